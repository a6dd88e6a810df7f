"""KIVI-style quantized KV cache: bit-packed 2/4/8-bit history plus a full-precision recent window.

Paper: KIVI, "A Tuning-Free Asymmetric 2bit Quantization for KV Cache", https://arxiv.org/abs/2402.02750
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import CacheLayerMixin

from hf_kvcache.base import BatchRowsMixin, KVCache
from hf_kvcache.layout import FULL_ATTENTION, LOCAL_ATTENTION, AttentionLayout, require_layer_types
from hf_kvcache.registry import register_strategy
from hf_kvcache.strategies.packing import (
    BACKENDS,
    SUPPORTED_NBITS,
    TorchCodec,
    make_codec,
    pack_token_groups,
    quantize_kivi,
    unpack_token_groups,
)


@dataclass(frozen=True)
class QuantizedOptions:
    """Options of :class:`QuantizedKVCache`; see there."""

    nbits: int = 4
    group_size: int = 32
    residual_length: int = 128
    backend: str = "torch"
    num_sink_tokens: int = 4

    def __post_init__(self):
        if self.nbits not in SUPPORTED_NBITS:
            raise ValueError(f"nbits must be one of {list(SUPPORTED_NBITS)}, got {self.nbits!r}")
        if not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"group_size must be a positive integer, got {self.group_size!r}")
        if not isinstance(self.residual_length, int) or self.residual_length < 0:
            raise ValueError(f"residual_length must be an integer >= 0, got {self.residual_length!r}")
        if not isinstance(self.num_sink_tokens, int) or self.num_sink_tokens < 0:
            raise ValueError(f"num_sink_tokens must be an integer >= 0, got {self.num_sink_tokens!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {list(BACKENDS)}, got {self.backend!r}")
        if self.group_size % (8 // self.nbits):
            per_byte = 8 // self.nbits
            raise ValueError(
                f"group_size={self.group_size} must be a multiple of {per_byte} for nbits={self.nbits}: the "
                f"{per_byte} codes in a byte belong to tokens of the same group"
            )

    def check_head_dim(self, head_dim: int) -> None:
        """Value groups split the head dimension."""
        if head_dim % self.group_size:
            raise ValueError(
                f"group_size={self.group_size} must divide the model's head dimension {head_dim}; "
                f"allowed: {[g for g in range(1, head_dim + 1) if head_dim % g == 0]}"
            )


class QuantizedLayer(BatchRowsMixin, CacheLayerMixin):
    """One model layer's quantized keys and values.

    Storage (``T_q`` quantized tokens, ``R`` residual tokens, ``G`` = group size):
    ``key_codes``/``value_codes`` ``[B, H, T_q * nbits / 8, D]`` uint8; ``key_scale``/``key_zero``
    ``[B, H, T_q / G, D]`` (per channel, per group of G tokens); ``value_scale``/``value_zero``
    ``[B, H, T_q, D / G]`` (per token, per group of G channels); ``keys``/``values`` ``[B, H, R, D]`` and
    ``sink_keys``/``sink_values`` ``[B, H, S, D]`` in the model's dtype. The sequence is sinks, then quantized
    tokens, then the residual.

    Codes are packed along the tokens of each group (:func:`~hf_kvcache.strategies.packing.pack_codes`'s
    planar layout over the group's ``G`` tokens): token ``i`` of a group sits in byte row ``i % (G * nbits / 8)``
    of that group, bit slot ``i // (G * nbits / 8)``. Each bit slot then unpacks to ``G * nbits / 8`` whole
    consecutive tokens, which makes dequantizing the history one long contiguous copy instead of many short ones.
    """

    is_compileable = False
    is_sliding = False

    batched = (
        "keys", "values", "sink_keys", "sink_values",
        "key_codes", "key_scale", "key_zero", "value_codes", "value_scale", "value_zero",
    )  # fmt: skip

    def __init__(self, options: QuantizedOptions, codec: TorchCodec, window: int | None = None):
        super().__init__()
        self.options, self.codec, self.window = options, codec, window
        self.is_sliding = window is not None
        # Sinks would sit outside a local layer's window, where the model never looks.
        self.sink_tokens = 0 if window is not None else options.num_sink_tokens
        self._clear()

    def _clear(self) -> None:
        self.keys = self.values = self.sink_keys = self.sink_values = None
        self.key_codes = self.key_scale = self.key_zero = None
        self.value_codes = self.value_scale = self.value_zero = None
        self.dropped = 0  # tokens a local layer let go of once they were behind its window
        self.is_initialized = False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        batch, heads, _, head_dim = key_states.shape
        groups = head_dim // self.options.group_size
        empty = key_states.new_empty
        self.keys, self.values = empty(batch, heads, 0, head_dim), empty(batch, heads, 0, head_dim)
        self.sink_keys, self.sink_values = empty(batch, heads, 0, head_dim), empty(batch, heads, 0, head_dim)
        self.key_codes = torch.empty(batch, heads, 0, head_dim, dtype=torch.uint8, device=self.device)
        self.value_codes = torch.empty_like(self.key_codes)
        self.key_scale, self.key_zero = empty(batch, heads, 0, head_dim), empty(batch, heads, 0, head_dim)
        self.value_scale, self.value_zero = empty(batch, heads, 0, groups), empty(batch, heads, 0, groups)
        self.residual_tokens = self.options.residual_length
        if self.window is not None:
            self.residual_tokens = self._local_residual_tokens(head_dim, key_states.element_size())
        self.is_initialized = True

    @property
    def quantized_length(self) -> int:
        return 0 if not self.is_initialized else self.key_codes.shape[-2] * 8 // self.options.nbits

    def _quantize_and_append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Quantize whole groups of tokens and append them; they are never requantized afterwards."""
        size = self.options.group_size
        key_codes, key_scale, key_zero, value_codes, value_scale, value_zero = quantize_kivi(
            self.codec, keys, values, size, self.dtype
        )
        key_codes, value_codes = (pack_token_groups(self.codec, c, size) for c in (key_codes, value_codes))
        self.key_codes = torch.cat([self.key_codes, key_codes], dim=-2)
        self.key_scale = torch.cat([self.key_scale, key_scale], dim=-2)
        self.key_zero = torch.cat([self.key_zero, key_zero], dim=-2)
        self.value_codes = torch.cat([self.value_codes, value_codes], dim=-2)
        self.value_scale = torch.cat([self.value_scale, value_scale], dim=-2)
        self.value_zero = torch.cat([self.value_zero, value_zero], dim=-2)

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The quantized part of the keys and values, ``[B, H, T_q, D]`` in the model's dtype."""
        batch, heads, _, head_dim = self.keys.shape
        shape = (batch, heads, self.quantized_length, head_dim)
        keys, values = self.keys.new_empty(shape), self.values.new_empty(shape)
        self._dequantize_into(keys, values)
        return keys, values

    def _dequantize_into(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Dequantize the quantized tokens into ``keys``/``values`` ``[B, H, T_q, D]`` (views are fine)."""
        batch, heads, length, head_dim = keys.shape
        size = self.options.group_size
        # One conversion of all codes, then in-place multiply-add over whole rows: faster on CPU than addcmul.
        key_groups = keys.view(batch, heads, length // size, size, head_dim)
        key_groups.copy_(unpack_token_groups(self.key_codes, self.options.nbits, size))
        key_groups.mul_(self.key_scale.unsqueeze(3)).add_(self.key_zero.unsqueeze(3))
        values.view(batch, heads, length // size, size, head_dim).copy_(
            unpack_token_groups(self.value_codes, self.options.nbits, size)
        )
        value_groups = values.view(batch, heads, length, head_dim // size, size)
        value_groups.mul_(self.value_scale.unsqueeze(4)).add_(self.value_zero.unsqueeze(4))

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        # The first tokens draw a large share of attention everywhere (attention sinks): keep them exact.
        missing_sinks = self.sink_tokens - self.sink_keys.shape[-2]
        if missing_sinks > 0:
            self.sink_keys = torch.cat([self.sink_keys, key_states[..., :missing_sinks, :]], dim=-2)
            self.sink_values = torch.cat([self.sink_values, value_states[..., :missing_sinks, :]], dim=-2)
            key_states, value_states = (
                key_states[..., missing_sinks:, :],
                value_states[..., missing_sinks:, :],
            )
        residual_keys = torch.cat([self.keys, key_states], dim=-2)
        residual_values = torch.cat([self.values, value_states], dim=-2)
        all_keys, all_values = self._assemble(residual_keys, residual_values)
        # Move the oldest whole groups out of the residual, keeping at least `residual_length` tokens there.
        overflow = residual_keys.shape[-2] - self.residual_tokens
        flush = max(overflow, 0) // self.options.group_size * self.options.group_size
        if flush:
            self._quantize_and_append(residual_keys[..., :flush, :], residual_values[..., :flush, :])
            # clone() so the residual does not pin the storage of the longer tensor it was sliced from
            residual_keys = residual_keys[..., flush:, :].clone()
            residual_values = residual_values[..., flush:, :].clone()
        self.keys, self.values = residual_keys, residual_values
        if self.window is not None:
            self._drop_behind_window()
        return all_keys, all_values

    def _drop_behind_window(self) -> None:
        """Let go of what the next query of a local layer cannot see: whole quantized groups (a group is kept
        while any of its tokens is in the window; the mask hides the rest) or, before anything is quantized,
        the oldest residual tokens."""
        span, size = self.window - 1, self.options.group_size
        excess = self.quantized_length + self.keys.shape[-2] - span
        groups = min(max(excess, 0) // size, self.quantized_length // size)
        if groups:
            self._slice_quantized(groups * size, self.quantized_length)
            self.dropped += groups * size
        elif self.quantized_length == 0 and excess > 0:
            self.keys, self.values = self.keys[..., excess:, :].clone(), self.values[..., excess:, :].clone()
            self.dropped += excess

    def _local_residual_tokens(self, head_dim: int, element_size: int) -> int:
        """Full-precision tokens of a local layer: as many as asked, unless quantizing the rest of the window
        could then hold more bytes than ``DynamicCache``'s ``window - 1`` full-precision tokens."""
        span, size = self.window - 1, self.options.group_size
        residual = min(self.options.residual_length, span)
        full = 2 * head_dim * element_size
        # codes, then key scales and zeros per group of tokens, then value scales and zeros per group of channels
        quantized = 2 * head_dim * self.options.nbits / 8 + 4 * head_dim * element_size / size
        # Worst case between drops: residual + size - 1 full-precision tokens, span - residual quantized ones.
        if (size - 1) * full <= (span - residual) * (full - quantized):
            return residual
        return span

    def _assemble(
        self, residual_keys: torch.Tensor, residual_values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sinks, dequantized history and residual as one ``[B, H, S + T_q + R, D]`` tensor each.

        The history is dequantized straight into its slice of the output, which saves a full copy of it per
        step compared with dequantizing and then concatenating.
        """
        if not self.quantized_length:
            return (
                torch.cat([self.sink_keys, residual_keys], dim=-2),
                torch.cat([self.sink_values, residual_values], dim=-2),
            )
        batch, heads, residual, head_dim = residual_keys.shape
        sinks, length = self.sink_keys.shape[-2], self.quantized_length
        shape = (batch, heads, sinks + length + residual, head_dim)
        all_keys, all_values = residual_keys.new_empty(shape), residual_values.new_empty(shape)
        all_keys[..., :sinks, :] = self.sink_keys
        all_values[..., :sinks, :] = self.sink_values
        self._dequantize_into(
            all_keys[..., sinks : sinks + length, :], all_values[..., sinks : sinks + length, :]
        )
        all_keys[..., sinks + length :, :] = residual_keys
        all_values[..., sinks + length :, :] = residual_values
        return all_keys, all_values

    def get_seq_length(self) -> int:
        if not self.is_initialized:
            return 0
        return self.sink_keys.shape[-2] + self.dropped + self.quantized_length + self.keys.shape[-2]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # Held tokens are consecutive from column `dropped` on; a local layer's mask then hides what is past
        # the window in the oldest group it keeps.
        return self.get_seq_length() - self.dropped + query_length, self.dropped

    def get_max_length(self) -> int:
        return -1 if self.window is None else self.window

    def reset(self) -> None:
        self._clear()

    def crop(self, max_length: int) -> None:
        """Keep the first ``max_length`` tokens (a negative value removes that many from the end).

        Exact while the cut falls in the full-precision residual or on a quantization group boundary;
        otherwise a ``ValueError``, since a key group's scale would no longer describe its tokens.
        """
        length = self.get_seq_length()
        if self.dropped:
            raise ValueError(
                f"cannot crop this local layer: it let go of {self.dropped} tokens behind its window of "
                f"{self.window}, so rolling back cannot be exact"
            )
        keep = length + max_length if max_length < 0 else min(max_length, length)
        if keep < 0:
            raise ValueError(f"cannot crop {-max_length} tokens from a cache of {length}")
        sinks = self.sink_keys.shape[-2]
        if keep < sinks:
            self.sink_keys, self.sink_values = (
                self.sink_keys[..., :keep, :].clone(),
                self.sink_values[..., :keep, :].clone(),
            )
        keep = max(keep - sinks, 0)
        if keep >= self.quantized_length:
            self.keys = self.keys[..., : keep - self.quantized_length, :].clone()
            self.values = self.values[..., : keep - self.quantized_length, :].clone()
            return
        if keep % self.options.group_size:
            raise ValueError(
                f"cannot crop the quantized cache to {keep} tokens: the cut falls inside a quantized group of "
                f"{self.options.group_size} tokens; crop to a multiple of {self.options.group_size} or to at "
                f"least {sinks + self.quantized_length} tokens"
            )
        self._slice_quantized(0, keep)
        self.keys, self.values = self.keys[..., :0, :].clone(), self.values[..., :0, :].clone()

    def _slice_quantized(self, start: int, stop: int) -> None:
        """Keep quantized tokens ``start`` to ``stop``, both multiples of the group size: no code changes."""
        size, per_byte = self.options.group_size, 8 // self.options.nbits
        rows, groups = slice(start // per_byte, stop // per_byte), slice(start // size, stop // size)
        self.key_codes = self.key_codes[..., rows, :].clone()
        self.value_codes = self.value_codes[..., rows, :].clone()
        self.key_scale, self.key_zero = (
            self.key_scale[..., groups, :].clone(),
            self.key_zero[..., groups, :].clone(),
        )
        self.value_scale = self.value_scale[..., start:stop, :].clone()
        self.value_zero = self.value_zero[..., start:stop, :].clone()


@register_strategy(
    "quantized", "KIVI: keys per channel, values per token, bit-packed, full-precision recent window"
)
class QuantizedKVCache(KVCache):
    """KIVI-style quantized KV cache with really bit-packed storage.

    Keys are quantized per channel (each group of ``group_size`` consecutive tokens has its own scale and zero
    point per channel) and values per token (each group of ``group_size`` channels has its own scale and zero
    point per token), asymmetric min-max, as in KIVI (https://arxiv.org/abs/2402.02750). The newest
    ``residual_length`` tokens stay in full precision; older tokens are quantized group by group, once, and never
    dequantized and quantized again. 2-bit codes are stored four to a byte, 4-bit codes two to a byte.

    Args:
        model: the model the cache serves (its config gives layers and head size).
        nbits: bits per code, one of 2, 4, 8. Default 4.
        group_size: tokens per key group and channels per value group; must divide the head dimension.
            Default 32.
        residual_length: newest tokens kept in full precision. Default 128.
        backend: ``"torch"`` (pure PyTorch) or ``"quanto"`` (optimum-quanto's primitives, same scheme).
            Default ``'torch'``.
        num_sink_tokens: first tokens of the sequence kept in full precision, since every later query attends
            to them heavily (StreamingLLM's attention sinks); 0 is plain KIVI. Default 4.

    Example:
        >>> cache = QuantizedKVCache(model, nbits=2)
        >>> model.generate(**inputs, past_key_values=cache, max_new_tokens=64)
    """

    options_class = QuantizedOptions

    def build_layers(self, model: PreTrainedModel, layout: AttentionLayout) -> list[QuantizedLayer]:
        require_layer_types(layout, (FULL_ATTENTION, *LOCAL_ATTENTION), type(self).__name__)
        self.options.check_head_dim(layout.head_dim)
        codec = make_codec(self.options.nbits, self.options.backend)
        return [QuantizedLayer(self.options, codec, layout.window(i)) for i in range(layout.num_layers)]
