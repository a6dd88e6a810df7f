"""One attention entry point for hf-kvcache layers, registered with transformers' ``AttentionInterface``.

``transformers`` hands a cache layer the new keys and values, takes back the tensors to attend over, and
calls the model's attention function on them. A layer that can attend over its own storage (bit-packed codes)
would have to build a dense copy of its history for that, every step, and a score-based layer would have to
compute the attention weights a second time to score its entries. Instead, models that run with
such a cache call :func:`storage_attention`, registered as ``hf_kvcache_sdpa`` / ``hf_kvcache_eager``:

* a pre-hook on each attention module tells the cache which module is about to update it;
* the cache layer stores the new tokens and, where it can serve this call from its storage (a short query,
  a layout it reads), hands itself to the module instead of dense tensors;
* :func:`storage_attention` dispatches on that layer (``layer.attend_stored``), and falls through to the
  attention the model was loaded with (``sdpa``, or the model's own ``eager``, which keeps soft-capping and
  attention sinks) for every other call: other caches, prefill chunks, layers without such storage.

:func:`install_storage_attention` switches a model to the entry point; a cache does that when it is built for
the model, so users do nothing. Models loaded with another attention (flash, flex) keep it, and the cache then
returns dense tensors as before. Nothing here runs at import.
"""

from __future__ import annotations

import functools
import inspect
import weakref

import torch
from torch import nn

from hf_kvcache.model_hooks import attention_modules

PREFIX = "hf_kvcache_"
FALLBACKS = ("sdpa", "eager")
STORAGE_ATTRIBUTE = "_hf_kvcache_storage"
_PRE_HOOKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def entry_name(fallback: str) -> str:
    """The registered name of the entry point that falls through to ``fallback``."""
    return PREFIX + fallback


def _fallback_function(module: nn.Module, fallback: str):
    if fallback == "sdpa":
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward
    # "eager" is each model's own function (soft-capping, sinks, ...), defined next to its attention class.
    eager = getattr(inspect.getmodule(type(module)), "eager_attention_forward", None)
    if eager is None:
        raise ValueError(
            f"{type(module).__name__} defines no eager_attention_forward to fall back to; load the model "
            "with attn_implementation='sdpa'"
        )
    return eager


def storage_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    *,
    fallback: str,
    **kwargs,
):
    """The entry point: attention over the storage of the layer this module's cache handed over, else the
    ``fallback`` attention (a registered name binds ``fallback``)."""
    layer = module.__dict__.pop(STORAGE_ATTRIBUTE, None)
    if layer is None:
        attention_mask = newest_columns(attention_mask, key.shape[-2])
        function = _fallback_function(module, fallback)
        return function(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    return layer.attend_stored(
        query, attention_mask, scaling, softcap=kwargs.get("softcap"), sinks=kwargs.get("s_aux")
    )


def newest_columns(attention_mask: torch.Tensor | None, keys: int) -> torch.Tensor | None:
    """The last ``keys`` columns of a mask made for more: transformers shapes one mask per kind of layer by
    its first layer, and an eviction layer under a per-layer budget (``layer_budgets=pyramid``) may hold fewer
    entries, which are the newest columns (:mod:`hf_kvcache.strategies.eviction`)."""
    if attention_mask is None or attention_mask.shape[-1] <= keys:
        return attention_mask
    return attention_mask[..., attention_mask.shape[-1] - keys :]


@functools.lru_cache(maxsize=1)
def register_entry_points() -> None:
    """Register :func:`storage_attention` and its masks under :func:`entry_name` of each fallback (once)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

    for fallback, mask in (("sdpa", sdpa_mask), ("eager", eager_mask)):
        name = entry_name(fallback)
        AttentionInterface.register(name, functools.partial(storage_attention, fallback=fallback))
        AttentionMaskInterface.register(name, mask)


def _announce_module(module: nn.Module, args: tuple, kwargs: dict) -> None:
    # Before each attention forward: tell a cache that reads its storage which module will read it next.
    module.__dict__.pop(STORAGE_ATTRIBUTE, None)
    cache = kwargs.get("past_key_values", kwargs.get("layer_past"))
    if not hasattr(cache, "attending_module") or module.training:
        return
    implementation = getattr(module.config, "_attn_implementation", None) or ""
    if implementation.startswith(PREFIX):
        cache.attending_module = module


def _cannot_serve(model: nn.Module) -> str | None:
    """Why the entry point must not replace ``model``'s attention, or ``None``."""
    from hf_kvcache.layout import text_config

    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return f"{type(model).__name__} is an encoder-decoder, whose cross-attention reads no cache layer"
    config = text_config(model)
    if getattr(config, "alibi", False) or getattr(config, "model_type", None) in ("bloom", "mpt"):
        return (
            f"{type(model).__name__} biases attention by position (ALiBi), which its packed path does not add"
        )
    return None


def use_storage_attention(model: nn.Module) -> None:
    """Run ``model`` with the entry point now (caches that read their storage do this themselves).

    Raises a ``ValueError`` naming what is supported for a model it cannot serve: an encoder-decoder, an
    ALiBi model, or one loaded with an attention other than ``sdpa`` or ``eager``.
    """
    from hf_kvcache.layout import attention_layout

    reason = _cannot_serve(model) or install_storage_attention(model, attention_layout(model).num_layers)
    if reason is not None:
        raise ValueError(
            f"hf-kvcache's attention entry point cannot serve this model: {reason}. It serves decoder-only "
            "models with rotary or no position embeddings, loaded with attn_implementation in "
            f"{list(FALLBACKS)}"
        )


def install_storage_attention(model: nn.Module, num_layers: int) -> str | None:
    """Run ``model`` with the entry point (keeping its attention as the fallback) and announce each attention
    module to the cache. Returns why not, or ``None`` once installed. Idempotent."""
    reason = _cannot_serve(model)
    if reason is not None:
        return reason
    config = getattr(model, "config", None)
    implementation = getattr(config, "_attn_implementation", None)
    if implementation is None or not implementation.startswith(PREFIX):
        if implementation not in FALLBACKS:
            return f"the model runs attn_implementation={implementation!r}; the entry point wraps {FALLBACKS}"
        register_entry_points()
        model.set_attn_implementation(entry_name(implementation))
        if model.config._attn_implementation != entry_name(implementation):
            return f"{type(model).__name__} does not let its attention implementation be set"
    if model not in _PRE_HOOKS:
        modules = attention_modules(model)
        if len(modules) != num_layers:
            return f"found {len(modules)} attention modules for {num_layers} layers"
        # First among the module's pre-hooks: the query capture asks the cache whether it needs queries.
        _PRE_HOOKS[model] = [
            m.register_forward_pre_hook(_announce_module, with_kwargs=True, prepend=True) for m in modules
        ]
    return None
