"""Streaming perplexity: the tokens go through the model in chunks, carrying the cache from chunk to chunk."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import Cache, DynamicCache, PreTrainedModel


@dataclass(frozen=True)
class PerplexityResult:
    """``perplexity = exp(mean_nll)`` over ``num_tokens`` scored tokens."""

    perplexity: float
    num_tokens: int
    mean_nll: float


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
    """
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    input_ids = _as_batch(input_ids).to(model.device)
    cache = DynamicCache(config=model.config) if cache is None else cache
    total_tokens = input_ids.shape[1]
    nll_sum = torch.zeros((), dtype=torch.float64)
    scored = 0
    for start in range(0, total_tokens, chunk_size):
        chunk = input_ids[:, start : start + chunk_size]
        logits = model(input_ids=chunk, past_key_values=cache, use_cache=True).logits
        # Chunk position i predicts token start + i + 1; the last chunk has one prediction fewer.
        targets = input_ids[:, start + 1 : start + chunk.shape[1] + 1]
        predicted = logits[:, : targets.shape[1]].float()
        nll_sum += (
            torch.nn.functional.cross_entropy(
                predicted.reshape(-1, predicted.shape[-1]), targets.reshape(-1), reduction="sum"
            )
            .double()
            .cpu()
        )
        scored += targets.numel()
        if on_chunk is not None:
            on_chunk(chunk.shape[1])
    mean_nll = float(nll_sum) / scored
    return PerplexityResult(perplexity=math.exp(mean_nll), num_tokens=scored, mean_nll=mean_nll)
