"""How far noise can move a retrieval score: paired bootstrap intervals of one strategy's score as a
fraction of another's.

A retrieval metric (``ruler``, ``passkey``) keeps in each cell of its values ``scores``, one per trial in seed
order. Every strategy meets the same seeded prompts, so trial ``i`` of a cell pairs across strategies, and
resampling the same trials for both cancels what the prompts share (a hard prompt is hard for both).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

BOOTSTRAP_RESAMPLES = 4000


def paired_ratio_interval(
    reference: list[dict], cells: list[dict], cell_key: tuple[str, ...] = ("task", "length"), seed: int = 0
) -> tuple[float, float] | None:
    """A 95 % paired bootstrap interval of ``mean(cells) / mean(reference)``, means of the cells' mean scores.

    Args:
        reference: the cells of the strategy divided by, each with ``scores`` (one per trial).
        cells: the cells of the other strategy, the same cells with as many trials each.
        cell_key: the fields that name a cell. Default ``("task", "length")`` (ruler; passkey's are
            ``("length", "depth")``).
        seed: of the resampling. Default 0.

    Each resample draws trials with replacement within every cell, the same trials for both. ``None`` where a
    cell lacks per-trial scores (records written before they were kept), or the cells or trial counts differ.
    """
    by_cell = {tuple(c[name] for name in cell_key): c.get("scores") for c in reference}
    pairs = [(by_cell.get(tuple(c[name] for name in cell_key)), c.get("scores")) for c in cells]
    if len(pairs) != len(by_cell) or any(a is None or b is None or len(a) != len(b) for a, b in pairs):
        return None
    generator = torch.Generator().manual_seed(seed)
    reference_sum, sums = torch.zeros(BOOTSTRAP_RESAMPLES), torch.zeros(BOOTSTRAP_RESAMPLES)
    for reference_scores, scores in pairs:
        drawn = torch.randint(len(scores), (BOOTSTRAP_RESAMPLES, len(scores)), generator=generator)
        reference_sum += torch.tensor(reference_scores, dtype=torch.float64)[drawn].mean(1).float()
        sums += torch.tensor(scores, dtype=torch.float64)[drawn].mean(1).float()
    ratios = (sums / reference_sum)[reference_sum > 0]
    if not len(ratios):
        return None
    low, high = torch.quantile(ratios, torch.tensor([0.025, 0.975])).tolist()
    return low, high


def ratio_table(
    records: list[dict], score: Callable[[dict], float], cell_key: tuple[str, ...], what: str
) -> str:
    """Markdown: each record's ``score(values)`` as a fraction of the reference's (``full`` if it was run,
    else the first record), with the interval of :func:`paired_ratio_interval`; empty for fewer than two
    records.

    Args:
        records: ``results.json`` records of one metric.
        score: a record's headline score from its ``values``, the mean of its cells' mean scores.
        cell_key: the fields that name a cell, as in :func:`paired_ratio_interval`.
        what: the score's name in the text (e.g. ``"RULER mean"``).
    """
    if len(records) < 2:
        return ""
    reference = next((r for r in records if r["spec"] == "full"), records[0])
    reference_score = score(reference["values"])
    lines = [
        "",
        f"Against `{reference['spec']}`: the {what} as a fraction of its {what}, with a 95 % paired "
        f"bootstrap interval ({BOOTSTRAP_RESAMPLES} resamples of the trials within each cell, the same "
        "trials for both; – where the records hold no per-trial scores).",
        "",
        "| strategy | ÷ reference | 95 % interval |",
        "|---|---|---|",
    ]
    for record in records:
        if record is reference:
            continue
        value = score(record["values"])
        ratio = f"{value / reference_score:.2f}" if reference_score else "– (the reference scored 0)"
        interval = paired_ratio_interval(reference["values"]["cells"], record["values"]["cells"], cell_key)
        shown = f"{interval[0]:.2f}-{interval[1]:.2f}" if interval else "–"
        lines.append(f"| `{record['spec']}` | {ratio} | {shown} |")
    return "\n".join(lines) + "\n"
