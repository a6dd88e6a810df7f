"""Moving cached keys along the RoPE position axis, from the model's own rotary parameters.

RoPE rotates each pair of channels by ``position * inv_freq``; rotating a key already at position ``p`` by
``delta * inv_freq`` puts it at ``p + delta``. ``inv_freq`` is read from the model's rotary module, so default,
linear and llama3 scaling are covered, and partial rotary (Phi3) rotates only the first ``2 * len(inv_freq)``
channels. Keys use the rotate-half layout of Llama-family models.
"""

from __future__ import annotations

import torch
from torch import nn


def find_rotary_module(model: nn.Module) -> nn.Module | None:
    """The model's rotary-embedding module (the one holding ``inv_freq``), or ``None`` without RoPE."""
    found = [m for m in model.modules() if isinstance(getattr(m, "inv_freq", None), torch.Tensor)]
    if len({id(m) for m in found}) > 1:
        raise ValueError(
            f"model has {len(found)} rotary embeddings ({[type(m).__name__ for m in found]}); re-rotating keys "
            "supports models with a single RoPE. Use positions='original'."
        )
    return found[0] if found else None


class KeyRotator:
    """Rotates keys ``[B, H, S, D]`` by a per-row position offset ``[B]``."""

    def __init__(self, rotary_module: nn.Module):
        self.rotary_module = rotary_module

    def shift(self, keys: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        inv_freq = self.rotary_module.inv_freq.to(device=keys.device, dtype=torch.float32)
        rotary_dim = 2 * inv_freq.shape[0]
        angles = offsets.to(torch.float32)[:, None] * inv_freq[None, :]  # [B, rotary_dim / 2]
        angles = torch.cat([angles, angles], dim=-1)[:, None, None, :]  # [B, 1, 1, rotary_dim]
        rotated, passed = keys[..., :rotary_dim].float(), keys[..., rotary_dim:]
        first, second = rotated.chunk(2, dim=-1)
        rotated = rotated * angles.cos() + torch.cat([-second, first], dim=-1) * angles.sin()
        return torch.cat([rotated.to(keys.dtype), passed], dim=-1)
