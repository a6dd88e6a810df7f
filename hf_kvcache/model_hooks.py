"""Everything hf-kvcache attaches to a model: the hooks that tell a cache about each forward, and RoPE helpers.

``transformers`` hands a cache layer only the new keys and values. Eviction caches also need the 2D padding
mask of the current forward, and score-based ones the queries of each attention layer. The hooks here are
installed on the model instance a cache is built for (never globally, never at import), and do nothing unless
the ``past_key_values`` of the call implements the matching method of :class:`CacheObserver`, so the model
behaves exactly as before with any other cache.

Shapes: keys, values and queries are ``[B, H, S, D]`` (batch, heads, sequence, head dimension).
"""

from __future__ import annotations

import inspect
import weakref
from typing import Protocol

import torch
from torch import nn

_FORWARD_HOOKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_QUERY_HOOKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class CacheObserver(Protocol):
    """What the model hooks call on the ``past_key_values`` of a forward, when it defines these methods."""

    def observe_forward(self, attention_mask: torch.Tensor | None, query_length: int) -> None:
        """Before each model forward: its 2D padding mask ``[B, seen + new]`` (or ``None``) and new length."""

    def wants_queries(self, layer_idx: int, query_length: int) -> bool:
        """Before each attention layer: whether the cache needs this forward's queries of that layer."""

    def observe_queries(self, layer_idx: int, queries: torch.Tensor, scaling: float) -> None:
        """The layer's new rotated queries ``[B, H_q, q, D]`` and the scale its attention applies to logits."""


# --- the forward observer: padding mask of each call -------------------------------------------------------
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
    """Make ``model`` call ``observe_forward`` on a cache that defines it, before each forward. Idempotent."""
    if model not in _FORWARD_HOOKS:
        _FORWARD_HOOKS[model] = model.register_forward_pre_hook(_observe_model_call, with_kwargs=True)


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


# --- query capture: the queries of each attention layer, under any attention implementation ---------------
def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The model's self-attention modules in layer order (those with ``layer_idx`` and a query projection)."""
    found = [
        m
        for m in model.modules()
        if isinstance(getattr(m, "layer_idx", None), int) and (hasattr(m, "q_proj") or hasattr(m, "qkv_proj"))
    ]
    return sorted(found, key=lambda m: m.layer_idx)


def _query_projection(module: nn.Module) -> nn.Module:
    return module.q_proj if hasattr(module, "q_proj") else module.qkv_proj


def rotated_queries(module: nn.Module, projected: torch.Tensor, position_embeddings) -> torch.Tensor:
    """The rotated queries ``[B, H_q, S, D]`` of ``module`` from its query projection's output ``[B, S, ...]``.

    SDPA never materializes attention probabilities, so score-based caches take the queries the model itself
    projected, apply what the module applies after the projection (q-norm, the RoPE it receives) and score
    them themselves.
    """
    batch, length, _ = projected.shape
    head_dim = module.head_dim
    if not hasattr(module, "q_proj"):  # fused projection (Phi3): queries come first
        projected = projected[..., : module.config.num_attention_heads * head_dim]
    queries = projected.view(batch, length, -1, head_dim)
    if hasattr(module, "q_norm"):
        queries = module.q_norm(queries)
    queries = queries.transpose(1, 2)
    if position_embeddings is not None:
        cos, sin = position_embeddings
        queries = rotate_half_rope(queries, cos.unsqueeze(1), sin.unsqueeze(1))
    return queries


def _arm_query_capture(module: nn.Module, args: tuple, kwargs: dict) -> None:
    # Before the attention module runs: if this call's cache wants the queries, remember it and the RoPE
    # tables until the query projection (which runs next, inside the module) produces them.
    module._hf_kvcache_capture = None
    cache = kwargs.get("past_key_values")
    if getattr(cache, "observe_queries", None) is None:
        return
    hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    if cache.wants_queries(module.layer_idx, hidden_states.shape[1]):
        module._hf_kvcache_capture = (cache, kwargs.get("position_embeddings"))


def _make_projection_hook(module: nn.Module):
    def capture(projection: nn.Module, inputs: tuple, projected: torch.Tensor) -> None:
        armed = getattr(module, "_hf_kvcache_capture", None)
        if armed is None:
            return
        module._hf_kvcache_capture = None
        cache, position_embeddings = armed
        with torch.no_grad():
            queries = rotated_queries(module, projected, position_embeddings)
        cache.observe_queries(module.layer_idx, queries, getattr(module, "scaling", module.head_dim**-0.5))

    return capture


def install_query_capture(model: nn.Module, num_layers: int) -> None:
    """Hook every attention module of ``model`` (once per model) so caches can observe the queries.

    A pre-hook on the attention module arms the capture when the call's cache wants the queries; a forward
    hook on its query projection then hands over what the model computed, so no projection runs twice.
    """
    if model in _QUERY_HOOKS:
        return
    modules = attention_modules(model)
    if len(modules) != num_layers:
        raise ValueError(
            f"found {len(modules)} attention modules with a query projection in {type(model).__name__}, expected "
            f"{num_layers}; score-based caches support Llama-style attention (q_proj or qkv_proj, layer_idx)"
        )
    handles = []
    for module in modules:
        handles.append(module.register_forward_pre_hook(_arm_query_capture, with_kwargs=True))
        handles.append(_query_projection(module).register_forward_hook(_make_projection_hook(module)))
    _QUERY_HOOKS[model] = handles


# --- RoPE ---------------------------------------------------------------------------------------------------
def rotate_half_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``cos.shape[-1]`` channels of ``x`` in the rotate-half layout of Llama-family models.

    ``cos`` and ``sin`` broadcast against ``x[..., :rotary_dim]``; the channels past ``rotary_dim`` (partial
    rotary, Phi3) pass through.
    """
    rotary_dim = cos.shape[-1]
    rotated, passed = x[..., :rotary_dim], x[..., rotary_dim:]
    first, second = rotated.chunk(2, dim=-1)
    rotated = rotated * cos + torch.cat([-second, first], dim=-1) * sin
    return torch.cat([rotated.to(x.dtype), passed], dim=-1)


def find_rotary_module(model: nn.Module) -> nn.Module | None:
    """The model's rotary-embedding module (the one holding ``inv_freq``), or ``None`` without RoPE."""
    found = [m for m in model.modules() if isinstance(getattr(m, "inv_freq", None), torch.Tensor)]
    if len({id(m) for m in found}) > 1:
        raise ValueError(
            f"model has {len(found)} rotary embeddings ({[type(m).__name__ for m in found]}); re-rotating keys "
            "supports models with a single RoPE. Use positions='original'."
        )
    return found[0] if found else None


class KeyRotator:
    """Moves cached keys ``[B, H, S, D]`` along the RoPE position axis by a per-row offset ``[B]``.

    RoPE rotates each channel pair by ``position * inv_freq``; rotating a key at position ``p`` by
    ``delta * inv_freq`` puts it at ``p + delta``. ``inv_freq`` comes from the model's rotary module, so default,
    linear and llama3 scaling are covered.
    """

    def __init__(self, rotary_module: nn.Module):
        self.rotary_module = rotary_module

    def shift(self, keys: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        inv_freq = self.rotary_module.inv_freq.to(device=keys.device, dtype=torch.float32)
        angles = offsets.to(torch.float32)[:, None] * inv_freq[None, :]  # [B, rotary_dim / 2]
        angles = torch.cat([angles, angles], dim=-1)[:, None, None, :]  # [B, 1, 1, rotary_dim]
        return rotate_half_rope(keys.float(), angles.cos(), angles.sin()).to(keys.dtype)
