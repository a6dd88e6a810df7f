"""Prefill and decode throughput of a model with a given cache: warm up, synchronize, then time."""

from __future__ import annotations

import os
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import Cache, PreTrainedModel

from hf_kvcache.evaluation.metric import Column, Metric, register_metric
from hf_kvcache.evaluation.report import save_figure, spec_label


@dataclass(frozen=True)
class SpeedResult:
    """Throughput of one run: ``prefill_tokens`` of prompt, then ``decode_tokens`` greedy decoding steps."""

    prefill_tokens: int
    prefill_tokens_per_s: float
    decode_tokens: int
    decode_tokens_per_s: float
    decode_ms_per_token: float


class CompetingLoad:
    """Measures how many CPU cores other processes kept busy while the ``with`` block ran.

    A timing taken while other processes compete for the cores is slower and scatters more; records carry this
    figure (``other_load_cores``) so that a slow or unstable figure says why. It counts the busy time (user,
    system, interrupts and hypervisor steal) of the CPUs this process may run on, from Linux's ``/proc/stat``,
    less this process's own CPU time; elsewhere ``cores`` is ``None``. Above ``warn_fraction`` of those CPUs
    (default 0.25) it warns.
    """

    def __init__(self, warn_fraction: float = 0.25):
        self.warn_fraction, self.cores = warn_fraction, None

    def start(self) -> CompetingLoad:
        self._start = _cpu_counters()
        return self

    def stop(self) -> float | None:
        """End the measurement; return (and keep in ``cores``) the cores other processes kept busy."""
        end = _cpu_counters()
        if self._start is None or end is None or end[2] <= self._start[2]:
            return None
        busy, own, wall = (after - before for after, before in zip(end, self._start, strict=True))
        self.cores = max(0.0, (busy - own) / wall)
        available = len(os.sched_getaffinity(0))
        if self.cores > self.warn_fraction * available:
            warnings.warn(
                f"other processes kept {self.cores:.1f} of this process's {available} CPU cores busy while "
                "it was timing: the timings are slower and less repeatable than on a quiet machine",
                stacklevel=2,
            )
        return self.cores

    def __enter__(self) -> CompetingLoad:
        return self.start()

    def __exit__(self, exc_type, *exc_info) -> None:
        if exc_type is None:
            self.stop()


def _cpu_counters() -> tuple[float, float, float] | None:
    """(busy seconds of this process's CPUs, this process's CPU seconds, monotonic seconds), or None."""
    try:
        with open("/proc/stat") as stream:
            lines = stream.read().splitlines()
        mine = {f"cpu{index}" for index in os.sched_getaffinity(0)}
    except (OSError, AttributeError):
        return None
    ticks_per_s = os.sysconf("SC_CLK_TCK")
    busy = 0
    for line in lines:
        name, *fields = line.split()
        if name in mine:  # user nice system idle iowait irq softirq steal
            busy += sum(int(fields[i]) for i in (0, 1, 2, 5, 6, 7))
    own = os.times()
    return busy / ticks_per_s, own.user + own.system, time.monotonic()


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so that a timer reads the time the work took."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure_speed(
    model: PreTrainedModel,
    prompt_ids: torch.Tensor,
    make_cache: Callable[[], Cache],
    decode_tokens: int = 32,
    prefill_chunk_size: int | None = None,
    warmup_tokens: int = 4,
) -> SpeedResult:
    """Time a prefill of ``prompt_ids`` ``[1, T]`` and ``decode_tokens`` greedy decode steps.

    Args:
        model: a causal LM.
        prompt_ids: the prompt, ``[1, T]``.
        make_cache: returns a fresh cache; called once for warm-up and once for the timed run.
        decode_tokens: greedy steps to time after the prefill. Default 32.
        prefill_chunk_size: feed the prompt in chunks of this size (a cache that evicts during prefill may
            need it to bound memory). Default ``None``: one forward pass.
        warmup_tokens: decode steps of an untimed warm-up run first; 0: none (the caller warmed up). Default
            4.
    """
    if decode_tokens < 1:
        raise ValueError(f"decode_tokens must be positive, got {decode_tokens}")
    prompt_ids = prompt_ids.to(model.device)
    chunk = prefill_chunk_size or prompt_ids.shape[1]

    def run(steps: int) -> tuple[float, float]:
        cache = make_cache()
        synchronize(model.device)
        start = time.perf_counter()
        for begin in range(0, prompt_ids.shape[1], chunk):
            logits = model(prompt_ids[:, begin : begin + chunk], past_key_values=cache, use_cache=True).logits
        token = logits[:, -1:].argmax(-1)
        synchronize(model.device)
        prefill_s = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(steps):
            token = model(token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        synchronize(model.device)
        return prefill_s, time.perf_counter() - start

    if warmup_tokens:
        run(warmup_tokens)
    prefill_s, decode_s = run(decode_tokens)
    return SpeedResult(
        prefill_tokens=prompt_ids.shape[1],
        prefill_tokens_per_s=prompt_ids.shape[1] / prefill_s,
        decode_tokens=decode_tokens,
        decode_tokens_per_s=decode_tokens / decode_s,
        decode_ms_per_token=1000 * decode_s / decode_tokens,
    )


def measure_speed_interleaved(
    model: PreTrainedModel,
    prompt_ids: torch.Tensor,
    make_caches: dict[str, Callable[[], Cache]],
    rounds: int,
    on_run: Callable[[], None] | None = None,
    **options,
) -> dict[str, list[SpeedResult]]:
    """Time every cache of ``make_caches`` ``rounds`` times, one of each per round (:func:`measure_speed`).

    Timings on a shared machine drift with its load; interleaving gives every cache the same conditions, so
    medians of the returned runs compare fairly. ``on_run`` is called after each run (progress); ``options``
    go to :func:`measure_speed`.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be positive, got {rounds}")
    runs = {name: [] for name in make_caches}
    for _ in range(rounds):
        for name, make_cache in make_caches.items():
            runs[name].append(measure_speed(model, prompt_ids, make_cache, **options))
            if on_run is not None:
                on_run()
    return runs


TIMED = ("prefill_tokens_per_s", "decode_tokens_per_s", "decode_ms_per_token")


def summarize_rounds(results: list[SpeedResult]) -> dict:
    """JSON-ready figures of several runs of one cache: for each rate its median, ``_min``, ``_max`` and every
    round's value (``_rounds``), plus ``rounds`` and the token counts."""
    summary = {
        "rounds": len(results),
        "prefill_tokens": results[0].prefill_tokens,
        "decode_tokens": results[0].decode_tokens,
    }
    for key in TIMED:
        values = [getattr(result, key) for result in results]
        summary.update({key: statistics.median(values), f"{key}_min": min(values), f"{key}_max": max(values)})
        summary[f"{key}_rounds"] = values
    return summary


@dataclass(frozen=True)
class SpeedOptions:
    """Options of the speed metric."""

    decode_tokens: int = field(
        default=16, metadata={"help": "timed greedy decode steps", "aliases": ("--decode-tokens",)}
    )
    # Five: on this project's shared 2-core machine, medians of 3 rounds moved by up to 27 % between two quiet
    # runs, of 5 by at most 14 % (README, "Results on the embedded defaults").
    rounds: int = field(
        default=5,
        metadata={"help": "timed runs per strategy, interleaved across strategies (medians reported)"},
    )

    def __post_init__(self):
        if not isinstance(self.decode_tokens, int) or self.decode_tokens < 1:
            raise ValueError(f"speed decode_tokens must be a positive integer, got {self.decode_tokens!r}")
        if not isinstance(self.rounds, int) or self.rounds < 3:
            raise ValueError(
                f"speed rounds must be an integer of at least 3 (a median needs them), got {self.rounds!r}"
            )


@register_metric
class SpeedMetric(Metric):
    """Prefill tokens/s over the run's prompt (chunks of 512) and decode tokens/s: medians of ``rounds`` timed
    runs per strategy, interleaved across strategies so that all meet the same machine load, after one short
    warm-up run each; the spread (min-max) is reported with every median."""

    name = "speed"
    summary = "prefill and decode tokens/s (medians of interleaved rounds, with min-max)"
    options_class = SpeedOptions
    columns = (
        Column("prefill_tokens_per_s", "prefill tok/s", "{:.1f}"),
        Column("decode_tokens_per_s", "decode tok/s", "{:.2f}"),
        Column("decode_tokens_per_s_spread", "decode min–max", "{}"),
        Column("other_load_cores", "other load (cores)", "{:.1f}"),
    )

    def work(self, run) -> int:
        return self.options.rounds * run.prompt_tokens

    def measure(self, run, spec: str, tick) -> dict:
        return self.measure_many(run, [spec], tick)[spec]

    def measure_many(self, run, specs: list[str], tick) -> dict[str, dict]:
        from hf_kvcache.registry import build_cache

        def maker(spec: str):
            return lambda: build_cache(spec, run.model)

        for spec in specs:  # lazy initialisation and first allocations are not charged to round one
            measure_speed(run.model, run.input_ids[:, :64], maker(spec), decode_tokens=2, warmup_tokens=0)
        with CompetingLoad() as load:
            results = measure_speed_interleaved(
                run.model,
                run.input_ids,
                {spec: maker(spec) for spec in specs},
                self.options.rounds,
                on_run=lambda: tick(run.prompt_tokens),
                decode_tokens=self.options.decode_tokens,
                prefill_chunk_size=512,
                warmup_tokens=0,
            )
        return {
            spec: {**summarize_rounds(values), "other_load_cores": load.cores}
            for spec, values in results.items()
        }

    def headline(self, values: dict) -> dict:
        row = super().headline(values)
        if row.get("other_load_cores") is None:  # not measured (no /proc/stat, or an older record)
            row.pop("other_load_cores", None)
        if "decode_tokens_per_s_min" in values:
            row["decode_tokens_per_s_spread"] = (
                f"{values['decode_tokens_per_s_min']:.2f}–{values['decode_tokens_per_s_max']:.2f}"
            )
        return row

    def plots(self, records: list[dict], out: Path) -> list[Path]:
        import matplotlib.pyplot as plt

        labels = [spec_label(r["spec"]) for r in records]
        figure, axis = plt.subplots(figsize=(8, 1.2 + 0.16 * sum(label.count("\n") + 1 for label in labels)))
        values = [r["values"] for r in records]
        medians = [v["decode_tokens_per_s"] for v in values]
        low = [m - v.get("decode_tokens_per_s_min", m) for m, v in zip(medians, values, strict=True)]
        high = [v.get("decode_tokens_per_s_max", m) - m for m, v in zip(medians, values, strict=True)]
        axis.barh(range(len(records)), medians, xerr=[low, high], capsize=3)
        axis.set_yticks(range(len(records)), labels)
        axis.set_xlabel("decode tokens/s (median of interleaved rounds; bars: min-max)")
        axis.invert_yaxis()
        axis.tick_params(axis="y", labelsize=6)
        return [save_figure(figure, out / "decode_speed.png")]
