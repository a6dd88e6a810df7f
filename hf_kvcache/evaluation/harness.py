"""``hf-kvcache compare``: perplexity, memory, speed and passkey retrieval for every strategy, resumable.

Each finished (strategy, metric) record is written to ``results.json`` atomically as soon as it completes, so a
killed run loses nothing already finished and a rerun skips it (unless ``force``). A record is reused only if it
was measured under the same settings (model, data, token counts, dtype, device): its ``fingerprint``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import resource
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from hf_kvcache.base import cache_nbytes
from hf_kvcache.evaluation.distributed import Workers, merge_records, work_units
from hf_kvcache.evaluation.metric import Metric, default_metric_names, get_metric, list_metrics
from hf_kvcache.evaluation.perplexity import PerplexityResult, perplexity
from hf_kvcache.layout import attention_layout
from hf_kvcache.registry import build_cache, canonical_spec

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
SCHEMA_VERSION = 1


def default_metrics() -> tuple[str, ...]:
    """The registered metrics marked ``in_defaults``, in registration order: what ``compare`` measures unless
    told otherwise."""
    return tuple(default_metric_names())


@dataclass(frozen=True)
class CompareSettings:
    """What to measure on. ``metric_options`` maps a metric name to its options (defaults where absent)."""

    model: str | None = None
    dataset: str | None = None
    text_file: str | None = None
    split: str = "test"
    max_tokens: int = 1024
    chunk_size: int = 16
    dtype: str | None = None
    device: str | None = None
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
        return {**shared, "options": dataclasses.asdict(self.metric(name).options)}

    def fingerprint(self, name: str) -> str:
        """Hash of :meth:`record_settings`: a record is reused only under the same one."""
        return fingerprint_of(self.record_settings(name))


def fingerprint_of(settings: dict) -> str:
    """A short stable hash of the JSON-ready ``settings`` a record depends on."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def new_record(strategy: str, spec: str, metric: str, values: dict, settings: dict, env: dict) -> dict:
    """One ``results.json`` record, fingerprinted from ``settings`` and stamped with the time it finished."""
    return {
        "strategy": strategy,
        "spec": spec,
        "metric": metric,
        "values": values,
        "settings": settings,
        "environment": env,
        "fingerprint": fingerprint_of(settings),
        "finished_at": datetime.now(timezone.utc).isoformat(),
    }


class ResultStore:
    """``results.json``: a list of records, rewritten atomically after each one."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.records: list[dict] = []
        if self.path.exists():
            data = json.loads(self.path.read_text())
            if data.get("schema_version") != SCHEMA_VERSION:
                raise ValueError(
                    f"{self.path} has schema {data.get('schema_version')}, expected {SCHEMA_VERSION}"
                )
            self.records = data["records"]

    def find(self, strategy: str, metric: str, fingerprint: str) -> dict | None:
        for record in self.records:
            if (record["strategy"], record["metric"], record["fingerprint"]) == (
                strategy,
                metric,
                fingerprint,
            ):
                return record
        return None

    def put(self, record: dict) -> None:
        self.records = [
            r
            for r in self.records
            if (r["strategy"], r["metric"], r["fingerprint"])
            != (record["strategy"], record["metric"], record["fingerprint"])
        ]
        self.records.append(record)
        self.write()

    def reorder(self, key) -> None:
        """Sort the records by ``key`` (stable) and write them."""
        self.records = sorted(self.records, key=key)
        self.write()

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = json.dumps({"schema_version": SCHEMA_VERSION, "records": self.records}, indent=2)
        handle, staging = tempfile.mkstemp(dir=self.path.parent, prefix=".results-", suffix=".json")
        with os.fdopen(handle, "w") as stream:
            stream.write(payload)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(staging, self.path)


def environment(model, settings: CompareSettings) -> dict:
    """Where a record was measured: model, dtype, device, library versions, hardware."""
    import transformers

    import hf_kvcache
    from hf_kvcache.evaluation.model import EMBEDDED_MODEL

    device = model.device
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {
        "model": settings.model or f"{EMBEDDED_MODEL} (embedded GGUF)",
        "dtype": str(model.dtype).replace("torch.", ""),
        "device": str(device),
        "hardware": f"{hardware}, {os.cpu_count()} CPU cores",
        # How torch's CPU threads wait decides how much other processes slow (and scatter) a timing.
        "cpu_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
        "versions": {
            "hf_kvcache": hf_kvcache.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "python": sys.version.split()[0],
        },
    }


def full_cache_bytes(model, tokens: int) -> int:
    """Bytes a ``DynamicCache`` holds after ``tokens`` tokens of one sequence: keys and values of every layer,
    where local (sliding-window, chunked) layers keep only their last ``window - 1`` tokens, as it does."""
    layout = attention_layout(model)
    element = torch.finfo(model.dtype).bits // 8
    per_token = 2 * layout.num_key_value_heads * layout.head_dim * element
    windows = (layout.window(index) for index in range(layout.num_layers))
    return sum(per_token * (tokens if window is None else min(tokens, window - 1)) for window in windows)


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
    """What metrics measure on: the model, tokenizer, corpus text and prompt ``input_ids`` ``[1, T]`` of one run."""

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
            full = full_cache_bytes(self.model, self.prompt_tokens)
            self._streams[spec] = StreamOutcome(result, seconds, cache_nbytes(cache), full, peak, peak_kind)
        return self._streams[spec]


def _by_metric(unit: list[tuple[str, str]]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for spec, name in unit:
        grouped.setdefault(name, []).append(spec)
    return grouped


def run_compare(
    strategies: list[str],
    settings: CompareSettings,
    out_dir: str | Path,
    force: bool = False,
    device_map: str | None = None,
    progress: bool = True,
) -> list[dict]:
    """Measure every strategy in ``strategies`` under ``settings``; records land in ``out_dir/results.json``."""
    from tqdm.auto import tqdm

    from hf_kvcache.evaluation.corpus import corpus_token_ids, load_corpus
    from hf_kvcache.evaluation.model import load_model

    canonical = {spec: canonical_spec(spec) for spec in strategies}  # validates every spec before any work
    store = ResultStore(Path(out_dir) / "results.json")
    metrics = {name: settings.metric(name) for name in settings.metrics}
    fingerprints = {name: settings.fingerprint(name) for name in metrics}

    def pending(spec: str, name: str) -> bool:
        return force or store.find(canonical[spec], name, fingerprints[name]) is None

    def current() -> list[dict]:
        return [
            r
            for r in store.records
            if r["metric"] in metrics
            and r["fingerprint"] == fingerprints[r["metric"]]
            and r["strategy"] in canonical.values()
        ]

    todo = [(spec, name) for spec in strategies for name in metrics if pending(spec, name)]
    workers = Workers()
    workers.wait()  # every process has read results.json before the main process writes to it
    if not todo:
        return current()
    if settings.text_file is not None and not Path(settings.text_file).is_file():
        raise FileNotFoundError(f"text file {settings.text_file!r} does not exist")
    text = load_corpus(settings.text_file or settings.dataset, split=settings.split)
    device = "auto" if device_map == "auto" else workers.device(settings.device)
    model, tokenizer = load_model(settings.model, settings.dtype, device)
    run = Run(model, tokenizer, text, corpus_token_ids(tokenizer, text, settings.max_tokens), settings)
    env = environment(model, settings)
    mine = workers.share(work_units(todo, metrics))
    # The bar counts prompt tokens fed through the model, the bulk of every measurement, so its rate and ETA
    # stay meaningful across perplexity streams (shared by the metrics that use them), speed runs and prompts.
    work = sum(
        any(metrics[name].uses_stream for _, name in unit) * run.prompt_tokens
        + sum(metrics[name].work(run) for _, name in unit)
        for unit in mine
    )
    produced = []
    with tqdm(total=work, desc="compare", unit="tok", disable=not progress or not workers.is_main) as bar:
        for unit in mine:
            for name, specs in _by_metric(unit).items():
                bar.set_postfix_str(f"{specs[0] if len(specs) == 1 else f'{len(specs)} strategies'} {name}")
                for spec, values in metrics[name].measure_many(run, specs, bar.update).items():
                    record = new_record(
                        canonical[spec], spec, name, values, settings.record_settings(name), env
                    )
                    produced.append(record)
                    if workers.is_main:  # saved as soon as it exists; the others' come when all are done
                        store.put(record)
    # Metric by metric, strategies in the order asked: what one process writes, however many measured.
    metric_order, strategy_order = list(metrics), list(canonical.values())
    store = merge_records(
        store, workers, produced,
        lambda r: (r["strategy"] in strategy_order and r["metric"] in metric_order,
                   metric_order.index(r["metric"]) if r["metric"] in metric_order else -1,
                   strategy_order.index(r["strategy"]) if r["strategy"] in strategy_order else -1),
    )  # fmt: skip
    return current()
