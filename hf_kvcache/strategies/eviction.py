"""Shared machinery of caches that drop tokens: preallocated buffers, per-row selection that respects left padding.

Each row of the batch keeps the same number of entries, chosen per row (and per KV head). The mask that
``transformers`` builds reads the 2D padding mask at columns ``seen - kept + i`` for stored entry ``i``; with left
padding those columns are padding exactly for the first ``max(0, kept - real_tokens)`` entries. So a row that has
enough real tokens keeps only real ones, and a row that has fewer keeps all of them behind that many padding
entries, which then line up with the padded columns.

Cost per step: a decoding step that evicts one entry per row and head, once no row holds padding, writes the new
token into a free slot of preallocated buffers and hands attention a view of them; the evicted slot is refilled
with that token at the start of the next step (attention still reads the view until then). Nothing is copied
but the new token, so the cost follows the tokens held, not those seen or evicted. Other steps (chunks of
prompt, rows still holding padding, the first step past the budget) take the general path: concatenate and
gather, which also puts the entries back in age order.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import CacheLayerMixin, DynamicSlidingWindowLayer

from hf_kvcache.base import BatchRowsMixin, KVCache, gather_entries
from hf_kvcache.layout import FULL_ATTENTION, LOCAL_ATTENTION, AttentionLayout, require_layer_types
from hf_kvcache.model_hooks import ForwardState, install_forward_observer


class EvictingLayer(BatchRowsMixin, CacheLayerMixin):
    """Keys and values of one layer in buffers ``[B, H, capacity, D]``, of which ``stored`` slots are held; whenever
    an update would leave more than ``capacity(new)`` entries, the subclass chooses which to keep.

    ``slot_positions`` ``[B, H, capacity]`` (int32) is the token column of each slot, or ``None`` until the first
    eviction: slot ``i`` then holds column ``seen - stored + i``, and no byte is spent on it. Slots are in age order
    except after decoding steps, which fill the evicted slot with the newest token. ``keys`` and ``values`` give
    the held entries in age order. Bookkeeping per row: ``real_seen`` real (non-padding) tokens so far and
    ``cached_real`` of them still held. Subclasses name per-slot tensors ``[B, H, capacity]`` in
    ``entry_state``: they follow every eviction.
    """

    is_compileable = False
    is_sliding = False
    is_croppable = False
    batched: ClassVar[tuple[str, ...]] = (
        "key_buffer", "value_buffer", "slot_positions", "real_seen", "cached_real", "pending_victim",
    )  # fmt: skip
    entry_state: ClassVar[tuple[str, ...]] = ()
    # Whether decoding steps may take the in-place path, which needs per-slot positions; a layer that stores
    # entries in another form (quantized storage) always takes the general path and keeps no positions.
    decodes_in_place: ClassVar[bool] = True

    def __init__(self, budget: int, state: ForwardState):
        super().__init__()
        self.budget = budget
        self.state = state
        self.reset()

    def reset(self) -> None:
        self.key_buffer = self.value_buffer = self.slot_positions = None
        self.real_seen = self.cached_real = self.pending_victim = None
        for name in self.entry_state:
            setattr(self, name, None)
        self.seen = self.stored = 0
        self.holds_padding = True
        self.is_initialized = False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        batch, heads = key_states.shape[:2]
        self.key_buffer, self.value_buffer = key_states[..., :0, :].clone(), value_states[..., :0, :].clone()
        self.real_seen = torch.zeros(batch, dtype=torch.long, device=self.device)
        self.cached_real = torch.zeros(batch, dtype=torch.long, device=self.device)
        self.is_initialized = True

    # --- reading ----------------------------------------------------------------------------------------
    def ordered(self, tensor: torch.Tensor) -> torch.Tensor:
        """The held slots of a per-slot tensor (``[B, H, capacity, ...]``) in age order: for inspection and tests."""
        self._apply_pending_eviction()
        self.restore_buffers()
        held = tensor[:, :, : self.stored]
        if self.slot_positions is None:
            return held
        order = self.slot_positions[..., : self.stored].argsort(dim=-1, stable=True)
        return held.gather(2, order.view(*order.shape, *([1] * (held.dim() - 3))).expand_as(held))

    def held(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[B, H, stored, D]`` of the held entries, in age order."""
        return self.ordered(self.key_buffer), self.ordered(self.value_buffer)

    def _read_only(self, value: None) -> None:
        # CacheLayerMixin.__init__ clears keys and values; what is held lives in the buffers.
        if value is not None:
            raise AttributeError(
                f"{type(self).__name__}.keys and .values are read-only views of what it holds"
            )

    keys = property(
        lambda self: self.held()[0] if self.is_initialized else None, _read_only, doc="Held keys."
    )
    values = property(
        lambda self: self.held()[1] if self.is_initialized else None, _read_only, doc="Held values."
    )

    # --- hooks for subclasses -------------------------------------------------------------------------
    def capacity(self, new: int) -> int:
        """Entries kept after an update that adds ``new``; more than that triggers :meth:`choose`."""
        return self.budget

    def attention_keys(self, keys: torch.Tensor, evicted: torch.Tensor, in_place: bool) -> torch.Tensor:
        """Keys handed to attention this step (held keys plus new); ``evicted`` real tokens per row so far.

        ``in_place``: ``keys`` is a view of the layer's own buffers, which may be written (decoding steps).
        """
        return keys

    def restore_buffers(self) -> None:
        """Undo what :meth:`attention_keys` wrote into the buffers, before the general path reorders them."""

    def observe_attention(
        self, keys: torch.Tensor, new_valid: torch.Tensor, real_in_full: torch.Tensor, evicting: bool
    ) -> None:
        """Called with the keys attention sees and before eviction (score-based strategies score here).

        ``new_valid`` ``[B, new]`` marks real new tokens, or is ``None`` on a decoding step that holds no padding
        (one new real token, every entry real); ``real_in_full`` ``[B]`` counts real entries in ``keys``.
        """

    def choose(self, total: int, kept: int, real_in_full: torch.Tensor) -> torch.Tensor:
        """Indices ``[B, H, kept]`` into ``total`` age-ordered entries, ascending, for rows with ``kept`` real ones."""
        raise NotImplementedError

    def choose_victim(self, total: int, positions: torch.Tensor) -> torch.Tensor:
        """The one slot ``[B, H]`` to evict among ``total`` slots holding only real tokens, in any order, whose
        token columns are ``positions`` ``[B, H, total]``; the newest token is in the last slot."""
        raise NotImplementedError

    # --------------------------------------------------------------------------------------------------
    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._apply_pending_eviction()
        batch, heads, new, _ = key_states.shape
        pads = self.state.padding(batch, self.seen + new, self.device)
        new_real = (self.seen + new - pads).clamp(min=0) - (self.seen - pads).clamp(min=0)
        real_in_full = self.cached_real + new_real
        total = self.stored + new
        kept = min(total, self.capacity(new))
        evicted = self.real_seen - self.cached_real
        fast = self.decodes_in_place and new == 1 and kept >= total - 1 and not self.holds_padding
        if fast and self.seen >= self.state.max_pad:
            result = self._decode_in_place(key_states, value_states, evicted, real_in_full, kept < total)
        else:
            result = self._update_general(key_states, value_states, pads, evicted, real_in_full, kept)
        self.seen += new
        self.real_seen = self.real_seen + new_real
        return result

    def _decode_in_place(self, key_states, value_states, evicted, real_in_full, evicting: bool):
        """One new real token, at most one entry evicted per row and head, no padding held: write in place."""
        total = self.stored + 1
        if self.key_buffer.shape[2] < total:
            self._grow_buffers(total if evicting else self._growth_size(total))
        self.key_buffer[:, :, self.stored] = key_states[:, :, 0]
        self.value_buffer[:, :, self.stored] = value_states[:, :, 0]
        if evicting and self.slot_positions is None:
            self.slot_positions = self._implicit_positions(self.key_buffer.shape[2])
        if self.slot_positions is not None:
            self.slot_positions[:, :, self.stored] = self.seen
        keys = self.attention_keys(self.key_buffer[:, :, :total], evicted, in_place=True)
        self.observe_attention(keys, None, real_in_full, evicting=evicting)
        values = self.value_buffer[:, :, :total]
        if evicting:
            self.pending_victim = self.choose_victim(total, self.slot_positions[..., :total])
            self.stored, self.cached_real = total - 1, real_in_full - 1
        else:
            self.stored, self.cached_real = total, real_in_full
        return keys, values

    def _growth_size(self, total: int) -> int:
        """Slots for a layer that keeps growing (nothing to evict): about 1/8 more than ``total``, but never more
        bytes, positions and scores included, than ``DynamicCache`` holds for the tokens seen by then."""
        token_bytes = self.key_buffer[0, 0, 0].nbytes + self.value_buffer[0, 0, 0].nbytes
        slot_bytes = sum(
            getattr(self, name)[0, 0, :1].nbytes
            for name in self.slot_tensors()
            if getattr(self, name) is not None
        )
        affordable = (self.seen + 1) * token_bytes // slot_bytes
        return max(total, min(affordable, total + total // 8))

    def _apply_pending_eviction(self) -> None:
        """Refill the slot evicted at the last decoding step with that step's token (the last slot)."""
        if self.pending_victim is None:
            return
        victim, last = self.pending_victim.unsqueeze(-1), self.stored
        for name in self.slot_tensors():
            tensor = getattr(self, name)
            if tensor is None:
                continue
            source = tensor[:, :, last : last + 1].clone()
            index = victim.view(*victim.shape, *([1] * (tensor.dim() - 3))).expand_as(source)
            tensor.scatter_(2, index, source)
        self.pending_victim = None

    def _implicit_positions(self, size: int) -> torch.Tensor:
        """Token columns ``[B, H, size]`` of slots that are still in plain age order (nothing evicted yet)."""
        batch, heads = self.key_buffer.shape[:2]
        columns = torch.arange(self.seen - self.stored, self.seen - self.stored + size, device=self.device)
        return columns.to(torch.int32).expand(batch, heads, size).contiguous()

    def _grow_buffers(self, size: int) -> None:
        for name in self.slot_tensors():
            tensor = getattr(self, name)
            if tensor is None:
                continue
            grown = tensor.new_empty(*tensor.shape[:2], size, *tensor.shape[3:])
            grown[:, :, : tensor.shape[2]] = tensor
            setattr(self, name, grown)

    def _update_general(self, key_states, value_states, pads, evicted, real_in_full, kept):
        batch, heads, new, _ = key_states.shape
        self.restore_buffers()
        self._sort_by_age()
        stored = self.stored
        # New entry j of row b is real when its column seen + j is past the row's padding.  # [B, new]
        columns = self.seen + torch.arange(new, device=self.device)
        new_valid = columns[None, :] >= pads[:, None]
        full_keys, full_values = self.entries_with(key_states, value_states)
        total = stored + new
        positions = None  # implicit while nothing has been evicted
        if self.decodes_in_place and (kept < total or self.slot_positions is not None):
            held = self._implicit_positions(stored) if self.slot_positions is None else self.slot_positions
            new_columns = columns.to(torch.int32).expand(batch, heads, new)
            positions = torch.cat([held[..., :stored], new_columns], dim=-1)
        returned_keys = self.attention_keys(full_keys, evicted, in_place=False)
        self.observe_attention(returned_keys, new_valid, real_in_full, evicting=kept < total)
        if kept == total:
            self.store_entries(full_keys, full_values, None)
            self.slot_positions = positions
            self.cached_real = real_in_full
        else:
            # Rows short of real tokens keep the newest `kept` entries: all real ones behind padding.
            fallback = torch.arange(total - kept, total, device=self.device).expand(batch, heads, kept)
            enough = (real_in_full >= kept)[:, None, None]
            indices = torch.where(enough, self.choose(total, kept, real_in_full), fallback)
            self._gather_slots(indices, full_keys, full_values, positions)
            self.cached_real = real_in_full.clamp(max=kept)
        self.stored = kept
        self.holds_padding = bool((self.cached_real < kept).any())
        return returned_keys, full_values

    def entries_with(self, key_states: torch.Tensor, value_states: torch.Tensor):
        """Held entries in age order, then the new ones: keys and values ``[B, H, stored + new, D]``."""
        keys, values = self.key_buffer[:, :, : self.stored], self.value_buffer[:, :, : self.stored]
        return torch.cat([keys, key_states], dim=-2), torch.cat([values, value_states], dim=-2)

    def store_entries(self, keys: torch.Tensor, values: torch.Tensor, indices: torch.Tensor | None) -> None:
        """Hold entries ``indices`` ``[B, H, kept]`` (ascending; ``None``: all) of :meth:`entries_with`' output."""
        if indices is not None:
            keys, values = gather_entries(keys, indices), gather_entries(values, indices)
        self.key_buffer, self.value_buffer = keys, values

    def _gather_slots(self, indices, keys, values, positions) -> None:
        self.store_entries(keys, values, indices)
        self.slot_positions = None if positions is None else positions.gather(2, indices)
        for name in self.entry_state:
            setattr(self, name, getattr(self, name).gather(2, indices))

    def _sort_by_age(self) -> None:
        """Put the held slots back in age order, which decoding steps scramble."""
        if self.slot_positions is None:
            return
        order = self.slot_positions[..., : self.stored].argsort(dim=-1, stable=True)
        if not bool((order == torch.arange(self.stored, device=self.device)).all()):
            self._gather_slots(order, self.key_buffer, self.value_buffer, self.slot_positions)

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.stored + query_length, self.seen - self.stored

    def get_max_length(self) -> int:
        return self.budget

    def slot_tensors(self) -> tuple[str, ...]:
        """Names of the per-slot tensors ``[B, H, capacity, ...]``: they move together when slots do."""
        return ("key_buffer", "value_buffer", "slot_positions", *self.entry_state)

    def row_tensors(self) -> tuple[str, ...]:
        return (*self.batched, *self.entry_state)

    def select_rows(self, select) -> None:
        self._apply_pending_eviction()
        super().select_rows(select)
        if self.is_initialized:
            self.holds_padding = bool((self.cached_real < self.stored).any())

    def crop(self, max_length: int) -> None:
        raise ValueError(
            f"{type(self).__name__} cannot crop: evicted tokens are gone, so rolling back cannot be exact "
            "(assisted decoding and other rollbacks need a cache that keeps every token)"
        )


class EvictionCache(KVCache):
    """A cache of :class:`EvictingLayer` s, one per full-attention layer, that learns each forward's padding mask
    from the model. Subclasses implement :meth:`make_layer`."""

    def build_layers(self, model: PreTrainedModel, layout: AttentionLayout) -> list[CacheLayerMixin]:
        """A strategy layer per full-attention layer; a plain recent window per local (sliding, chunked) layer.

        A local layer's attention never reaches past its window, so the strategy's choice among older tokens
        would be wasted there: it keeps the newest ``min(budget, window - 1)`` tokens, never more than
        ``DynamicCache`` keeps for it.
        """
        require_layer_types(layout, (FULL_ATTENTION, *LOCAL_ATTENTION), type(self).__name__)
        config = model.config.get_text_config(decoder=True)
        if getattr(config, "alibi", False) or getattr(config, "model_type", None) in ("bloom", "mpt"):
            # ALiBi biases each key by its distance to the query, computed from the mask's columns, which
            # after an eviction no longer are the kept tokens' positions: the result would be silently wrong.
            raise ValueError(
                f"{type(self).__name__} cannot serve {type(model).__name__}: its ALiBi attention biases keys by "
                "position, which evicting tokens breaks; use 'quantized' (any options) or 'full'"
            )
        install_forward_observer(model)
        self.forward_state = ForwardState()
        layers = []
        for index in range(layout.num_layers):
            layer, window = self.make_layer(layout), layout.window(index)
            if window is not None:
                layer = DynamicSlidingWindowLayer(sliding_window=min(window, layer.budget + 1))
            layers.append(layer)
        return layers

    def make_layer(self, layout: AttentionLayout) -> EvictingLayer:
        """A fresh layer for one model layer; it shares ``self.forward_state``."""
        raise NotImplementedError

    def observe_forward(self, attention_mask: torch.Tensor | None, query_length: int) -> None:
        """Called by the model hook before each forward with the 2D mask of that call."""
        self.forward_state.observe(attention_mask)

    def reset(self) -> None:
        super().reset()
        self.forward_state.observe(None)
