"""Quantized storage under eviction: compositions ``eviction+quantized`` (``sliding-window+quantized``, ...).

The eviction half decides *which* tokens a layer holds; the quantized half how: the layer's entries live in
the one quantized store (:mod:`.packed_store`) as sinks, packed tokens in the *scattered* layout (single
tokens can be evicted from their key groups without anything being dequantized or quantized again) and a
full-precision residual in the layer's ``key_buffer``/``value_buffer``.

Tokens leave the residual once, a whole key group at a time, when the residual would hold more than
``residual_length``. Nothing is quantized while a row still holds left padding, so each row's sinks are its
own first real tokens. The eviction half never evicts sinks or residual entries (the strategies that compose
check this in their options), which keeps the three parts the same length in every row and head.
"""

from __future__ import annotations

from typing import Any

import torch

from hf_kvcache.base import gather_entries
from hf_kvcache.strategies.packed_slots import PackedSlots, dequantize_slots
from hf_kvcache.strategies.packed_store import QuantizedTokens
from hf_kvcache.strategies.quantized import QuantizedOptions


def check_composed_quantization(quantization: object) -> None:
    """For an eviction strategy's ``quantization`` option: ``None`` or a :class:`QuantizedOptions`."""
    if quantization is not None and not isinstance(quantization, QuantizedOptions):
        raise ValueError(
            "quantization must be None or a QuantizedOptions (e.g. QuantizedOptions(nbits=4)), "
            f"got {quantization!r}"
        )
    if quantization is not None and quantization.calibrated_bits is not None:
        raise ValueError(
            f"calibrated_bits={quantization.calibrated_bits} is an option of quantized alone; under eviction "
            "give nbits, nbits_keys and nbits_values"
        )
    if quantization is not None and quantization.clipping == "calibrated":
        raise ValueError(
            "clipping='calibrated' is an option of quantized alone, which reads a calibration of its layers; "
            "under eviction give clipping='none', 'mse', 'mse-values' or 'mse-keys'"
        )
    if quantization is not None and quantization.keys != "post_rope":
        raise ValueError(
            f"keys={quantization.keys!r} is an option of quantized alone; under eviction keys are stored as "
            "the model rotated them (keys='post_rope')"
        )


def check_recent_covers_residual(recent: object, quantization: QuantizedOptions | None) -> None:
    """For a strategy that protects its ``recent`` newest entries and may hold them quantized: ``recent``
    (in tokens) must cover the full-precision residual, which is never evicted."""
    if quantization is None:
        return
    # The residual packs whole key groups only, so it holds up to residual_length + group_size - 1 tokens.
    most = quantization.residual_length + quantization.group_size - 1
    if not isinstance(recent, int) or recent < most:
        raise ValueError(
            f"recent={recent} must be at least residual_length + group_size - 1 = {most} tokens of the "
            "quantized half: the full-precision residual (up to that many newest tokens) is never evicted"
        )


class QuantizedStorage(PackedSlots, QuantizedTokens):
    """Mixin for an :class:`~hf_kvcache.strategies.eviction.EvictingLayer`: holds its entries in the quantized
    store, scattered layout (see the module docstring); ``sinks`` tokens are kept exact and always. Decoding
    steps run in place over packed slots where the strategy allows (:mod:`.packed_slots`)."""

    decodes_in_place = False  # EvictingLayer's own in-place path writes full-precision slots

    def __init__(self, *args: Any, quantization: QuantizedOptions, num_sink_tokens: int, **kwargs: Any):
        self.setup_quantized(quantization, num_sink_tokens, quantization.residual_length, scattered=True)
        super().__init__(*args, **kwargs)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.init_quantized(key_states, value_states)

    # --- the two storage hooks of EvictingLayer's general path --------------------------------------------
    def entries_with(self, key_states: torch.Tensor, value_states: torch.Tensor):
        return self.assemble(key_states, value_states)

    def store_entries(self, keys: torch.Tensor, values: torch.Tensor, indices: torch.Tensor | None) -> None:
        sinks = self.sink_keys.shape[2]
        if indices is not None and self.packed_length:
            # Pack the residual's excess before evicting, so that what is evicted from the full-precision part
            # is only ever among the newest tokens, which the eviction half keeps in every row and head.
            start = sinks + self.packed_length
            count = self.excess(keys.shape[2] - start)
            if count:
                self.packed.append(keys[:, :, start : start + count], values[:, :, start : start + count])
        packed = self.packed_length
        if indices is None:
            self.key_buffer = keys[:, :, sinks + packed :].clone()
            self.value_buffer = values[:, :, sinks + packed :].clone()
            return
        in_sinks = (indices < sinks).sum(-1)
        in_packed = ((indices >= sinks) & (indices < sinks + packed)).sum(-1)
        first = in_packed.flatten()[0]
        uneven = (in_sinks != sinks).any() | (in_packed != first).any()
        kept_packed, uneven = torch.stack([first, uneven.long()]).tolist()  # one device sync, not three
        if uneven:
            raise RuntimeError(
                f"{type(self).__name__}: the eviction dropped a sink, or kept different numbers of packed "
                "tokens in different rows or heads, which this storage cannot hold"
            )
        if kept_packed < packed:
            self.packed.keep(indices[..., sinks : sinks + kept_packed] - sinks)
        residual = indices[..., sinks + kept_packed :]
        self.key_buffer, self.value_buffer = gather_entries(keys, residual), gather_entries(values, residual)

    def assemble(self, key_states: torch.Tensor | None = None, value_states: torch.Tensor | None = None):
        if self.packed_stamps is None:
            return super().assemble(key_states, value_states)
        order = self.age_order_of_slots()  # slots in use: read them in age order, changing nothing
        packed = [gather_entries(t, order) for t in dequantize_slots(self.packed, self.key_buffer)]
        fresh = ([], []) if key_states is None else ([key_states], [value_states])
        return tuple(
            torch.cat([sink, part, residual, *new], dim=2)
            for sink, part, residual, new in zip(
                (self.sink_keys, self.sink_values),
                packed,
                (self.key_buffer, self.value_buffer),
                fresh,
                strict=True,
            )
        )

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        self.leave_slots()
        result = super().update(key_states, value_states, *args, **kwargs)
        if not self.holds_padding:
            self.settle()
        return result
