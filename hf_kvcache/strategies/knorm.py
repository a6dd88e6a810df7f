"""Key-norm eviction: keep the entries whose keys have the smallest L2 norm.

Paper: "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression" (Devoto et al., 2024),
https://arxiv.org/abs/2406.11430
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hf_kvcache.budget import LAYER_SCHEDULES, Budget, check_budget, check_layer_budgets
from hf_kvcache.registry import WHEN_SET, register_strategy
from hf_kvcache.strategies.adaptive_context import (
    CompressedContext,
    CompressedContextCache,
    check_head_budgets,
)
from hf_kvcache.strategies.eviction import EvictingLayer, EvictionCache
from hf_kvcache.strategies.quantized import QuantizedOptions
from hf_kvcache.strategies.quantized_storage import (
    QuantizedStorage,
    check_composed_quantization,
    check_recent_covers_residual,
)
from hf_kvcache.strategies.ragged import require_entry_point


@dataclass(frozen=True)
class KeyNormOptions:
    """Options of :class:`KeyNormKVCache`; see there."""

    budget: Budget = 256
    num_sink_tokens: int = 4
    recent: Budget = 160
    quantization: QuantizedOptions | None = field(default=None, metadata={"composes": "quantized"})
    layer_budgets: str = field(default="uniform", metadata=WHEN_SET)
    head_budgets: str = field(default="uniform", metadata=WHEN_SET)

    def __post_init__(self):
        check_budget(self, sinks="num_sink_tokens", recent="recent")
        check_layer_budgets(self, (*LAYER_SCHEDULES, "adaptive"))
        check_head_budgets(self, "knorm")
        check_composed_quantization(self.quantization)
        check_recent_covers_residual(self.recent, self.quantization)


# Significant bits a key norm keeps when ranked. The same token at two positions has one norm in exact
# arithmetic (RoPE preserves it), but the two computed norms differ in their last bits, and differently on
# each device: rounded, they tie, and the tie goes to the newer entry on every device.
NORM_BITS = 12


def rounded_norms(keys: torch.Tensor) -> torch.Tensor:
    """L2 norms ``[B, H, T]`` of ``keys`` ``[B, H, T, D]`` in float32, rounded to :data:`NORM_BITS`
    significant bits."""
    mantissa, exponent = torch.frexp(keys.float().norm(dim=-1))
    return torch.ldexp(torch.round(mantissa * 2**NORM_BITS) / 2**NORM_BITS, exponent)


class KeyNormLayer(EvictingLayer):
    """Ranks entries by the negated L2 norm of their keys: a low-norm key draws high attention (the paper's
    finding), so the smallest norms are kept. Norms equal to 12 significant bits tie; ties go to the newer
    entry."""

    def priority(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return -rounded_norms(keys)


class AdaptiveKeyNormLayer(CompressedContext, KeyNormLayer):
    """A key-norm layer under ``head_budgets=adaptive``: the prompt's key norms rank its entries once, at
    its end, across the layer's heads (:mod:`.adaptive_context`)."""


class QuantizedKeyNormLayer(QuantizedStorage, KeyNormLayer):
    """A key-norm layer that holds its entries in quantized storage (``knorm+quantized``); it ranks them by
    the norms of their dequantized keys."""


@register_strategy("knorm", "key norm: keep the entries whose keys have the smallest L2 norm")
class KeyNormKVCache(CompressedContextCache, EvictionCache):
    """Key-norm eviction (Devoto et al., https://arxiv.org/abs/2406.11430), under any attention.

    Needs no attention scores, so it costs one norm per entry and works with SDPA, eager and flash attention
    alike. The first ``num_sink_tokens`` real tokens of each row and the ``recent`` newest are always kept;
    of the rest, each KV head keeps those whose keys have the smallest norm, up to ``budget`` entries in all.
    On models that normalize their keys (Qwen 3, Olmo 2, Gemma 3 with ``k_norm``) the norms nearly tie, and
    ties go to the newer entry: the cache then behaves as a sliding window.

    Args:
        model: the model the cache serves.
        budget: entries kept per layer and KV head, in tokens or as a fraction of the tokens seen.
            Default 256.
        num_sink_tokens: first tokens of each row always kept. Default 4.
        recent: newest tokens always kept, in tokens or a fraction of the tokens seen; it covers the
            residual of a default quantized half. Default 160.
        quantization: a :class:`~hf_kvcache.strategies.quantized.QuantizedOptions` to hold the kept tokens
            bit-packed (spec ``knorm:...+quantized:...``); ``recent`` must cover its residual
            (``residual_length + group_size - 1`` tokens).
            ``None``: everything in full precision. Default ``None``.
        layer_budgets: ``'uniform'`` (``budget`` in every layer), ``'pyramid'`` (PyramidKV's schedule,
            :func:`hf_kvcache.budget.pyramid_budgets`: more in early layers, less in late ones, at the same
            total) or, with adaptive heads, ``'adaptive'`` (every layer's heads share one budget). Default
            ``'uniform'``.
        head_budgets: ``'uniform'`` (``budget`` per KV head, evicting at every step) or ``'adaptive'``
            (AdaKV, https://arxiv.org/abs/2407.11550): the prompt is held whole until it ends (the first
            one-token forward, or :meth:`compress_context`), then each layer keeps ``budget`` times its KV
            heads entries of smallest key norm, whatever their head, held ragged, and later tokens are
            appended (:mod:`hf_kvcache.strategies.adaptive_context`; sdpa or eager models, no
            ``quantization``). Default ``'uniform'``.

    Example:
        >>> cache = KeyNormKVCache(model, budget=0.25)
        >>> model.generate(**inputs, past_key_values=cache, max_new_tokens=64)
    """

    options_class = KeyNormOptions

    def __init__(self, model, *option_args, **option_kwargs):
        super().__init__(model, *option_args, **option_kwargs)
        require_entry_point(self, "knorm")

    def make_layer(self, layout) -> KeyNormLayer:
        options, quantization = self.options, self.options.quantization
        if quantization is None:  # adaptive heads never compose with quantization (checked by the options)
            layer_class = AdaptiveKeyNormLayer if options.head_budgets == "adaptive" else KeyNormLayer
            return layer_class(options.budget, self.forward_state, options.num_sink_tokens, options.recent)
        quantization.check_head_dim(layout.head_dim)
        # Sinks past the quantizer's are held packed; they are never evicted either way.
        sinks = min(quantization.num_sink_tokens, options.num_sink_tokens)
        return QuantizedKeyNormLayer(
            options.budget,
            self.forward_state,
            options.num_sink_tokens,
            options.recent,
            quantization=quantization,
            num_sink_tokens=sinks,
        )
