"""Sliding-window KV cache with attention sinks (StreamingLLM).

Paper: "Efficient Streaming Language Models with Attention Sinks", https://arxiv.org/abs/2309.17453
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel

from hf_kvcache.budget import Budget, check_budget
from hf_kvcache.held import RowTensor
from hf_kvcache.layout import AttentionLayout
from hf_kvcache.model_hooks import (
    ForwardState,
    KeyRotator,
    applies_rope,
    attention_modules,
    find_rotary_module,
)
from hf_kvcache.registry import check_int, register_strategy
from hf_kvcache.strategies.eviction import EvictingLayer, EvictionCache
from hf_kvcache.strategies.quantized import QuantizedOptions
from hf_kvcache.strategies.quantized_storage import QuantizedStorage, check_composed_quantization

POSITION_MODES = ("shifted", "original")


@dataclass(frozen=True)
class SlidingWindowOptions:
    """Options of :class:`SlidingWindowKVCache`; see there."""

    window_length: Budget = 256
    num_sink_tokens: int = 4
    positions: str = "shifted"
    quantization: QuantizedOptions | None = field(default=None, metadata={"composes": "quantized"})

    def __post_init__(self):
        check_composed_quantization(self.quantization)
        check_int("num_sink_tokens", self.num_sink_tokens, 0)
        if isinstance(self.window_length, int) and self.window_length == self.num_sink_tokens:
            raise ValueError(
                f"window_length must be larger than num_sink_tokens={self.num_sink_tokens}, "
                f"got {self.window_length}"
            )
        check_budget(self, "window_length", sinks="num_sink_tokens")
        if self.positions not in POSITION_MODES:
            raise ValueError(f"positions must be one of {list(POSITION_MODES)}, got {self.positions!r}")


class SlidingWindowLayer(EvictingLayer):
    """Keeps each row's first ``num_sink_tokens`` real tokens and its newest ones, ``window_length`` in all:
    the eviction contract's default priority (age) with the sinks protected."""

    sink_originals = RowTensor("the sinks' own keys while the slots hold them shifted [B, H, sinks, D]")

    def __init__(self, options: SlidingWindowOptions, state: ForwardState, rotator: KeyRotator | None):
        self.rotator = rotator
        super().__init__(options.window_length, state, sinks=options.num_sink_tokens)

    def attention_keys(self, keys: torch.Tensor, evicted: torch.Tensor, in_place: bool) -> torch.Tensor:
        # Shifted positions: the kept tokens sit at consecutive positions ending just before the new ones.
        # The recent tokens already do; the sinks are moved up by the number of real tokens evicted so far,
        # always from their original rotation, so the shift is never applied twice.
        if self.rotator is None or self.sinks == 0:
            return keys
        # A shift by 0 is exact, so a compiled step shifts unconditionally rather than read the count back.
        if not torch.compiler.is_compiling() and not bool((evicted > 0).any()):
            return keys
        sinks = self.sinks
        if not in_place:
            return torch.cat(
                [self.rotator.shift(keys[..., :sinks, :], evicted), keys[..., sinks:, :]], dim=-2
            )
        # Decoding steps write the shifted sinks over the slots' own (sinks never move) and keep the
        # originals.
        if self.sink_originals is None:
            self.sink_originals = keys[..., :sinks, :].clone()
        keys[..., :sinks, :] = self.rotator.shift(self.sink_originals, evicted)
        return keys

    def restore_buffers(self) -> None:
        if self.sink_originals is not None:
            self.key_buffer[:, :, : self.sinks] = self.sink_originals
            self.sink_originals = None

    def stored_keys(self) -> torch.Tensor:
        if self.sink_originals is None:
            return self.key_buffer
        keys = self.key_buffer.clone()
        keys[:, :, : self.sinks] = self.sink_originals
        return keys


class QuantizedSlidingWindowLayer(QuantizedStorage, SlidingWindowLayer):
    """A sliding-window layer that holds its entries in quantized storage (``sliding-window+quantized``)."""

    victims_from = "age"


@register_strategy(
    "sliding-window",
    "StreamingLLM: attention sinks plus the most recent tokens, positions shifted into the window",
)
class SlidingWindowKVCache(EvictionCache):
    """Sliding-window cache with attention sinks (StreamingLLM, https://arxiv.org/abs/2309.17453).

    Keeps the first ``num_sink_tokens`` tokens of each sequence and the most recent
    ``window_length - num_sink_tokens``, so memory is bounded whatever the length. ``get_seq_length()`` counts
    every token seen, so position ids stay correct. Left-padded batches keep each row's own first real tokens
    as sinks.

    Args:
        model: the model the cache serves.
        window_length: tokens kept per layer, sinks included; or a fraction of the tokens seen (``0.25``).
            Default 256.
        num_sink_tokens: first tokens always kept; 0 is a plain sliding window. Default 4.
        positions: ``"shifted"``: attention sees the kept tokens at consecutive positions, as StreamingLLM
            does, which keeps streaming stable far past the trained context (RoPE models only).
            ``"original"``: kept keys keep the positions they were computed at. Default ``'shifted'``.
        quantization: a :class:`~hf_kvcache.strategies.quantized.QuantizedOptions` to hold the kept tokens
            bit-packed (spec ``sliding-window:...+quantized:...``; see :mod:`~.quantized_storage`): sinks and
            the newest ``residual_length`` tokens in full precision, the rest of the window packed. ``None``:
            everything in full precision. Default ``None``.

    Example:
        >>> cache = SlidingWindowKVCache(model, window_length=256, num_sink_tokens=4)
        >>> model.generate(**inputs, past_key_values=cache, max_new_tokens=2000)
        >>> cache = SlidingWindowKVCache(model, window_length=512, quantization=QuantizedOptions(nbits=4))
    """

    options_class = SlidingWindowOptions

    def build_layers(self, model: PreTrainedModel, layout: AttentionLayout) -> list[SlidingWindowLayer]:
        rotary = None
        if self.options.positions == "shifted" and self.options.num_sink_tokens > 0:
            rotary = find_rotary_module(model)
            if rotary is None:
                raise ValueError(
                    "positions='shifted' re-rotates cached keys and needs a RoPE model; "
                    f"{type(model).__name__} has no rotary embedding. Use positions='original'."
                )
        layers = super().build_layers(model, layout)
        if rotary is not None:
            modules = attention_modules(model)
            for index, (kind, layer) in enumerate(zip(layout.layer_types, layers, strict=True)):
                # A layer without positions (NoPE) has nothing to re-rotate.
                uses_rope = index >= len(modules) or applies_rope(modules[index])
                if isinstance(layer, SlidingWindowLayer) and uses_rope:
                    layer.rotator = KeyRotator(rotary, kind)
        return layers

    def make_layer(self, layout: AttentionLayout) -> SlidingWindowLayer:
        quantization = self.options.quantization
        if quantization is None:
            return SlidingWindowLayer(self.options, self.forward_state, rotator=None)
        quantization.check_head_dim(layout.head_dim)
        # Window sinks past the quantizer's are held packed; they are never evicted either way.
        sinks = min(quantization.num_sink_tokens, self.options.num_sink_tokens)
        return QuantizedSlidingWindowLayer(
            self.options, self.forward_state, None, quantization=quantization, num_sink_tokens=sinks
        )
