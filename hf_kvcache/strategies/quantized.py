"""KIVI-style quantized KV cache: bit-packed 2/4/8-bit history plus a full-precision recent window.

Paper: KIVI, "A Tuning-Free Asymmetric 2bit Quantization for KV Cache", https://arxiv.org/abs/2402.02750
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import CacheLayerMixin

from hf_kvcache.base import KVCache
from hf_kvcache.calibration import calibrated_layer_options, check_calibrated_bits
from hf_kvcache.held import HeldTensors, RowTensor, check_batch, held_view
from hf_kvcache.layout import FULL_ATTENTION, LOCAL_ATTENTION, AttentionLayout, require_layer_types
from hf_kvcache.model_hooks import KeyRotator
from hf_kvcache.registry import WHEN_SET, check_int, register_strategy
from hf_kvcache.strategies.outliers import check_outlier_fraction
from hf_kvcache.strategies.packed_attention import ATTENTION_BACKENDS, StoredAttention
from hf_kvcache.strategies.packed_store import QuantizedTokens
from hf_kvcache.strategies.packing import (
    BACKENDS,
    SUPPORTED_NBITS,
    check_width,
    codes_per_packing_unit,
    scale_dtype,
)
from hf_kvcache.strategies.ranges import check_clipping
from hf_kvcache.strategies.rotation import KEY_MODES, ROTATIONS, key_ropes


@dataclass(frozen=True)
class QuantizedOptions:
    """Options of :class:`QuantizedKVCache`; see there."""

    nbits: int = 4
    group_size: int = 32
    residual_length: int = 128
    backend: str = "torch"
    num_sink_tokens: int = 4
    # Spelled out in a canonical spec only when set, so that stored results keep their keys.
    nbits_keys: int | None = field(default=None, metadata=WHEN_SET)
    nbits_values: int | None = field(default=None, metadata=WHEN_SET)
    rotation: str = field(default="none", metadata=WHEN_SET)
    keys: str = field(default="post_rope", metadata=WHEN_SET)
    calibrated_bits: float | None = field(default=None, metadata=WHEN_SET)
    calibration: str | None = field(default=None, metadata=WHEN_SET)
    attention: str = field(default="auto", metadata=WHEN_SET)
    outliers: float = field(default=0.0, metadata=WHEN_SET)
    outliers_keys: float | None = field(default=None, metadata=WHEN_SET)
    outliers_values: float | None = field(default=None, metadata=WHEN_SET)
    scales: str = field(default="model", metadata=WHEN_SET)
    clipping: str = field(default="none", metadata=WHEN_SET)

    def __post_init__(self):
        for name in ("nbits", "nbits_keys", "nbits_values"):
            value = getattr(self, name)
            if value not in SUPPORTED_NBITS and not (name != "nbits" and value is None):
                raise ValueError(f"{name} must be one of {list(SUPPORTED_NBITS)}, got {value!r}")
        check_int("group_size", self.group_size, 1)
        check_int("residual_length", self.residual_length, 0)
        check_int("num_sink_tokens", self.num_sink_tokens, 0)
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {list(BACKENDS)}, got {self.backend!r}")
        if self.rotation not in ROTATIONS:
            raise ValueError(f"rotation must be one of {list(ROTATIONS)}, got {self.rotation!r}")
        if self.attention not in ATTENTION_BACKENDS:
            raise ValueError(f"attention must be one of {list(ATTENTION_BACKENDS)}, got {self.attention!r}")
        if self.keys not in KEY_MODES:
            raise ValueError(f"keys must be one of {list(KEY_MODES)}, got {self.keys!r}")
        check_calibrated_bits(self)
        scale_dtype(self.scales, torch.float32)  # names the bad value
        check_clipping(self.clipping, self.backend)
        for name in ("outliers", "outliers_keys", "outliers_values"):
            check_outlier_fraction(name, getattr(self, name), optional=name != "outliers")
        for name, nbits in (
            ("nbits" if self.nbits_keys is None else "nbits_keys", self.key_nbits),
            ("nbits" if self.nbits_values is None else "nbits_values", self.value_nbits),
        ):
            check_width(name, nbits, self.backend, self.scales)
            unit = codes_per_packing_unit(nbits)
            if self.group_size % unit:
                raise ValueError(
                    f"group_size={self.group_size} must be a multiple of {unit} for {name}={nbits}: "
                    f"{nbits}-bit codes fill whole bytes {unit} at a time, and the codes in a byte belong to "
                    "tokens of the same group"
                )

    @property
    def key_nbits(self) -> int:
        """Bits per key code: ``nbits_keys``, or ``nbits`` when that is not given."""
        return self.nbits if self.nbits_keys is None else self.nbits_keys

    @property
    def value_nbits(self) -> int:
        """Bits per value code: ``nbits_values``, or ``nbits`` when that is not given."""
        return self.nbits if self.nbits_values is None else self.nbits_values

    @property
    def key_outliers(self) -> float:
        """Fraction of each key kept exact: ``outliers_keys``, or ``outliers`` when that is not given."""
        return self.outliers if self.outliers_keys is None else self.outliers_keys

    @property
    def value_outliers(self) -> float:
        """Fraction of each value kept exact: ``outliers_values``, or ``outliers`` when that is not given."""
        return self.outliers if self.outliers_values is None else self.outliers_values

    def check_head_dim(self, head_dim: int) -> None:
        """Value groups split the head dimension."""
        if head_dim % self.group_size:
            raise ValueError(
                f"group_size={self.group_size} must divide the model's head dimension {head_dim}; "
                f"allowed: {[g for g in range(1, head_dim + 1) if head_dim % g == 0]}"
            )


class QuantizedLayer(StoredAttention, QuantizedTokens, HeldTensors, CacheLayerMixin):
    """One model layer's tokens as sinks, packed history and full-precision residual (:mod:`.packed_store`).

    The packed tokens use the grouped layout: whole key groups arrive, and only whole groups leave (a local
    layer's window, ``crop``).

    ``keys`` and ``values`` are every held token, dequantized, in sequence order; ``key_buffer`` and
    ``value_buffer`` ``[B, H, R, D]`` are the residual. Decode steps of a global layer attend over the storage
    itself (:mod:`.packed_attention`) unless ``attention='dense'`` or ``outliers`` are kept.

    A local (sliding-window) layer keeps no sinks, which would sit outside its window, and lets go of whole
    groups once they are behind it (``dropped`` tokens).
    """

    is_compileable = False
    is_sliding = False

    key_buffer = RowTensor("residual keys in the model's dtype [B, H, R, D]")
    value_buffer = RowTensor("residual values [B, H, R, D]")

    def __init__(
        self, options: QuantizedOptions, window: int | None = None, key_rope: KeyRotator | None = None
    ):
        super().__init__()
        self.options, self.window = options, window
        self.is_sliding = window is not None
        # Sinks would sit outside a local layer's window, where the model never looks.
        sinks = 0 if window is not None else options.num_sink_tokens
        # KIVI keeps `residual_length` tokens exact: a group is packed once that many newer ones exist.
        residual = options.residual_length + options.group_size - 1
        self.setup_quantized(options, sinks, residual, scattered=False, key_rope=key_rope)
        self.reset()

    def reset(self) -> None:
        self.clear_held()
        self.dropped = 0  # tokens a local layer let go of once they were behind its window
        self.is_initialized = False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.key_buffer, self.value_buffer = key_states[..., :0, :].clone(), value_states[..., :0, :].clone()
        self.init_quantized(key_states, value_states)
        if self.window is not None:
            residual = self._local_residual_tokens(key_states.shape[-1], key_states.element_size())
            self.max_residual = residual + self.options.group_size - 1
        self.is_initialized = True

    @property
    def reads_storage(self) -> bool:
        # Exact outliers sit over the codes (an attention over storage would have to add their share).
        exact = self.options.key_outliers or self.options.value_outliers
        return self.options.attention != "dense" and self.window is None and not exact

    def append_tokens(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        check_batch(self, self.key_buffer, key_states)
        self.key_buffer = torch.cat([self.key_buffer, key_states], dim=-2)
        self.value_buffer = torch.cat([self.value_buffer, value_states], dim=-2)

    keys = held_view(0, "Every held key, dequantized, in order.")
    values = held_view(1, "Every held value, dequantized, in order.")

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.append_tokens(key_states, value_states)
        # Attend, then pack (as the storage path does): new tokens see themselves and the residual in full
        # precision, as in KIVI, even when residual_length is 0.
        all_keys, all_values = self.assemble()
        self.settle()
        if self.window is not None:
            self._drop_behind_window()
        return all_keys, all_values

    def _drop_behind_window(self) -> None:
        """Let go of what the next query of a local layer cannot see: whole packed groups (a group is kept
        while any of its tokens is in the window; the mask hides the rest) or, before anything is packed, the
        oldest residual tokens."""
        span, size = self.window - 1, self.options.group_size
        excess = self.packed_length + self.key_buffer.shape[-2] - span
        groups = min(max(excess, 0) // size, self.packed_length // size)
        if groups:
            self.packed.slice_groups(groups, self.packed_length // size)
            self.dropped += groups * size
        elif self.packed_length == 0 and excess > 0:
            self.key_buffer = self.key_buffer[..., excess:, :].clone()
            self.value_buffer = self.value_buffer[..., excess:, :].clone()
            self.dropped += excess

    def _local_residual_tokens(self, head_dim: int, element_size: int) -> int:
        """Full-precision tokens of a local layer: as many as asked, unless quantizing the rest of the window
        could then hold more bytes than ``DynamicCache``'s ``window - 1`` full-precision tokens."""
        span, size = self.window - 1, self.options.group_size
        residual = min(self.options.residual_length, span)
        full = 2 * head_dim * element_size
        # codes, then key scales and zeros per group of tokens, then value ones per group of channels
        code_bits = self.options.key_nbits + self.options.value_nbits
        quantized = head_dim * code_bits / 8 + 4 * head_dim * element_size / size
        # Worst case between drops: residual + size - 1 full-precision tokens, span - residual quantized ones.
        if (size - 1) * full <= (span - residual) * (full - quantized):
            return residual
        return span

    def get_seq_length(self) -> int:
        if not self.is_initialized:
            return 0
        return self.sink_keys.shape[-2] + self.dropped + self.packed_length + self.key_buffer.shape[-2]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # Held tokens are consecutive from column `dropped` on; a local layer's mask then hides what is past
        # the window in the oldest group it keeps.
        return self.get_seq_length() - self.dropped + query_length, self.dropped

    def get_max_length(self) -> int:
        return -1 if self.window is None else self.window

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
            self.sink_keys = self.sink_keys[..., :keep, :].clone()
            self.sink_values = self.sink_values[..., :keep, :].clone()
        keep, packed = max(keep - sinks, 0), self.packed_length
        if keep >= packed:
            self.key_buffer = self.key_buffer[..., : keep - packed, :].clone()
            self.value_buffer = self.value_buffer[..., : keep - packed, :].clone()
            return
        size = self.options.group_size
        if keep % size:
            raise ValueError(
                f"cannot crop the quantized cache to {keep} tokens: the cut falls inside a quantized group "
                f"of {size} tokens; crop to a multiple of {size} or to at least {sinks + packed} tokens"
            )
        self.packed.slice_groups(0, keep // size)
        self.key_buffer = self.key_buffer[..., :0, :].clone()
        self.value_buffer = self.value_buffer[..., :0, :].clone()


@register_strategy(
    "quantized", "KIVI: keys per channel, values per token, bit-packed, full-precision recent window"
)
class QuantizedKVCache(KVCache):
    """KIVI-style quantized KV cache with really bit-packed storage.

    Keys are quantized per channel (each group of ``group_size`` consecutive tokens has its own scale and zero
    point per channel) and values per token (each group of ``group_size`` channels has its own scale and zero
    point per token), asymmetric min-max, as in KIVI (https://arxiv.org/abs/2402.02750). The newest
    ``residual_length`` tokens stay in full precision; older tokens are quantized group by group, once (never
    again): four 2-bit or two 4-bit codes to a byte, eight 3-bit codes to three bytes.

    Args:
        model: the model the cache serves (its config gives layers and head size).
        nbits: bits per code, one of 2, 3, 4, 8. Default 4.
        group_size: tokens per key group, channels per value group; divides the head dimension. Default 32.
        residual_length: newest tokens kept in full precision. Default 128.
        backend: ``"torch"`` (pure PyTorch) or ``"quanto"`` (optimum-quanto's primitives, same scheme).
            Default ``'torch'``.
        num_sink_tokens: first tokens of the sequence kept in full precision, since every later query attends
            to them heavily (StreamingLLM's attention sinks); 0 is plain KIVI. Default 4.
        nbits_keys: bits per key code, overriding ``nbits`` for keys (``None``: ``nbits``). Default None.
        nbits_values: bits per value code, overriding ``nbits`` for values. Default None.
        rotation: ``"none"``, or ``"hadamard"``: a fixed randomized Hadamard rotation of each head's keys and
            values before quantization (inverted on the way out), which spreads outlier channels over all
            channels (QuaRot, https://arxiv.org/abs/2404.00456; TurboQuant, https://arxiv.org/abs/2504.19874).
            ``"hadamard-values"`` rotates only the values: keys are quantized per channel, where an outlier
            channel already has its own range. Default ``'none'``.
        keys: ``"post_rope"`` quantizes keys as the model hands them over; ``"pre_rope"`` undoes the rotary
            embedding of each key's position before quantizing and applies it again on the way out
            (KVQuant, https://arxiv.org/abs/2401.18079): a channel's scale then covers one channel rather
            than a pair mixed by the rotation. The position is the key's index in the cache, which is its
            RoPE position up to a fixed rotation per left-padded row, so the round trip stays exact. Decode
            steps still read the codes in place: the kernel turns each key group to its positions.
            ``quantized`` alone (not under eviction), on models with one rotary embedding. Default
            ``'post_rope'``.
        calibrated_bits: mean bits per code (2-8); each layer's keys and values get a width of 2, 3, 4 or 8
            from the model's calibration (:mod:`hf_kvcache.calibration`, ``hf-kvcache calibrate``) that loses
            the least of its predictions. ``None``: ``nbits`` everywhere. Default None.
        calibration: the calibration file to read; ``None``: the one ``hf-kvcache calibrate`` wrote for this
            model and setting. Default None.
        attention: how decode steps read the packed history (:mod:`.packed_attention`): ``"compiled"``, a
            native kernel that folds the scales into the query and the weights and never builds a dequantized
            copy (built on first use with the system's C++ compiler, CPU); ``"triton"``, Triton kernels
            that do the same on a CUDA device (:mod:`hf_kvcache.kernels.triton_packed`; ``group_size`` a
            power of two from 16); ``"torch"``, the same sums in torch; ``"auto"``, compiled on CPU where it
            builds (else torch with one warning), Triton on CUDA where it is installed (else torch);
            ``"dense"``, dequantize the history and run the model's own attention. Default ``'auto'``.
        outliers: fraction ``F`` of each token's entries (per KV head) kept exact in a sparse store, the
            ``ceil(F * D)`` farthest from their quantization group's center, which would stretch its range
            (KVQuant's dense-and-sparse scheme, https://arxiv.org/abs/2401.18079; :mod:`.outliers`). Decoding
            then attends over a dequantized copy. Default 0.0.
        outliers_keys: the fraction for keys, overriding ``outliers`` (``None``: ``outliers``). Default None.
        outliers_values: the fraction for values, overriding ``outliers``. Default None.
        scales: scales and zero points in the model's dtype (``"model"``: 32 / ``group_size`` bits per entry
            in bfloat16) or in ``float8_e5m2`` (``"float8"``, half that, codes of 2-4 bits; under 0.03 bits
            of code lost at 2 and 3 bits, 0.1 at 4: ``eval/bench_scale_format.py``). Default ``'model'``.
        clipping: ``"mse"`` shrinks each group's range toward its center where that lowers its squared error
            (:mod:`.ranges`; torch backend), ``"mse-values"`` (``"mse-keys"``) only the values' (keys');
            ``"calibrated"``: each layer's keys and values clipped or not, whichever the calibration found
            to cost less at their width (widths 2-4, or ``calibrated_bits``). Default ``'none'``.

    Example:
        >>> cache = QuantizedKVCache(model, nbits=2)
        >>> model.generate(**inputs, past_key_values=cache, max_new_tokens=64)
    """

    options_class = QuantizedOptions

    def build_layers(self, model: PreTrainedModel, layout: AttentionLayout) -> list[QuantizedLayer]:
        require_layer_types(layout, (FULL_ATTENTION, *LOCAL_ATTENTION), type(self).__name__)
        self.options.check_head_dim(layout.head_dim)
        StoredAttention.require_attention_backend(model, self.options)
        ropes = key_ropes(model, layout) if self.options.keys == "pre_rope" else [None] * layout.num_layers
        options = [self.options] * layout.num_layers
        if self.options.calibrated_bits is not None or self.options.clipping == "calibrated":
            options = calibrated_layer_options(model, self.options)
        return [QuantizedLayer(options[i], layout.window(i), ropes[i]) for i in range(layout.num_layers)]
