"""Asymmetric min-max quantization and bit packing for KV caches.

Codes of ``nbits`` in {2, 4, 8} are packed along the last dimension into ``uint8``: four 2-bit codes or two
4-bit codes per byte, in the planar layout of :func:`pack_codes`. Two codecs implement the same scheme and
produce the same bytes: ``"torch"`` (pure PyTorch) and ``"quanto"`` (optimum-quanto's range optimizer and
packing kernels). Both unpack with :func:`unpack_into`.
"""

from __future__ import annotations

import importlib.util

import torch

SUPPORTED_NBITS = (2, 4, 8)
BACKENDS = ("torch", "quanto")


def pack_codes(codes: torch.Tensor, nbits: int) -> torch.Tensor:
    """Pack ``uint8`` codes ``[..., n]`` into ``[..., m]`` bytes, ``m = n * nbits // 8``.

    Planar layout: code ``i`` goes to byte ``i % m``, bits ``[(i // m) * nbits, (i // m + 1) * nbits)``. Each
    bit slot then holds a contiguous run of codes, so unpacking is one shift and mask per slot over whole
    rows (no interleaving), and the bytes are the same as optimum-quanto's ``pack_weights`` along that axis.
    """
    if nbits == 8:
        return codes.to(torch.uint8)
    per_byte = 8 // nbits
    if codes.shape[-1] % per_byte:
        raise ValueError(
            f"last dimension {codes.shape[-1]} is not a multiple of {per_byte} for {nbits}-bit packing"
        )
    slots = codes.to(torch.uint8).unflatten(-1, (per_byte, -1))
    packed = slots[..., 0, :].clone()
    for slot in range(1, per_byte):
        packed |= slots[..., slot, :] << (slot * nbits)
    return packed


def _slot_codes(packed: torch.Tensor, slot: int, nbits: int) -> torch.Tensor:
    """The codes in bit slot ``slot`` of every byte, as ``uint8``."""
    mask = 2**nbits - 1
    # Viewing bytes as int64 needs whole, 8-byte-aligned words; any other slice takes the per-byte path.
    if packed.is_contiguous() and packed.shape[-1] % 8 == 0 and packed.storage_offset() % 8 == 0:
        # Eight bytes per shift: a byte's slot never takes bits from its neighbours once masked per byte.
        words = packed.view(torch.int64)
        return ((words >> (slot * nbits)) & int.from_bytes(bytes([mask]) * 8, "little", signed=True)).view(
            torch.uint8
        )
    shifted = packed >> (slot * nbits) if slot else packed
    return shifted if (slot + 1) * nbits == 8 else shifted & mask


def unpack_codes(packed: torch.Tensor, nbits: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``[..., m]`` bytes to ``[..., m * 8 // nbits]`` codes."""
    if nbits == 8:
        return packed
    return torch.cat([_slot_codes(packed, slot, nbits) for slot in range(8 // nbits)], dim=-1)


def unpack_into(packed: torch.Tensor, nbits: int, out: torch.Tensor) -> torch.Tensor:
    """Write the codes of ``packed`` ``[..., n * nbits // 8]`` into ``out`` ``[..., n]``, converting to its dtype.

    ``out`` may be a strided view, e.g. a slice of a larger keys tensor: dequantizing in place there saves a
    temporary and a copy per decode step.
    """
    if nbits == 8:
        return out.copy_(packed)
    out_slots = out.unflatten(-1, (8 // nbits, -1))
    for slot in range(8 // nbits):
        out_slots[..., slot, :].copy_(_slot_codes(packed, slot, nbits))
    return out


def min_max_range(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group ``(low, high)`` of ``x`` reduced over ``dim``, in float32, keeping the dimension."""
    x = x.float()
    return x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)


class TorchCodec:
    """Pure PyTorch quantization: min-max range, round to nearest, shifts and masks for packing."""

    name = "torch"

    def __init__(self, nbits: int):
        self.nbits = nbits

    def value_range(self, x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        return min_max_range(x, dim)

    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        return pack_codes(codes, self.nbits)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        return unpack_codes(packed, self.nbits)

    def unpack_into(self, packed: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return unpack_into(packed, self.nbits, out)

    def quantize(
        self, x: torch.Tensor, dim: int, scale_dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Quantize ``x`` with one scale and zero point per group reduced over ``dim``.

        Returns ``(codes, scale, zero)``: ``uint8`` codes shaped like ``x``, not yet packed (the caller picks
        the axis to pack along); ``scale`` and ``zero`` keep ``dim`` as size 1 and are stored in
        ``scale_dtype``. The codes are computed from the stored (rounded) scale and zero, so dequantization
        reproduces exactly what was rounded.
        """
        low, high = self.value_range(x, dim)
        levels = 2**self.nbits - 1
        scale = ((high - low) / levels).to(scale_dtype)
        zero = low.to(scale_dtype)
        step = scale.float().clamp_min(torch.finfo(torch.float32).tiny)
        codes = torch.round((x.float() - zero.float()) / step).clamp_(0, levels).to(torch.uint8)
        return codes, scale, zero


class QuantoCodec(TorchCodec):
    """The same scheme computed with optimum-quanto: its ``MaxOptimizer`` ranges and its bit-packing kernels."""

    name = "quanto"

    def __init__(self, nbits: int):
        super().__init__(nbits)
        if importlib.util.find_spec("optimum.quanto") is None:
            raise ModuleNotFoundError(
                "backend='quanto' needs optimum-quanto: pip install 'hf-kvcache[quanto]' "
                "(or use the default backend='torch')"
            )
        from optimum.quanto import MaxOptimizer, qint2, qint4, qint8

        self._optimizer = MaxOptimizer()
        self._qtype = {2: qint2, 4: qint4, 8: qint8}[nbits]

    def value_range(self, x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        moved = x.float().movedim(dim, -1)
        rows = moved.reshape(-1, moved.shape[-1])
        scale, shift = self._optimizer.optimize(rows, self._qtype, axis=0)
        levels = 2**self.nbits - 1
        low = -shift
        high = low + scale * levels
        shape = (*moved.shape[:-1], 1)
        return low.reshape(shape).movedim(-1, dim), high.reshape(shape).movedim(-1, dim)

    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        if self.nbits == 8:
            return codes
        from optimum.quanto.tensor.packed import pack_weights

        # quanto packs along its first dimension; put the channel dimension there and bring it back.
        rows = codes.reshape(-1, codes.shape[-1]).t()
        packed = pack_weights(rows.contiguous(), self.nbits)
        return packed.t().reshape(*codes.shape[:-1], -1).contiguous()

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        if self.nbits == 8:
            return packed
        rows = packed.reshape(-1, packed.shape[-1]).t().contiguous()
        codes = torch.ops.quanto.unpack(rows, self.nbits)
        return codes.t().reshape(*packed.shape[:-1], -1)


def make_codec(nbits: int, backend: str) -> TorchCodec:
    """The codec for ``backend`` in :data:`BACKENDS`."""
    if backend == "torch":
        return TorchCodec(nbits)
    if backend == "quanto":
        return QuantoCodec(nbits)
    raise ValueError(f"unknown backend {backend!r}; allowed: {list(BACKENDS)}")
