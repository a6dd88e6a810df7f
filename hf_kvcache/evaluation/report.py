"""Turn ``results.json`` records into a CSV, a markdown table and PNG plots, as each metric declares them."""

from __future__ import annotations

import csv
from pathlib import Path

from hf_kvcache.evaluation.metric import Column, get_metric, list_metrics


def summarize(records: list[dict]) -> list[dict]:
    """One row per strategy, in the order strategies first appear, with each metric's headline figures."""
    rows: dict[str, dict] = {}
    for record in records:
        row = rows.setdefault(record["strategy"], {"strategy": record["strategy"], "spec": record["spec"]})
        row.update(get_metric(record["metric"])().headline(record["values"]))
    result = list(rows.values())
    for name in metrics_in(records):
        get_metric(name)().finish_rows(result)
    return result


def metrics_in(records: list[dict]) -> list[str]:
    """The metrics present in ``records``, in registration order."""
    present = {r["metric"] for r in records}
    return [name for name in list_metrics() if name in present]


def table_columns(records: list[dict]) -> list[Column]:
    """The strategy column, then the columns of every metric present, in registration order."""
    return [Column("spec", "strategy", "{}")] + [
        c for n in metrics_in(records) for c in get_metric(n).columns
    ]


def markdown_table(rows: list[dict], columns: list[Column]) -> str:
    lines = ["| " + " | ".join(c.title for c in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for column in columns:
            if column.key not in row:
                cells.append("–")
            elif column.format == "mib":
                cells.append(f"{row[column.key] / 2**20:.2f}")
            else:
                cells.append(column.format.format(row[column.key]))
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
    frontier = ", ".join(f"`{r['spec']}`" for r in pareto_frontier(rows))
    footer = f"\nPareto frontier (perplexity against cache memory): {frontier}.\n" if frontier else ""
    (out / "results.md").write_text(header + markdown_table(rows, table_columns(records)) + footer)
    return [out / "results.csv", out / "results.md", *write_plots(records, rows, out)]


def write_plots(records: list[dict], rows: list[dict], out: Path) -> list[Path]:
    """The Pareto plot of perplexity against memory, then each metric's own plots."""
    import matplotlib

    matplotlib.use("Agg")
    written = write_pareto_plot(rows, out)
    for name in metrics_in(records):
        written += get_metric(name)().plots([r for r in records if r["metric"] == name], out)
    return written


def pareto_frontier(rows: list[dict]) -> list[dict]:
    """The rows no other row beats on both memory (``ratio_to_full``) and ``perplexity``, by memory ascending.

    A row is dominated when another holds no more memory and has no higher perplexity, and is strictly better
    on one of the two; of rows tied on both, the first stays.
    """
    quality = [r for r in rows if "perplexity" in r and "ratio_to_full" in r]
    frontier = []
    for row in sorted(quality, key=lambda r: (r["ratio_to_full"], r["perplexity"])):
        if not frontier or row["perplexity"] < frontier[-1]["perplexity"]:
            frontier.append(row)
    return frontier


def write_pareto_plot(rows: list[dict], out: Path) -> list[Path]:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    quality = [r for r in rows if "perplexity" in r and "ratio_to_full" in r]
    if not quality:
        return []
    figure, axis = plt.subplots(figsize=(7, 5))
    # Strategies at the same budget sit on top of each other, so a legend names them, not labels.
    markers = "osD^vP*Xhp"
    for index, row in enumerate(quality):
        axis.scatter(
            row["ratio_to_full"],
            row["perplexity"],
            s=50,
            marker=markers[index % len(markers)],
            label=spec_label(row["spec"], 60),
            alpha=0.85,
        )
    frontier = pareto_frontier(quality)
    axis.plot(
        [r["ratio_to_full"] for r in frontier],
        [r["perplexity"] for r in frontier],
        color="0.4",
        linewidth=1,
        linestyle="--",
        zorder=0,
        label="Pareto frontier (nothing beats these on both)",
    )
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
    return [save_figure(figure, out / "pareto.png")]


def spec_label(spec: str, width: int = 36) -> str:
    """A strategy spec wrapped onto lines of about ``width`` characters, after its commas and before a ``+``,
    so that long specs make tall labels rather than figures wider than a page."""
    lines, line = [], ""
    for piece in spec.replace("+", "\n+").replace(",", ",\n").split("\n"):
        if line and (piece.startswith("+") or len(line) + len(piece) > width):
            lines.append(line)
            line = ""
        line += piece
    return "\n".join([*lines, line])


def save_figure(figure, path: Path) -> Path:
    """Lay ``figure`` out, write it to ``path`` with the canvas grown to hold every label, title and legend
    whole (long strategy specs included), and close it."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    figure.savefig(path, dpi=120, bbox_inches="tight", pad_inches=0.1)
    plt.close(figure)
    return Path(path)
