"""Query capture for score-based strategies, working under any attention implementation (SDPA included).

SDPA never materializes attention probabilities, so a forward pre-hook on each attention module recomputes
that layer's new queries from the module's own inputs (projection, optional q-norm, RoPE from the
``position_embeddings`` it receives) and hands them to the cache, which then computes the probabilities of
those queries against the keys it holds. The hooks are installed on one model instance, once, and do nothing
unless the call's ``past_key_values`` defines ``observe_queries(layer_idx, queries)``.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

_INSTALLED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The model's self-attention modules in layer order (those with ``layer_idx`` and a query projection)."""
    found = [
        m
        for m in model.modules()
        if isinstance(getattr(m, "layer_idx", None), int) and (hasattr(m, "q_proj") or hasattr(m, "qkv_proj"))
    ]
    return sorted(found, key=lambda m: m.layer_idx)


def rotate_queries(queries: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE in the rotate-half layout on the first ``cos.shape[-1]`` channels (partial rotary aware)."""
    rotary_dim = cos.shape[-1]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1, S, rotary_dim]
    rotated, passed = queries[..., :rotary_dim], queries[..., rotary_dim:]
    first, second = rotated.chunk(2, dim=-1)
    rotated = rotated * cos + torch.cat([-second, first], dim=-1) * sin
    return torch.cat([rotated, passed], dim=-1)


def recompute_queries(module: nn.Module, hidden_states: torch.Tensor, position_embeddings) -> torch.Tensor:
    """The rotated queries ``[B, H_q, S, D]`` that ``module`` computes from ``hidden_states``."""
    batch, length, _ = hidden_states.shape
    head_dim = module.head_dim
    num_heads = module.config.num_attention_heads
    if hasattr(module, "q_proj"):
        queries = module.q_proj(hidden_states)
    else:  # fused projection (Phi3): queries come first
        queries = module.qkv_proj(hidden_states)[..., : num_heads * head_dim]
    queries = queries.view(batch, length, -1, head_dim)
    if hasattr(module, "q_norm"):
        queries = module.q_norm(queries)
    queries = queries.transpose(1, 2)
    if position_embeddings is not None:
        cos, sin = position_embeddings
        queries = rotate_queries(queries, cos, sin)
    return queries


def _capture_queries(module: nn.Module, args: tuple, kwargs: dict) -> None:
    cache = kwargs.get("past_key_values")
    observe = getattr(cache, "observe_queries", None)
    if observe is None:
        return
    hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    with torch.no_grad():
        queries = recompute_queries(module, hidden_states, kwargs.get("position_embeddings"))
    observe(module.layer_idx, queries)


def install_query_capture(model: nn.Module, num_layers: int) -> None:
    """Hook every attention module of ``model`` (once per model) so caches can observe the queries."""
    if model in _INSTALLED:
        return
    modules = attention_modules(model)
    if len(modules) != num_layers:
        raise ValueError(
            f"found {len(modules)} attention modules with a query projection in {type(model).__name__}, expected "
            f"{num_layers}; score-based caches support Llama-style attention (q_proj or qkv_proj, layer_idx)"
        )
    _INSTALLED[model] = [m.register_forward_pre_hook(_capture_queries, with_kwargs=True) for m in modules]
