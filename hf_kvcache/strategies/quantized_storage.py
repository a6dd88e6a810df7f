"""Quantized storage under eviction: the composition ``eviction+quantized`` (``sliding-window+quantized``, ...).

The eviction half decides *which* tokens a layer holds; this storage decides *how* they are held. Every row
and KV head holds its entries, in age order, as three parts:

* **sinks**: the first ``num_sink_tokens`` tokens of the sequence, in the model's dtype (attention sinks,
  which every later query attends to heavily, stay exact);
* **packed**: older tokens, bit-packed KIVI-style (https://arxiv.org/abs/2402.02750). Values are quantized per
  token (one scale and zero point per group of ``group_size`` channels). Keys are quantized per channel over
  *key groups* of ``group_size`` tokens that left the full-precision part together;
* **residual**: the newest tokens, at most ``residual_length``, in the model's dtype.

How single tokens are evicted from per-channel key groups: every packed token carries its own codes (packed
along the channels) and the index of its key group; each group's per-channel scale and zero point live in a
small *group table* ``[B, H, groups, D]`` with a member count per row. Evicting a token removes its codes and
lowers its group's count; the remaining members keep decoding with their own group's scale and zero point, so
nothing is ever dequantized and quantized again. A group's table row is let go of once its last member is
gone (the table is compacted whenever a new group is added). Costs per held token: ``2 * D * nbits / 8`` bytes
of codes, the value scales, a 2-byte group index, and a share of its group's row (``4 * D`` bytes in 16-bit
dtypes), which a token that outlives the rest of its group pays alone.

Tokens leave the residual once, a whole key group at a time, when the residual would hold more than
``residual_length``. Nothing is quantized while a row still holds left padding, so each row's sinks are its
own first real tokens. The eviction half never evicts sinks or residual entries (the strategies that compose
check this in their options), which keeps the three parts the same length in every row and head.
"""

from __future__ import annotations

from typing import Any

import torch

from hf_kvcache.base import gather_entries
from hf_kvcache.strategies.packing import TorchCodec, make_codec, quantize_kivi, unpack_codes
from hf_kvcache.strategies.quantized import QuantizedOptions

STORAGE_TENSORS = (
    "sink_keys", "sink_values", "key_codes", "value_codes", "value_scale", "value_zero", "key_group",
    "group_scale", "group_zero", "group_members",
)  # fmt: skip


def check_composed_quantization(quantization: object) -> None:
    """For an eviction strategy's ``quantization`` option: ``None`` or a :class:`QuantizedOptions`."""
    if quantization is not None and not isinstance(quantization, QuantizedOptions):
        raise ValueError(
            f"quantization must be None or a QuantizedOptions (e.g. QuantizedOptions(nbits=4)), got {quantization!r}"
        )


class QuantizedStorage:
    """Mixin for an :class:`~hf_kvcache.strategies.eviction.EvictingLayer`: holds its entries as sinks, packed
    tokens and a full-precision residual (see the module docstring). The residual lives in the layer's
    ``key_buffer``/``value_buffer``.

    Shapes (``s`` sinks, ``n`` packed tokens, ``g`` key groups, ``D`` head size, ``G`` group size):
    ``sink_keys``/``sink_values`` ``[B, H, s, D]``; ``key_codes``/``value_codes`` ``[B, H, n, D * nbits / 8]``
    uint8; ``value_scale``/``value_zero`` ``[B, H, n, D / G]``; ``key_group`` ``[B, H, n]`` int16;
    ``group_scale``/``group_zero`` ``[B, H, g, D]``; ``group_members`` ``[B, H, g]`` int16.
    """

    decodes_in_place = False

    def __init__(self, *args: Any, quantization: QuantizedOptions, num_sink_tokens: int, **kwargs: Any):
        self.quantization = quantization
        self.codec: TorchCodec = make_codec(quantization.nbits, quantization.backend)
        self.sink_target = num_sink_tokens
        super().__init__(*args, **kwargs)

    def reset(self) -> None:
        super().reset()
        for name in STORAGE_TENSORS:
            setattr(self, name, None)

    def row_tensors(self) -> tuple[str, ...]:
        return (*super().row_tensors(), *STORAGE_TENSORS)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        batch, heads, _, head_dim = key_states.shape
        size, packed_dim = self.quantization.group_size, head_dim * self.quantization.nbits // 8
        self.sink_keys, self.sink_values = key_states[..., :0, :].clone(), value_states[..., :0, :].clone()
        codes = torch.empty(batch, heads, 0, packed_dim, dtype=torch.uint8, device=self.device)
        self.key_codes, self.value_codes = codes, codes.clone()
        self.value_scale = key_states.new_empty(batch, heads, 0, head_dim // size)
        self.value_zero = self.value_scale.clone()
        self.key_group = torch.empty(batch, heads, 0, dtype=torch.int16, device=self.device)
        self.group_scale = key_states.new_empty(batch, heads, 0, head_dim)
        self.group_zero = self.group_scale.clone()
        self.group_members = torch.empty(batch, heads, 0, dtype=torch.int16, device=self.device)

    @property
    def packed_length(self) -> int:
        return 0 if self.key_codes is None else self.key_codes.shape[2]

    def held(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.entries_with(self.key_buffer[:, :, :0], self.value_buffer[:, :, :0])

    # --- the two hooks of EvictingLayer's general path ----------------------------------------------------
    def entries_with(self, key_states: torch.Tensor, value_states: torch.Tensor):
        sinks, packed = self.sink_keys.shape[2], self.packed_length
        residual, new = self.key_buffer.shape[2], key_states.shape[2]
        batch, heads, _, head_dim = key_states.shape
        shape = (batch, heads, sinks + packed + residual + new, head_dim)
        keys, values = key_states.new_empty(shape), value_states.new_empty(shape)
        # One output, each part written into its slice: no concatenation of the dequantized history.
        for out, parts in ((keys, (self.sink_keys, self.key_buffer, key_states)),
                           (values, (self.sink_values, self.value_buffer, value_states))):  # fmt: skip
            out[:, :, :sinks] = parts[0]
            out[:, :, sinks + packed : sinks + packed + residual] = parts[1]
            out[:, :, sinks + packed + residual :] = parts[2]
        if packed:
            self._dequantize_into(keys[:, :, sinks : sinks + packed], values[:, :, sinks : sinks + packed])
        return keys, values

    def store_entries(self, keys: torch.Tensor, values: torch.Tensor, indices: torch.Tensor | None) -> None:
        sinks = self.sink_keys.shape[2]
        if indices is not None and self.packed_length:
            # Pack the residual's excess before evicting, so that what is evicted from the full-precision part
            # is only ever among the newest tokens, which the eviction half keeps in every row and head.
            start = sinks + self.packed_length
            count = self._excess(keys.shape[2] - start)
            if count:
                self._pack(keys[:, :, start : start + count], values[:, :, start : start + count])
        packed = self.packed_length
        if indices is None:
            self.key_buffer = keys[:, :, sinks + packed :].clone()
            self.value_buffer = values[:, :, sinks + packed :].clone()
            return
        in_sinks = (indices < sinks).sum(-1)
        in_packed = ((indices >= sinks) & (indices < sinks + packed)).sum(-1)
        first = in_packed.flatten()[0]
        uneven = (in_sinks != sinks).any() | (in_packed != first).any()
        kept_packed, uneven = torch.stack(
            [first, uneven.long()]
        ).tolist()  # one device sync per step, not three
        if uneven:
            raise RuntimeError(
                f"{type(self).__name__}: the eviction dropped a sink, or kept different numbers of packed tokens "
                "in different rows or heads, which this storage cannot hold"
            )
        if kept_packed < packed:
            self._keep_packed(indices[..., sinks : sinks + kept_packed] - sinks)
        residual = indices[..., sinks + kept_packed :]
        self.key_buffer, self.value_buffer = gather_entries(keys, residual), gather_entries(values, residual)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        result = super().update(key_states, value_states, *args, **kwargs)
        if not self.holds_padding:
            self._settle()
        return result

    # --- storage ----------------------------------------------------------------------------------------
    def _settle(self) -> None:
        """Move the first tokens into the sinks, then whole key groups of the oldest residual tokens into packed
        storage while the residual holds more than ``residual_length``."""
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
        count = self._excess(self.key_buffer.shape[2])
        if count:
            self._pack(self.key_buffer[:, :, :count], self.value_buffer[:, :, :count])
            self.key_buffer = self.key_buffer[:, :, count:].clone()
            self.value_buffer = self.value_buffer[:, :, count:].clone()

    def _excess(self, residual: int) -> int:
        """Oldest tokens of a residual of ``residual`` to pack: whole key groups, until at most
        ``residual_length`` are left (or fewer than a group)."""
        size, excess = self.quantization.group_size, residual - self.quantization.residual_length
        return min(-(-excess // size), residual // size) * size if excess > 0 else 0

    def _pack(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Quantize ``[B, H, groups * G, D]`` tokens once and append them, one new key group per G tokens."""
        batch, heads, length, _ = keys.shape
        size = self.quantization.group_size
        groups = length // size
        key_codes, key_scale, key_zero, value_codes, value_scale, value_zero = quantize_kivi(
            self.codec, keys, values, size, self.key_buffer.dtype
        )
        self._compact_groups()
        first = self.group_scale.shape[2]
        if first + groups > torch.iinfo(self.key_group.dtype).max:
            self.key_group = self.key_group.int()  # more than 32767 live key groups
        ids = torch.arange(first, first + groups, device=self.device, dtype=self.key_group.dtype)
        self.group_scale = torch.cat([self.group_scale, key_scale], dim=2)
        self.group_zero = torch.cat([self.group_zero, key_zero], dim=2)
        members = torch.full((batch, heads, groups), size, dtype=torch.int16, device=self.device)
        self.group_members = torch.cat([self.group_members, members], dim=2)
        new_ids = ids.repeat_interleave(size).expand(batch, heads, length)
        self.key_group = torch.cat([self.key_group, new_ids], dim=2)
        self.key_codes = torch.cat([self.key_codes, self.codec.pack(key_codes)], dim=2)
        self.value_codes = torch.cat([self.value_codes, self.codec.pack(value_codes)], dim=2)
        self.value_scale = torch.cat([self.value_scale, value_scale], dim=2)
        self.value_zero = torch.cat([self.value_zero, value_zero], dim=2)

    def _keep_packed(self, keep: torch.Tensor) -> None:
        """Keep packed tokens ``keep`` ``[B, H, kept]`` (ascending) and recount the members of each key group."""
        for name in ("key_codes", "value_codes", "value_scale", "value_zero", "key_group"):
            setattr(self, name, gather_entries(getattr(self, name), keep))
        members = torch.zeros_like(self.group_members, dtype=torch.int32)
        members.scatter_add_(2, self.key_group.long(), torch.ones_like(self.key_group, dtype=torch.int32))
        self.group_members = members.to(torch.int16)

    def _compact_groups(self) -> None:
        """Let go of key-group rows that no packed token uses any more: live rows move to the front."""
        live = self.group_members > 0
        rows = int(live.sum(-1).max()) if live.numel() else 0
        if rows == live.shape[2]:
            return
        # Stable: live rows keep their order, so a token's group index only ever moves down.
        order = (~live).to(torch.int8).argsort(dim=-1, stable=True)
        keep = order[..., :rows]
        index = keep.unsqueeze(-1).expand(-1, -1, -1, self.group_scale.shape[-1])
        self.group_scale, self.group_zero = (
            self.group_scale.gather(2, index),
            self.group_zero.gather(2, index),
        )
        self.group_members = self.group_members.gather(2, keep)
        renumber = torch.empty_like(order)
        renumber.scatter_(2, order, torch.arange(order.shape[2], device=self.device).expand_as(order))
        self.key_group = renumber.gather(2, self.key_group.long()).to(self.key_group.dtype)

    def _dequantize_into(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Dequantize the packed tokens into ``keys``/``values`` ``[B, H, n, D]`` (views of the output)."""
        batch, heads, length, head_dim = keys.shape
        nbits, size = self.quantization.nbits, self.quantization.group_size
        keys.copy_(unpack_codes(self.key_codes, nbits))
        group = self.key_group.long()
        keys.mul_(gather_entries(self.group_scale, group)).add_(gather_entries(self.group_zero, group))
        values.copy_(unpack_codes(self.value_codes, nbits))
        value_groups = values.view(batch, heads, length, head_dim // size, size)
        value_groups.mul_(self.value_scale.unsqueeze(-1)).add_(self.value_zero.unsqueeze(-1))
