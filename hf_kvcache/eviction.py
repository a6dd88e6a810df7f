"""Shared machinery of caches that drop tokens: per-row selection that respects left padding.

Each row of the batch keeps the same number of entries, chosen per row (and per KV head). The mask that
``transformers`` builds reads the 2D padding mask at columns ``seen - kept + i`` for stored entry ``i``; with left
padding those columns are padding exactly for the first ``max(0, kept - real_tokens)`` entries. So a row that has
enough real tokens keeps only real ones, and a row that has fewer keeps all of them behind that many padding
entries, which then line up with the padded columns.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import CacheLayerMixin

from hf_kvcache.base import KVCache
from hf_kvcache.forward_context import install_forward_observer, left_padding_counts


class ForwardState:
    """What the current forward call looks like, shared by the layers of one cache."""

    def __init__(self):
        self.attention_mask: torch.Tensor | None = None


class EvictingLayer(CacheLayerMixin):
    """Keys and values ``[B, H, K, D]`` with ``K <= budget``; subclasses choose which entries to keep.

    Bookkeeping per row: ``real_seen`` real (non-padding) tokens so far and ``cached_real`` of them still held.
    """

    is_compileable = False
    is_sliding = False
    is_croppable = False

    def __init__(self, budget: int, state: ForwardState):
        super().__init__()
        self.budget = budget
        self.state = state
        self.reset()

    def reset(self) -> None:
        self.keys = self.values = None
        self.real_seen = self.cached_real = None
        self.seen = 0
        self.is_initialized = False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        batch = key_states.shape[0]
        self.keys, self.values = key_states[..., :0, :].clone(), value_states[..., :0, :].clone()
        self.real_seen = torch.zeros(batch, dtype=torch.long, device=self.device)
        self.cached_real = torch.zeros(batch, dtype=torch.long, device=self.device)
        self.is_initialized = True

    # --- hooks for subclasses -------------------------------------------------------------------------
    def attention_keys(self, keys: torch.Tensor, evicted: torch.Tensor) -> torch.Tensor:
        """Keys handed to attention this step (stored keys plus new); ``evicted`` real tokens per row so far."""
        return keys

    def observe_attention(
        self, keys: torch.Tensor, new_valid: torch.Tensor, real_in_full: torch.Tensor
    ) -> None:
        """Called after concatenation and before eviction (score-based strategies accumulate here)."""

    def choose(self, total: int, kept: int, real_in_full: torch.Tensor) -> torch.Tensor:
        """Indices ``[B, H, kept]`` into the ``total`` entries, ascending, for rows with ``kept`` real entries."""
        raise NotImplementedError

    def gather_extra(self, indices: torch.Tensor) -> None:
        """Apply the same selection to per-entry state a subclass keeps."""

    # --------------------------------------------------------------------------------------------------
    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        batch, heads, new, _ = key_states.shape
        pads = left_padding_counts(self.state.attention_mask, batch, self.seen + new, self.device)
        before = (self.seen - pads).clamp(min=0)
        after = (self.seen + new - pads).clamp(min=0)
        new_real = after - before
        # New entry j of row b is real when its column seen + j is past the row's padding.  # [B, new]
        new_valid = (self.seen + torch.arange(new, device=self.device))[None, :] >= pads[:, None]
        full_keys = torch.cat([self.keys, key_states], dim=-2)
        full_values = torch.cat([self.values, value_states], dim=-2)
        real_in_full = self.cached_real + new_real
        returned_keys = self.attention_keys(full_keys, self.real_seen - self.cached_real)
        self.observe_attention(returned_keys, new_valid, real_in_full)
        self.seen += new
        self.real_seen = self.real_seen + new_real
        total = full_keys.shape[-2]
        if total <= self.budget:
            self.keys, self.values, self.cached_real = full_keys, full_values, real_in_full
            return returned_keys, full_values
        kept = self.budget
        # Rows short of real tokens keep the newest `kept` entries: all real ones behind padding.
        fallback = torch.arange(total - kept, total, device=self.device).expand(batch, heads, kept)
        enough = (real_in_full >= kept)[:, None, None]
        indices = torch.where(enough, self.choose(total, kept, real_in_full), fallback)
        gather = indices.unsqueeze(-1).expand(-1, -1, -1, full_keys.shape[-1])
        self.keys = full_keys.gather(2, gather)
        self.values = full_values.gather(2, gather)
        self.gather_extra(indices)
        self.cached_real = real_in_full.clamp(max=kept)
        return returned_keys, full_values

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        stored = 0 if not self.is_initialized else self.keys.shape[-2]
        return stored + query_length, self.seen - stored

    def get_max_length(self) -> int:
        return self.budget

    def _select_rows(self, select) -> None:
        if self.is_initialized:
            self.keys, self.values = select(self.keys), select(self.values)
            self.real_seen, self.cached_real = select(self.real_seen), select(self.cached_real)
            self.select_extra_rows(select)

    def select_extra_rows(self, select) -> None:
        """Apply a batch-row selection to per-entry state a subclass keeps."""

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select_rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select_rows(lambda t: t[indices])

    def crop(self, max_length: int) -> None:
        raise ValueError(
            f"{type(self).__name__} cannot crop: evicted tokens are gone, so rolling back cannot be exact "
            "(assisted decoding and other rollbacks need a cache that keeps every token)"
        )


class EvictionCache(KVCache):
    """A cache of :class:`EvictingLayer` s that learns each forward's padding mask from the model."""

    def __init__(
        self, model: PreTrainedModel, layers: list[EvictingLayer], config: object, state: ForwardState
    ):
        super().__init__(layers, config)
        self.forward_state = state
        install_forward_observer(model)

    def observe_forward(self, attention_mask: torch.Tensor | None, query_length: int) -> None:
        """Called by the model hook before each forward with the 2D mask of that call."""
        self.forward_state.attention_mask = attention_mask

    def reset(self) -> None:
        super().reset()
        self.forward_state.attention_mask = None
