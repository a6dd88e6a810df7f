"""The one store of quantized tokens: sinks, bit-packed tokens and a full-precision residual, as in KIVI.

Paper: KIVI, "A Tuning-Free Asymmetric 2bit Quantization for KV Cache", https://arxiv.org/abs/2402.02750

``quantized`` and every ``eviction+quantized`` composition hold a layer's tokens in three parts, in sequence
order:

* **sinks**: the first ``num_sink_tokens`` tokens, in the model's dtype (every later query attends to them
  heavily, so they stay exact);
* **packed**: older tokens, quantized once and bit-packed (:class:`PackedTokens`): values per token over
  groups of ``group_size`` channels, keys per channel over *key groups* of ``group_size`` tokens that left the
  residual together;
* **residual**: the newest tokens in the model's dtype (the host layer's ``key_buffer``/``value_buffer``); the
  oldest of them move into packed storage a whole key group at a time once there are more than
  ``max_residual``.

Nothing is ever dequantized and quantized again. The packed codes have one of two layouts, chosen by whether
single tokens may leave the store:

* **grouped** (``quantized``: whole key groups only ever arrive and leave): each key group's codes are packed
  along its tokens (:func:`~.packing.pack_token_groups`), and its per-channel scale and zero point are row
  ``i // group_size`` of the group table. Dequantizing is one long contiguous copy and a broadcast
  multiply-add.
* **scattered** (compositions: eviction takes single tokens): each token's codes are packed along its
  channels, so it can be dropped alone, and it carries the index of its key group (int16); the group table
  counts each group's members and lets a row go once its last member is gone. A token that outlives the rest
  of its key group pays for the group's row (``2 * D`` scale and zero values) alone.

Why two layouts: a grouped store cannot drop one token without repacking its group, and a scattered store
dequantizes about half as fast (per-token rows of ``D * nbits / 8`` bytes are too short for one long copy).
"""

from __future__ import annotations

from typing import Any

import torch

from hf_kvcache.base import gather_entries
from hf_kvcache.held import HeldPart, HeldTensors, RowTensor
from hf_kvcache.model_hooks import KeyRotator
from hf_kvcache.strategies.outliers import index_dtype, outlier_count, restore_outliers, split_outliers
from hf_kvcache.strategies.packing import (
    TorchCodec,
    make_codec,
    pack_token_groups,
    quantize_kivi,
    scale_dtype,
    unpack_codes,
    unpack_token_groups,
)
from hf_kvcache.strategies.ranges import clipping_of
from hf_kvcache.strategies.rotation import StoredSpace

# The tensors :meth:`PackedTokens.quantize` returns, by name (then OUTLIER_PARTS, with ``outliers``).
PACKED_PARTS = ("key_codes", "value_codes", "value_scale", "value_zero", "group_scale", "group_zero")
OUTLIER_PARTS = ("key_outlier_index", "key_outlier_value", "value_outlier_index", "value_outlier_value")


class PackedTokens(StoredSpace, HeldTensors):
    """Bit-packed tokens of one layer in the grouped or scattered layout (see the module docstring).

    Shapes (``n`` tokens, ``g`` key groups, ``D`` head size, ``G`` group size, ``b = nbits``):
    ``key_codes``/``value_codes`` ``[B, H, n * b / 8, D]`` (grouped) or ``[B, H, n, D * b / 8]`` (scattered),
    uint8; ``value_scale``/``value_zero`` ``[B, H, n, D / G]``; ``group_scale``/``group_zero`` ``[B, H, g,
    D]``; scattered only: ``key_group`` ``[B, H, n]`` and ``group_members`` ``[B, H, g]``, int16; with
    ``outliers`` (:mod:`.outliers`): each token's exact entries, channels and values ``[B, H, n, k]``.
    """

    key_codes = RowTensor("packed key codes")
    value_codes = RowTensor("packed value codes")
    value_scale = RowTensor("value scale per token and channel group")
    value_zero = RowTensor("value zero point per token and channel group")
    group_scale = RowTensor("key scale per key group and channel")
    group_zero = RowTensor("key zero point per key group and channel")
    key_group = RowTensor("key group of each token (scattered layout)")
    group_members = RowTensor("tokens left in each key group (scattered layout)")
    key_outlier_index = RowTensor("channels of each token's exact keys (outliers=F) [B, H, n, k]")
    key_outlier_value = RowTensor("their exact values [B, H, n, k]")
    value_outlier_index = RowTensor("channels of each token's exact values [B, H, n, k]")
    value_outlier_value = RowTensor("their exact values [B, H, n, k]")

    def __init__(
        self,
        group_size: int,
        codecs: tuple[TorchCodec, TorchCodec],
        scattered: bool,
        like: torch.Tensor,
        rotation: str = "none",
        key_rope: KeyRotator | None = None,
        outliers: tuple[int, int] = (0, 0),
        scale_dtype: torch.dtype | None = None,
    ):
        self.group_size, self.scattered, self.rotation_kind = group_size, scattered, rotation
        self.entry_dtype = like.dtype  # of the tokens (and exact outliers); scales may be narrower
        self.outliers = outliers  # exact entries per token and head: (keys, values)
        # keys=pre_rope (grouped layout only): keys are stored with the rotary embedding of their position
        # undone; token 0 of the store sits at `first_position`.
        self.key_rope, self.first_position = key_rope, 0
        self.key_codec, self.value_codec = codecs
        batch, heads, _, head_dim = like.shape
        for name, codec in (("key_codes", self.key_codec), ("value_codes", self.value_codec)):
            packed_dim = head_dim * codec.nbits // 8 if scattered else head_dim
            setattr(self, name, like.new_empty(batch, heads, 0, packed_dim, dtype=torch.uint8))
        self.value_scale = like.new_empty(batch, heads, 0, head_dim // group_size, dtype=scale_dtype)
        self.value_zero = self.value_scale.clone()
        self.group_scale = like.new_empty(batch, heads, 0, head_dim, dtype=scale_dtype)
        self.group_zero = self.group_scale.clone()
        self.key_group = self.group_members = None
        if scattered:
            self.key_group = torch.empty(batch, heads, 0, dtype=torch.int16, device=like.device)
            self.group_members = torch.empty(batch, heads, 0, dtype=torch.int16, device=like.device)
        if any(outliers):
            for name, count in zip(OUTLIER_PARTS, (outliers[0],) * 2 + (outliers[1],) * 2, strict=True):
                dtype = index_dtype(head_dim) if name.endswith("index") else like.dtype
                setattr(self, name, like.new_empty(batch, heads, 0, count, dtype=dtype))

    @property
    def exact_parts(self) -> tuple[str, ...]:
        """The names of the sparse store's tensors, which follow the tokens (none without ``outliers``)."""
        return OUTLIER_PARTS if any(self.outliers) else ()

    @property
    def part_names(self) -> tuple[str, ...]:
        """The names of what :meth:`quantize` returns."""
        return PACKED_PARTS + self.exact_parts

    @property
    def length(self) -> int:
        """Tokens held."""
        return self.value_scale.shape[2]

    def quantize(self, keys: torch.Tensor, values: torch.Tensor, position: int = 0) -> tuple:
        """``[B, H, k * G, D]`` tokens quantized as ``k`` key groups and packed for this layout: the tensors
        of ``PACKED_PARTS``; ``position``: the cache position of the first (read with ``keys=pre_rope``)."""
        size = self.group_size
        keys, values = self._to_stored(keys, values, position)
        exact = []
        if any(self.outliers):
            keys, *key_exact = split_outliers(keys, self.outliers[0], size, True, self.entry_dtype)
            values, *value_exact = split_outliers(values, self.outliers[1], size, False, self.entry_dtype)
            exact = key_exact + value_exact
        key_codes, key_scale, key_zero, value_codes, value_scale, value_zero = quantize_kivi(
            self.key_codec, self.value_codec, keys, values, size, self.group_scale.dtype
        )
        if self.scattered:
            key_codes, value_codes = self.key_codec.pack(key_codes), self.value_codec.pack(value_codes)
        else:
            key_codes = pack_token_groups(self.key_codec, key_codes, size)
            value_codes = pack_token_groups(self.value_codec, value_codes, size)
        return key_codes, value_codes, value_scale, value_zero, key_scale, key_zero, *exact

    def append(self, keys: torch.Tensor, values: torch.Tensor, position: int = 0) -> None:
        """Quantize ``[B, H, k * G, D]`` tokens once, as ``k`` new key groups, and append them; ``position``:
        the cache position of the first of them (read with ``keys=pre_rope``)."""
        if self.length == 0:
            self.first_position = position
        parts = self.quantize(keys, values, position)
        if self.scattered:
            new_ids = self.add_group_rows(keys.shape[2] // self.group_size)  # renumbers key_group first
            self.key_group = torch.cat([self.key_group, new_ids], dim=2)
        for name, part in zip(self.part_names, parts, strict=True):
            setattr(self, name, torch.cat([getattr(self, name), part], dim=2))

    def add_group_rows(self, groups: int) -> torch.Tensor:
        """Scattered layout: number ``groups`` new key groups of ``G`` tokens, after compacting the table, and
        return the key group of each of their tokens, ``[B, H, groups * G]``."""
        self._compact_groups()
        batch, heads, first = self.group_members.shape
        if first + groups > torch.iinfo(self.key_group.dtype).max:
            self.key_group = self.key_group.int()  # more than 32767 live key groups
        ids = torch.arange(first, first + groups, device=self.key_group.device, dtype=self.key_group.dtype)
        members = self.group_members.new_full((batch, heads, groups), self.group_size)
        self.group_members = torch.cat([self.group_members, members], dim=2)
        return ids.repeat_interleave(self.group_size).expand(batch, heads, -1)

    def _compact_groups(self) -> None:
        """Let go of key-group rows that no token uses any more: live rows move to the front, in order."""
        live = self.group_members > 0
        rows = int(live.sum(-1).max()) if live.numel() else 0
        if rows == live.shape[2]:
            return
        # Stable: live rows keep their order, so a token's group index only ever moves down.
        order = (~live).to(torch.int8).argsort(dim=-1, stable=True)
        keep = order[..., :rows]
        self.group_scale = gather_entries(self.group_scale, keep)
        self.group_zero = gather_entries(self.group_zero, keep)
        self.group_members = self.group_members.gather(2, keep)
        renumber = torch.empty_like(order)
        renumber.scatter_(2, order, torch.arange(order.shape[2], device=order.device).expand_as(order))
        # An empty slot (packed_slots.py) may name a group that went: any row in range does for it.
        renumbered = renumber.gather(2, self.key_group.long()).clamp_(max=max(rows - 1, 0))
        self.key_group = renumbered.to(self.key_group.dtype)

    def keep(self, indices: torch.Tensor) -> None:
        """Scattered layout: keep tokens ``indices`` ``[B, H, kept]`` (ascending); recount each key group."""
        for name in ("key_codes", "value_codes", "value_scale", "value_zero", "key_group", *self.exact_parts):
            setattr(self, name, gather_entries(getattr(self, name), indices))
        members = torch.zeros_like(self.group_members, dtype=torch.int32)
        members.scatter_add_(2, self.key_group.long(), torch.ones_like(self.key_group, dtype=torch.int32))
        self.group_members = members.to(torch.int16)

    def slice_groups(self, start: int, stop: int) -> None:
        """Grouped layout: keep key groups ``start`` to ``stop``; no code changes."""
        size = self.group_size
        groups, tokens = slice(start, stop), slice(start * size, stop * size)
        self.first_position += start * size
        for name, codec in (("key_codes", self.key_codec), ("value_codes", self.value_codec)):
            rows = slice(start * size * codec.nbits // 8, stop * size * codec.nbits // 8)
            setattr(self, name, getattr(self, name)[:, :, rows].clone())
        self.group_scale, self.group_zero = (
            self.group_scale[:, :, groups].clone(),
            self.group_zero[:, :, groups].clone(),
        )
        for name in ("value_scale", "value_zero", *self.exact_parts):
            setattr(self, name, getattr(self, name)[:, :, tokens].clone())

    def dequantize_into(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Dequantize every token into ``keys``/``values`` ``[B, H, n, D]`` (views into a larger output)."""
        batch, heads, length, head_dim = keys.shape
        size = self.group_size
        # One conversion of all codes, then in-place multiply-add over whole rows: faster on CPU than addcmul.
        key_bits, value_bits = self.key_codec.nbits, self.value_codec.nbits
        if self.scattered:
            keys.copy_(unpack_codes(self.key_codes, key_bits))
            group = self.key_group.long()
            scale, zero = (gather_entries(t, group) for t in (self.group_scale, self.group_zero))
            keys.mul_(scale.to(keys.dtype)).add_(zero.to(keys.dtype))
            values.copy_(unpack_codes(self.value_codes, value_bits))
        else:
            key_groups = keys.view(batch, heads, length // size, size, head_dim)
            key_groups.copy_(unpack_token_groups(self.key_codes, key_bits, size))
            scale, zero = (t.to(keys.dtype).unsqueeze(3) for t in (self.group_scale, self.group_zero))
            key_groups.mul_(scale).add_(zero)
            values.view(batch, heads, length // size, size, head_dim).copy_(
                unpack_token_groups(self.value_codes, value_bits, size)
            )
        value_groups = values.view(batch, heads, length, head_dim // size, size)
        scale, zero = (t.to(values.dtype).unsqueeze(-1) for t in (self.value_scale, self.value_zero))
        value_groups.mul_(scale).add_(zero)
        if any(self.outliers):
            restore_outliers(keys, self.key_outlier_index, self.key_outlier_value)
            restore_outliers(values, self.value_outlier_index, self.value_outlier_value)
        self._from_stored(keys, values)


class QuantizedTokens:
    """Mixin for a cache layer that holds sinks, :class:`PackedTokens` and a full-precision residual.

    The host layer declares ``key_buffer``/``value_buffer`` (the residual ``[B, H, R, D]``) and calls
    :meth:`setup_quantized` in its constructor and :meth:`init_quantized` on its first update.
    """

    sink_keys = RowTensor("first tokens, exact [B, H, s, D]")
    sink_values = RowTensor("their values [B, H, s, D]")
    packed = HeldPart("the bit-packed tokens")

    def setup_quantized(
        self,
        options: Any,
        num_sink_tokens: int,
        max_residual: int,
        scattered: bool,
        key_rope: KeyRotator | None = None,
    ) -> None:
        """``options``: a :class:`~.quantized.QuantizedOptions`; ``max_residual``: residual tokens above which
        the oldest whole key groups are packed; ``scattered``: whether single tokens may leave the store;
        ``key_rope``: the layer's rotary embedding, for ``keys=pre_rope``."""
        self.quantization, self.sink_target, self.key_rope = options, num_sink_tokens, key_rope
        self.max_residual, self.scattered = max_residual, scattered
        self.codecs = (
            make_codec(options.key_nbits, options.backend, clipping_of(options.clipping, "keys")),
            make_codec(options.value_nbits, options.backend, clipping_of(options.clipping, "values")),
        )

    def init_quantized(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.sink_keys, self.sink_values = key_states[..., :0, :].clone(), value_states[..., :0, :].clone()
        options = self.quantization
        head_dim = key_states.shape[-1]
        outliers = (
            outlier_count(options.key_outliers, head_dim),
            outlier_count(options.value_outliers, head_dim),
        )
        scales = scale_dtype(options.scales, key_states.dtype)
        layout = (options.group_size, self.codecs, self.scattered, key_states, options.rotation)
        self.packed = PackedTokens(*layout, self.key_rope, outliers, scales)

    @property
    def packed_length(self) -> int:
        return 0 if self.packed is None else self.packed.length

    def assemble(
        self, key_states: torch.Tensor | None = None, value_states: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sinks, dequantized packed tokens, residual and then ``key_states``/``value_states`` (if given), as
        one ``[B, H, S + n + R (+ new), D]`` tensor each. The packed tokens are dequantized straight into
        their slice of the output, which saves a copy of the history per step over concatenating."""
        outputs = []
        for sink, held, fresh in (
            (self.sink_keys, self.key_buffer, key_states),
            (self.sink_values, self.value_buffer, value_states),
        ):
            parts = [sink, None, held] + ([] if fresh is None else [fresh])
            if not self.packed_length:
                outputs.append(torch.cat([p for p in parts if p is not None], dim=2))
                continue
            sizes = [p.shape[2] if p is not None else self.packed_length for p in parts]
            out = held.new_empty(*held.shape[:2], sum(sizes), held.shape[3])
            start = 0
            for part, size in zip(parts, sizes, strict=True):
                if part is not None and size:
                    out[:, :, start : start + size] = part
                start += size
            outputs.append(out)
        if self.packed_length:
            window = slice(self.sink_keys.shape[2], self.sink_keys.shape[2] + self.packed_length)
            self.packed.dequantize_into(outputs[0][:, :, window], outputs[1][:, :, window])
        return outputs[0], outputs[1]

    def held(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every held key and value ``[B, H, S + n + R, D]``, dequantized, in sequence order."""
        return self.assemble()

    def settle(self) -> None:
        """Move the first tokens into the sinks (while nothing is packed yet), then pack the oldest residual
        tokens, whole key groups at a time, until at most ``max_residual`` are left."""
        sinks = self.sink_keys.shape[2]
        if sinks < self.sink_target and self.packed_length == 0:
            # Before anything is packed the residual starts at the sequence's first held token.
            move = min(self.sink_target - sinks, self.key_buffer.shape[2])
            self.sink_keys = torch.cat([self.sink_keys, self.key_buffer[:, :, :move]], dim=2)
            self.sink_values = torch.cat([self.sink_values, self.value_buffer[:, :, :move]], dim=2)
            self.key_buffer = self.key_buffer[:, :, move:].clone()
            self.value_buffer = self.value_buffer[:, :, move:].clone()
        if self.sink_keys.shape[2] < self.sink_target:
            return
        count = self.excess(self.key_buffer.shape[2])
        if count:
            # The cache position of the first token packed now (a local layer counts the tokens it dropped).
            position = self.sink_keys.shape[2] + getattr(self, "dropped", 0) + self.packed_length
            self.packed.append(self.key_buffer[:, :, :count], self.value_buffer[:, :, :count], position)
            # clone() so the residual does not pin the storage of the longer tensor it was sliced from
            self.key_buffer = self.key_buffer[:, :, count:].clone()
            self.value_buffer = self.value_buffer[:, :, count:].clone()

    def excess(self, residual: int) -> int:
        """Oldest tokens of a residual of ``residual`` to pack: whole key groups, until at most
        ``max_residual`` are left (or fewer than a group)."""
        size, excess = self.quantization.group_size, residual - self.max_residual
        return min(-(-excess // size), residual // size) * size if excess > 0 else 0
