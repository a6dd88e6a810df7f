"""Memory metric: the bytes a cache holds at the end of the perplexity stream, against ``DynamicCache``'s."""

from __future__ import annotations

from hf_kvcache.evaluation.metric import Column, Metric, register_metric


@register_metric
class MemoryMetric(Metric):
    """Bytes held after streaming the run's prompt, their ratio to a full cache, and the run's peak memory.

    The peak is CUDA's ``max_memory_allocated`` (reset before the stream) or, on CPU, the process' peak RSS
    so far, which is process-wide and not a per-strategy figure.
    """

    name = "memory"
    summary = "bytes the cache holds after the stream, and their ratio to the full cache"
    columns = (Column("cache_bytes", "cache MiB", "mib"), Column("ratio_to_full", "× full", "{:.3f}"))
    uses_stream = True

    def measure(self, run, spec: str, tick) -> dict:
        stream = run.stream(spec, tick)
        return {
            "tokens": run.prompt_tokens,
            "cache_bytes": stream.cache_bytes,
            "full_cache_bytes": stream.full_cache_bytes,
            "ratio_to_full": stream.cache_bytes / stream.full_cache_bytes,
            "peak_memory_bytes": stream.peak_memory_bytes,
            "peak_memory_kind": stream.peak_memory_kind,
        }

    def headline(self, values: dict) -> dict:
        return {**super().headline(values), "peak_memory_bytes": values["peak_memory_bytes"]}
