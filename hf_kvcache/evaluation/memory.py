"""Memory metric: the bytes a cache holds at the end of the perplexity stream, against ``DynamicCache``'s; and
the measurements of peak and free memory that ``scale`` uses."""

from __future__ import annotations

import contextlib
import ctypes
import gc
from pathlib import Path

import torch

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


def free_memory(device: torch.device) -> int | None:
    """Bytes free for tensors on ``device`` (CUDA's free memory, Linux's MemAvailable); ``None``: unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return _kib_field("/proc/meminfo", "MemAvailable")


class PeakMemory:
    """Peak memory growth over a block of work: CUDA's allocator peak, or on Linux the process's resident set
    (``/proc/self/clear_refs`` resets its high-water mark); ``kind`` says which."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "rss_high_water_mark"

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
        else:
            # Memory freed by earlier runs stays resident in the allocator's arenas, where this run would
            # reuse
            # it without raising the high-water mark: hand it back to the system first (glibc).
            gc.collect()
            _malloc_trim()
            Path("/proc/self/clear_refs").write_text("5")
            self.baseline = _status_bytes("VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.growth = torch.cuda.max_memory_allocated(self.device) - self.baseline
        else:
            self.growth = _status_bytes("VmHWM") - self.baseline


def _malloc_trim() -> None:
    # Not glibc: nothing to trim, and the peak may then be under-reported, never over-reported.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _status_bytes(field: str) -> int:
    size = _kib_field("/proc/self/status", field)
    if size is None:
        raise RuntimeError(f"{field} missing from /proc/self/status")
    return size


def _kib_field(path: str, field: str) -> int | None:
    """Bytes of a ``field:  N kB`` line of a Linux ``/proc`` file; ``None`` without the file or the field."""
    with contextlib.suppress(OSError):
        for line in Path(path).read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return None
