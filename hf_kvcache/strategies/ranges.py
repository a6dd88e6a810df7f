"""How a quantization group's range is chosen: its minimum and maximum, or the part of that range whose codes
lose the least (option ``clipping`` of ``quantized`` and of the compositions' packed storage).

A min-max range spends the levels on a group's extremes. Keys and values after a Hadamard rotation are close
to Gaussian, and 64 such entries span about ±2.4 standard deviations: at 2 bits the step is then about 1.6 σ,
where about 1.0 σ gives the least squared error, the few entries beyond the range clipping to the outer
levels (the analysis of ACIQ, https://arxiv.org/abs/1810.05723). ``clipping="mse"`` shrinks the min-max
range toward its center by each factor of :data:`SHRINK_FACTORS` and keeps, per group, the one whose codes
restore the group with the least squared error. Only the scale and zero point move: nothing more is stored,
and every reader (dequantization, the attention kernels) reads the codes as before.
"""

from __future__ import annotations

import torch

# "mse-values" clips the values alone: a key's outlying entries are what its query finds it by, and clipping
# them can cost attention more than the smaller squared error saves (README, ``eval/bench_clipping.py``).
# "calibrated" lets the model's calibration choose per layer (:mod:`hf_kvcache.calibration`), which then
# gives each layer one of the others.
CLIPPINGS = ("none", "mse", "mse-values", "mse-keys", "calibrated")
# 1.0 first: a group that no shrinking helps keeps its min-max range (ties keep the earlier factor).
SHRINK_FACTORS = tuple(round(1.0 - 0.05 * step, 2) for step in range(11))
# Up to this many float32 elements (x times the factors) the factors are tried at once.
BATCHED_ELEMENTS = 1 << 20


def check_clipping(clipping: str, backend: str) -> None:
    """``clipping`` is one of :data:`CLIPPINGS`, and clipping goes with the torch codec."""
    if clipping not in CLIPPINGS:
        raise ValueError(f"clipping must be one of {list(CLIPPINGS)}, got {clipping!r}")
    if clipping != "none" and backend != "torch":
        raise ValueError(
            f"clipping={clipping!r} with backend={backend!r}: the quanto codec chooses ranges with its own "
            "optimizer; use backend='torch' or clipping='none'"
        )


def clipping_of(clipping: str, part: str) -> str:
    """The clipping of ``part`` (``"keys"`` or ``"values"``) under the option: ``"mse"`` or ``"none"``."""
    if clipping == "calibrated":  # resolved per layer before any store is built
        raise ValueError("clipping='calibrated' is chosen per layer from a calibration; no store reads it")
    return "mse" if clipping in ("mse", f"mse-{part}") else "none"


def clipping_option(keys: str, values: str) -> str:
    """The option that clips keys and values as given (each ``"mse"`` or ``"none"``): the inverse of
    :func:`clipping_of`."""
    fixed = (option for option in CLIPPINGS if option != "calibrated")
    return next(
        option
        for option in fixed
        if (clipping_of(option, "keys"), clipping_of(option, "values")) == (keys, values)
    )


def min_max_range(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group ``(low, high)`` of ``x`` reduced over ``dim``, in float32, keeping the dimension."""
    x = x.float()
    return x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)


def mse_range(
    x: torch.Tensor, dim: int, nbits: int, scale_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group ``(low, high)`` of ``x`` reduced over ``dim`` (float32, keeping the dimension): the min-max
    range shrunk toward its center by the factor of :data:`SHRINK_FACTORS` under which ``nbits`` codes
    (round to nearest, clamped to the range) restore the group with the least squared error, with the scale
    and zero point rounded to ``scale_dtype`` as the codec stores them (float8 rounds a range by up to an
    eighth of it)."""
    x, dim = x.float(), dim % x.dim()
    low, high = min_max_range(x, dim)
    half, levels = (high - low) / 2, 2**nbits - 1
    # Each range is rounded as the codec will store it (factor 1.0: exactly min-max), so its error is the
    # codec's, and ties keep the wider range.
    if x.numel() * len(SHRINK_FACTORS) <= BATCHED_ELEMENTS:
        # Few entries (a decoding step's values): every factor at once, a few ops rather than many small ones.
        factors = torch.tensor(SHRINK_FACTORS, device=x.device).view(-1, *([1] * x.dim()))
        starts, ends = low + (1 - factors) * half, high - (1 - factors) * half
        best = restore_error(x, starts, ends, levels, scale_dtype, dim + 1).argmin(0, keepdim=True)
        return starts.gather(0, best).squeeze(0), ends.gather(0, best).squeeze(0)
    best = None
    # One factor at a time, so that the transient memory is one float32 copy of x, whatever the count.
    for factor in SHRINK_FACTORS:
        start, end = low + (1 - factor) * half, high - (1 - factor) * half
        error = restore_error(x, start, end, levels, scale_dtype, dim)
        if best is None:
            best = error, start, end
            continue
        better = error < best[0]
        best = tuple(
            torch.where(better, new, old) for new, old in zip((error, start, end), best, strict=True)
        )
    return best[1], best[2]


def codes_in_range(
    x: torch.Tensor, low: torch.Tensor, high: torch.Tensor, levels: int, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(codes, scale, zero)`` of float32 ``x`` over the range ``[low, high]`` (broadcast against ``x``): the
    scale and zero point in ``scale_dtype``, as stored, and the codes (float32, integers in ``[0, levels]``)
    computed from them rounded, so that ``codes * scale + zero`` reproduces exactly what was stored."""
    scale, zero = ((high - low) / levels).to(scale_dtype), low.to(scale_dtype)
    step = scale.float().clamp_min(torch.finfo(torch.float32).tiny)
    return torch.round((x - zero.float()) / step).clamp_(0, levels), scale, zero


def restore_error(x, start, end, levels: int, scale_dtype: torch.dtype, dim: int) -> torch.Tensor:
    """Squared error, summed over ``dim``, of ``x`` quantized over the range ``[start, end]`` as the codec
    stores it (:func:`codes_in_range`), and restored."""
    codes, scale, zero = codes_in_range(x, start, end, levels, scale_dtype)
    restored = codes.mul_(scale.float()).add_(zero.float())
    return restored.sub_(x).square_().sum(dim, keepdim=True)
