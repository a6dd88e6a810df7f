"""Caches that drop tokens: one policy contract, preallocated slots, per-row choices, left padding.

The contract. An eviction strategy declares what it protects and, optionally, how much each entry is worth:

* ``sinks``: the first ``sinks`` real entries of every row are always kept;
* ``recent``: the newest ``recent`` entries are always kept;
* :meth:`EvictingLayer.priority`: ``[B, H, N]``, higher is kept; the default is age (newest first), which
  makes a sliding window. Of entries tied in priority, the older goes first.

Whenever an update would leave a layer holding more than ``capacity(new)`` entries, the base class keeps the
protected entries and, of the others, those of highest priority: a top-k over the held entries and the new
ones on the general path, an argmin over the slots on the decoding path below. Nothing else is written per
strategy.

Left padding. Each row of the batch keeps the same number of entries, chosen per row (and per KV head). The
mask that ``transformers`` builds reads the 2D padding mask at columns ``seen - kept + i`` for stored entry
``i``; with left padding those columns are padding exactly for the first ``max(0, kept - real_tokens)``
entries. So a row that has enough real tokens keeps only real ones, and a row that has fewer keeps all of them
behind that many padding entries, which then line up with the padded columns.

Cost per step. A decoding step once no row holds padding writes the new token into the slot the last step's
victim left (or the next free one), hands attention a view of the slots and marks the new victim: it follows
the tokens held, not those seen or evicted. Prompt chunks and rows holding padding take the general path.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import CacheLayerMixin, DynamicSlidingWindowLayer

from hf_kvcache.base import KVCache, gather_entries
from hf_kvcache.budget import Budget, apply_layer_schedule, tokens
from hf_kvcache.held import HeldTensors, RowTensor, SlotTensor, check_batch, held_view
from hf_kvcache.layout import (
    FULL_ATTENTION,
    LOCAL_ATTENTION,
    AttentionLayout,
    require_layer_types,
    require_positions_in_keys,
)
from hf_kvcache.model_hooks import ForwardState, install_forward_observer
from hf_kvcache.strategies.slots import (
    age_order,
    fill_new_slots,
    grow_slots,
    growth_size,
    implicit_positions,
    keep_slot_state,
    sort_slots_by_age,
    start_slot_state,
    survivors,
    victim,
    write_slot,
)


class EvictingLayer(HeldTensors, CacheLayerMixin):
    """Keys and values of one layer in slots ``[B, H, capacity, D]``; the module docstring has the contract.

    ``stored`` entries are held. After a decoding step that evicted, ``pending_victim`` ``[B, H]`` names the
    slot of the entry that went; the next token is written there, so until then ``stored + 1`` slots are in
    use. ``slot_positions`` is the token column of each slot, or ``None`` until the first eviction: slot ``i``
    then holds column ``seen - stored + i``, and no byte is spent on it. ``keys`` and ``values`` give the held
    entries in age order, and reading them changes nothing.

    Args:
        budget: entries kept per row and KV head.
        state: the forward state (padding mask) shared by the layers of one cache.
        sinks: first real entries of each row always kept. Default 0.
        recent: newest entries always kept. Default 0.
    """

    is_compileable = False
    is_sliding = False
    is_croppable = False
    # Whether decoding steps may take the in-place path, which needs per-slot positions; a layer that stores
    # entries in another form (quantized storage) always takes the general path and keeps no positions.
    decodes_in_place: ClassVar[bool] = True
    # Set while a decoding step's victim waits for the attention function's weights (scoring.py).
    scores_from_attention = False
    victim_choice = None

    key_buffer = SlotTensor("keys of the held entries [B, H, slots, D]")
    value_buffer = SlotTensor("values of the held entries [B, H, slots, D]")
    slot_positions = SlotTensor(
        "token column of each slot [B, H, slots], int32; None until the first eviction"
    )
    real_seen = RowTensor("real (non-padding) tokens seen so far [B]")
    cached_real = RowTensor("real tokens held [B]")
    pending_victim = RowTensor("slot of the entry the last decoding step evicted [B, H], or None")

    def __init__(self, budget: Budget, state: ForwardState, sinks: int = 0, recent: Budget = 0):
        super().__init__()
        if isinstance(budget, int) and isinstance(recent, int) and sinks + recent > budget:
            raise ValueError(
                f"{type(self).__name__}: sinks={sinks} plus recent={recent} protected entries exceed the "
                f"budget of {budget}"
            )
        self.budget, self.state, self.sinks, self.recent = budget, state, sinks, recent
        self.reset()

    def reset(self) -> None:
        self.clear_held()
        self.seen = self.stored = 0
        self.holds_padding = True
        self.is_initialized = False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        batch, heads = key_states.shape[:2]
        self.key_buffer, self.value_buffer = key_states[..., :0, :].clone(), value_states[..., :0, :].clone()
        start_slot_state(self, batch, heads)
        self.real_seen = torch.zeros(batch, dtype=torch.long, device=self.device)
        self.cached_real = torch.zeros(batch, dtype=torch.long, device=self.device)
        self.is_initialized = True

    # --- the contract ---------------------------------------------------------------------------------------
    def capacity(self, new: int) -> int:
        """Entries kept after an update that adds ``new``; more than that triggers an eviction. By default the
        budget (in tokens, or its fraction of the tokens seen), and never fewer than what is protected."""
        seen = self.seen + new
        return max(tokens(self.budget, seen), self.sinks + tokens(self.recent, seen))

    def priority(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """How much each entry attention saw this step is worth keeping, ``[B, H, N]``: higher is kept.

        ``keys`` and ``values`` ``[B, H, N, D]`` are those entries (held ones and new ones), in age order on
        the general path and in slot order on a decoding step; ``positions`` ``[B, H, N]`` are their token
        columns (a layer that keeps no columns, such as quantized storage, passes their rank in age order).
        Protected entries are kept whatever their priority. Default: age, so the newest entries are kept.
        """
        return positions

    def observe_attention(
        self, keys: torch.Tensor, new_valid: torch.Tensor | None, real_in_full: torch.Tensor, evicting: bool
    ) -> None:
        """Called with the keys attention sees this step, before anything is evicted (scoring happens here).

        ``new_valid`` ``[B, new]`` marks real new tokens, or is ``None`` on a decoding step that holds no
        padding (one new real token, every entry real); ``real_in_full`` ``[B]`` counts real entries in
        ``keys``.
        """

    def attention_keys(self, keys: torch.Tensor, evicted: torch.Tensor, in_place: bool) -> torch.Tensor:
        """Keys handed to attention this step (held keys plus new); ``evicted`` real tokens per row so far.

        ``in_place``: ``keys`` is a view of the layer's own slots, which may be written (decoding steps); what
        is written must be undone by :meth:`restore_buffers`.
        """
        return keys

    def restore_buffers(self) -> None:
        """Undo what :meth:`attention_keys` wrote into the slots."""

    def stored_keys(self) -> torch.Tensor:
        """The key slots as held, without what :meth:`attention_keys` wrote for attention (never mutates)."""
        return self.key_buffer

    # --- reading: never changes anything --------------------------------------------------------------------
    def ordered(self, tensor: torch.Tensor) -> torch.Tensor:
        """Held entries of a per-slot tensor ``[B, H, slots, ...]`` in age order (a view before evictions)."""
        kept = tensor[:, :, : self.stored]
        return kept if self.slot_positions is None else gather_entries(tensor, age_order(self))

    def held(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[B, H, stored, D]`` of the held entries, in age order."""
        return self.ordered(self.stored_keys()), self.ordered(self.value_buffer)

    keys = held_view(0, "Held keys, in age order.")
    values = held_view(1, "Held values, in age order.")

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.stored + query_length, self.seen - self.stored

    def get_max_length(self) -> int:
        return self.budget if isinstance(self.budget, int) else -1

    # --- updating -------------------------------------------------------------------------------------------
    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        check_batch(self, self.real_seen, key_states)
        batch, _, new, _ = key_states.shape
        pads = self.state.padding(batch, self.seen + new, self.device)
        new_real = (self.seen + new - pads).clamp(min=0) - (self.seen - pads).clamp(min=0)
        real_in_full = self.cached_real + new_real
        total = self.stored + new
        kept, recent = min(total, self.capacity(new)), tokens(self.recent, self.seen + new)
        evicted = self.real_seen - self.cached_real
        if self.will_decode_in_place(new):
            result = self._decode_in_place(
                key_states, value_states, evicted, real_in_full, kept < total, recent
            )
        else:
            result = self._update_general(key_states, value_states, pads, evicted, real_in_full, kept, recent)
        self.seen += new
        self.real_seen = self.real_seen + new_real
        return result

    def will_decode_in_place(self, new: int) -> bool:
        """Whether adding ``new`` tokens in this forward takes the in-place decoding path: one new real token,
        at most one entry evicted per row and head, no padding held."""
        if not (self.decodes_in_place and self.is_initialized and new == 1 and not self.holds_padding):
            return False
        self.state.padding(self.real_seen.shape[0], self.seen + new, self.device)
        total = self.stored + new
        return min(total, self.capacity(new)) >= total - 1 and self.seen >= self.state.max_pad

    def _decode_in_place(self, key_states, value_states, evicted, real_in_full, evicting: bool, recent: int):
        """Write the new token in place (:meth:`will_decode_in_place`). When the attention function hands
        over its weights (``scores_from_attention``), the victim is chosen once they arrive
        (:meth:`choose_victim`)."""
        total = self.stored + 1
        if self.pending_victim is None:  # append after the held slots
            if self.key_buffer.shape[2] < total:
                grow_slots(self, total if evicting else growth_size(self, total))
            slot = self.stored
        else:  # refill the slot the last step evicted
            slot, self.pending_victim = self.pending_victim, None
        if evicting and self.slot_positions is None:
            self.slot_positions = implicit_positions(self, self.key_buffer.shape[2])
        write_slot(self, slot, key_states, value_states, self.seen)
        keys = self.attention_keys(self.key_buffer[:, :, :total], evicted, in_place=True)
        values = self.value_buffer[:, :, :total]
        if not self.scores_from_attention:
            self.observe_attention(keys, None, real_in_full, evicting=evicting)
        if evicting:
            positions = self.slot_positions[..., :total]
            # Protected: each row's first `sinks` real tokens and the newest `recent` (columns up to `seen`).
            candidate = None if recent == 0 else positions <= self.seen - recent
            if self.sinks:
                first_real = (self.seen - self.real_seen)[:, None, None]
                not_sink = positions >= first_real + self.sinks
                candidate = not_sink if candidate is None else candidate & not_sink
            self.victim_choice = (keys, values, positions, candidate)
            if not self.scores_from_attention:
                self.choose_victim()
            self.stored, self.cached_real = total - 1, real_in_full - 1
        else:
            self.stored, self.cached_real = total, real_in_full
        return keys, values

    def choose_victim(self) -> None:
        """Mark the slot the next decoding step refills, from the priorities of this step's entries."""
        keys, values, positions, candidate = self.victim_choice
        self.victim_choice = None
        self.pending_victim = victim(self.priority(keys, values, positions), candidate, positions)

    def _update_general(self, key_states, value_states, pads, evicted, real_in_full, kept, recent: int):
        batch, heads, new, _ = key_states.shape
        self.restore_buffers()
        sort_slots_by_age(self)
        stored, total = self.stored, self.stored + new
        evicting = kept < total
        # New entry j of row b is real when its column seen + j is past the row's padding.  # [B, new]
        columns = self.seen + torch.arange(new, device=self.device)
        new_valid = columns[None, :] >= pads[:, None]
        full_keys, full_values = self.entries_with(key_states, value_states)
        positions = None  # implicit while nothing has been evicted, and never kept without in-place decoding
        if self.decodes_in_place and (evicting or self.slot_positions is not None):
            held = implicit_positions(self, stored) if self.slot_positions is None else self.slot_positions
            new_columns = columns.to(torch.int32).expand(batch, heads, new)
            positions = torch.cat([held[..., :stored], new_columns], dim=-1)
        fill_new_slots(self, stored, new)
        returned_keys = self.attention_keys(full_keys, evicted, in_place=False)
        self.observe_attention(returned_keys, new_valid, real_in_full, evicting=evicting)
        indices = None
        if evicting:
            if positions is None:  # no columns kept (quantized storage): their age rank orders them
                positions = torch.arange(total, device=self.device).expand(batch, heads, total)
            priority = self.priority(returned_keys, full_values, positions)
            indices = survivors(priority, total, kept, real_in_full, self.sinks, recent)
            self.cached_real = real_in_full.clamp(max=kept)
            if self.decodes_in_place:
                positions = positions.gather(2, indices)
            keep_slot_state(self, indices)
        else:
            self.cached_real = real_in_full
        self.store_entries(full_keys, full_values, indices)
        self.slot_positions = positions if self.decodes_in_place else None
        self.stored = kept
        self.holds_padding = bool((self.cached_real < kept).any())
        return returned_keys, full_values

    def entries_with(self, key_states: torch.Tensor, value_states: torch.Tensor):
        """Held entries in age order, then the new ones: keys and values ``[B, H, stored + new, D]``."""
        keys, values = self.key_buffer[:, :, : self.stored], self.value_buffer[:, :, : self.stored]
        return torch.cat([keys, key_states], dim=-2), torch.cat([values, value_states], dim=-2)

    def store_entries(self, keys: torch.Tensor, values: torch.Tensor, indices: torch.Tensor | None) -> None:
        """Hold entries ``indices`` ``[B, H, kept]`` (ascending; ``None``: all) of :meth:`entries_with`."""
        if indices is not None:
            keys, values = gather_entries(keys, indices), gather_entries(values, indices)
        self.key_buffer, self.value_buffer = keys, values

    def select_rows(self, select) -> None:
        super().select_rows(select)
        if self.is_initialized:
            self.holds_padding = bool((self.cached_real < self.stored).any())

    def crop(self, max_length: int) -> None:
        raise ValueError(
            f"{type(self).__name__} cannot crop: evicted tokens are gone, so rolling back cannot be exact "
            "(assisted decoding and other rollbacks need a cache that keeps every token)"
        )


class EvictionCache(KVCache):
    """A cache of :class:`EvictingLayer` s, one per full-attention layer, that learns each forward's padding
    mask from the model. Subclasses implement :meth:`make_layer`."""

    def build_layers(self, model: PreTrainedModel, layout: AttentionLayout) -> list[CacheLayerMixin]:
        """A strategy layer per full-attention layer (budgets per ``layer_budgets`` where the strategy has
        it); a recent window per local (sliding, chunked) layer: its attention never reaches past its window,
        so it keeps the newest ``min(budget, window - 1)`` tokens, never more than ``DynamicCache`` does.
        """
        require_layer_types(layout, (FULL_ATTENTION, *LOCAL_ATTENTION), type(self).__name__)
        require_positions_in_keys(model, type(self).__name__)
        install_forward_observer(model)
        self.forward_state = ForwardState()
        layers = []
        for index in range(layout.num_layers):
            layer, window = self.make_layer(layout), layout.window(index)
            if window is not None:
                budget = layer.budget if isinstance(layer.budget, int) else window
                layer = DynamicSlidingWindowLayer(sliding_window=min(window, budget + 1))
            layers.append(layer)
        apply_layer_schedule(layers, self.options)
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
