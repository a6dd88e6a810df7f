"""Asymmetric min-max quantization and bit packing for KV caches.

Codes of ``nbits`` in {2, 3, 4, 8} are packed along the last dimension into ``uint8``: four 2-bit codes or
two 4-bit codes per byte, eight 3-bit codes in three bytes, in the planar layout of :func:`pack_codes`. Two
codecs implement the same scheme and produce the same bytes: ``"torch"`` (pure PyTorch) and ``"quanto"``
(optimum-quanto's range optimizer and packing kernels; 2, 4 and 8 bits). Both unpack with
:func:`unpack_codes`.
"""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

import torch

from hf_kvcache.strategies.ranges import codes_in_range, min_max_range, mse_range

SUPPORTED_NBITS = (2, 3, 4, 8)
BACKENDS = ("torch", "quanto")
# Option ``scales``: scales and zero points in the model's dtype, or in float8_e5m2, whose normal range (6e-5
# to 57344) holds any model's; codes are computed from the rounded scale, so only the step moves (README).
SCALE_FORMATS = ("model", "float8")


def scale_dtype(scales: str, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype scales and zero points are stored in under the option ``scales``."""
    if scales not in SCALE_FORMATS:
        raise ValueError(f"scales must be one of {list(SCALE_FORMATS)}, got {scales!r}")
    return model_dtype if scales == "model" else torch.float8_e5m2


def check_width(name: str, nbits: int, backend: str, scales: str) -> None:
    """Codes of ``nbits`` (option ``name``) go with the ``backend`` and ``scales`` options."""
    if backend == "quanto" and nbits == 3:
        raise ValueError(
            f"{name}=3 is not supported with backend='quanto' (its kernels pack 2, 4 or 8 bits); "
            "use backend='torch'"
        )
    if scales == "float8" and nbits == 8:
        raise ValueError(
            f"{name}=8 with scales='float8': a float8 zero point is off by more than an 8-bit step; "
            "use scales='model'"
        )


def byte_view(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` itself, or its bytes (``uint8``) if it holds float8, which torch cannot scatter."""
    return tensor.view(torch.uint8) if tensor.is_floating_point() and tensor.element_size() == 1 else tensor


def codes_per_packing_unit(nbits: int) -> int:
    """The fewest codes that fill whole bytes: 4 for 2-bit, 8 (in three bytes) for 3-bit, 2, 1."""
    return 8 if nbits == 3 else 8 // nbits


def _pack_planar(codes: torch.Tensor, nbits: int) -> torch.Tensor:
    per_byte = 8 // nbits
    slots = codes.to(torch.uint8).unflatten(-1, (per_byte, -1))
    packed = slots[..., 0, :].clone()
    for slot in range(1, per_byte):
        packed |= slots[..., slot, :] << (slot * nbits)
    return packed


def pack_codes(codes: torch.Tensor, nbits: int) -> torch.Tensor:
    """Pack ``uint8`` codes ``[..., n]`` into ``[..., m]`` bytes, ``m = n * nbits // 8``.

    Planar layout: code ``i`` goes to byte ``i % m``, bits ``[(i // m) * nbits, (i // m + 1) * nbits)``. Each
    bit slot then holds a contiguous run of codes, so unpacking is one shift and mask per slot over whole
    rows (no interleaving), and the bytes are the same as optimum-quanto's ``pack_weights`` along that axis.

    3-bit codes are two planes, concatenated along the last dimension: their low two bits packed as 2-bit
    codes (``n / 4`` bytes), then their high bit packed eight to a byte (``n / 8`` bytes): 3 bytes per 8
    codes.
    """
    if nbits == 8:
        return codes.to(torch.uint8)
    unit = codes_per_packing_unit(nbits)
    if codes.shape[-1] % unit:
        raise ValueError(
            f"last dimension {codes.shape[-1]} is not a multiple of {unit} for {nbits}-bit packing"
        )
    if nbits == 3:
        codes = codes.to(torch.uint8)
        return torch.cat([_pack_planar(codes & 3, 2), _pack_planar(codes >> 2, 1)], dim=-1)
    return _pack_planar(codes, nbits)


def unpack_slots(packed: torch.Tensor, nbits: int) -> torch.Tensor:
    """Split each byte of ``packed`` ``[..., m]`` into bit slots: ``uint8`` codes ``[..., 8 // nbits, m]``
    (``nbits`` in 1, 2, 4, 8; 3-bit codes are two planes, see :func:`unpack_codes`).

    Slot ``s`` of the result holds bits ``[s * nbits, (s + 1) * nbits)`` of every byte, which for bytes from
    :func:`pack_codes` are codes ``s * m`` to ``(s + 1) * m - 1``: one shift and mask per slot over whole
    rows.
    """
    per_byte = 8 // nbits
    if nbits == 8:
        return packed.unsqueeze(-2)
    mask = 2**nbits - 1
    shifts = torch.arange(0, 8, nbits, device=packed.device).view(per_byte, 1)
    # Eight bytes per shift where the bytes form whole, aligned int64 words: a byte's slot never takes bits
    # from
    # its neighbours once masked per byte.
    aligned = packed.storage_offset() % 8 == 0 and all(stride % 8 == 0 for stride in packed.stride()[:-1])
    if packed.is_contiguous() and packed.shape[-1] % 8 == 0 and aligned:
        words = packed.view(torch.int64).unsqueeze(-2)
        word_mask = int.from_bytes(bytes([mask]) * 8, "little", signed=True)
        return ((words >> shifts) & word_mask).view(torch.uint8)
    return (packed.unsqueeze(-2) >> shifts.to(torch.uint8)) & mask


def unpack_codes(packed: torch.Tensor, nbits: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``[..., m]`` bytes to ``[..., m * 8 // nbits]`` codes."""
    if nbits == 3:
        low_bytes = packed.shape[-1] * 2 // 3
        low = unpack_slots(packed[..., :low_bytes], 2).flatten(-2)
        high = unpack_slots(packed[..., low_bytes:], 1).flatten(-2)
        return low | (high << 2)
    return unpack_slots(packed, nbits).flatten(-2)


def quantize_kivi(
    key_codec: TorchCodec,
    value_codec: TorchCodec,
    keys: torch.Tensor,
    values: torch.Tensor,
    group_size: int,
    scale_dtype: torch.dtype,
) -> tuple[torch.Tensor, ...]:
    """KIVI's scheme on whole groups of tokens, keys and values ``[B, H, n * G, D]``: keys per channel over
    each group of ``group_size`` consecutive tokens, values per token over each group of ``group_size``
    channels.

    Returns ``(key_codes, key_scale, key_zero, value_codes, value_scale, value_zero)``: uint8 codes
    ``[B, H, n * G, D]``, not yet packed; key scales and zero points ``[B, H, n, D]``; value scales and zero
    points ``[B, H, n * G, D / G]``, in ``scale_dtype``.
    """
    batch, heads, length, head_dim = keys.shape
    key_groups = keys.reshape(batch, heads, length // group_size, group_size, head_dim)  # [B, H, n, G, D]
    key_codes, key_scale, key_zero = key_codec.quantize(key_groups, dim=3, scale_dtype=scale_dtype)
    value_groups = values.reshape(
        batch, heads, length, head_dim // group_size, group_size
    )  # [B, H, T, D/G, G]
    value_codes, value_scale, value_zero = value_codec.quantize(value_groups, dim=4, scale_dtype=scale_dtype)
    shape = (batch, heads, length, head_dim)
    return (
        key_codes.reshape(shape),
        key_scale.squeeze(3),
        key_zero.squeeze(3),
        value_codes.reshape(shape),
        value_scale.squeeze(4),
        value_zero.squeeze(4),
    )


def pack_token_groups(codec: TorchCodec, codes: torch.Tensor, group_size: int) -> torch.Tensor:
    """Codes ``[B, H, T, D]`` or ``[B, H, n, G, D]`` of whole groups of ``group_size`` tokens to bytes ``[B,
    H, T * nbits / 8, D]``, packed along the tokens of each group in :func:`pack_codes`' layout."""
    batch, heads, head_dim = codes.shape[0], codes.shape[1], codes.shape[-1]
    groups = codes.reshape(batch, heads, -1, group_size, head_dim)  # [B, H, n, G, D]
    packed = codec.pack(groups.transpose(-1, -2)).transpose(-1, -2)  # [B, H, n, G * nbits / 8, D]
    return packed.reshape(batch, heads, -1, head_dim)


def unpack_token_groups(packed: torch.Tensor, nbits: int, group_size: int) -> torch.Tensor:
    """Inverse of :func:`pack_token_groups`: ``uint8`` codes ``[B, H, n, G, D]``."""
    batch, heads, rows, head_dim = packed.shape
    per_group = group_size * nbits // 8
    flat = packed.reshape(batch, heads, rows // per_group, per_group * head_dim)
    return unpack_codes(flat, nbits).view(batch, heads, -1, group_size, head_dim)


class TorchCodec:
    """Pure PyTorch quantization: min-max range (or ``clipping``'s, :mod:`.ranges`), round to nearest, shifts
    and masks for packing."""

    name = "torch"

    def __init__(self, nbits: int, clipping: str = "none"):
        self.nbits, self.clipping = nbits, clipping

    def value_range(self, x: torch.Tensor, dim: int, scale_dtype=torch.float32) -> tuple[torch.Tensor, ...]:
        return mse_range(x, dim, self.nbits, scale_dtype) if self.clipping == "mse" else min_max_range(x, dim)

    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        return pack_codes(codes, self.nbits)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        return unpack_codes(packed, self.nbits)

    def quantize(
        self, x: torch.Tensor, dim: int, scale_dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Quantize ``x`` with one scale and zero point per group reduced over ``dim``.

        Returns ``(codes, scale, zero)``: ``uint8`` codes shaped like ``x``, not yet packed (the caller picks
        the axis to pack along); ``scale`` and ``zero`` keep ``dim`` as size 1 and are stored in
        ``scale_dtype``. The codes are computed from the stored (rounded) scale and zero, so dequantization
        reproduces exactly what was rounded.
        """
        low, high = self.value_range(x, dim, scale_dtype)
        codes, scale, zero = codes_in_range(x.float(), low, high, 2**self.nbits - 1, scale_dtype)
        return codes.to(torch.uint8), scale, zero


class QuantoCodec(TorchCodec):
    """The same scheme computed with optimum-quanto: its ``MaxOptimizer`` ranges and bit-packing kernels."""

    name = "quanto"

    def __init__(self, nbits: int):
        super().__init__(nbits)
        if importlib.util.find_spec("optimum.quanto") is None:
            raise ModuleNotFoundError(
                "backend='quanto' needs optimum-quanto: pip install 'hf-kvcache[quanto]' "
                "(or use the default backend='torch')"
            )
        if nbits not in (2, 4, 8):
            raise ValueError(
                f"nbits={nbits} is not supported with backend='quanto' (2, 4, 8); use backend='torch'"
            )
        from optimum.quanto import MaxOptimizer, qint2, qint4, qint8

        wait_for_quanto_build()
        self._optimizer = MaxOptimizer()
        self._qtype = {2: qint2, 4: qint4, 8: qint8}[nbits]

    def value_range(self, x: torch.Tensor, dim: int, scale_dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
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


def wait_for_quanto_build(timeout_s: float | None = None) -> None:
    """Wait while another process compiles optimum-quanto's C++ extension, and refuse a stale build lock.

    The extension is compiled on first use under a lock file that a killed compile leaves behind; every later
    use would then wait on it forever. A lock older than ``timeout_s`` (default
    ``$HF_KVCACHE_QUANTO_LOCK_WAIT`` or 300 s) gets a ``RuntimeError`` that names the file to remove.
    """
    from optimum.quanto.library.extensions import get_extension, is_extension_available

    if not is_extension_available("quanto_cpp"):
        return
    lock = Path(get_extension("quanto_cpp").build_directory) / "lock"
    timeout_s = float(os.environ.get("HF_KVCACHE_QUANTO_LOCK_WAIT", 300)) if timeout_s is None else timeout_s
    while True:
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return
        if age >= timeout_s:
            raise RuntimeError(
                f"optimum-quanto's C++ extension has been locked for {age:.0f} s by {lock}: a compile that "
                "was killed leaves that file behind, and quanto would wait on it forever. If no other "
                f"process is compiling it, remove {lock} and run again (or use backend='torch')"
            )
        time.sleep(min(1.0, timeout_s - age))


def make_codec(nbits: int, backend: str, clipping: str = "none") -> TorchCodec:
    """The codec for ``backend`` in :data:`BACKENDS` (``clipping``: the torch codec's ranges)."""
    if backend == "torch":
        return TorchCodec(nbits, clipping)
    if backend == "quanto":
        return QuantoCodec(nbits)
    raise ValueError(f"unknown backend {backend!r}; allowed: {list(BACKENDS)}")


# The torch sums unpack codes into float32, 4 to 16 times their bytes: they unpack a bounded number of
# groups at a time, so that their transient memory is a fixed size, not a float32 copy of a layer's history.
UNPACKED_ELEMENTS = 1 << 24


def unpacked_group_slices(codes: torch.Tensor, group_size: int, nbits: int):
    """Yield ``(first, end, unpacked)``: the token groups ``[first, end)`` of packed ``codes`` ``[B, H, rows,
    D]`` and their codes as float32 ``[B, H, end - first, G, D]``, at most :data:`UNPACKED_ELEMENTS`
    elements (at least one group) at a time."""
    batch, heads, rows, head_dim = codes.shape
    per_group = group_size * nbits // 8
    step = max(1, UNPACKED_ELEMENTS // (batch * heads * group_size * head_dim))
    for first in range(0, rows // per_group, step):
        end = min(rows // per_group, first + step)
        part = codes[:, :, first * per_group : end * per_group]
        yield first, end, unpack_token_groups(part, nbits, group_size).float()


def torch_packed_scores(codes, query, scale, zero, group_size: int, nbits: int) -> torch.Tensor:
    """``q . k`` of queries ``[B, H, M, D]`` (float32) with grouped-layout key codes (scales and zeros
    ``[B, H, g, D]``, per channel and group of tokens): ``[B, H, M, n]``, the reference the native kernel
    matches."""
    batch, heads, queries, _ = query.shape
    parts = []
    for first, end, keys in unpacked_group_slices(codes, group_size, nbits):
        folded = query.unsqueeze(2) * scale[:, :, first:end].float().unsqueeze(3)  # [B, H, g, M, D]
        logits = folded @ keys.transpose(-1, -2)  # [B, H, g, M, G]
        logits += (query @ zero[:, :, first:end].float().transpose(-1, -2)).transpose(-1, -2).unsqueeze(-1)
        parts.append(logits.permute(0, 1, 3, 2, 4).reshape(batch, heads, queries, -1))
    return torch.cat(parts, dim=-1)


def torch_packed_values(codes, weights, scale, zero, group_size: int, nbits: int) -> torch.Tensor:
    """``weights @ V`` for weights ``[B, H, M, n]`` (float32) over grouped-layout value codes (scales and
    zeros ``[B, H, n, D / G]``, per token and group of channels): ``[B, H, M, D]``."""
    batch, heads, queries, _ = weights.shape
    channel_groups, out = codes.shape[-1] // group_size, None
    for first, end, values in unpacked_group_slices(codes, group_size, nbits):
        tokens = slice(first * group_size, end * group_size)
        values = values.view(batch, heads, -1, channel_groups, group_size)  # [B, H, n, D / G, G]
        part_weights = weights[..., tokens]
        folded = part_weights.unsqueeze(-1) * scale[:, :, tokens].float().unsqueeze(2)  # [B, H, M, n, D/G]
        part = torch.einsum("bhmnc,bhncj->bhmcj", folded, values)
        part += (part_weights @ zero[:, :, tokens].float()).unsqueeze(-1)
        out = part if out is None else out + part
    return out.reshape(batch, heads, queries, -1)
