"""Shared machinery of caches that drop tokens: per-row selection that respects left padding.

Each row of the batch keeps the same number of entries, chosen per row (and per KV head). The mask that
``transformers`` builds reads the 2D padding mask at columns ``seen - kept + i`` for stored entry ``i``; with left
padding those columns are padding exactly for the first ``max(0, kept - real_tokens)`` entries. So a row that has
enough real tokens keeps only real ones, and a row that has fewer keeps all of them behind that many padding
entries, which then line up with the padded columns.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import CacheLayerMixin

from hf_kvcache.base import BatchRowsMixin, KVCache
from hf_kvcache.layout import FULL_ATTENTION, AttentionLayout, require_layer_types
from hf_kvcache.model_hooks import install_forward_observer, left_padding_counts


class ForwardState:
    """What the current forward call looks like, shared by the layers of one cache."""

    def __init__(self):
        self.attention_mask: torch.Tensor | None = None


class EvictingLayer(BatchRowsMixin, CacheLayerMixin):
    """Keys and values ``[B, H, K, D]``; whenever an update would leave more than ``capacity(new)`` entries, the
    subclass's :meth:`choose` picks which to keep.

    Bookkeeping per row: ``real_seen`` real (non-padding) tokens so far and ``cached_real`` of them still held.
    Subclasses name per-entry tensors ``[B, H, K]`` in ``entry_state``: they follow each eviction.
    """

    is_compileable = False
    is_sliding = False
    is_croppable = False
    batched: ClassVar[tuple[str, ...]] = ("keys", "values", "real_seen", "cached_real")
    entry_state: ClassVar[tuple[str, ...]] = ()

    def __init__(self, budget: int, state: ForwardState):
        super().__init__()
        self.budget = budget
        self.state = state
        self.reset()

    def reset(self) -> None:
        self.keys = self.values = None
        self.real_seen = self.cached_real = None
        for name in self.entry_state:
            setattr(self, name, None)
        self.seen = 0
        self.is_initialized = False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        batch = key_states.shape[0]
        self.keys, self.values = key_states[..., :0, :].clone(), value_states[..., :0, :].clone()
        self.real_seen = torch.zeros(batch, dtype=torch.long, device=self.device)
        self.cached_real = torch.zeros(batch, dtype=torch.long, device=self.device)
        self.is_initialized = True

    @property
    def stored(self) -> int:
        """Entries held now."""
        return 0 if self.keys is None else self.keys.shape[-2]

    # --- hooks for subclasses -------------------------------------------------------------------------
    def capacity(self, new: int) -> int:
        """Entries kept after an update that adds ``new``; more than that triggers :meth:`choose`."""
        return self.budget

    def attention_keys(self, keys: torch.Tensor, evicted: torch.Tensor) -> torch.Tensor:
        """Keys handed to attention this step (stored keys plus new); ``evicted`` real tokens per row so far."""
        return keys

    def observe_attention(
        self, keys: torch.Tensor, new_valid: torch.Tensor, real_in_full: torch.Tensor, evicting: bool
    ) -> None:
        """Called after concatenation and before eviction (score-based strategies score here).

        ``new_valid`` ``[B, new]`` marks real new tokens; ``real_in_full`` ``[B]`` counts real entries in ``keys``.
        """

    def choose(self, total: int, kept: int, real_in_full: torch.Tensor) -> torch.Tensor:
        """Indices ``[B, H, kept]`` into the ``total`` entries, ascending, for rows with ``kept`` real entries."""
        raise NotImplementedError

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
        total = full_keys.shape[-2]
        kept = min(total, self.capacity(new))
        returned_keys = self.attention_keys(full_keys, self.real_seen - self.cached_real)
        self.observe_attention(returned_keys, new_valid, real_in_full, evicting=kept < total)
        self.seen += new
        self.real_seen = self.real_seen + new_real
        if kept == total:
            self.keys, self.values, self.cached_real = full_keys, full_values, real_in_full
            return returned_keys, full_values
        # Rows short of real tokens keep the newest `kept` entries: all real ones behind padding.
        fallback = torch.arange(total - kept, total, device=self.device).expand(batch, heads, kept)
        enough = (real_in_full >= kept)[:, None, None]
        indices = torch.where(enough, self.choose(total, kept, real_in_full), fallback)
        gather = indices.unsqueeze(-1).expand(-1, -1, -1, full_keys.shape[-1])
        self.keys = full_keys.gather(2, gather)
        self.values = full_values.gather(2, gather)
        for name in self.entry_state:
            setattr(self, name, getattr(self, name).gather(2, indices))
        self.cached_real = real_in_full.clamp(max=kept)
        return returned_keys, full_values

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.stored + query_length, self.seen - self.stored

    def get_max_length(self) -> int:
        return self.budget

    def select_rows(self, select) -> None:
        super().select_rows(select)
        if self.is_initialized:
            for name in self.entry_state:
                if getattr(self, name) is not None:
                    setattr(self, name, select(getattr(self, name)))

    def crop(self, max_length: int) -> None:
        raise ValueError(
            f"{type(self).__name__} cannot crop: evicted tokens are gone, so rolling back cannot be exact "
            "(assisted decoding and other rollbacks need a cache that keeps every token)"
        )


class EvictionCache(KVCache):
    """A cache of :class:`EvictingLayer` s, one per full-attention layer, that learns each forward's padding mask
    from the model. Subclasses implement :meth:`make_layer`."""

    def build_layers(self, model: PreTrainedModel, layout: AttentionLayout) -> list[EvictingLayer]:
        require_layer_types(layout, (FULL_ATTENTION,), type(self).__name__)
        install_forward_observer(model)
        self.forward_state = ForwardState()
        return [self.make_layer(layout) for _ in range(layout.num_layers)]

    def make_layer(self, layout: AttentionLayout) -> EvictingLayer:
        """A fresh layer for one model layer; it shares ``self.forward_state``."""
        raise NotImplementedError

    def observe_forward(self, attention_mask: torch.Tensor | None, query_length: int) -> None:
        """Called by the model hook before each forward with the 2D mask of that call."""
        self.forward_state.attention_mask = attention_mask

    def reset(self) -> None:
        super().reset()
        self.forward_state.attention_mask = None
