"""The frontier of issue 23: bits per entry against RULER, passkey and perplexity for every sub-4-bit setting.

    python eval/sub4bit_frontier.py

Reads what was already measured and runs nothing: the records of every ``hf-kvcache compare`` run under
``--results`` (``results.json`` and the bisection's files in ``eval/results/sub4bit/``), and every
``bits_per_entry*.json`` under ``--bits`` (``eval/bits_per_entry.py`` at 4096 tokens in bfloat16). A score
is a ratio to the ``full`` record of the same run and settings, so ratios are side by side. Where a setting
was measured more than once, the run with the most trials (RULER, passkey) or tokens (perplexity) counts.
Writes ``frontier.md`` (one row per setting, sorted by bits, the RULER-against-bits frontier marked) and
``frontier.png`` (RULER and perplexity against bits, the uniform 2- and 4-bit caches marked as baselines).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hf_kvcache.registry import canonical_spec

HEADLINE = {"ruler": "ruler_score", "passkey": "accuracy", "perplexity": "perplexity"}
BASELINES = ("quantized:nbits=2", "quantized:nbits=4")


def run_size(record: dict) -> int:
    """How much a record measured: trials per cell (RULER, passkey) or tokens (perplexity)."""
    if record["metric"] == "perplexity":
        return record["values"]["num_tokens"]
    options = record["settings"]["options"]
    cells = len(options["lengths"]) * len(options.get("tasks", options.get("depths", [None])))
    return options["trials"] * cells


def reference_key(record: dict) -> str:
    settings = record["settings"]
    measured = settings["options"] if record["metric"] != "perplexity" else settings["max_tokens"]
    return json.dumps([record["metric"], measured], sort_keys=True)


def ratios(results_dir: Path) -> dict[str, dict[str, tuple[float, int]]]:
    """``{canonical spec: {metric: (ratio to full, run size)}}``, the largest run of each."""
    best: dict[str, dict[str, tuple[float, int]]] = {}
    for path in sorted(results_dir.rglob("*.json")):
        report = json.loads(path.read_text())
        if not isinstance(report, dict) or "records" not in report:
            continue
        records = [r for r in report["records"] if r["metric"] in HEADLINE]
        full = {reference_key(r): r for r in records if r["strategy"] == "full"}
        for record in records:
            reference = full.get(reference_key(record))
            if record["strategy"] == "full" or reference is None:
                continue
            field = HEADLINE[record["metric"]]
            ratio = record["values"][field] / reference["values"][field]
            size = run_size(record)
            metrics = best.setdefault(canonical_spec(record["strategy"]), {})
            if record["metric"] not in metrics or size > metrics[record["metric"]][1]:
                metrics[record["metric"]] = (ratio, size)
    return best


def bits_per_entry(bits_dir: Path) -> dict[str, tuple[float, str]]:
    """``{canonical spec: (bits per entry, spec as written)}`` from the 4096-token bfloat16 counts."""
    found = {}
    for path in sorted(bits_dir.glob("bits_per_entry*.json")):
        report = json.loads(path.read_text())
        if report["settings"]["tokens"] != 4096 or report["settings"]["dtype"] != "bfloat16":
            continue
        for row in report["rows"]:
            if row["spec"] != "full":
                found[canonical_spec(row["spec"])] = (row["bits_per_entry"], row["spec"])
    return found


def frontier_rows(results_dir: Path, bits_dir: Path) -> list[dict]:
    """One row per setting that has its bits and a RULER or perplexity ratio, sorted by bits; ``frontier``
    marks the rows no cheaper setting matches on RULER."""
    scores = ratios(results_dir)
    rows = []
    for canonical, (bits, written) in bits_per_entry(bits_dir).items():
        measured = scores.get(canonical, {})
        if "ruler" in measured or "perplexity" in measured:
            rows.append({"spec": written, "bits": bits, **measured})
    rows.sort(key=lambda row: (row["bits"], -row.get("ruler", (0.0, 0))[0]))
    on_frontier = {id(row) for row in frontier(rows, "ruler", higher_is_better=True)}
    for row in rows:
        row["frontier"] = id(row) in on_frontier
    return rows


def frontier(rows: list[dict], metric: str, higher_is_better: bool) -> list[dict]:
    """The rows (sorted by bits) that score better on ``metric`` than every cheaper row with a score."""
    sign = 1.0 if higher_is_better else -1.0
    edge, best = [], float("-inf")
    for row in rows:
        if metric in row and sign * row[metric][0] > best:
            edge.append(row)
            best = sign * row[metric][0]
    return edge


def short(spec: str) -> str:
    """A calibration file by its name alone, so a row stays readable."""
    named = "calibration="
    parts = [named + Path(p[len(named) :]).name if p.startswith(named) else p for p in spec.split(",")]
    return ",".join(parts)


def markdown(rows: list[dict]) -> str:
    def cell(row: dict, metric: str, unit: str, digits: int) -> str:
        if metric not in row:
            return ""
        ratio, size = row[metric]
        return f"{ratio:.{digits}f} ({size} {unit})"

    lines = [
        "| setting | bits / entry at 4k | RULER ÷ full | passkey ÷ full | perplexity × full "
        "| on the RULER frontier |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        name = f"`{short(row['spec'])}`" + (" (baseline)" if row["spec"] in BASELINES else "")
        lines.append(
            f"| {name} | {row['bits']:.2f} | {cell(row, 'ruler', 'prompts', 2)} | "
            f"{cell(row, 'passkey', 'prompts', 2)} | {cell(row, 'perplexity', 'tokens', 3)} | "
            f"{'yes' if row['frontier'] else ''} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for axis, metric in ((left, "ruler"), (right, "perplexity")):
        points = [row for row in rows if metric in row]
        axis.scatter([r["bits"] for r in points], [r[metric][0] for r in points], s=18, label="a setting")
        for row in points:
            if row["spec"] in BASELINES:
                square = {"s": 70, "marker": "s", "facecolors": "none", "edgecolors": "red"}
                axis.scatter(row["bits"], row[metric][0], **square)
                axis.annotate(row["spec"].split(":")[1], (row["bits"], row[metric][0]), fontsize=8)
        axis.axhline(1.0, color="grey", linestyle="--", label="full cache")
        axis.set_xlabel("bits per entry at 4k tokens (bf16)")
    edge = frontier(rows, "ruler", higher_is_better=True)
    left.step(
        [r["bits"] for r in edge], [r["ruler"][0] for r in edge], where="post", color="C1", label="frontier"
    )
    left.axhline(0.95, color="C2", linestyle=":", label="95 % of full")
    left.set_ylabel("RULER mean ÷ full cache")
    edge = frontier(rows, "perplexity", higher_is_better=False)
    right.step([r["bits"] for r in edge], [r["perplexity"][0] for r in edge], where="post", color="C1")
    right.axhline(1.01, color="C2", linestyle=":", label="1.01× full")
    right.set_ylabel("perplexity × full cache")
    left.legend(fontsize=8)
    right.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out, dpi=120)
    plt.close(figure)


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--results", type=Path, default=Path("eval/results/sub4bit"))
    parser.add_argument("--bits", type=Path, default=Path("eval/results"))
    parser.add_argument("--out", type=Path, default=Path("eval/results/sub4bit"))
    args = parser.parse_args()
    rows = frontier_rows(args.results, args.bits)
    table = markdown(rows)
    (args.out / "frontier.md").write_text(table)
    plot(rows, args.out / "frontier.png")
    print(table)


if __name__ == "__main__":
    main()
