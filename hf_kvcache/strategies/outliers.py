"""Dense-and-sparse quantization: each token's outlying entries kept exact beside the packed codes.

Paper: KVQuant, "Towards 10 Million Context Length LLM Inference with KV Cache Quantization",
https://arxiv.org/abs/2401.18079 (section 3.4, dense-and-sparse quantization).

A min-max quantizer spends its levels on the range of a group; one entry far from the rest stretches the range
and coarsens every other entry of the group. ``quantized:outliers=F`` takes the ``ceil(F * D)`` entries of
each token (per KV head) that lie farthest from the center of the quantization group they belong to (keys:
the channel's mean over the key group's tokens; values: the mean of the token's channel group), keeps them
exact in a sparse store (their channel index, uint8 or int16, and their value in the model's dtype), and
quantizes the rest with each outlier replaced by the mean of the other members of its group, which moves no
range. Dequantizing writes the exact entries back over their codes.

The sparse store has a fixed number of entries per token, so it is two ``[B, H, n, k]`` tensors that follow
the tokens like the codes do (appended, sliced, evicted), and ``nbytes`` counts them: ``k * (1 + 2) * 8 / D``
bits per entry for a bf16 model with ``D <= 256``.
"""

from __future__ import annotations

import math

import torch


def outlier_count(fraction: float, head_dim: int) -> int:
    """Entries kept exact per token and head for ``outliers=fraction``: ``ceil(fraction * head_dim)``."""
    return math.ceil(fraction * head_dim) if fraction else 0


def check_outlier_fraction(name: str, value: object, optional: bool) -> None:
    """For :class:`~.quantized.QuantizedOptions`: ``ValueError`` naming ``name`` unless ``value`` is a number
    in ``[0, 1)`` (or ``None`` where ``optional``)."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(
            f"{name} must be a fraction in [0, 1) of each token's entries to keep exact, got {value!r}"
        )


def index_dtype(head_dim: int) -> torch.dtype:
    """The smallest integer type that indexes ``head_dim`` channels."""
    return torch.uint8 if head_dim <= 256 else torch.int16


def split_outliers(
    x: torch.Tensor, count: int, group_size: int, per_channel: bool, exact_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split ``x`` ``[B, H, T, D]`` into what is quantized and what is kept exact.

    ``per_channel``: ``x`` is quantized per channel over groups of ``group_size`` consecutive tokens (keys);
    otherwise per token over groups of ``group_size`` channels (values). Returns ``(dense, index, exact)``:
    ``dense`` is ``x`` with the ``count`` outliers of each token replaced by the mean of the rest of their
    group; ``index`` ``[B, H, T, count]`` their channels (ascending), ``exact`` their values in
    ``exact_dtype``.
    """
    batch, heads, length, head_dim = x.shape
    if count == 0:
        nothing = x.new_empty(batch, heads, length, 0)
        return x, nothing.to(index_dtype(head_dim)), nothing.to(exact_dtype)
    shape = (
        (batch, heads, length // group_size, group_size, head_dim)
        if per_channel
        else (batch, heads, length, head_dim // group_size, group_size)
    )
    reduce = 3 if per_channel else 4
    work = x.float().reshape(shape)
    center = work.mean(reduce, keepdim=True).expand(shape).reshape(x.shape)
    index = (x.float() - center).abs().topk(count, dim=-1, sorted=False).indices.sort(dim=-1).values
    is_outlier = torch.zeros(x.shape, dtype=torch.bool, device=x.device).scatter_(-1, index, True)
    others = (~is_outlier).reshape(shape).float()
    # A group whose every member is an outlier has nothing left to quantize: its mean of nothing is 0.
    rest_mean = (work * others).sum(reduce, keepdim=True) / others.sum(reduce, keepdim=True).clamp(min=1)
    dense = torch.where(is_outlier, rest_mean.expand(shape).reshape(x.shape).to(x.dtype), x)
    exact = x.gather(-1, index).to(exact_dtype)
    return dense, index.to(index_dtype(head_dim)), exact


def restore_outliers(out: torch.Tensor, index: torch.Tensor, exact: torch.Tensor) -> None:
    """Write the exact entries back into dequantized ``out`` ``[B, H, n, D]`` (a view), in place."""
    out.scatter_(-1, index.long(), exact.to(out.dtype))
