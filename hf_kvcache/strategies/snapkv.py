"""SnapKV: compress the prompt once, by the attention of its last queries, and decode uncompressed after it.

Paper: "SnapKV: LLM Knows What You are Looking for Before Generation", https://arxiv.org/abs/2404.14469
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hf_kvcache.budget import Budget, check_budget, tokens
from hf_kvcache.registry import check_int, register_strategy
from hf_kvcache.strategies.scoring import ScoringCache, ScoringLayer


@dataclass(frozen=True)
class SnapKVOptions:
    """Options of :class:`SnapKVCache`; see there."""

    budget: Budget = 256
    window_size: int = 32
    kernel_size: int = 7

    def __post_init__(self):
        check_int("window_size", self.window_size, 1)
        check_budget(self, recent="window_size")
        if not isinstance(self.kernel_size, int) or self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be an odd integer >= 1, got {self.kernel_size!r}")


class SnapKVLayer(ScoringLayer):
    """Compresses to ``budget`` on multi-token forwards (prefill) only; single-token steps append."""

    def __init__(self, options: SnapKVOptions, state):
        self.scored_queries = options.window_size
        self.kernel_size = options.kernel_size
        super().__init__(options.budget, state, recent=options.window_size)

    def capacity(self, new: int) -> int:
        return max(tokens(self.budget, self.seen + new), self.recent) if new > 1 else sys.maxsize

    def get_max_length(self) -> int:
        return -1

    def score(self, mass: torch.Tensor, new: int) -> torch.Tensor:
        # Max-pooling keeps the neighbours of a strong token, so kept text stays in readable spans. Only the
        # entries before the observation window compete; the window itself is always kept.
        prefix = F.max_pool1d(mass[..., : -self.recent], self.kernel_size, 1, self.kernel_size // 2)
        return torch.cat([prefix, mass[..., -self.recent :]], dim=-1)


@register_strategy("snapkv", "SnapKV: compress the prompt once by its last queries' pooled attention")
class SnapKVCache(ScoringCache):
    """SnapKV prompt compression (https://arxiv.org/abs/2404.14469), under SDPA or eager attention.

    When a forward feeds more than one token (the prompt) and the layer would then hold more than ``budget``
    entries, each KV head keeps the ``window_size`` newest entries (the observation window) plus the ``budget
    - window_size`` older ones with the most attention from the window's queries (summed over those queries
    and the query heads sharing the KV head), after a 1-D max-pool of ``kernel_size`` over positions. Tokens
    generated afterwards, one per forward, are appended uncompressed, so the cache holds ``budget`` plus the
    generated tokens. A prompt fed in chunks is compressed after each chunk, scored by that chunk's last
    queries. Left padding is never kept over a real token.

    Args:
        model: the model the cache serves (Llama-style attention: Llama, Mistral, Qwen2/3, Phi3, ...).
        budget: entries kept per layer and KV head after the prompt, window included; in tokens or as a
            fraction of the prompt (``0.25``). Default 256.
        window_size: last prompt queries that score the rest, and entries always kept. Default 32.
        kernel_size: width of the max-pool over scores (odd). Default 7.

    Example:
        >>> cache = SnapKVCache(model, budget=256)
        >>> model.generate(**inputs, past_key_values=cache, max_new_tokens=256)
    """

    options_class = SnapKVOptions

    def make_layer(self, layout) -> SnapKVLayer:
        return SnapKVLayer(self.options, self.forward_state)
