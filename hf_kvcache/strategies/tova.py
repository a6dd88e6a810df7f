"""TOVA: keep a fixed budget; at each step evict the entry the current query attends to least.

Paper: "Transformers are Multi-State RNNs" (Oren et al., 2024), https://arxiv.org/abs/2401.06104
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hf_kvcache.budget import LAYER_SCHEDULES, Budget, check_budget, check_layer_budgets
from hf_kvcache.held import RowTensor
from hf_kvcache.registry import WHEN_SET, register_strategy
from hf_kvcache.strategies.adaptive_context import (
    CompressedContext,
    CompressedContextCache,
    check_head_budgets,
)
from hf_kvcache.strategies.ragged import require_entry_point
from hf_kvcache.strategies.scoring import ScoringCache, ScoringLayer


@dataclass(frozen=True)
class TOVAOptions:
    """Options of :class:`TOVAKVCache`; see there."""

    budget: Budget = 256
    layer_budgets: str = field(default="uniform", metadata=WHEN_SET)
    head_budgets: str = field(default="uniform", metadata=WHEN_SET)

    def __post_init__(self):
        check_budget(self)
        check_layer_budgets(self, (*LAYER_SCHEDULES, "adaptive"))
        check_head_budgets(self, "tova")


class TOVALayer(ScoringLayer):
    """Scores an entry by the attention of the newest query, summed over the query heads of its KV head."""

    scored_queries = 1


class AdaptiveTOVALayer(CompressedContext, TOVALayer):
    """A TOVA layer under ``head_budgets=adaptive``: the prompt's last query ranks it once, at its end,
    across the layer's heads (:mod:`.adaptive_context`)."""

    accumulates = True  # every prompt forward scores, so that its last query's attention is at hand
    newest_attention = RowTensor(
        "attention of the newest prompt query to every held entry [B, H_kv, N], float32, until compressed"
    )

    def score(self, mass: torch.Tensor, new: int) -> torch.Tensor:
        self.newest_attention = mass
        return mass

    def context_priority(self, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return self.newest_attention

    def compress(self, keep: torch.Tensor | None) -> None:
        super().compress(keep)
        self.newest_attention = None


@register_strategy("tova", "TOVA: a fixed budget; evict the entries the current query attends to least")
class TOVAKVCache(CompressedContextCache, ScoringCache):
    """Token Omission Via Attention (TOVA, https://arxiv.org/abs/2401.06104), under SDPA or eager attention.

    Holds at most ``budget`` entries per layer. Whenever a forward would leave more, each KV head keeps the
    ``budget`` entries with the highest attention from the newest query (its probabilities summed over the
    query heads that share the KV head, which ranks them as their average does); the newest token itself may
    go. There
    is no fixed recent window: the query decides. A prompt longer than the budget is cut to it at prefill by
    its last token's attention. Left padding is never kept over a real token.

    Args:
        model: the model the cache serves (Llama-style attention: Llama, Mistral, Qwen2/3, Phi3, ...).
        budget: entries kept per layer and KV head, in tokens or as a fraction of the tokens seen
            (``0.25``). Default 256.
        layer_budgets: ``'uniform'`` (``budget`` in every layer) or ``'pyramid'``: more in early layers,
            less in late ones, at the same total (PyramidKV, :func:`hf_kvcache.budget.pyramid_budgets`).
            Under adaptive heads also ``'adaptive'``: one budget for every layer's heads together. Default
            ``'uniform'``.
        head_budgets: ``'uniform'`` (``budget`` per KV head, evicting at every step) or ``'adaptive'``
            (AdaKV, https://arxiv.org/abs/2407.11550): the prompt is held whole until it ends (the first
            one-token forward, or :meth:`compress_context`), then each layer keeps ``budget`` times its KV
            heads entries wherever the prompt's last query attends most, held ragged, and later tokens are
            appended (:mod:`hf_kvcache.strategies.adaptive_context`; sdpa or eager models). Default
            ``'uniform'``.

    Example:
        >>> cache = TOVAKVCache(model, budget=256)
        >>> model.generate(**inputs, past_key_values=cache, max_new_tokens=256)
    """

    options_class = TOVAOptions

    def __init__(self, model, *option_args, **option_kwargs):
        super().__init__(model, *option_args, **option_kwargs)
        require_entry_point(self, "tova")

    def make_layer(self, layout) -> TOVALayer:
        adaptive = self.options.head_budgets == "adaptive"
        return (AdaptiveTOVALayer if adaptive else TOVALayer)(self.options.budget, self.forward_state)
