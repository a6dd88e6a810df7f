"""``hf-kvcache compare``: perplexity, memory, speed, retrieval and more for every strategy, resumable.

A record per (strategy, metric), measured and saved by the orchestrator (:mod:`.orchestrator`): it is reused
only if it was measured under the same settings (model, data, token counts, dtype, device, the metric's own
options), its ``fingerprint``.
"""

from __future__ import annotations

import dataclasses
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hf_kvcache.base import cache_nbytes
from hf_kvcache.evaluation.distributed import work_units
from hf_kvcache.evaluation.metric import Metric, default_metric_names, get_metric, list_metrics
from hf_kvcache.evaluation.orchestrator import DataSource, Job, Measured, RecordKey, run_job
from hf_kvcache.evaluation.perplexity import PerplexityResult, perplexity
from hf_kvcache.evaluation.records import fingerprint_of
from hf_kvcache.layout import attention_layout
from hf_kvcache.registry import build_cache, canonical_spec, is_spelled

DEFAULT_STRATEGIES = (
    "full",
    "quantized:nbits=4",
    "quantized:nbits=2",
    "sliding-window:window_length=256,num_sink_tokens=4",
    "heavy-hitter:heavy_budget=128,recent_budget=128",
    # Eviction and quantization multiply: the same windows, held at 4 bits.
    "sliding-window:window_length=256,num_sink_tokens=4+quantized:nbits=4",
    "heavy-hitter:heavy_budget=128,recent_budget=128+quantized:nbits=4",
)


def default_metrics() -> tuple[str, ...]:
    """The registered metrics marked ``in_defaults``, in registration order: what ``compare`` measures unless
    told otherwise."""
    return tuple(default_metric_names())


@dataclass(frozen=True)
class CompareSettings(DataSource):
    """What to measure on (the :class:`~.orchestrator.DataSource` fields) and how: ``max_tokens`` of prompt,
    streamed ``chunk_size`` at a time, and ``metric_options`` mapping a metric name to its options (defaults
    where absent)."""

    max_tokens: int = 1024
    chunk_size: int = 16
    metrics: tuple[str, ...] = field(default_factory=default_metrics)
    metric_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        for name in ("max_tokens", "chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_tokens < 2:
            raise ValueError(f"max_tokens must be at least 2, got {self.max_tokens}")
        unknown = sorted(set(self.metrics) - set(list_metrics()))
        if unknown:
            raise ValueError(f"unknown metrics {unknown}; allowed: {list_metrics()}")
        for name, options in self.metric_options.items():
            expected = get_metric(name).options_class
            if not isinstance(options, expected):
                raise TypeError(f"options of metric {name!r} must be a {expected.__name__}, got {options!r}")

    def metric(self, name: str) -> Metric:
        """The metric ``name`` with this run's options."""
        return get_metric(name)(self.metric_options.get(name))

    def record_settings(self, name: str) -> dict:
        """The settings a record of metric ``name`` depends on: the shared ones and that metric's options."""
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        shared.pop("metrics"), shared.pop("metric_options")
        options = self.metric(name).options
        # Options added later and left at their default stay out, so that earlier records keep their key.
        spelled = {f.name for f in dataclasses.fields(options) if is_spelled(f, options)}
        values = {k: v for k, v in dataclasses.asdict(options).items() if k in spelled}
        return {**shared, "options": values}

    def fingerprint(self, name: str) -> str:
        """Hash of :meth:`record_settings`: a record is reused only under the same one."""
        return fingerprint_of(self.record_settings(name))


def full_cache_bytes(model, tokens: int, chunk_size: int | None = None) -> int:
    """Bytes a ``DynamicCache`` holds after ``tokens`` tokens of one sequence, fed ``chunk_size`` at a time
    (``None``: in one forward), counted as :func:`~hf_kvcache.cache_nbytes` counts them: the storage of the
    keys and values of every layer. A local (sliding-window, chunked) layer keeps a view of its last ``window
    - 1`` tokens, which pins the storage of the last concatenation: those tokens, plus the tokens of the last
    chunk beyond them; and an 8-byte window scalar."""
    layout = attention_layout(model)
    element = torch.finfo(model.dtype).bits // 8
    per_token = 2 * layout.num_key_value_heads * layout.head_dim * element
    last = tokens if chunk_size is None else tokens - (tokens - 1) // chunk_size * chunk_size
    total = 0
    for window in (layout.window(index) for index in range(layout.num_layers)):
        if window is None:
            total += per_token * tokens
        else:
            total += per_token * (min(window - 1, tokens - last) + last) + 8
    return total


def peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda_max_allocated"
    # ru_maxrss is in KiB on Linux; it is the process-wide peak so far, not a per-strategy figure.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process_max_rss"


@dataclass(frozen=True)
class StreamOutcome:
    """One perplexity stream of the run's prompt through a fresh cache, and what the cache held at its end."""

    perplexity: PerplexityResult
    seconds: float
    cache_bytes: int
    full_cache_bytes: int
    peak_memory_bytes: int
    peak_memory_kind: str


class Run:
    """What metrics measure on: model, tokenizer, corpus text and prompt ``input_ids`` ``[1, T]``."""

    def __init__(self, model, tokenizer, text: str, input_ids: torch.Tensor, settings: CompareSettings):
        self.model, self.tokenizer, self.text = model, tokenizer, text
        self.input_ids, self.settings = input_ids, settings
        self._streams: dict[str, StreamOutcome] = {}

    @property
    def prompt_tokens(self) -> int:
        return self.input_ids.shape[1]

    def stream(self, spec: str, tick) -> StreamOutcome:
        """Stream the prompt through a fresh ``spec`` cache, once per spec however many metrics ask."""
        if spec not in self._streams:
            if self.model.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.model.device)
            cache = build_cache(spec, self.model)
            start = time.perf_counter()
            result = perplexity(
                self.model, self.input_ids, cache=cache, chunk_size=self.settings.chunk_size, on_chunk=tick
            )
            seconds = time.perf_counter() - start
            peak, peak_kind = peak_memory(self.model.device)
            full = full_cache_bytes(self.model, self.prompt_tokens, self.settings.chunk_size)
            self._streams[spec] = StreamOutcome(result, seconds, cache_nbytes(cache), full, peak, peak_kind)
        return self._streams[spec]


class CompareJob(Job):
    """``compare`` as an orchestrator job: a record per (strategy, metric), grouped into units by
    :func:`~hf_kvcache.evaluation.distributed.work_units`."""

    label = "compare"

    def __init__(self, strategies: list[str], settings: CompareSettings):
        self.settings = settings
        self.canonical = {spec: canonical_spec(spec) for spec in strategies}  # validates every spec first
        self.written = {canonical: spec for spec, canonical in self.canonical.items()}
        self.metrics = {name: settings.metric(name) for name in settings.metrics}
        self.fingerprints = {name: settings.fingerprint(name) for name in self.metrics}

    def wanted(self) -> list[RecordKey]:
        # Metric by metric, strategies in the order asked: the order of the results table's sections.
        canonical = dict.fromkeys(self.canonical.values())
        return [(spec, name, self.fingerprints[name]) for name in self.metrics for spec in canonical]

    def units(self, pending: list[RecordKey]) -> list[list[RecordKey]]:
        pairs = [(spec, name) for spec, name, _ in pending]
        return [[(s, n, self.fingerprints[n]) for s, n in unit] for unit in work_units(pairs, self.metrics)]

    def prepare(self, model, tokenizer, text: str) -> None:
        from hf_kvcache.evaluation.corpus import corpus_token_ids

        ids = corpus_token_ids(tokenizer, text, self.settings.max_tokens)
        self.run = Run(model, tokenizer, text, ids, self.settings)

    def work(self, unit: list[RecordKey]) -> int:
        # Prompt tokens fed through the model, the bulk of every measurement, so the bar's rate and ETA stay
        # meaningful across perplexity streams (shared by the metrics that read them), speed runs and prompts.
        names = [name for _, name, _ in unit]
        streams = any(self.metrics[name].uses_stream for name in names) * self.run.prompt_tokens
        return streams + sum(self.metrics[name].work(self.run) for name in names)

    def measure(self, unit: list[RecordKey], tick) -> list[Measured]:
        measured = []
        for name in dict.fromkeys(name for _, name, _ in unit):
            specs = [self.written[strategy] for strategy, metric, _ in unit if metric == name]
            for spec, values in self.metrics[name].measure_many(self.run, specs, tick).items():
                key = (self.canonical[spec], name, self.fingerprints[name])
                measured.append(Measured(key, spec, values, self.settings.record_settings(name)))
        return measured


def run_compare(
    strategies: list[str],
    settings: CompareSettings,
    out_dir: str | Path,
    force: bool = False,
    device_map: str | None = None,
    progress: bool = True,
) -> list[dict]:
    """Measure every strategy of ``strategies`` under ``settings``; records go to ``out_dir/results.json``."""
    return run_job(CompareJob(strategies, settings), settings, out_dir, force, device_map, progress)
