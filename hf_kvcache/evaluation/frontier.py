"""``hf-kvcache frontier``: retrieval against bytes held, one line per strategy family.

Each family (an eviction strategy, or one composed with 4-bit storage) is swept over budgets given as
fractions of the context (``--ratios``), so that every family is compared at the bytes it really holds: each
point's bytes are what its cache holds once the context is in (``cache_nbytes``, averaged over the RULER
prompts), divided by what the full cache holds for the same prompts in the same run. Its score is the RULER
metric's (:mod:`.ruler`), under one protocol or both (``compress-first``: the context is compressed, then the
question is appended; ``question-inside``: the question ends the compressed prompt), and its perplexity is
the continuation metric's (:mod:`.continuation`: the text after a context of the longest ``--lengths``,
compressed first) as a ratio to the full cache's. The records go to
``results.json`` through the same orchestrator as ``compare`` (resumable, split across processes with
accelerate); ``frontier.md`` and ``frontier.png`` are drawn from them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from hf_kvcache.registry import canonical_spec, parse_spec

DEFAULT_FAMILIES = (
    "sliding-window",
    "heavy-hitter",
    "tova",
    "snapkv",
    "knorm:recent=16",
    "expected-attention",
    "expected-attention:head_budgets=adaptive",
    "kvzip",
    "sliding-window+quantized",
    "expected-attention+quantized",
    "kvzip+quantized:nbits=4,rotation=hadamard",
)
DEFAULT_RATIOS = (0.5, 0.25, 0.125, 0.0625)
# The options that hold a family's budget, split evenly between them; otherwise ``budget``.
FRACTION_OPTIONS = {"sliding-window": ("window_length",), "heavy-hitter": ("heavy_budget", "recent_budget")}
STORAGE = "quantized:nbits=4"


def check_ratios(ratios) -> tuple[float, ...]:
    """The ratios as floats, each strictly between 0 and 1; a ``ValueError`` names the first that is not."""
    if not ratios:
        raise ValueError("frontier needs at least one ratio, e.g. --ratios 0.25 0.125")
    for ratio in ratios:
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
            raise ValueError(f"ratio {ratio!r} must be a fraction of the context strictly between 0 and 1")
    return tuple(float(r) for r in ratios)


def family_spec(family: str, ratio: float) -> str:
    """The spec of ``family`` (a strategy name or spec, optionally ``+quantized[:...]``) holding ``ratio`` of
    the context; a ``ValueError`` when the family has no budget that a ratio can set."""
    eviction, _, storage = family.partition("+")
    strategy, options = parse_spec(eviction)
    fields = {f.name for f in dataclasses.fields(options)}
    names = FRACTION_OPTIONS.get(strategy.name, ("budget",))
    if not set(names) <= fields:
        raise ValueError(
            f"{family!r} has no budget that a fraction of the context can set (it keeps "
            f"{'everything' if strategy.name == 'full' else 'every token, compressed'}); frontier sweeps "
            "eviction strategies and their compositions"
        )
    share = ratio / len(names)
    settings = ",".join(f"{name}={share!r}" for name in names)
    spec = f"{eviction}{',' if ':' in eviction else ':'}{settings}"
    if storage:
        spec += "+" + (STORAGE if storage == "quantized" else storage)
    return canonical_spec(spec)


def frontier_points(families, ratios) -> tuple[list[tuple[str, float, str]], list[str]]:
    """``(family, ratio, spec)`` for every family and ratio that can be swept, and a message per family
    skipped."""
    points, skipped = [], []
    for family in families:
        try:
            points += [(family, ratio, family_spec(family, ratio)) for ratio in ratios]
        except ValueError as error:
            skipped.append(f"frontier skips {family}: {error}")
    return points, skipped


def point_values(records: list[dict], points, fingerprint: str) -> tuple[dict, list[dict]]:
    """The full cache's ruler values and, per point, its bytes as a fraction of the full cache's and its
    ruler values, from the ruler records of one run's settings (``fingerprint``)."""
    by_spec = {
        r["strategy"]: r["values"]
        for r in records
        if r["metric"] == "ruler" and r["fingerprint"] == fingerprint
    }
    full = by_spec.get("full")
    if full is None:
        raise ValueError("no ruler record of the full cache under these settings: it is the reference")
    full_bytes = sum(c["held_bytes"] for c in full["cells"])
    rows = []
    for family, ratio, spec in points:
        values = by_spec.get(spec)
        if values is not None:
            held = sum(c["held_bytes"] for c in values["cells"]) / full_bytes
            rows.append({"family": family, "ratio": ratio, "spec": spec, "bytes": held, **values})
    return full, rows


def continuation_ratios(records: list[dict], fingerprint: str | None) -> dict[str, float]:
    """Each strategy's continuation perplexity as a ratio to the full cache's, from one run's records."""
    by_spec = {
        r["strategy"]: r["values"]["continuation_perplexity"]
        for r in records
        if r["metric"] == "continuation" and r["fingerprint"] == fingerprint
    }
    full = by_spec.get("full")
    return {spec: value / full for spec, value in by_spec.items()} if full else {}


def frontier_markdown(full: dict, rows: list[dict], protocol: str, ratios, perplexity=None) -> str:
    """A table of every point (ratio, bytes held, score, score against full, continuation perplexity against
    full's where ``perplexity`` maps its spec to one) and the frontier: the best score at or below each byte
    fraction, and who holds it."""
    score, perplexity = full["ruler_score"], perplexity or {}
    lines = [
        f"### {protocol}: full cache {score:.0%}",
        "",
        "| family | ratio | bytes of full | RULER score | of full | continuation perplexity × full |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        of_full = row["ruler_score"] / score if score else float("nan")
        cells = [row["family"], f"{row['ratio']:g}", f"{row['bytes']:.3f}", f"{row['ruler_score']:.0%}"]
        ratio = perplexity.get(row["spec"])
        cells += [f"{of_full:.0%}", "-" if ratio is None else f"{ratio:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| bytes held at most | best score | of full | by |", "|---|---|---|---|"]
    for limit in sorted(ratios, reverse=True):
        within = [row for row in rows if row["bytes"] <= limit]
        if within:
            best = max(within, key=lambda row: row["ruler_score"])
            of_full = best["ruler_score"] / score if score else float("nan")
            lines.append(f"| {limit:g} | {best['ruler_score']:.0%} | {of_full:.0%} | `{best['spec']}` |")
        else:
            lines.append(f"| {limit:g} | - | - | no point holds that little |")
    return "\n".join(lines) + "\n"


def write_frontier(records: list[dict], points, fingerprints: dict, ratios, out: str | Path) -> list[Path]:
    """``frontier.md`` (a table per protocol) and ``frontier.png`` (a panel per protocol: score against bytes
    held, log-scale x, a line per family, the full cache as a horizontal line) in ``out``; ``fingerprints``
    maps each protocol to the fingerprint of its ruler records, and ``"continuation"`` to that of the
    continuation perplexity records."""
    import matplotlib.pyplot as plt

    from hf_kvcache.evaluation.report import save_figure

    out = Path(out)
    text = []
    perplexity = continuation_ratios(records, fingerprints.get("continuation"))
    protocols = {name: value for name, value in fingerprints.items() if name != "continuation"}
    figure, axes = plt.subplots(1, len(protocols), figsize=(6 * len(protocols), 4.5), squeeze=False)
    for axis, (protocol, fingerprint) in zip(axes[0], protocols.items(), strict=True):
        full, rows = point_values(records, points, fingerprint)
        text.append(frontier_markdown(full, rows, protocol, ratios, perplexity))
        for family in dict.fromkeys(row["family"] for row in rows):
            own = sorted((row for row in rows if row["family"] == family), key=lambda row: row["bytes"])
            axis.plot([r["bytes"] for r in own], [r["ruler_score"] for r in own], marker="o", label=family)
        axis.axhline(full["ruler_score"], color="black", linestyle="--", label="full cache")
        axis.set_xscale("log")
        axis.set(xlabel="bytes held / full cache's", ylabel="RULER score", title=protocol)
        axis.legend(fontsize=7)
    (out / "frontier.md").write_text("\n".join(text))
    return [out / "frontier.md", save_figure(figure, out / "frontier.png")]


def run_frontier(
    families, ratios, protocols, ruler_options: dict, source: dict, out, force=False, device_map=None
) -> list[Path]:
    """Measure the RULER score and bytes of every point of every family (and of the full cache) under each of
    ``protocols``, records in ``out/results.json``, then write the frontier. ``ruler_options``: the other
    :class:`~.ruler.RulerOptions` (tasks, lengths, trials); ``source``: the
    :class:`~.harness.CompareSettings` fields that name the model and data."""
    from hf_kvcache.evaluation.continuation import ContinuationOptions
    from hf_kvcache.evaluation.distributed import Workers
    from hf_kvcache.evaluation.harness import CompareSettings, run_compare
    from hf_kvcache.evaluation.ruler import RulerOptions

    ratios = check_ratios(ratios)
    points, skipped = frontier_points(families, ratios)
    for message in skipped:
        print(message)
    if not points:
        raise ValueError(f"no family of {list(families)} can be swept over a fraction of the context")
    specs = ["full", *dict.fromkeys(spec for _, _, spec in points)]
    records, fingerprints = [], {}
    for protocol in protocols:
        options = RulerOptions(protocol=protocol, **ruler_options)
        settings = CompareSettings(**source, metrics=("ruler",), metric_options={"ruler": options})
        records += run_compare(specs, settings, out, force=force, device_map=device_map)
        fingerprints[protocol] = settings.fingerprint("ruler")
    # Perplexity of the text after a context of the longest length, compressed as under compress-first.
    continuation = ContinuationOptions(context=max(options.lengths))
    settings = CompareSettings(
        **source, metrics=("continuation",), metric_options={"continuation": continuation}
    )
    records += run_compare(specs, settings, out, force=force, device_map=device_map)
    fingerprints["continuation"] = settings.fingerprint("continuation")
    # Under accelerate, the main process alone holds every record and writes.
    return write_frontier(records, points, fingerprints, ratios, out) if Workers().is_main else []
