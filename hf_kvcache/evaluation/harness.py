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

import torch

from hf_kvcache.base import cache_nbytes
from hf_kvcache.layout import attention_layout
from hf_kvcache.registry import build_cache, canonical_spec, parse_spec

DEFAULT_STRATEGIES = (
    "full",
    "quantized:nbits=4",
    "quantized:nbits=2",
    "sliding-window:window_length=256,num_sink_tokens=4",
    "sliding-window:window_length=256,num_sink_tokens=0",
    "heavy-hitter:heavy_budget=128,recent_budget=128",
)
METRICS = ("perplexity", "memory", "speed", "passkey")
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class CompareSettings:
    """What to measure on; every field takes part in the records' fingerprint."""

    model: str | None = None
    dataset: str | None = None
    text_file: str | None = None
    split: str = "test"
    max_tokens: int = 1024
    chunk_size: int = 16
    dtype: str | None = None
    device: str | None = None
    decode_tokens: int = 16
    passkey_lengths: tuple[int, ...] = (1024, 2048)
    passkey_depths: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
    passkey_trials: int = 1
    metrics: tuple[str, ...] = field(default=METRICS)

    def __post_init__(self):
        for name in ("max_tokens", "chunk_size", "decode_tokens", "passkey_trials"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_tokens < 2:
            raise ValueError(f"max_tokens must be at least 2, got {self.max_tokens}")
        if any(length < 64 for length in self.passkey_lengths):
            raise ValueError(f"passkey lengths must be at least 64 tokens, got {list(self.passkey_lengths)}")
        if any(not 0 <= depth <= 1 for depth in self.passkey_depths):
            raise ValueError(f"passkey depths must lie in [0, 1], got {list(self.passkey_depths)}")
        unknown = sorted(set(self.metrics) - set(METRICS))
        if unknown:
            raise ValueError(f"unknown metrics {unknown}; allowed: {list(METRICS)}")

    def fingerprint(self) -> str:
        fields = dataclasses.asdict(self)
        fields.pop("metrics")
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


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
        "versions": {
            "hf_kvcache": hf_kvcache.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "python": sys.version.split()[0],
        },
    }


def full_cache_bytes(model, tokens: int) -> int:
    """Bytes a ``DynamicCache`` holds for ``tokens`` tokens of one sequence: keys and values of every layer."""
    layout = attention_layout(model)
    element = torch.finfo(model.dtype).bits // 8
    return 2 * layout.num_layers * layout.num_key_value_heads * layout.head_dim * tokens * element


def peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda_max_allocated"
    # ru_maxrss is in KiB on Linux; it is the process-wide peak so far, not a per-strategy figure.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process_max_rss"


def measure_quality_and_memory(model, spec: str, input_ids: torch.Tensor, settings: CompareSettings, tick):
    from hf_kvcache.evaluation.perplexity import perplexity

    if model.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(model.device)
    cache = build_cache(spec, model)
    start = time.perf_counter()
    result = perplexity(model, input_ids, cache=cache, chunk_size=settings.chunk_size, on_chunk=tick)
    seconds = time.perf_counter() - start
    tokens = input_ids.shape[1]
    held, full = cache_nbytes(cache), full_cache_bytes(model, tokens)
    peak, peak_kind = peak_memory(model.device)
    quality = {
        "perplexity": result.perplexity,
        "mean_nll": result.mean_nll,
        "num_tokens": result.num_tokens,
        "seconds": seconds,
        "stream_tokens_per_s": tokens / seconds,
    }
    memory = {
        "tokens": tokens,
        "cache_bytes": held,
        "full_cache_bytes": full,
        "ratio_to_full": held / full,
        "peak_memory_bytes": peak,
        "peak_memory_kind": peak_kind,
    }
    return quality, memory


def measure_speed_record(model, spec: str, input_ids: torch.Tensor, settings: CompareSettings) -> dict:
    from hf_kvcache.evaluation.speed import measure_speed

    result = measure_speed(
        model, input_ids, lambda: build_cache(spec, model), settings.decode_tokens, prefill_chunk_size=512
    )
    return dataclasses.asdict(result)


def measure_passkey(model, tokenizer, spec: str, text: str, settings: CompareSettings, tick) -> dict:
    from hf_kvcache.evaluation.passkey import make_passkey_prompt, run_passkey

    cells = []
    for length in settings.passkey_lengths:
        for depth in settings.passkey_depths:
            correct = 0
            for trial in range(settings.passkey_trials):
                prompt = make_passkey_prompt(tokenizer, text, length, depth, seed=trial)
                correct += run_passkey(model, tokenizer, prompt, build_cache(spec, model))
                tick(length)
            cells.append(
                {"length": length, "depth": depth, "correct": correct, "trials": settings.passkey_trials}
            )
    total = sum(c["trials"] for c in cells)
    return {"cells": cells, "accuracy": sum(c["correct"] for c in cells) / total}


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
    for spec in strategies:
        parse_spec(spec)
    store = ResultStore(Path(out_dir) / "results.json")
    fingerprint = settings.fingerprint()

    def pending(spec: str, metric: str) -> bool:
        return metric in settings.metrics and (
            force or store.find(canonical[spec], metric, fingerprint) is None
        )

    todo = [(s, m) for s in strategies for m in settings.metrics if pending(s, m)]
    records = [
        r for r in store.records if r["fingerprint"] == fingerprint and r["strategy"] in canonical.values()
    ]
    if not todo:
        return records
    if settings.text_file is not None and not Path(settings.text_file).is_file():
        raise FileNotFoundError(f"text file {settings.text_file!r} does not exist")
    text = load_corpus(settings.text_file or settings.dataset, split=settings.split)
    model, tokenizer = load_model(
        settings.model, settings.dtype, "auto" if device_map == "auto" else settings.device
    )
    input_ids = corpus_token_ids(tokenizer, text, settings.max_tokens)
    env = environment(model, settings)

    def save(spec: str, metric: str, values: dict) -> None:
        record = {
            "strategy": canonical[spec],
            "spec": spec,
            "metric": metric,
            "values": values,
            "settings": {k: v for k, v in dataclasses.asdict(settings).items() if k != "metrics"},
            "environment": env,
            "fingerprint": fingerprint,
            "finished_at": datetime.now(timezone.utc).isoformat(),
        }
        store.put(record)

    streamed = {s for s, m in todo if m in ("perplexity", "memory")}
    # The bar counts prompt tokens fed through the model, the bulk of every measurement, so its rate and
    # ETA stay meaningful across perplexity streams, speed runs (warm-up + timed) and passkey prompts.
    prompt_tokens = input_ids.shape[1]
    speed_tokens = 2 * prompt_tokens
    passkey_tokens = settings.passkey_trials * len(settings.passkey_depths) * sum(settings.passkey_lengths)
    work = len(streamed) * prompt_tokens + sum(
        {"speed": speed_tokens, "passkey": passkey_tokens}.get(m, 0) for _, m in todo
    )
    with tqdm(total=work, desc="compare", unit="tok", disable=not progress) as bar:
        for spec in strategies:
            bar.set_postfix_str(spec)
            if spec in streamed:
                # One streaming run gives both: the perplexity, and the bytes the cache holds at its end.
                quality, memory = measure_quality_and_memory(model, spec, input_ids, settings, bar.update)
                for metric, values in (("perplexity", quality), ("memory", memory)):
                    if metric in settings.metrics:
                        save(spec, metric, values)
            if pending(spec, "speed"):
                save(spec, "speed", measure_speed_record(model, spec, input_ids, settings))
                bar.update(speed_tokens)
            if pending(spec, "passkey"):
                save(spec, "passkey", measure_passkey(model, tokenizer, spec, text, settings, bar.update))
    return [
        r for r in store.records if r["fingerprint"] == fingerprint and r["strategy"] in canonical.values()
    ]
