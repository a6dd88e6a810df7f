"""Streaming perplexity: the tokens go through the model in chunks, carrying the cache from chunk to chunk."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import Cache, DynamicCache, PreTrainedModel

from hf_kvcache.evaluation.metric import Column, Metric, register_metric


@dataclass(frozen=True)
class PerplexityResult:
    """``perplexity = exp(mean_nll)`` over ``num_tokens`` scored tokens; ``token_nll`` ``[B, T - 1]``."""

    perplexity: float
    num_tokens: int
    mean_nll: float
    token_nll: torch.Tensor | None = None

    def segment_perplexities(self, segment: int) -> list[float]:
        """Perplexity of each run of ``segment`` scored positions (needs ``keep_token_nll=True``)."""
        if self.token_nll is None:
            raise ValueError("segment_perplexities needs perplexity(..., keep_token_nll=True)")
        nll = self.token_nll.double().mean(0)
        return [math.exp(float(nll[s : s + segment].mean())) for s in range(0, nll.shape[0], segment)]


def _as_batch(input_ids: torch.Tensor) -> torch.Tensor:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError("input_ids must be an integer tensor of shape [T] or [B, T]")
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if input_ids.dim() != 2 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must have shape [T] or [B, T] with T >= 2, got {tuple(input_ids.shape)}")
    return input_ids


@torch.no_grad()
def perplexity(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    cache: Cache | None = None,
    chunk_size: int = 16,
    on_chunk: Callable[[int], None] | None = None,
    keep_token_nll: bool = False,
) -> PerplexityResult:
    """Perplexity of ``input_ids`` fed ``chunk_size`` tokens at a time through ``cache``.

    Every token after the first is scored exactly once, predicted from the cache as it stands when its
    chunk arrives; ``chunk_size=1`` is exact token-by-token decoding.

    Args:
        model: a causal LM.
        input_ids: ``[T]`` or ``[B, T]`` token ids, no padding.
        cache: the cache to carry between chunks. Default ``None``: a fresh ``DynamicCache``.
        chunk_size: tokens per forward pass. Default 16.
        on_chunk: called with the number of tokens of each chunk once it is done (progress bars).
        keep_token_nll: also return every token's negative log-likelihood. Default False.
    """
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    input_ids = _as_batch(input_ids).to(model.device)
    cache = DynamicCache(config=model.config) if cache is None else cache
    total_tokens = input_ids.shape[1]
    pieces = []
    for start in range(0, total_tokens, chunk_size):
        chunk = input_ids[:, start : start + chunk_size]
        logits = model(input_ids=chunk, past_key_values=cache, use_cache=True).logits
        # Chunk position i predicts token start + i + 1; the last chunk has one prediction fewer.
        targets = input_ids[:, start + 1 : start + chunk.shape[1] + 1]
        predicted = logits[:, : targets.shape[1]].float()
        nll = torch.nn.functional.cross_entropy(
            predicted.transpose(1, 2), targets, reduction="none"
        )  # [B, c]
        pieces.append(nll.double().cpu())
        if on_chunk is not None:
            on_chunk(chunk.shape[1])
    token_nll = torch.cat(pieces, dim=1)
    mean_nll = float(token_nll.mean())
    return PerplexityResult(
        perplexity=math.exp(mean_nll),
        num_tokens=token_nll.numel(),
        mean_nll=mean_nll,
        token_nll=token_nll if keep_token_nll else None,
    )


@register_metric
class PerplexityMetric(Metric):
    """Streaming perplexity over the run's prompt, in chunks of ``--chunk-size`` (see :func:`perplexity`)."""

    name = "perplexity"
    summary = "streaming perplexity, chunk by chunk through the cache"
    columns = (Column("perplexity", "perplexity", "{:.3f}"), Column("perplexity_ratio", "× full", "{:.3f}"))
    uses_stream = True

    def measure(self, run, spec: str, tick) -> dict:
        stream = run.stream(spec, tick)
        result = stream.perplexity
        return {
            "perplexity": result.perplexity,
            "mean_nll": result.mean_nll,
            "num_tokens": result.num_tokens,
            "seconds": stream.seconds,
            "stream_tokens_per_s": run.prompt_tokens / stream.seconds,
        }

    def finish_rows(self, rows: list[dict]) -> None:
        full = next((r for r in rows if r["strategy"] == "full" and "perplexity" in r), None)
        for row in rows:
            if full is not None and "perplexity" in row:
                row["perplexity_ratio"] = row["perplexity"] / full["perplexity"]
