"""Heavy-hitter eviction (H2O): keep the recent tokens and those that have drawn the most attention.

Paper: "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models",
https://arxiv.org/abs/2306.14048
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hf_kvcache.budget import Budget, check_budget_value, tokens
from hf_kvcache.held import SlotTensor
from hf_kvcache.registry import WHEN_SET, register_strategy
from hf_kvcache.strategies.adaptive_context import (
    CompressedContext,
    CompressedContextCache,
    check_head_budgets,
)
from hf_kvcache.strategies.quantized import QuantizedOptions
from hf_kvcache.strategies.quantized_storage import QuantizedStorage, check_composed_quantization
from hf_kvcache.strategies.ragged import require_entry_point
from hf_kvcache.strategies.scoring import ScoringCache, ScoringLayer


@dataclass(frozen=True)
class HeavyHitterOptions:
    """Options of :class:`HeavyHitterKVCache`; see there."""

    heavy_budget: Budget = 128
    recent_budget: Budget = 128
    quantization: QuantizedOptions | None = field(default=None, metadata={"composes": "quantized"})
    head_budgets: str = field(default="uniform", metadata=WHEN_SET)

    def __post_init__(self):
        check_composed_quantization(self.quantization)
        check_head_budgets(self, "heavy-hitter")
        check_budget_value("heavy_budget", self.heavy_budget, 0)
        check_budget_value("recent_budget", self.recent_budget, 0)
        if self.heavy_budget == 0 and self.recent_budget == 0:
            raise ValueError("heavy_budget + recent_budget must be at least 1, got 0")
        quantization = self.quantization
        if quantization is not None and not isinstance(self.recent_budget, int):
            raise ValueError(
                f"recent_budget={self.recent_budget} must be in tokens (at least residual_length="
                f"{quantization.residual_length}) when the kept tokens are quantized: the full-precision "
                "residual is the newest tokens, which heavy-hitter eviction must never evict"
            )
        if quantization is not None and quantization.residual_length > self.recent_budget:
            raise ValueError(
                f"residual_length={quantization.residual_length} of the quantized half must be at most "
                f"recent_budget={self.recent_budget}: the full-precision residual is the newest tokens, "
                "which heavy-hitter eviction must never evict"
            )
        heavy = self.heavy_budget
        if quantization is not None and isinstance(heavy, int) and quantization.num_sink_tokens > heavy:
            raise ValueError(
                f"num_sink_tokens={quantization.num_sink_tokens} of the quantized half must be at most "
                f"heavy_budget={self.heavy_budget}: the sinks are always kept, out of the heavy budget"
            )


class HeavyHitterLayer(ScoringLayer):
    """Scores each held entry by the attention it has received so far: every query's probabilities, summed
    over the query heads sharing its KV head (``accumulated``, which follows every eviction)."""

    accumulates = True

    def __init__(self, heavy: Budget, state, sinks: int = 0, recent: Budget = 0):
        # The budget is heavy + recent; kept as one number where both are tokens (local windows read it).
        budget = heavy + recent if isinstance(heavy, int) and isinstance(recent, int) else heavy
        self.heavy = heavy
        super().__init__(budget, state, sinks, recent)

    def capacity(self, new: int) -> int:
        seen = self.seen + new
        return max(self.sinks, tokens(self.heavy, seen)) + tokens(self.recent, seen)

    accumulated = SlotTensor("attention each slot received so far [B, H_kv, slots]", torch.float32, fill=0.0)

    def score(self, mass: torch.Tensor, new: int) -> torch.Tensor:
        seen = self.accumulated[..., : mass.shape[-1]]
        seen += mass
        return seen

    @property
    def scores(self) -> torch.Tensor:
        """Accumulated attention ``[B, H_kv, K]`` of the held entries, in age order."""
        return self.ordered(self.accumulated)


class AdaptiveHeavyHitterLayer(CompressedContext, HeavyHitterLayer):
    """A heavy-hitter layer under ``head_budgets=adaptive``: the attention every prompt query paid each entry
    ranks the prompt once, at its end, across the layer's heads (:mod:`.adaptive_context`)."""

    def context_priority(self, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return self.scores


class QuantizedHeavyHitterLayer(QuantizedStorage, HeavyHitterLayer):
    """A heavy-hitter layer that holds its entries in quantized storage (``heavy-hitter+quantized``); its
    sinks are always kept, out of the heavy budget."""

    victims_from = "scores"


@register_strategy(
    "heavy-hitter", "H2O: recent tokens plus those with the most accumulated attention, per KV head"
)
class HeavyHitterKVCache(CompressedContextCache, ScoringCache):
    """Heavy-hitter eviction cache (H2O, https://arxiv.org/abs/2306.14048), under SDPA or eager attention.

    For each KV head it keeps the ``recent_budget`` newest tokens plus the ``heavy_budget`` older tokens with
    the
    largest accumulated attention: the probability each token has received, summed over every query so far and
    over the query heads that share the KV head (GQA). Eviction happens at prefill and at every decoding step,
    so memory stays bounded. Each row of a batch chooses its own tokens; left padding is never kept as a heavy
    hitter. Scores come from queries recomputed in hooks on this model's attention modules, so SDPA works and
    nothing changes for other caches.

    Args:
        model: the model the cache serves (Llama-style attention: Llama, Mistral, Qwen2/3, Phi3, ...).
        heavy_budget: older tokens kept by accumulated attention, in tokens or as a fraction of the tokens
            seen (``0.125``). Default 128.
        recent_budget: newest tokens always kept, in tokens or as a fraction of the tokens seen. Default 128.
        quantization: a :class:`~hf_kvcache.strategies.quantized.QuantizedOptions` to hold the kept tokens
            bit-packed (spec ``heavy-hitter:...+quantized:...``; see :mod:`~.quantized_storage` for how single
            tokens leave per-channel key groups): the first ``num_sink_tokens`` tokens are then always kept in
            full precision, out of the heavy budget, and the newest ``residual_length`` (at most
            ``recent_budget``) too. ``None``: everything in full precision. Default ``None``.
        head_budgets: ``'uniform'`` (the budgets per KV head, evicting at every step) or ``'adaptive'``
            (AdaKV, https://arxiv.org/abs/2407.11550): the prompt is held whole until it ends (the first
            one-token forward, or :meth:`compress_context`), then each layer keeps its ``recent_budget``
            newest entries per head plus ``heavy_budget`` times its KV heads of the most accumulated
            attention, whatever their head, held ragged, and later tokens are appended
            (:mod:`hf_kvcache.strategies.adaptive_context`; sdpa or eager models, no ``quantization``).
            Default ``'uniform'``.

    Example:
        >>> cache = HeavyHitterKVCache(model, heavy_budget=128, recent_budget=128)
        >>> model.generate(**inputs, past_key_values=cache, max_new_tokens=256)
    """

    options_class = HeavyHitterOptions

    def __init__(self, model, *option_args, **option_kwargs):
        super().__init__(model, *option_args, **option_kwargs)
        require_entry_point(self, "heavy-hitter")

    def make_layer(self, layout) -> HeavyHitterLayer:
        heavy, recent = self.options.heavy_budget, self.options.recent_budget
        quantization = self.options.quantization
        if quantization is None:
            adaptive = self.options.head_budgets == "adaptive"
            return (AdaptiveHeavyHitterLayer if adaptive else HeavyHitterLayer)(
                heavy, self.forward_state, recent=recent
            )
        quantization.check_head_dim(layout.head_dim)
        sinks = quantization.num_sink_tokens
        return QuantizedHeavyHitterLayer(
            heavy, self.forward_state, sinks, recent, quantization=quantization, num_sink_tokens=sinks
        )
