"""Prefill and decode throughput of a model with a given cache: warm up, synchronize, then time."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import Cache, PreTrainedModel

from hf_kvcache.evaluation.metric import Column, Metric, register_metric


@dataclass(frozen=True)
class SpeedResult:
    """Throughput of one run: ``prefill_tokens`` of prompt, then ``decode_tokens`` greedy single-token steps."""

    prefill_tokens: int
    prefill_tokens_per_s: float
    decode_tokens: int
    decode_tokens_per_s: float
    decode_ms_per_token: float


def _synchronize(device: torch.device) -> None:
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
        warmup_tokens: decode steps of the untimed warm-up run. Default 4.
    """
    if decode_tokens < 1:
        raise ValueError(f"decode_tokens must be positive, got {decode_tokens}")
    prompt_ids = prompt_ids.to(model.device)
    chunk = prefill_chunk_size or prompt_ids.shape[1]

    def run(steps: int) -> tuple[float, float]:
        cache = make_cache()
        _synchronize(model.device)
        start = time.perf_counter()
        for begin in range(0, prompt_ids.shape[1], chunk):
            logits = model(prompt_ids[:, begin : begin + chunk], past_key_values=cache, use_cache=True).logits
        token = logits[:, -1:].argmax(-1)
        _synchronize(model.device)
        prefill_s = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(steps):
            token = model(token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        _synchronize(model.device)
        return prefill_s, time.perf_counter() - start

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
    **options,
) -> dict[str, list[SpeedResult]]:
    """Time every cache of ``make_caches`` ``rounds`` times, one of each per round, with :func:`measure_speed`.

    Timings on a shared machine drift with its load; interleaving gives every cache the same conditions, so
    medians of the returned runs compare fairly. ``options`` go to :func:`measure_speed`.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be positive, got {rounds}")
    runs = {name: [] for name in make_caches}
    for _ in range(rounds):
        for name, make_cache in make_caches.items():
            runs[name].append(measure_speed(model, prompt_ids, make_cache, **options))
    return runs


@dataclass(frozen=True)
class SpeedOptions:
    """Options of the speed metric."""

    decode_tokens: int = field(
        default=16, metadata={"help": "timed greedy decode steps", "aliases": ("--decode-tokens",)}
    )

    def __post_init__(self):
        if not isinstance(self.decode_tokens, int) or self.decode_tokens < 1:
            raise ValueError(f"speed decode_tokens must be a positive integer, got {self.decode_tokens!r}")


@register_metric
class SpeedMetric(Metric):
    """Prefill tokens/s over the run's prompt (chunks of 512) and decode tokens/s, after a warm-up run."""

    name = "speed"
    summary = "prefill and decode tokens/s"
    options_class = SpeedOptions
    columns = (
        Column("prefill_tokens_per_s", "prefill tok/s", "{:.1f}"),
        Column("decode_tokens_per_s", "decode tok/s", "{:.2f}"),
    )

    def work(self, run) -> int:
        return 2 * run.prompt_tokens  # warm-up and timed prefill

    def measure(self, run, spec: str, tick) -> dict:
        from hf_kvcache.registry import build_cache

        result = measure_speed(
            run.model,
            run.input_ids,
            lambda: build_cache(spec, run.model),
            self.options.decode_tokens,
            prefill_chunk_size=512,
        )
        tick(self.work(run))
        return asdict(result)

    def plots(self, records: list[dict], out: Path) -> list[Path]:
        import matplotlib.pyplot as plt

        figure, axis = plt.subplots(figsize=(7, 4))
        axis.barh([r["spec"] for r in records], [r["values"]["decode_tokens_per_s"] for r in records])
        axis.set_xlabel("decode tokens/s")
        axis.invert_yaxis()
        axis.tick_params(axis="y", labelsize=7)
        figure.tight_layout()
        figure.savefig(out / "decode_speed.png", dpi=120)
        plt.close(figure)
        return [out / "decode_speed.png"]
