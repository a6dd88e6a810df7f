"""TOVA: keep a fixed budget; at each step evict the entry the current query attends to least.

Paper: "Transformers are Multi-State RNNs" (Oren et al., 2024), https://arxiv.org/abs/2401.06104
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hf_kvcache.budget import Budget, check_budget, check_layer_budgets
from hf_kvcache.registry import WHEN_SET, register_strategy
from hf_kvcache.strategies.scoring import ScoringCache, ScoringLayer


@dataclass(frozen=True)
class TOVAOptions:
    """Options of :class:`TOVAKVCache`; see there."""

    budget: Budget = 256
    layer_budgets: str = field(default="uniform", metadata=WHEN_SET)

    def __post_init__(self):
        check_budget(self)
        check_layer_budgets(self)


class TOVALayer(ScoringLayer):
    """Scores an entry by the attention of the newest query, summed over the query heads of its KV head."""

    scored_queries = 1


@register_strategy("tova", "TOVA: a fixed budget; evict the entries the current query attends to least")
class TOVAKVCache(ScoringCache):
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
            Default ``'uniform'``.

    Example:
        >>> cache = TOVAKVCache(model, budget=256)
        >>> model.generate(**inputs, past_key_values=cache, max_new_tokens=256)
    """

    options_class = TOVAOptions

    def make_layer(self, layout) -> TOVALayer:
        return TOVALayer(self.options.budget, self.forward_state)
