"""Chunked prefill: run a prompt far longer than a cache's budget through the model with bounded memory."""

from __future__ import annotations

import torch
from transformers import Cache, PreTrainedModel

from hf_kvcache.base import KVCache


@torch.no_grad()
def prefill(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    cache: Cache,
    chunk_size: int = 512,
    attention_mask: torch.Tensor | None = None,
    leave_last: bool = True,
) -> Cache:
    """Feed all but the last token of ``input_ids`` into ``cache``, ``chunk_size`` tokens per forward.

    Afterwards ``model.generate(input_ids, attention_mask=attention_mask, past_key_values=cache, ...)``
    continues from the cache: ``transformers`` skips the cached prefix and feeds only the last prompt token,
    which gives the logits of the first new token. With an eviction cache (sliding window, H2O, TOVA, SnapKV)
    the memory of the whole run is then bounded by the budget plus one chunk, whatever the prompt length; no
    forward computes more than one position of vocabulary logits. (transformers' own ``generate(...,
    prefill_chunk_size=N)`` works with these caches too; it also chunks the last token's forward.)

    Args:
        model: a causal LM.
        input_ids: ``[B, T]`` prompt ids, left-padded for batches (``T >= 2``). If ``cache`` already holds
            ``P`` tokens, ``input_ids`` is the whole sequence and only tokens ``P .. T - 2`` are fed.
        cache: the cache to fill (any ``transformers`` cache).
        chunk_size: tokens per forward pass. Default 512.
        attention_mask: ``[B, T]`` padding mask for left-padded batches. Default ``None``: no padding.
        leave_last: leave the last token out, for ``generate`` to feed. ``False`` feeds every token (a
            context that questions will follow, :func:`hf_kvcache.ask`). Default ``True``.

    Returns:
        ``cache``, holding ``T - 1`` tokens' worth of context (``T`` with ``leave_last=False``).

    Example:
        >>> cache = SlidingWindowKVCache(model, window_length=512)
        >>> prefill(model, ids, cache, chunk_size=512)  # a 32k-token prompt, 512 tokens held per layer
        >>> model.generate(ids, past_key_values=cache, max_new_tokens=32)
    """
    least = 2 if leave_last else 1
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] < least:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(
            f"input_ids must be a [batch, tokens] tensor with at least {least} tokens, got {shape}"
        )
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask of shape {tuple(attention_mask.shape)} must match input_ids "
            f"{tuple(input_ids.shape)}"
        )
    if not isinstance(cache, Cache):
        raise TypeError(f"cache must be a transformers Cache, got {type(cache).__name__}")
    if isinstance(cache, KVCache):
        cache.check_model(model)
    past, end = cache.get_seq_length(), input_ids.shape[1] - leave_last
    if past > end:
        raise ValueError(
            f"the cache already holds {past} tokens, more than the {end} to prefill from input_ids"
        )
    input_ids = input_ids.to(model.device)
    if attention_mask is not None:
        attention_mask = attention_mask.to(model.device)
        # The positions generate() gives a left-padded batch, so both paths see the same positions.
        positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    else:
        positions = torch.arange(input_ids.shape[1], device=model.device).expand_as(input_ids)
    for start in range(past, end, chunk_size):
        stop = min(start + chunk_size, end)
        model(
            input_ids=input_ids[:, start:stop],
            attention_mask=None if attention_mask is None else attention_mask[:, :stop],
            position_ids=positions[:, start:stop],
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
    return cache
