"""Per-forward information that ``Cache.update`` does not receive, captured with hooks on one model.

``transformers`` hands a cache layer only the new keys and values. Eviction caches also need the 2D padding
mask of the current forward, and score-based ones the queries of each attention layer. The hooks here are
installed on the model instance a cache is built for (never globally, never at import), and do nothing
unless the ``past_key_values`` of the call is a cache that asks for the information, so the model behaves
exactly as before with any other cache.
"""

from __future__ import annotations

import inspect
import weakref

import torch
from torch import nn

_MODEL_HOOKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _find_argument(module: nn.Module, name: str, args: tuple, kwargs: dict):
    if name in kwargs:
        return kwargs[name]
    try:
        bound = inspect.signature(module.forward).bind_partial(*args, **kwargs)
    except TypeError:
        return None
    return bound.arguments.get(name)


def _observe_model_call(module: nn.Module, args: tuple, kwargs: dict) -> None:
    cache = _find_argument(module, "past_key_values", args, kwargs)
    observe = getattr(cache, "observe_forward", None)
    if observe is None:
        return
    input_ids = _find_argument(module, "input_ids", args, kwargs)
    embeds = _find_argument(module, "inputs_embeds", args, kwargs)
    query_length = (input_ids if input_ids is not None else embeds).shape[1]
    observe(_find_argument(module, "attention_mask", args, kwargs), query_length)


def install_forward_observer(model: nn.Module) -> None:
    """Make ``model`` tell a cache that defines ``observe_forward(attention_mask, query_length)`` about each call.

    Idempotent per model instance.
    """
    if model not in _MODEL_HOOKS:
        _MODEL_HOOKS[model] = model.register_forward_pre_hook(_observe_model_call, with_kwargs=True)


def left_padding_counts(attention_mask: torch.Tensor | None, batch: int, total: int, device) -> torch.Tensor:
    """Padding tokens at the start of each row of a 2D mask ``[B, total]``; ``ValueError`` for other padding."""
    if attention_mask is None:
        return torch.zeros(batch, dtype=torch.long, device=device)
    if attention_mask.dim() != 2:
        raise ValueError(
            f"eviction caches need the usual 2D attention mask [batch, tokens], got shape {tuple(attention_mask.shape)}"
        )
    mask = attention_mask.to(device=device, dtype=torch.long)
    if mask.shape != (batch, total):
        raise ValueError(
            f"attention mask of shape {tuple(mask.shape)} does not cover {batch} rows of {total} tokens"
        )
    pads = total - mask.sum(-1)
    starts_real = torch.arange(total, device=device) >= pads[:, None]
    if not torch.equal(mask.bool(), starts_real):
        raise ValueError(
            "eviction caches support left padding only (each row: zeros, then ones); got a mask with padding "
            "after a real token. Use tokenizer.padding_side = 'left'."
        )
    return pads
