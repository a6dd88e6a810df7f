"""Triton kernels for a decoding step over packed codes on a GPU.

The same two sums as :func:`~hf_kvcache.strategies.packing.torch_packed_scores` and
:func:`~hf_kvcache.strategies.packing.torch_packed_values`, with the same arguments and results, but each
token group is unpacked and dequantized in registers and never written to memory: the torch sums launch
several kernels per bounded slice of groups and move a float32 copy of the codes through memory, which on
CUDA made a decoding step over packed codes slower than one over the full cache although it reads a fifth of
the bytes. A third, :func:`triton_rope_scores`, does the logits for keys stored before their rotary embedding
(``keys=pre_rope``), as the native kernel's ``rope_scores`` does on CPU.

Codes are ``[B, H, rows, D]`` ``uint8`` in :func:`~hf_kvcache.strategies.packing.pack_token_groups`' layout:
within each group of ``G`` tokens, token ``t`` of an ``nbits``-bit code (2, 4, 8) sits in row ``t % m`` at
bits ``(t // m) * nbits``, ``m = G * nbits / 8``; 3-bit codes are a 2-bit plane of ``G / 4`` rows and a 1-bit
plane of ``G / 8`` rows. The products run in IEEE float32 (no TF32), so they match the torch sums to float32
rounding.

Triton is imported when a kernel is first needed, not at import. ``TRITON_INTERPRET=1`` (set before that
first use) runs the kernels on CPU tensors in Triton's interpreter, which is how the tests check them without
a GPU.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

QUERY_BLOCK = 16  # tl.dot's smallest tile side
# Programs in flight per streaming multiprocessor that the value sum aims for when it splits the tokens.
PROGRAMS_PER_SM = 4


@functools.cache  # asked on every packed step under attention='auto'
def triton_available() -> bool:
    """Whether Triton can be imported here (it ships with torch's CUDA wheels)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether Triton's interpreter runs the kernels (``TRITON_INTERPRET=1``), which takes CPU tensors."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def unsupported_group_size(group_size: int) -> str | None:
    """Why the kernels cannot read groups of ``group_size`` tokens, or ``None``: a group is one tile side,
    so a power of two of at least 16."""
    if group_size < 16 or group_size & (group_size - 1):
        return f"group_size={group_size}: the Triton kernels take powers of two from 16"
    return None


def require_triton(device: torch.device, group_size: int) -> None:
    """For ``attention='triton'``: a clear error unless the kernels can run on ``device`` and read groups of
    ``group_size`` tokens."""
    if not triton_available():
        raise ValueError(
            "attention='triton' needs Triton, which is not installed (it comes with torch's CUDA wheels, or "
            "`pip install triton`). Use attention='auto' or 'torch'"
        )
    if device.type != "cuda" and not interpreting():
        raise ValueError(
            f"attention='triton' runs Triton kernels on a CUDA device; this layer is on {device}. Use "
            "attention='auto' or 'torch' there (or TRITON_INTERPRET=1 for Triton's interpreter on CPU)"
        )
    if unsupported_group_size(group_size):
        raise ValueError(f"attention='triton' cannot read this store: {unsupported_group_size(group_size)}")


def triton_sums(backend: str, group_size: int, device: torch.device):
    """The pair ``(scores, values)`` of Triton sums for a packed step, or ``None`` where they do not apply:
    ``attention='auto'`` takes them on CUDA when Triton is there; ``'triton'`` always (see
    :func:`require_triton`). Under ``torch.compile`` the torch sums are traced instead."""
    if backend not in ("auto", "triton") or torch.compiler.is_compiling():
        return None
    if backend == "auto" and (
        device.type != "cuda" or not triton_available() or unsupported_group_size(group_size)
    ):
        return None
    require_triton(device, group_size)
    return triton_packed_scores, triton_packed_values


@functools.cache
def _kernels():
    """Triton and the jitted kernels, imported at first use (so that ``TRITON_INTERPRET`` set by then is
    honoured)."""
    from hf_kvcache.kernels import triton_source

    return triton_source.triton, triton_source.scores_kernel, triton_source.values_kernel


def unsupported_rope(head_dim: int, inv_freq: torch.Tensor) -> str | None:
    """Why :func:`triton_rope_scores` cannot turn keys of ``head_dim`` channels by ``inv_freq``, or ``None``:
    it takes a rotary embedding over every channel of a head whose size is a power of two from 16 (a key
    tile is split in halves, and turned back from a Hadamard rotation, in registers)."""
    if head_dim < 16 or head_dim & (head_dim - 1):
        return f"head_dim={head_dim}: the Triton RoPE kernel takes powers of two from 16"
    if 2 * inv_freq.numel() != head_dim:
        return f"a rotary embedding over {2 * inv_freq.numel()} of {head_dim} channels (partial rotary)"
    return None


def triton_rope_scores(
    codes, query, scale, zero, group_size: int, nbits: int, inv_freq, first: int, signs=None
) -> torch.Tensor:
    """``q . k`` like :func:`triton_packed_scores`, for keys stored before their rotary embedding
    (``keys=pre_rope``): each program dequantizes one key group, undoes its Hadamard rotation (``signs``
    ``[D]``, see :func:`~hf_kvcache.strategies.rotation.hadamard_signs`; ``None``: not rotated), turns token
    ``t`` to position ``first + t`` by ``inv_freq`` ``[D / 2]`` and dots it with the queries. The same
    arguments and result as the native kernel's ``rope_scores``; see :func:`unsupported_rope` for what it
    takes."""
    from hf_kvcache.kernels import triton_source

    codes, query, scale, zero = _inner_contiguous(codes, query, scale, zero)
    batch, heads, queries, head_dim = query.shape
    if unsupported_rope(head_dim, inv_freq):
        raise ValueError(f"triton_rope_scores cannot read these keys: {unsupported_rope(head_dim, inv_freq)}")
    groups = codes.shape[2] // (group_size * nbits // 8)
    out = torch.empty(batch, heads, queries, groups * group_size, dtype=torch.float32, device=query.device)
    inv_freq = inv_freq.to(device=query.device, dtype=torch.float32).contiguous()
    # The kernel reads `signs` only when ROTATED; any float32 pointer stands in otherwise.
    signs_or_any = inv_freq if signs is None else signs.to(device=query.device, dtype=torch.float32)
    if groups:
        triton_source.rope_scores_kernel[(batch * heads, groups)](
            codes, query, scale, zero, out, inv_freq, signs_or_any, first, heads, queries,
            *codes.stride()[:3], *query.stride()[:3], *scale.stride()[:3], *zero.stride()[:3],
            *out.stride()[:3], G=group_size, NBITS=nbits, D=head_dim, LOG2_D=head_dim.bit_length() - 1,
            ROTATED=signs is not None, BLOCK_M=QUERY_BLOCK, num_warps=_warps(group_size * head_dim),
        )  # fmt: skip
    return out


def _inner_contiguous(*tensors: torch.Tensor) -> list[torch.Tensor]:
    # The kernels step the last dimension by one element, and read float8 scales (``scales=float8``) in
    # float32: a copy of 1 / group_size of the codes' elements.
    tensors = [t.float() if t.is_floating_point() and t.element_size() == 1 else t for t in tensors]
    return [t if t.stride(-1) == 1 else t.contiguous() for t in tensors]


def _tile(triton, head_dim: int, group_size: int) -> dict:
    block_d = triton.next_power_of_2(head_dim)
    return {"BLOCK_M": QUERY_BLOCK, "BLOCK_D": block_d, "num_warps": _warps(group_size * block_d)}


def _warps(tile: int) -> int:
    """Warps per program for a ``[G, D]`` key or value tile of ``tile`` elements."""
    return 8 if tile > 4096 else 4


def triton_packed_scores(codes, query, scale, zero, group_size: int, nbits: int) -> torch.Tensor:
    """``q . k`` of float32 queries ``[B, H, M, D]`` with grouped-layout key codes (scales and zeros ``[B, H,
    g, D]``): float32 ``[B, H, M, g * group_size]``, as :func:`torch_packed_scores` returns."""
    triton, scores_kernel, _ = _kernels()
    codes, query, scale, zero = _inner_contiguous(codes, query, scale, zero)
    batch, heads, queries, head_dim = query.shape
    groups = codes.shape[2] // (group_size * nbits // 8)
    out = torch.empty(batch, heads, queries, groups * group_size, dtype=torch.float32, device=query.device)
    if groups:
        scores_kernel[(batch * heads, groups)](
            codes, query, scale, zero, out, heads, queries, head_dim,
            *codes.stride()[:3], *query.stride()[:3], *scale.stride()[:3], *zero.stride()[:3],
            *out.stride()[:3], G=group_size, NBITS=nbits, **_tile(triton, head_dim, group_size),
        )  # fmt: skip
    return out


def _splits(device: torch.device, rows: int, groups: int) -> int:
    """How many programs share one row's tokens in the value sum: enough to keep the GPU busy."""
    if device.type == "cuda":
        processors = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        processors = 1
    return max(1, min(groups, -(-PROGRAMS_PER_SM * processors // rows)))


def triton_packed_values(codes, weights, scale, zero, group_size: int, nbits: int) -> torch.Tensor:
    """``weights @ V`` for float32 weights ``[B, H, M, n]`` over grouped-layout value codes (scales and zeros
    ``[B, H, n, D / G]``): float32 ``[B, H, M, D]``, as :func:`torch_packed_values` returns. The tokens are
    split across programs whose partial sums are added at the end."""
    triton, _, values_kernel = _kernels()
    codes, weights, scale, zero = _inner_contiguous(codes, weights, scale, zero)
    batch, heads, queries, _ = weights.shape
    head_dim = codes.shape[-1]
    groups = codes.shape[2] // (group_size * nbits // 8)
    splits = _splits(weights.device, batch * heads, groups) if groups else 1
    per_split = -(-groups // splits) if groups else 0
    splits = -(-groups // per_split) if groups else 1
    out = torch.zeros(splits, batch, heads, queries, head_dim, dtype=torch.float32, device=weights.device)
    if groups:
        values_kernel[(batch * heads, splits)](
            codes, weights, scale, zero, out, heads, queries, head_dim, groups, per_split,
            *codes.stride()[:3], *weights.stride()[:3], *scale.stride()[:3], *zero.stride()[:3],
            *out.stride()[:4], G=group_size, NBITS=nbits, **_tile(triton, head_dim, group_size),
        )  # fmt: skip
    return out.sum(0)
