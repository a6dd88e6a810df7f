"""Turn ``results.json`` records into a CSV, a markdown table and PNG plots."""

from __future__ import annotations

import csv
from pathlib import Path


def summarize(records: list[dict]) -> list[dict]:
    """One row per strategy, in the order strategies first appear, with the headline figure of each metric."""
    rows: dict[str, dict] = {}
    for record in records:
        row = rows.setdefault(record["strategy"], {"strategy": record["strategy"], "spec": record["spec"]})
        values, metric = record["values"], record["metric"]
        if metric == "perplexity":
            row["perplexity"] = values["perplexity"]
        elif metric == "memory":
            row["cache_bytes"] = values["cache_bytes"]
            row["cache_ratio"] = values["ratio_to_full"]
            row["peak_memory_bytes"] = values["peak_memory_bytes"]
        elif metric == "speed":
            row["prefill_tokens_per_s"] = values["prefill_tokens_per_s"]
            row["decode_tokens_per_s"] = values["decode_tokens_per_s"]
        elif metric == "passkey":
            row["passkey_accuracy"] = values["accuracy"]
    full = next((r for r in rows.values() if r["strategy"] == "full"), None)
    for row in rows.values():
        if full and "perplexity" in full and "perplexity" in row:
            row["perplexity_ratio"] = row["perplexity"] / full["perplexity"]
    return list(rows.values())


COLUMNS = [
    ("spec", "strategy", "{}"),
    ("perplexity", "perplexity", "{:.3f}"),
    ("perplexity_ratio", "× full", "{:.3f}"),
    ("cache_bytes", "cache MiB", None),
    ("cache_ratio", "× full", "{:.3f}"),
    ("prefill_tokens_per_s", "prefill tok/s", "{:.1f}"),
    ("decode_tokens_per_s", "decode tok/s", "{:.2f}"),
    ("passkey_accuracy", "passkey", "{:.0%}"),
]


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(title for _, title, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = []
        for key, _, fmt in COLUMNS:
            if key not in row:
                cells.append("–")
            elif fmt is None:
                cells.append(f"{row[key] / 2**20:.2f}")
            else:
                cells.append(fmt.format(row[key]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_reports(records: list[dict], out_dir: str | Path) -> list[Path]:
    """Write ``results.csv``, ``results.md`` and the plots next to ``results.json``; return the paths."""
    out = Path(out_dir)
    rows = summarize(records)
    keys = sorted({key for row in rows for key in row})
    with open(out / "results.csv", "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    header = ""
    if records:
        env = records[0]["environment"]
        header = f"Model {env['model']}, {env['dtype']} on {env['device']} ({env['hardware']}).\n\n"
    (out / "results.md").write_text(header + markdown_table(rows))
    return [out / "results.csv", out / "results.md", *write_plots(records, rows, out)]


def write_plots(records: list[dict], rows: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    quality = [r for r in rows if "perplexity" in r and "cache_ratio" in r]
    if quality:
        from matplotlib.ticker import ScalarFormatter

        figure, axis = plt.subplots(figsize=(7, 5))
        # Strategies at the same budget sit on top of each other, so a legend names them, not labels.
        markers = "osD^vP*Xhp"
        for index, row in enumerate(quality):
            axis.scatter(
                row["cache_ratio"], row["perplexity"], s=50, marker=markers[index % len(markers)],
                label=row["spec"], alpha=0.85,
            )  # fmt: skip
        # Perplexity is exp(mean NLL): a log axis keeps a bad outlier from flattening the rest.
        axis.set_yscale("log")
        axis.yaxis.set_major_formatter(ScalarFormatter())
        axis.yaxis.set_minor_formatter(ScalarFormatter())
        axis.tick_params(axis="y", which="minor", labelsize=7)
        axis.set_xlim(0, 1.05)
        axis.set_xlabel("cache bytes / full cache bytes")
        axis.set_ylabel("perplexity, log scale (lower is better)")
        axis.set_title("Quality against cache memory")
        axis.grid(alpha=0.3, which="both")
        axis.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, frameon=False)
        figure.tight_layout()
        figure.savefig(out / "pareto.png", dpi=120, bbox_inches="tight")
        plt.close(figure)
        written.append(out / "pareto.png")
    speed = [r for r in rows if "decode_tokens_per_s" in r]
    if speed:
        figure, axis = plt.subplots(figsize=(7, 4))
        axis.barh([r["spec"] for r in speed], [r["decode_tokens_per_s"] for r in speed])
        axis.set_xlabel("decode tokens/s")
        axis.invert_yaxis()
        axis.tick_params(axis="y", labelsize=7)
        figure.tight_layout()
        figure.savefig(out / "decode_speed.png", dpi=120)
        plt.close(figure)
        written.append(out / "decode_speed.png")
    passkey = [r for r in records if r["metric"] == "passkey"]
    if passkey:
        columns = [(c["length"], c["depth"]) for c in passkey[0]["values"]["cells"]]
        grid = [[c["correct"] / c["trials"] for c in r["values"]["cells"]] for r in passkey]
        figure, axis = plt.subplots(figsize=(4 + 0.6 * len(columns), 1.5 + 0.45 * len(passkey)))
        axis.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        axis.set_xticks(range(len(columns)), [f"{n}\n{d:.0%}" for n, d in columns], fontsize=7)
        axis.set_yticks(range(len(passkey)), [r["spec"] for r in passkey], fontsize=7)
        axis.set_xlabel("prompt tokens / needle depth")
        axis.set_title("Passkey retrieval accuracy")
        figure.tight_layout()
        figure.savefig(out / "passkey.png", dpi=120)
        plt.close(figure)
        written.append(out / "passkey.png")
    return written
