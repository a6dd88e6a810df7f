"""Cost against context length: what each strategy holds, peaks at and spends per token as the prompt grows.

For every length and strategy: the bytes the cache holds after the prompt, the peak memory while it went in
(chunked prefill), prefill tokens/s and decode ms per token. Timings are medians of ``rounds`` runs
interleaved across the strategies of one length (all meet the same machine load), with min and max. Each
cost's growth exponent is the slope of a least-squares line through ``(log length, log cost)``: about 1 for a
cost that grows with the context, about 0 for one that does not.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from hf_kvcache.base import cache_nbytes
from hf_kvcache.evaluation.memory import PeakMemory, free_memory
from hf_kvcache.evaluation.orchestrator import DataSource, Job, Measured, RecordKey, run_job
from hf_kvcache.evaluation.records import fingerprint_of
from hf_kvcache.evaluation.report import save_figure, spec_label
from hf_kvcache.evaluation.speed import CompetingLoad, synchronize
from hf_kvcache.prefill import prefill
from hf_kvcache.registry import build_cache, canonical_spec

COSTS = ("held_bytes", "peak_memory_bytes", "prefill_seconds", "decode_ms_per_token")


@dataclass(frozen=True)
class ScaleSettings:
    """What ``hf-kvcache scale`` measures: prompt ``lengths`` (tokens, at least 64 each), timed ``rounds`` per
    strategy and length (at least 3), ``decode_tokens`` timed per round, ``chunk_size`` of the prefill."""

    lengths: tuple[int, ...] = (1024, 2048, 4096, 8192)
    rounds: int = 3
    decode_tokens: int = 8
    chunk_size: int = 512

    def __post_init__(self):
        if not self.lengths or any(not isinstance(n, int) or n < 64 for n in self.lengths):
            raise ValueError(
                f"scale lengths must be integers of at least 64 tokens, got {list(self.lengths)}"
            )
        if not isinstance(self.rounds, int) or self.rounds < 3:
            raise ValueError(
                f"scale rounds must be an integer of at least 3 (a median needs them), got {self.rounds!r}"
            )
        for name in ("decode_tokens", "chunk_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"scale {name} must be a positive integer, got {getattr(self, name)!r}")


def growth_exponent(lengths: list[int], costs: list[float]) -> float | None:
    """Slope of the least-squares line through ``(log length, log cost)``; ``None`` with fewer than two
    distinct lengths or a cost that is not positive."""
    if len(set(lengths)) < 2 or any(c <= 0 for c in costs):
        return None
    xs, ys = [math.log(n) for n in lengths], [math.log(c) for c in costs]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / spread


def check_lengths(model, lengths: tuple[int, ...], available_tokens: int, specs: list[str]) -> None:
    """Refuse lengths the corpus cannot fill, and lengths whose full cache would not fit in free memory."""
    too_long = [n for n in lengths if n > available_tokens]
    if too_long:
        raise ValueError(f"scale lengths {too_long} exceed the {available_tokens} tokens the text provides")
    if "full" not in specs:
        return
    from hf_kvcache.evaluation.harness import full_cache_bytes

    free = free_memory(model.device)
    needed = {n: full_cache_bytes(model, n) for n in lengths}
    over = [n for n, size in needed.items() if free is not None and size > free]
    if over:
        raise ValueError(
            f"scale lengths {over} need {needed[over[0]] / 2**30:.1f} GiB or more for the full cache, more "
            f"than the {free / 2**30:.1f} GiB free on {model.device}; drop 'full' or those lengths"
        )


def _spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "rounds": values}


@torch.no_grad()
def measure_length(
    model, ids: torch.Tensor, specs: list[str], settings: ScaleSettings, tick
) -> dict[str, dict]:
    """All costs of every strategy of ``specs`` for the prompt ``ids`` ``[1, L]``, in interleaved rounds."""
    ids, length = ids.to(model.device), ids.shape[1]
    runs = {spec: {"prefill_seconds": [], "peak_memory_bytes": []} for spec in specs}
    caches, tokens, held = {}, {}, {}
    for spec in specs:  # warm-up: lazy initialisation is not charged to round one
        prefill(model, ids[:, :64], build_cache(spec, model), chunk_size=settings.chunk_size)
    load = CompetingLoad().start()
    for _ in range(settings.rounds):
        for spec in specs:
            caches.pop(spec, None)  # the previous round's cache goes before the next one fills
            cache = build_cache(spec, model)
            with PeakMemory(model.device) as peak:
                synchronize(model.device)
                start = time.perf_counter()
                prefill(model, ids, cache, chunk_size=settings.chunk_size)
                logits = model(ids[:, -1:], past_key_values=cache, logits_to_keep=1).logits
                synchronize(model.device)
                runs[spec]["prefill_seconds"].append(time.perf_counter() - start)
            runs[spec]["peak_memory_bytes"].append(peak.growth)
            caches[spec], tokens[spec] = cache, logits[:, -1:].argmax(-1)
            held[spec] = cache_nbytes(cache)  # after the prompt, before the timed decode steps add to it
            tick(length)
    runs = {spec: {**run, "decode_ms_per_token": []} for spec, run in runs.items()}
    for _ in range(settings.rounds):
        for spec in specs:
            synchronize(model.device)
            start = time.perf_counter()
            for _ in range(settings.decode_tokens):
                logits = model(tokens[spec], past_key_values=caches[spec]).logits
                tokens[spec] = logits[:, -1:].argmax(-1)
            synchronize(model.device)
            runs[spec]["decode_ms_per_token"].append(
                1000 * (time.perf_counter() - start) / settings.decode_tokens
            )
    load.stop()
    results = {}
    for spec, run in runs.items():
        values = {"length": length, "held_bytes": held[spec], "peak_memory_kind": peak.kind}
        values["other_load_cores"] = load.cores
        values.update({name: _spread(series) for name, series in run.items()})
        values["prefill_tokens_per_s"] = length / values["prefill_seconds"]["median"]
        results[spec] = values
    return results


def exponents(records: list[dict]) -> dict[str, dict[str, float | None]]:
    """Each strategy's growth exponent of every cost in :data:`COSTS`, from its records at several lengths."""
    by_strategy: dict[str, list[dict]] = {}
    for record in records:
        by_strategy.setdefault(record["spec"], []).append(record["values"])
    result = {}
    for spec, values in by_strategy.items():
        values = sorted(values, key=lambda v: v["length"])
        lengths = [v["length"] for v in values]
        costs = {name: [_median(v[name]) for v in values] for name in COSTS}
        result[spec] = {name: growth_exponent(lengths, series) for name, series in costs.items()}
    return result


def _median(value) -> float:
    return value["median"] if isinstance(value, dict) else value


def scale_table(records: list[dict]) -> str:
    """Markdown: one row per (strategy, length), then the growth exponents per strategy."""
    lines = [
        "| strategy | tokens | held MiB | peak MiB | prefill tok/s | decode ms/token (min–max) |",
        "|---|---|---|---|---|---|",
    ]
    for record in sorted(records, key=lambda r: (r["values"]["length"], r["spec"])):
        v = record["values"]
        decode = v["decode_ms_per_token"]
        lines.append(
            f"| {record['spec']} | {v['length']} | {v['held_bytes'] / 2**20:.2f} | "
            f"{_median(v['peak_memory_bytes']) / 2**20:.1f} | {v['prefill_tokens_per_s']:.1f} | "
            f"{decode['median']:.1f} ({decode['min']:.1f}–{decode['max']:.1f}) |"
        )
    lines += [
        "",
        "| strategy | growth exponent: held | peak | prefill time | decode per token |",
        "|---|---|---|---|---|",
    ]
    for spec, growth in exponents(records).items():
        cells = ["–" if growth[name] is None else f"{growth[name]:.2f}" for name in COSTS]
        lines.append(f"| {spec} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_scale_plot(records: list[dict], out: Path) -> Path:
    """``scale.png``: held bytes and decode ms/token against context length, log-log, a line per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (memory, decode) = plt.subplots(1, 2, figsize=(12, 4.5))
    growth = exponents(records)
    for spec in dict.fromkeys(r["spec"] for r in records):
        values = sorted((r["values"] for r in records if r["spec"] == spec), key=lambda v: v["length"])
        lengths = [v["length"] for v in values]
        exponent = growth[spec]["held_bytes"]
        label = spec if exponent is None else f"{spec} (held ∝ L^{exponent:.2f})"
        memory.plot(
            lengths, [v["held_bytes"] / 2**20 for v in values], marker="o", label=spec_label(label, 60)
        )
        medians = [v["decode_ms_per_token"]["median"] for v in values]
        low = [m - v["decode_ms_per_token"]["min"] for m, v in zip(medians, values, strict=True)]
        high = [v["decode_ms_per_token"]["max"] - m for m, v in zip(medians, values, strict=True)]
        decode.errorbar(lengths, medians, yerr=[low, high], marker="o", capsize=3, label=spec_label(spec, 60))
    for axis, title in (
        (memory, "cache bytes held (MiB)"),
        (decode, "decode ms per token (median, min-max)"),
    ):
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("context length (tokens)")
        axis.set_title(title)
        axis.grid(alpha=0.3, which="both")
    memory.legend(fontsize=6)
    return save_figure(figure, Path(out) / "scale.png")


def settings_record(settings: ScaleSettings, source: DataSource, length: int) -> dict:
    """What a record at ``length`` depends on (its fingerprint is a hash of this)."""
    own = dataclasses.asdict(settings)
    own.pop("lengths")
    return {**dataclasses.asdict(source), **own, "length": length}


class ScaleJob(Job):
    """``scale`` as an orchestrator job: a record per (strategy, length); a unit is one length, all its
    pending strategies measured together in interleaved rounds."""

    label = "scale"

    def __init__(self, strategies: list[str], source: DataSource, settings: ScaleSettings):
        self.settings, self.strategies = settings, strategies
        self.canonical = {spec: canonical_spec(spec) for spec in strategies}  # validates every spec first
        self.written = {canonical: spec for spec, canonical in self.canonical.items()}
        self.recorded = {n: settings_record(settings, source, n) for n in settings.lengths}
        self.lengths = {fingerprint_of(record): n for n, record in self.recorded.items()}

    def wanted(self) -> list[RecordKey]:
        fingerprints = {n: fingerprint_of(record) for n, record in self.recorded.items()}
        strategies = dict.fromkeys(self.canonical.values())
        return [(spec, "scale", fingerprints[n]) for n in sorted(self.recorded) for spec in strategies]

    def units(self, pending: list[RecordKey]) -> list[list[RecordKey]]:
        by_length: dict[str, list[RecordKey]] = {}
        for key in pending:
            by_length.setdefault(key[2], []).append(key)
        return list(by_length.values())

    def prepare(self, model, tokenizer, text: str) -> None:
        from hf_kvcache.evaluation.corpus import corpus_token_ids

        self.model = model
        self.ids = corpus_token_ids(tokenizer, text, max(self.settings.lengths))
        check_lengths(model, self.settings.lengths, self.ids.shape[1], self.strategies)

    def work(self, unit: list[RecordKey]) -> int:
        return self.lengths[unit[0][2]] * len(unit) * self.settings.rounds

    def describe(self, unit: list[RecordKey]) -> str:
        return f"{self.lengths[unit[0][2]]} tokens"

    def measure(self, unit: list[RecordKey], tick) -> list[Measured]:
        length, fingerprint = self.lengths[unit[0][2]], unit[0][2]
        specs = [self.written[strategy] for strategy, _, _ in unit]
        results = measure_length(self.model, self.ids[:, :length], specs, self.settings, tick)
        return [
            Measured((self.canonical[spec], "scale", fingerprint), spec, values, self.recorded[length])
            for spec, values in results.items()
        ]


def run_scale(
    strategies: list[str],
    source: DataSource,
    settings: ScaleSettings,
    out_dir: str | Path,
    force: bool = False,
    device_map: str | None = None,
    progress: bool = True,
) -> list[dict]:
    """Measure every strategy at every length; records land in ``out_dir/results.json``, one per (strategy,
    length), saved as each length finishes, and reused on a rerun with the same settings unless ``force``."""
    return run_job(ScaleJob(strategies, source, settings), source, out_dir, force, device_map, progress)
