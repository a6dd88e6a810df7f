"""SnapKV: compress the prompt once, by the attention of its last queries, and decode uncompressed after it.

Paper: "SnapKV: LLM Knows What You are Looking for Before Generation", https://arxiv.org/abs/2404.14469
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from hf_kvcache.budget import Budget, check_budget, check_layer_budgets, tokens
from hf_kvcache.held import RowTensor
from hf_kvcache.registry import WHEN_SET, check_int, register_strategy
from hf_kvcache.strategies.scoring import ScoringCache, ScoringLayer, attention_mass


@dataclass(frozen=True)
class SnapKVOptions:
    """Options of :class:`SnapKVCache`; see there."""

    budget: Budget = 256
    window_size: int = 32
    kernel_size: int = 7
    max_prefill: int | None = field(default=None, metadata=WHEN_SET)
    layer_budgets: str = field(default="uniform", metadata=WHEN_SET)

    def __post_init__(self):
        check_int("window_size", self.window_size, 1)
        if self.max_prefill is not None:
            least = max(self.window_size, self.budget if isinstance(self.budget, int) else 1)
            check_int("max_prefill", self.max_prefill, least, " (the budget and the window must fit)")
        check_budget(self, recent="window_size")
        check_layer_budgets(self)
        if not isinstance(self.kernel_size, int) or self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be an odd integer >= 1, got {self.kernel_size!r}")


class SnapKVLayer(ScoringLayer):
    """Compresses to ``budget`` on multi-token forwards (prefill) only; single-token steps append.

    With ``max_prefill``, prompt chunks are held uncompressed while the layer holds at most ``max_prefill``
    entries, and the queries of the newest ``window_size`` prompt tokens are kept: the first one-token forward
    (the end of the prompt) then compresses the held prompt by them, as one forward over the whole prompt
    would have, before it appends its token.
    """

    window_queries = RowTensor(
        "queries of the newest prompt tokens, until the prompt is compressed [B, H_q, w, D]"
    )
    window_valid = RowTensor("which of them are real tokens [B, w]")

    def __init__(self, options: SnapKVOptions, state):
        self.scored_queries = options.window_size
        self.kernel_size, self.max_prefill = options.kernel_size, options.max_prefill
        super().__init__(options.budget, state, recent=options.window_size)

    def capacity(self, new: int) -> int:
        kept = max(tokens(self.budget, self.seen + new), self.recent)
        if self.max_prefill is None:
            return kept if new > 1 else sys.maxsize
        if new > 1:
            return kept if self.stored + new > self.max_prefill else sys.maxsize
        # The end of the prompt: what one forward over the prompt would keep, plus this token.
        return (
            max(tokens(self.budget, self.seen), self.recent) + 1
            if self.window_queries is not None
            else sys.maxsize
        )

    def get_max_length(self) -> int:
        return -1

    def wants_queries(self, new: int) -> bool:
        return (self.max_prefill is not None and new > 1) or super().wants_queries(new)

    def serves_attention(self, new: int) -> bool:
        return self.window_queries is None and super().serves_attention(new)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        result = super().update(key_states, value_states, *args, **kwargs)
        if key_states.shape[-2] == 1:  # the prompt is over: its window has voted, or had nothing to do
            self.window_queries = self.window_valid = None
        return result

    def observe_attention(self, keys, new_valid, real_in_full, evicting: bool) -> None:
        new = 1 if new_valid is None else new_valid.shape[-1]
        if self.max_prefill is not None and new > 1:
            valid = new_valid[:, -self.recent :]
            held = self.queries[..., -self.recent :, :]
            if self.window_queries is not None and held.shape[-2] < self.recent:  # a chunk shorter than it
                held = torch.cat([self.window_queries, held], -2)[..., -self.recent :, :]
                valid = torch.cat([self.window_valid, valid], -1)[:, -self.recent :]
            self.window_queries, self.window_valid = held, valid
        elif new == 1 and evicting and self.window_queries is not None:
            self._score_by_window(keys, new_valid)
            return
        super().observe_attention(keys, new_valid, real_in_full, evicting)

    def _score_by_window(self, keys: torch.Tensor, new_valid: torch.Tensor | None) -> None:
        """Scores of the held prompt by its window's queries, as one forward over the prompt would give them;
        the window and the new token are kept whatever their score."""
        _, math = self.take_queries(required=True)
        stored, window = keys.shape[-2] - 1, self.window_queries.shape[-2]
        key_valid = None if new_valid is None else self.real_entries(stored, new_valid)
        mass = attention_mass(self.window_queries, keys, self.window_valid, key_valid, stored - window, math)
        prefix = F.max_pool1d(mass[..., : stored - window], self.kernel_size, 1, self.kernel_size // 2)
        self.step_scores = torch.cat(
            [prefix, torch.full_like(mass[..., stored - window :], float("inf"))], -1
        )

    def pooled(self, mass: torch.Tensor) -> torch.Tensor:
        # Max-pooling keeps the neighbours of a strong token, so kept text stays in readable spans.
        return F.max_pool1d(mass, self.kernel_size, 1, self.kernel_size // 2)

    def score(self, mass: torch.Tensor, new: int) -> torch.Tensor:
        # Only the entries before the observation window compete; the window itself is always kept.
        return torch.cat([self.pooled(mass[..., : -self.recent]), mass[..., -self.recent :]], dim=-1)


@register_strategy("snapkv", "SnapKV: compress the prompt once by its last queries' pooled attention")
class SnapKVCache(ScoringCache):
    """SnapKV prompt compression (https://arxiv.org/abs/2404.14469), under SDPA or eager attention.

    When a forward feeds more than one token (the prompt) and the layer would then hold more than ``budget``
    entries, each KV head keeps the ``window_size`` newest entries (the observation window) plus the ``budget
    - window_size`` older ones with the most attention from the window's queries (summed over those queries
    and the query heads sharing the KV head), after a 1-D max-pool of ``kernel_size`` over positions. Tokens
    generated afterwards, one per forward, are appended uncompressed, so the cache holds ``budget`` plus the
    generated tokens. A prompt fed in chunks is compressed after each chunk, scored by that chunk's last
    queries, unless ``max_prefill`` defers it: the chunks are then held (at most ``max_prefill`` entries per
    layer and KV head, plus one chunk; past that the layer compresses as without it) and the prompt's last
    ``window_size`` queries (a question at its end) score it at the first one-token forward. Left padding is
    never kept over a real token.

    Args:
        model: the model the cache serves (Llama-style attention: Llama, Mistral, Qwen2/3, Phi3, ...).
        budget: entries kept per layer and KV head after the prompt, window included; in tokens or as a
            fraction of the prompt (``0.25``). Default 256.
        window_size: last prompt queries that score the rest, and entries always kept. Default 32.
        kernel_size: width of the max-pool over scores (odd). Default 7.
        max_prefill: entries a chunked prompt may hold before it is compressed; ``None``: compress after every
            chunk. Default ``None``.
        layer_budgets: ``'uniform'`` (``budget`` in every layer) or ``'pyramid'``: more in early layers,
            less in late ones, at the same total (PyramidKV, :func:`hf_kvcache.budget.pyramid_budgets`).
            Default ``'uniform'``.

    Example:
        >>> cache = SnapKVCache(model, budget=256)
        >>> model.generate(**inputs, past_key_values=cache, max_new_tokens=256)
    """

    options_class = SnapKVOptions

    def make_layer(self, layout) -> SnapKVLayer:
        return SnapKVLayer(self.options, self.forward_state)
