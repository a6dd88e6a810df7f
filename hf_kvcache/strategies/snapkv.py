"""SnapKV: compress the prompt once, by the attention of its last queries, and decode uncompressed after it.

Paper: "SnapKV: LLM Knows What You are Looking for Before Generation", https://arxiv.org/abs/2404.14469
"""

from __future__ import annotations

import sys
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from hf_kvcache.budget import Budget, check_budget, check_layer_budgets, tokens
from hf_kvcache.held import RowTensor
from hf_kvcache.model_hooks import AttentionMath, attention_modules
from hf_kvcache.registry import WHEN_SET, check_int, register_strategy
from hf_kvcache.strategies.adaptive_context import check_head_budgets
from hf_kvcache.strategies.ragged import RaggedContext, RaggedEntries, highest_entries, require_entry_point
from hf_kvcache.strategies.scoring import ScoringCache, ScoringLayer, attention_mass


@dataclass(frozen=True)
class SnapKVOptions:
    """Options of :class:`SnapKVCache`; see there."""

    budget: Budget = 256
    window_size: int = 32
    kernel_size: int = 7
    max_prefill: int | None = field(default=None, metadata=WHEN_SET)
    layer_budgets: str = field(default="uniform", metadata=WHEN_SET)
    head_budgets: str = field(default="uniform", metadata=WHEN_SET)

    def __post_init__(self):
        check_head_budgets(self, "snapkv")
        check_int("window_size", self.window_size, 1)
        if self.max_prefill is not None:
            least = max(self.window_size, self.budget if isinstance(self.budget, int) else 1)
            check_int("max_prefill", self.max_prefill, least, " (the budget and the window must fit)")
        check_budget(self, recent="window_size")
        check_layer_budgets(self)
        if not isinstance(self.kernel_size, int) or self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be an odd integer >= 1, got {self.kernel_size!r}")


class SnapKVLayer(RaggedContext, ScoringLayer):
    """Compresses to ``budget`` on multi-token forwards (prefill) only; single-token steps append.

    A *deferred* prompt (``max_prefill``, or ``head_budgets=adaptive``) is held uncompressed while the layer
    holds at most ``max_prefill`` entries (no bound under adaptive budgets alone), and the queries of its
    newest ``window_size`` tokens are kept: the end of the prompt (the first one-token forward, or
    :meth:`SnapKVCache.compress_context`) then compresses the held prompt by them, as one forward over the
    whole prompt would have. Under adaptive budgets the kept entries go to a ragged store
    (:class:`~hf_kvcache.strategies.ragged.RaggedContext`), and later tokens are appended after them.
    """

    window_queries = RowTensor(
        "queries of the newest prompt tokens, until the prompt is compressed [B, H_q, w, D]"
    )
    window_valid = RowTensor("which of them are real tokens [B, w]")

    def __init__(self, options: SnapKVOptions, state):
        self.scored_queries = options.window_size
        self.kernel_size, self.max_prefill = options.kernel_size, options.max_prefill
        self.adaptive = options.head_budgets == "adaptive"
        super().__init__(options.budget, state, recent=options.window_size)

    def reset(self) -> None:
        super().reset()
        self.compressing = False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.ragged = RaggedEntries() if self.adaptive else None

    @property
    def deferring(self) -> bool:
        """Whether prompt chunks are held for the end of the prompt to compress (see the class)."""
        return (self.max_prefill is not None or self.adaptive) and not self.holds_ragged

    def capacity_now(self) -> int:
        return max(tokens(self.budget, self.seen), self.recent)

    def capacity(self, new: int) -> int:
        if self.compressing:
            return self.capacity_now()
        kept = max(tokens(self.budget, self.seen + new), self.recent)
        if new == 1 and self.window_queries is not None and not self.adaptive:
            return self.capacity_now() + 1  # the end of a deferred prompt: compressed, then this token
        if new == 1 or self.holds_ragged:  # generated tokens, and whatever comes after a ragged context
            return sys.maxsize
        if not self.deferring:
            return kept
        limit = sys.maxsize if self.max_prefill is None else self.max_prefill
        return kept if self.stored + new > limit else sys.maxsize

    def get_max_length(self) -> int:
        return -1

    def wants_queries(self, new: int) -> bool:
        if new == 1 and self.window_queries is not None:  # the end of the prompt: its math scores the window
            return self.stored > self.capacity_now()
        return (self.deferring and new > 1) or super().wants_queries(new)

    def serves_attention(self, new: int) -> bool:
        return self.window_queries is None and not self.adaptive and super().serves_attention(new)

    def store_for_attention(self, key_states: torch.Tensor, value_states: torch.Tensor) -> bool | None:
        if not self.adaptive:  # decoding steps that score in place
            return ScoringLayer.store_for_attention(self, key_states, value_states)
        if key_states.shape[-2] == 1 and self.window_queries is not None:
            self.end_prompt()
        return super().store_for_attention(key_states, value_states)  # the ragged context, once held

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if key_states.shape[-2] == 1 and self.window_queries is not None and self.adaptive:
            self.end_prompt()
        result = super().update(key_states, value_states, *args, **kwargs)
        if key_states.shape[-2] == 1:  # the prompt is over: its window has voted, or had nothing to do
            self.window_queries = self.window_valid = None
        return result

    def end_prompt(self, math: AttentionMath | None = None) -> None:
        """Compress a deferred prompt by its window's queries (``math``: this forward's, when ``None``)."""
        if math is None:
            _, math = self.take_queries(required=self.stored > self.capacity_now())
        if self.stored > self.capacity_now():
            keys, values = super().held()
            scores = self.window_scores(keys, math)
            if self.adaptive:  # the layer's budget goes to its highest scores, whatever their head
                quota = self.cached_real.clamp(max=self.capacity_now()) * keys.shape[1]
                real = self.real_entries(keys.shape[-2], self.window_valid[:, :0])
                scores = scores.masked_fill(~real[:, None], float("-inf"))
                self.hold_ragged(keys, values, highest_entries([scores], quota)[0])
            else:
                self.step_scores, self.compressing = scores, True
                try:
                    super().update(keys[:, :, :0], values[:, :, :0])
                finally:
                    self.compressing = False
        self.window_queries = self.window_valid = None

    def window_scores(self, keys: torch.Tensor, math: AttentionMath) -> torch.Tensor:
        """Scores ``[B, H, N]`` of the held prompt by its window's queries, as one forward over the prompt
        would give them; the window itself scores infinity."""
        stored, window = keys.shape[-2], self.window_queries.shape[-2]
        key_valid = self.real_entries(stored, self.window_valid[:, :0])
        mass = attention_mass(self.window_queries, keys, self.window_valid, key_valid, stored - window, math)
        prefix = self.pooled(mass[..., : stored - window])
        return torch.cat([prefix, torch.full_like(mass[..., stored - window :], float("inf"))], -1)

    def observe_attention(self, keys, new_valid, real_in_full, evicting: bool) -> None:
        if self.compressing:  # end_prompt scored the held prompt
            return
        new = 1 if new_valid is None else new_valid.shape[-1]
        if self.deferring and new > 1:
            valid = new_valid[:, -self.recent :]
            held = self.queries[..., -self.recent :, :]
            if self.window_queries is not None and held.shape[-2] < self.recent:  # a chunk shorter than it
                held = torch.cat([self.window_queries, held], -2)[..., -self.recent :, :]
                valid = torch.cat([self.window_valid, valid], -1)[:, -self.recent :]
            self.window_queries, self.window_valid = held, valid
        elif new == 1 and evicting and self.window_queries is not None:  # the end of a deferred prompt
            _, math = self.take_queries(required=True)
            scores = self.window_scores(keys[:, :, :-1], math)
            self.step_scores = torch.cat([scores, torch.full_like(scores[..., :1], float("inf"))], -1)
            return
        super().observe_attention(keys, new_valid, real_in_full, evicting)

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
    ``window_size`` queries (a question at its end) score it at the first one-token forward, or when
    :meth:`compress_context` is called. Left padding is never kept over a real token.

    With ``head_budgets=adaptive`` (AdaKV, https://arxiv.org/abs/2407.11550) a layer keeps ``budget`` times
    its KV heads entries in all, wherever the window's scores are highest: a head that attends widely keeps
    more, one that looks at a few tokens fewer (each keeps at least its window). The prompt is then always
    deferred: the layer holds it in full (up to ``max_prefill`` per head when set) until its end, as
    ``DynamicCache`` would, and the kept entries are held ragged (:mod:`hf_kvcache.strategies.ragged`), so
    ``nbytes`` shows the saving; attention reads them through hf-kvcache's entry point (sdpa or eager
    models). Tokens after the compression are appended.

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
        head_budgets: ``'uniform'`` (``budget`` per KV head) or ``'adaptive'`` (the layer's budget split
            across its heads by score, see above). Default ``'uniform'``.

    Example:
        >>> cache = SnapKVCache(model, budget=256)
        >>> model.generate(**inputs, past_key_values=cache, max_new_tokens=256)
    """

    options_class = SnapKVOptions

    def __init__(self, model, *option_args, **option_kwargs):
        super().__init__(model, *option_args, **option_kwargs)
        require_entry_point(self, "snapkv")

    def build_layers(self, model, layout):
        self.model_ref = weakref.ref(model)
        return super().build_layers(model, layout)

    def make_layer(self, layout) -> SnapKVLayer:
        return SnapKVLayer(self.options, self.forward_state)

    @torch.no_grad()
    def compress_context(self) -> None:
        """Compress a deferred prompt now, by its last ``window_size`` queries (what the first one-token
        forward would do): the context is then compressed before any question is appended. Does nothing
        where nothing is deferred."""
        deferred = [
            i for i, layer in enumerate(self.layers) if getattr(layer, "window_queries", None) is not None
        ]
        if not deferred:
            return
        model = self.model_ref()
        if model is None:
            raise RuntimeError("snapkv cannot compress: the model this cache was built for no longer exists")
        modules = attention_modules(model)
        for index in deferred:
            self.layers[index].end_prompt(AttentionMath.of(modules[index]))
