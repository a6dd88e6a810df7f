"""In-place decoding for the compositions ``eviction+quantized``: packed tokens live in slots, and attention
reads the slots' codes (:mod:`hf_kvcache.attention`), with no dequantized copy and no gather per step.

A composition's layer holds sinks, packed tokens (scattered layout, :mod:`.packed_store`) and a full-precision
residual. On the general path (prompt chunks, rows holding padding) the packed tokens are kept in age order,
and every step assembles a dense copy of all of them. A decoding step served by the entry point instead:

* appends the new token to the residual, and attends over sinks, every packed slot and the residual in one
  softmax (:func:`attend_slots`: the native kernel reads each slot's codes, an empty slot gets weight 0);
* once the residual holds more than ``residual_length`` tokens, quantizes its oldest key group once and writes
  it into the slots that evicted tokens left empty (more slots only while nothing has been evicted);
* evicts one packed token per row and KV head, by the strategy's priority: age (``victims_from="age"``, the
  sliding window) or this step's scores from the same attention weights (``"scores"``, H2O). The slot is
  marked empty; its key group's member count (which frees the group's row once it reaches 0) is recounted
  when the next key group is packed, and when the layer leaves the slots, rather than at every eviction.

``packed_stamps`` ``[B, H, P]`` (int32) orders the slots by age (``-1``: empty); it exists only while
decoding in place. Reading the layer (``keys``, ``values``) and the general path see the tokens in age order.
Per-slot state of the strategy (H2O's accumulated attention) follows the slots: ``[B, H, S + P + R]`` in slot
order. A step's cost follows the slots held; the one gather per key group moves that group's state.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from hf_kvcache.base import gather_entries
from hf_kvcache.budget import tokens
from hf_kvcache.held import RowTensor
from hf_kvcache.strategies.packed_attention import attention_weights, compiled_kernels
from hf_kvcache.strategies.packed_store import PackedTokens
from hf_kvcache.strategies.packing import byte_view

# The stamp of an empty slot: above every token's, so that the oldest token is the smallest stamp.
EMPTY_SLOT = torch.iinfo(torch.int32).max
# Slot-aligned tensors of a scattered PackedTokens (one row per token), which grow together.
SLOT_PARTS = ("key_codes", "value_codes", "value_scale", "value_zero", "key_group")


def dequantize_slots(packed: PackedTokens, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every slot's key and value ``[B, H, P, D]`` in ``like``'s dtype (empty slots hold garbage)."""
    batch, heads, _, head_dim = like.shape
    keys = like.new_zeros(batch, heads, packed.length, head_dim)
    values = torch.zeros_like(keys)
    if packed.group_scale.shape[2]:  # no group row left: every slot is empty
        packed.dequantize_into(keys, values)
    return keys, values


def _require_all_visible(attention_mask: torch.Tensor | None) -> None:
    # A decoding step that holds no padding sees every entry; a mask that hides one would need the entries in
    # the order transformers assumes, which slots do not keep.
    if attention_mask is None:
        return
    visible = attention_mask.all() if attention_mask.dtype == torch.bool else (attention_mask == 0).all()
    if not bool(visible):
        raise RuntimeError(
            "a decoding step over packed slots got an attention mask that hides cached entries; slots serve "
            "steps that see every held entry (no padding held). Pass the padding mask the prompt was run with"
        )


def attend_slots(
    layer: Any, query: torch.Tensor, attention_mask, scaling: float, sink_keys: torch.Tensor, **math
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``query`` ``[B, H_q, q, D]`` over a composition layer in slot mode: ``sink_keys`` (as the
    strategy shows them this step), every packed slot, the residual. Returns the output ``[B, q, H_q, D]`` and
    the weights ``[B, H_q, q, S + P + R]`` in slot order; ``math``: ``softcap`` and ``sinks`` as for
    :func:`~.packed_attention.attend_quantized`."""
    _require_all_visible(attention_mask)
    batch, query_heads, length, head_dim = query.shape
    packed, stamps = layer.packed, layer.packed_stamps
    kv_heads = stamps.shape[1]
    queries = query.float().reshape(batch, kv_heads, query_heads // kv_heads * length, head_dim)
    residual = (layer.key_buffer, layer.value_buffer)
    fused = (
        all(v is None for v in math.values())
        and packed.rotation_kind == "none"
        and packed.key_codec.nbits == packed.value_codec.nbits
        and layer.key_buffer.dtype == torch.float32
    )
    kernels = compiled_kernels(layer.quantization.attention, query.device) if fused else None
    if kernels is not None:
        sinks = (sink_keys, layer.sink_values)
        out, weights = kernels.slots_decode(queries, sinks, packed, stamps, residual, scaling)
        weights = weights.view(batch, query_heads, length, -1)
    else:
        packed_keys, packed_values = dequantize_slots(packed, layer.key_buffer)
        keys = torch.cat([sink_keys, packed_keys, residual[0]], dim=2).float()
        values = torch.cat([layer.sink_values, packed_values, residual[1]], dim=2).float()
        logits = (queries @ keys.transpose(-1, -2)).view(batch, query_heads, length, -1)
        filled = F.pad(stamps != EMPTY_SLOT, (sink_keys.shape[2], residual[0].shape[2]), value=True)
        keep = filled.repeat_interleave(query_heads // kv_heads, dim=1).unsqueeze(2)  # [B, H_q, 1, K]
        weights = attention_weights(logits, keep, scaling, **math)
        out = weights.reshape(batch, kv_heads, -1, weights.shape[-1]) @ values
    out = out.view(batch, query_heads, length, head_dim).transpose(1, 2).to(query.dtype)
    return out, weights


class PackedSlots:
    """Mixin for :class:`~.quantized_storage.QuantizedStorage`: decoding steps in place over packed slots
    (module docstring). A composed layer class sets ``victims_from`` to ``"age"`` or ``"scores"`` to take
    this path; ``None`` (a priority that reads the keys, such as key norms) keeps the general path."""

    victims_from: ClassVar[str | None] = None
    packed_stamps = RowTensor(
        "age stamp of each packed slot while decoding in place [B, H, P], int32; EMPTY_SLOT: empty"
    )

    @property
    def reads_storage(self) -> bool:
        quantization = self.quantization
        exact = quantization.key_outliers or quantization.value_outliers  # the slots hold codes only
        return self.victims_from is not None and quantization.attention != "dense" and not exact

    @property
    def packed_length(self) -> int:
        """Packed tokens held (slots in use, while decoding in place)."""
        if self.packed_stamps is not None:
            return self.packed_live
        return 0 if self.packed is None else self.packed.length

    def reset(self) -> None:
        super().reset()
        self.packed_live = self.next_stamp = 0
        self.slot_step = None

    def packs_in_place(self, new: int) -> bool:
        """Whether an update adding ``new`` tokens decodes in place over the slots: one new token, no padding
        held, sinks settled, at most one eviction, and a packed token to evict whenever one goes."""
        if not (self.reads_storage and new == 1 and self.is_initialized and not self.holds_padding):
            return False
        if self.packed is None or self.packed.length == 0 or self.sink_keys.shape[2] != self.sinks:
            return False
        self.state.padding(self.real_seen.shape[0], self.seen + 1, self.device)
        total = self.stored + 1
        kept = min(total, self.capacity(1))
        if kept < total - 1 or self.seen < self.state.max_pad:
            return False
        if kept == total:
            return True
        residual = self.key_buffer.shape[2] + 1
        residual -= self.excess(residual)
        live = self.packed_length + 1
        if self.victims_from == "age":  # the oldest entry past the sinks: a packed one
            return live > 0
        recent = tokens(self.recent, self.seen + 1)  # the newest `recent` are protected: all the residual
        return recent >= residual and live > recent - residual

    def serves_attention(self, new: int) -> bool:
        # Asked by the query capture just before this layer's update, which then reuses the answer.
        served = self.packs_in_place(new)
        self.slot_step = ("decided", self.seen, self.stored, new, served)
        return served

    def store_for_attention(self, key_states: torch.Tensor, value_states: torch.Tensor) -> bool | None:
        """Begin a step in place (the entry point then calls :meth:`attend_stored`); ``None`` otherwise."""
        new, decided = key_states.shape[-2], self.slot_step
        if decided is not None and decided[:4] == ("decided", self.seen, self.stored, new):
            served = decided[4]
        else:
            served = self.packs_in_place(new)
        self.slot_step = None
        if not served:
            return None
        if self.packed_stamps is None:  # the packed tokens are in age order: slot i is the i-th oldest
            count = self.packed.length
            stamps = torch.arange(count, dtype=torch.int32, device=self.device)
            self.packed_stamps = stamps.expand(*key_states.shape[:2], count).contiguous()
            self.next_stamp = self.packed_live = count
        total = self.stored + 1
        evicting = min(total, self.capacity(1)) < total
        self.slot_step = (evicting, self.real_seen - self.cached_real, tokens(self.recent, self.seen + 1))
        self.key_buffer = torch.cat([self.key_buffer, key_states], dim=2)
        self.value_buffer = torch.cat([self.value_buffer, value_states], dim=2)
        for declared, tensor in self.slot_state():
            widths = [0, 0] * (tensor.dim() - 3) + [0, 1]
            setattr(self, declared.name, F.pad(tensor, widths, value=declared.fill))
        self.seen, self.real_seen = self.seen + 1, self.real_seen + 1
        if not evicting:  # an evicting step holds as many real tokens after it as before
            self.stored, self.cached_real = total, self.cached_real + 1
        return True

    def attend_stored(self, query: torch.Tensor, attention_mask, scaling: float, **math):
        """Attend over the slots, score them from the same weights (``"scores"``), pack and evict."""
        evicting, evicted, recent = self.slot_step
        self.slot_step = None
        sink_keys = self.attention_keys(self.sink_keys, evicted, in_place=False)
        out, weights = attend_slots(self, query, attention_mask, scaling, sink_keys, **math)
        scores = None
        if self.victims_from == "scores":
            batch, kv_heads = self.packed_stamps.shape[:2]
            scores = self.score(weights.float().reshape(batch, kv_heads, -1, weights.shape[-1]).sum(2), 1)
        count = self.excess(self.key_buffer.shape[2])
        if count:
            scores = self._pack_into_slots(count, scores)
        if evicting:
            self._evict_packed(scores, recent)
        return out, weights.to(query.dtype)

    def slot_state(self):
        """``(declaration, tensor)`` of the strategy's per-entry state (declared slot tensors with a fill)."""
        for declared in self.declared("slot"):
            tensor = getattr(self, declared.name)
            if declared.fill is not None and tensor is not None:
                yield declared, tensor

    def _move_entries(self, source: torch.Tensor, scores: torch.Tensor | None) -> torch.Tensor | None:
        """Rearrange the per-entry state (and ``scores``): entry ``i`` is old entry ``source[..., i]``."""
        for declared, tensor in self.slot_state():
            setattr(self, declared.name, gather_entries(tensor, source))
        return None if scores is None else gather_entries(scores, source)

    def _pack_into_slots(self, count: int, scores: torch.Tensor | None) -> torch.Tensor | None:
        """Quantize the residual's oldest ``count`` tokens into empty slots (new ones where too few)."""
        packed, stamps = self.packed, self.packed_stamps
        batch, heads, slots = stamps.shape
        sinks, reused = self.sink_keys.shape[2], min(slots - self.packed_live, count)
        device = stamps.device
        targets = [stamps.topk(reused, dim=-1).indices]  # empty slots have the largest stamp
        if count > reused:
            grown = count - reused
            for name in SLOT_PARTS:
                tensor = getattr(packed, name)
                setattr(
                    packed,
                    name,
                    torch.cat([tensor, tensor.new_zeros(batch, heads, grown, *tensor.shape[3:])], 2),
                )
            self.packed_stamps = stamps = F.pad(stamps, (0, grown), value=EMPTY_SLOT)
            targets.append(torch.arange(slots, slots + grown, device=device).expand(batch, heads, grown))
        target = torch.cat(targets, dim=-1)
        members = torch.zeros_like(packed.group_members, dtype=torch.int32)
        members.scatter_add_(2, packed.key_group.long(), (stamps != EMPTY_SLOT).int())
        packed.group_members = members.to(packed.group_members.dtype)  # before a table compaction reads it
        residual = self.key_buffer.shape[2]
        parts = dict(
            zip(
                packed.part_names,
                packed.quantize(self.key_buffer[:, :, :count], self.value_buffer[:, :, :count]),
                strict=True,
            )
        )
        group_ids = packed.add_group_rows(count // packed.group_size)
        packed.group_scale = torch.cat([packed.group_scale, parts["group_scale"]], dim=2)
        packed.group_zero = torch.cat([packed.group_zero, parts["group_zero"]], dim=2)
        parts["key_group"] = group_ids  # in the table's index type, which adding rows may have widened
        for name in SLOT_PARTS:
            tensor = getattr(packed, name)
            index = target.view(batch, heads, count, *([1] * (tensor.dim() - 3))).expand(
                -1, -1, -1, *tensor.shape[3:]
            )
            byte_view(tensor).scatter_(2, index, byte_view(parts[name].to(tensor.dtype)))
        new_stamps = torch.arange(self.next_stamp, self.next_stamp + count, dtype=torch.int32, device=device)
        stamps.scatter_(2, target, new_stamps.expand(batch, heads, count).contiguous())
        self.next_stamp, self.packed_live = self.next_stamp + count, self.packed_live + count
        self.key_buffer = self.key_buffer[:, :, count:].clone()
        self.value_buffer = self.value_buffer[:, :, count:].clone()
        # Per-entry state in slot order: the packed tokens' entries move from the residual to their slots.
        filled = stamps.shape[2]
        source = (
            torch.cat(
                [
                    torch.arange(sinks + slots, device=device),
                    torch.zeros(filled - slots, dtype=torch.long, device=device),
                    torch.arange(sinks + slots + count, sinks + slots + residual, device=device),
                ]
            )
            .expand(batch, heads, -1)
            .contiguous()
        )
        moved = torch.arange(sinks + slots, sinks + slots + count, device=device).expand(batch, heads, count)
        source.scatter_(2, sinks + target, moved.contiguous())
        return self._move_entries(source, scores)

    def _evict_packed(self, scores: torch.Tensor | None, recent: int) -> None:
        """Empty the slot of the packed token of lowest priority (ties: the oldest) in each row and head."""
        stamps = self.packed_stamps
        if scores is None:  # age: the oldest token, whose stamp is the smallest
            chosen = stamps.argmin(dim=-1)
        else:
            # No entry among the newest `recent` was ever evicted, so the packed ones among them hold the
            # newest stamps, without gaps: below `threshold` are the candidates.
            threshold = self.next_stamp - max(recent - self.key_buffer.shape[2], 0)
            sinks = self.sink_keys.shape[2]
            protected = stamps >= threshold
            priority = scores[..., sinks : sinks + stamps.shape[2]].masked_fill(protected, float("inf"))
            tied = priority == priority.amin(dim=-1, keepdim=True)  # never protected: a candidate exists
            chosen = torch.where(tied, stamps, EMPTY_SLOT).argmin(dim=-1)  # the oldest of those tied
        # The key group's member count is updated when the next group is packed, not here (module docstring).
        stamps.scatter_(2, chosen.unsqueeze(-1), EMPTY_SLOT)
        self.packed_live -= 1

    def leave_slots(self) -> None:
        """Put the packed tokens (and per-entry state) back in age order, dropping empty slots: before a step
        on the general path."""
        if self.packed_stamps is None:
            return
        stamps, sinks = self.packed_stamps, self.sink_keys.shape[2]
        order = self.age_order_of_slots()
        batch, heads, slots = stamps.shape
        residual = self.key_buffer.shape[2]
        source = torch.cat(
            [
                torch.arange(sinks, device=stamps.device).expand(batch, heads, sinks),
                sinks + order,
                torch.arange(sinks + slots, sinks + slots + residual, device=stamps.device).expand(
                    batch, heads, residual
                ),
            ],
            dim=-1,
        )
        self._move_entries(source, None)
        self.packed.keep(order)
        self.packed_stamps = None

    def age_order_of_slots(self) -> torch.Tensor:
        """Slots ``[B, H, live]`` of the packed tokens, oldest first."""
        return self.packed_stamps.argsort(dim=-1, stable=True)[..., : self.packed_live]
