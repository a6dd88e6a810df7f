"""Native kernels: attention over bit-packed codes (``packed_attention.cpp``), built once per machine.

The C++ source ships with the package and is compiled on first use with the system's C++ compiler (``$CXX``,
else ``g++`` or ``c++``; OpenMP, ``-O3 -march=native``) into ``$HF_KVCACHE_HOME/kernels/``, keyed by the
source, the flags and the CPU (:mod:`.build`), then loaded with :mod:`ctypes`. No torch headers are
involved, so a build takes about ten seconds. :func:`load_packed_kernels` raises :class:`KernelUnavailable`
(saying why) where no compiler, OpenMP or working build is available; the caller then runs the same
computation in torch.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from hf_kvcache.kernels.build import KernelUnavailable, load_library

# Below this many multiply-adds a step runs on one thread: waking the others (with passive waiting, a futex
# per phase) costs more than they save. A decoding step over a few hundred held tokens is that small.
SERIAL_WORK = 2**20


def _threads_for(work: int) -> int:
    return 1 if work < SERIAL_WORK else torch.get_num_threads()


# The C functions' arguments, one letter each (spaces only group them as the C++ file does): p a pointer, s an
# int64, i an int, f a float.
ARGUMENT_TYPES = {"p": ctypes.c_void_p, "s": ctypes.c_int64, "i": ctypes.c_int, "f": ctypes.c_float}
SIGNATURES = {
    "_scores": ("hfkv_packed_scores", "ppppp sssss i pss ps i"),
    "_values": ("hfkv_packed_values", "ppppp sssss ipi"),
    "_decode": ("hfkv_decode", "pppp s pppppp s pp s ppp ssss ii f pss pp s i"),
    "_dense": ("hfkv_dense_decode", "ppp ss pp sss fi"),
    "_slots": ("hfkv_slots_decode", "ppp s pppp s pppp s pp s ppp ssss iii fi"),
}


class PackedKernels:
    """The loaded library (see the C++ file): :meth:`scores` and :meth:`values` over grouped-layout codes, a
    whole unmasked step over a quantized layer (:meth:`decode`) and over float32 slots (:meth:`dense_decode`).
    Each call runs on :func:`_threads_for` its work."""

    def __init__(self, library: ctypes.CDLL):
        for attribute, (name, signature) in SIGNATURES.items():
            function = getattr(library, name)
            function.argtypes = [ARGUMENT_TYPES[letter] for letter in signature.replace(" ", "")]
            function.restype = ctypes.c_int
            setattr(self, attribute, function)

    @property
    def functions(self):
        """``(scores, values)``, with the signatures of the torch versions in :mod:`..packed_attention`."""
        return self.scores, self.values

    @staticmethod
    def _flat(name: str, tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``tensor`` as a contiguous CPU tensor (in ``dtype``, if given) whose data the kernels read as rows
        ``[B * H, ...]``."""
        if tensor.device.type != "cpu":
            raise ValueError(f"the packed-attention kernel runs on CPU; {name} is on {tensor.device}")
        if dtype is not None and tensor.dtype != dtype:
            tensor = tensor.to(dtype)
        return tensor if tensor.is_contiguous() else tensor.contiguous()

    @staticmethod
    def _step_outputs(query: torch.Tensor, total: int):
        """For a fused step of ``query`` ``[B, H, M, D]`` over ``total`` tokens: its threads, the weights
        ``[B, H, M, total]``, the output ``[B, H, M, D]`` (zeros) and each thread's partial output."""
        batch, heads, queries, head_dim = query.shape
        threads = _threads_for(batch * heads * queries * total * head_dim)
        weights = query.new_empty(batch, heads, queries, total)
        out = query.new_zeros(batch, heads, queries, head_dim)
        return threads, weights, out, query.new_empty(threads, batch * heads, queries, head_dim)

    def scores(self, codes, query, scale, zero, group_size: int, nbits: int) -> torch.Tensor:
        """``q . k`` of queries ``[B, H, M, D]`` with the keys of grouped-layout ``codes`` (``[B, H, n * nbits
        / 8, D]``, key scale/zero ``[B, H, n / G, D]``): ``[B, H, M, n]``, float32."""
        return self._grouped_scores(codes, query, scale, zero, group_size, nbits)

    def rope_scores(
        self, codes, query, scale, zero, group_size: int, nbits: int, inv_freq, first: int, signs=None
    ) -> torch.Tensor:
        """``q . k`` like :meth:`scores`, for keys stored before their rotary embedding (``keys=pre_rope``):
        token ``t`` of the store is turned to position ``first + t`` by the frequencies ``inv_freq``
        ``[rotary_dim / 2]`` after its Hadamard rotation is undone (``signs`` ``[D]``, see
        :func:`~hf_kvcache.strategies.rotation.hadamard_signs`; ``None``: keys not rotated)."""
        return self._grouped_scores(codes, query, scale, zero, group_size, nbits, (inv_freq, first, signs))

    def _grouped_scores(self, codes, query, scale, zero, group_size: int, nbits: int, rope=None):
        batch, heads, queries, head_dim = query.shape
        groups = scale.shape[2]
        tensors = [
            self._flat("codes", codes),
            self._flat("query", query, torch.float32),
            self._flat("scale", scale, torch.float32),
            self._flat("zero", zero, torch.float32),
        ]
        out = tensors[1].new_empty(batch, heads, queries, groups * group_size)
        shape = (batch * heads, groups, group_size, head_dim, queries, nbits)
        work = batch * heads * queries * groups * group_size * head_dim
        inv_freq, first, signs = rope or (None, 0, None)
        if rope is not None:  # turning a key to its position costs about what 8 queries' dot products do
            work += 8 * work // queries
            inv_freq = self._flat("inv_freq", inv_freq, torch.float32)
            signs = None if signs is None else self._flat("signs", signs, torch.float32)
        status = self._scores(
            *(t.data_ptr() for t in tensors),
            out.data_ptr(),
            *shape,
            None if inv_freq is None else inv_freq.data_ptr(),
            0 if inv_freq is None else inv_freq.numel(),
            first,
            None if signs is None else signs.data_ptr(),
            head_dim & -head_dim,
            _threads_for(work),
        )
        if status:
            raise ValueError(f"the packed-attention kernel has no {nbits}-bit codes")
        return out

    def values(self, codes, weights, scale, zero, group_size: int, nbits: int) -> torch.Tensor:
        """``weights @ V`` for weights ``[B, H, M, n]`` over the values of grouped-layout ``codes`` (``[B, H,
        n * nbits / 8, D]``, value scale/zero ``[B, H, n, D / G]``): ``[B, H, M, D]``, float32."""
        batch, heads, queries, length = weights.shape
        head_dim = codes.shape[-1]
        tensors = [
            self._flat("codes", codes),
            self._flat("weights", weights, torch.float32),
            self._flat("scale", scale, torch.float32),
            self._flat("zero", zero, torch.float32),
        ]
        threads = _threads_for(batch * heads * queries * length * head_dim)
        partial = tensors[1].new_empty(threads, batch * heads, queries, head_dim)
        out = tensors[1].new_empty(batch, heads, queries, head_dim)
        status = self._values(
            *(t.data_ptr() for t in tensors),
            out.data_ptr(),
            batch * heads,
            length // group_size,
            group_size,
            head_dim,
            queries,
            nbits,
            partial.data_ptr(),
            threads,
        )
        if status:
            raise ValueError(f"the packed-attention kernel has no {nbits}-bit codes")
        return out

    def decode(
        self,
        query,
        sinks,
        packed,
        residual,
        scaling: float,
        packed_query=None,
        inv_freq=None,
        key_signs=None,
        value_signs=None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One unmasked step over sinks, packed tokens and residual, in one call: ``query`` ``[B, H, M, D]``
        grouped by key head, ``sinks``/``residual`` ``(keys, values)`` ``[B, H, N, D]`` in float32, ``packed``
        a :class:`~hf_kvcache.strategies.packed_store.PackedTokens` (grouped layout).

        How its space differs from the model's: ``packed_query``, the queries rotated like keys stored rotated
        after RoPE (``None``: ``query``); ``inv_freq`` ``[rotary_dim / 2]``, keys stored before RoPE (then
        ``key_signs``, see :func:`~hf_kvcache.strategies.rotation.hadamard_signs`, undoes their rotation);
        ``value_signs``, values stored rotated. Returns the output ``[B, H, M, D]`` and the weights
        ``[B, H, M, total]``, float32."""
        batch, heads, queries, head_dim = query.shape
        held = [sinks[0].shape[2], packed.length, residual[0].shape[2]]
        tensors = [self._flat("query", query, torch.float32)]
        tensors.append(
            tensors[0] if packed_query is None else self._flat("query", packed_query, torch.float32)
        )
        tensors += [self._flat("sinks", part) for part in sinks]
        tensors += [
            self._flat("codes", packed.key_codes),
            self._flat("scale", packed.group_scale, torch.float32),
            self._flat("zero", packed.group_zero, torch.float32),
            self._flat("codes", packed.value_codes),
            self._flat("scale", packed.value_scale, torch.float32),
            self._flat("zero", packed.value_zero, torch.float32),
        ]
        tensors += [self._flat("residual", part) for part in residual]
        space = [
            None if t is None else self._flat("space", t, torch.float32)
            for t in (inv_freq, key_signs, value_signs)
        ]
        threads, weights, out, partial = self._step_outputs(tensors[0], sum(held))
        pointers = [t.data_ptr() for t in tensors]
        status = self._decode(
            *pointers[:4],
            held[0],
            *pointers[4:10],
            held[1],
            *pointers[10:],
            held[2],
            weights.data_ptr(),
            out.data_ptr(),
            partial.data_ptr(),
            batch * heads,
            packed.group_size,
            head_dim,
            queries,
            packed.key_codec.nbits,
            packed.value_codec.nbits,
            scaling,
            *[None if t is None else t.data_ptr() for t in space[:1]],
            0 if inv_freq is None else space[0].numel(),
            packed.first_position,
            *[None if t is None else t.data_ptr() for t in space[1:]],
            head_dim & -head_dim,
            threads,
        )
        if status:
            raise ValueError(
                f"the fused decoding kernel has no {packed.key_codec.nbits}-bit keys or "
                f"{packed.value_codec.nbits}-bit values"
            )
        return out, weights

    def slots_decode(
        self, query, sinks, packed, stamps, residual, scaling: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One unmasked step over sinks, the slots of a scattered-layout
        :class:`~hf_kvcache.strategies.packed_store.PackedTokens` (keys and values of one width; a slot whose
        int32 ``stamps`` ``[B, H, P]`` entry is ``EMPTY_SLOT`` holds nothing) and residual, in one call.
        ``query`` ``[B, H, M, D]`` grouped by key head; ``sinks``/``residual`` ``(keys, values)`` in float32.
        Returns the output ``[B, H, M, D]`` and the weights ``[B, H, M, S + P + R]`` (slot order), float32."""
        batch, heads, queries, head_dim = query.shape
        held = [sinks[0].shape[2], stamps.shape[2], residual[0].shape[2]]
        group = self._flat("key groups", packed.key_group)
        tensors = [self._flat("query", query, torch.float32)]
        tensors += [self._flat("sinks", part) for part in sinks]
        tensors += [
            self._flat("codes", packed.key_codes),
            group,
            self._flat("scale", packed.group_scale, torch.float32),
            self._flat("zero", packed.group_zero, torch.float32),
            self._flat("codes", packed.value_codes),
            self._flat("scale", packed.value_scale, torch.float32),
            self._flat("zero", packed.value_zero, torch.float32),
            self._flat("stamps", stamps),
        ]
        tensors += [self._flat("residual", part) for part in residual]
        threads, weights, out, partial = self._step_outputs(tensors[0], sum(held))
        pointers = [t.data_ptr() for t in tensors]
        status = self._slots(
            *pointers[:3],
            held[0],
            *pointers[3:7],
            packed.group_scale.shape[2],
            *pointers[7:11],
            held[1],
            *pointers[11:],
            held[2],
            weights.data_ptr(),
            out.data_ptr(),
            partial.data_ptr(),
            batch * heads,
            packed.group_size,
            head_dim,
            queries,
            packed.key_codec.nbits,
            packed.value_codec.nbits,
            group.element_size(),
            scaling,
            threads,
        )
        if status:
            raise ValueError("the slot decoding kernel needs keys and values of one known width")
        return out, weights

    def dense_decode(self, query, keys, values, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
        """One unmasked step of ``query`` ``[B, H, M, D]`` (grouped by key head) over float32 ``keys`` and
        ``values`` ``[B, H, N, D]``, which may be the first ``N`` slots of contiguous ``[B, H, slots, D]``
        buffers (read in place). Returns the output ``[B, H, M, D]`` and the weights ``[B, H, M, N]``."""
        batch, heads, queries, head_dim = query.shape
        length = keys.shape[2]
        flat_query = self._flat("query", query, torch.float32)
        weights = flat_query.new_empty(batch, heads, queries, length)
        out = flat_query.new_zeros(batch, heads, queries, head_dim)
        self._dense(
            flat_query.data_ptr(),
            keys.data_ptr(),
            values.data_ptr(),
            keys.stride(1),
            length,
            weights.data_ptr(),
            out.data_ptr(),
            batch * heads,
            head_dim,
            queries,
            scaling,
            _threads_for(batch * heads * queries * length * head_dim),
        )
        return out, weights


def load_packed_kernels() -> PackedKernels:
    """Build (once per machine) and load the kernels; :class:`KernelUnavailable` says why not. A failure is
    remembered for the life of the process, so that a missing compiler costs one attempt, not one per step."""
    loaded = _load_once()
    if isinstance(loaded, KernelUnavailable):
        raise loaded
    return loaded


@functools.lru_cache(maxsize=1)
def _load_once() -> PackedKernels | KernelUnavailable:
    try:
        return PackedKernels(load_library())
    except KernelUnavailable as error:
        return error
