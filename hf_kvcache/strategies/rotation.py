"""Fixed orthogonal rotations of each head's channels, applied before quantization and inverted after.

A few channels of keys and values carry most of their magnitude; a min-max quantizer over a group that holds
one of them spends its levels on that outlier. Rotating every head vector by one fixed orthogonal matrix
spreads the outliers over all channels while keeping inner products (``q . k`` and the attention output) the
same, as in QuaRot (https://arxiv.org/abs/2404.00456) and TurboQuant (https://arxiv.org/abs/2504.19874).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from hf_kvcache.layout import AttentionLayout
from hf_kvcache.model_hooks import KeyRotator, applies_rope, attention_modules, find_rotary_module

ROTATIONS = ("none", "hadamard", "hadamard-values")
KEY_MODES = ("post_rope", "pre_rope")


def rotated_tensors(kind: str) -> tuple[bool, bool]:
    """Whether rotation ``kind`` rotates ``(keys, values)``: ``hadamard`` both, ``hadamard-values`` only the
    values (keys are quantized per channel, which already gives an outlier channel its own range)."""
    if kind not in ROTATIONS:
        raise ValueError(f"rotation must be one of {list(ROTATIONS)}, got {kind!r}")
    return kind == "hadamard", kind != "none"


def _signs(head_dim: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, (head_dim,), generator=generator) * 2 - 1).to(torch.float64)


@functools.lru_cache(maxsize=32)
def _hadamard_float64(head_dim: int, seed: int) -> torch.Tensor:
    block = head_dim & -head_dim  # the largest power of two that divides head_dim
    sylvester = torch.ones(1, 1, dtype=torch.float64)
    while sylvester.shape[0] < block:
        sylvester = torch.cat(
            [torch.cat([sylvester, sylvester], 1), torch.cat([sylvester, -sylvester], 1)], 0
        )
    # Block-diagonal for head sizes that are not a power of two (80, 96, ...): still orthogonal.
    blocks = torch.block_diag(*[sylvester / block**0.5] * (head_dim // block))
    return _signs(head_dim, seed).unsqueeze(1) * blocks


@functools.lru_cache(maxsize=64)
def hadamard_signs(head_dim: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """The factors ``s / sqrt(block)`` ``[D]`` (float32) of the ``"hadamard"`` rotation ``R = diag(s) @ H``:
    ``x @ R.T`` is the unnormalized fast Walsh-Hadamard transform of each block of ``x``, times them, which is
    how the native kernel undoes the rotation without a ``D x D`` product. Shared and read-only, like
    :func:`rotation_matrix`: decoding asks for it at every step of every layer."""
    block = head_dim & -head_dim
    return (_signs(head_dim, seed) / block**0.5).to(dtype=torch.float32, device=device)


@functools.lru_cache(maxsize=64)
def rotation_matrix(
    kind: str, head_dim: int, dtype: torch.dtype, device: torch.device, seed: int = 0
) -> torch.Tensor | None:
    """The ``[D, D]`` orthogonal matrix ``R`` of rotation ``kind`` (rows rotate: ``x @ R``, undone by
    ``y @ R.T``), or ``None`` for ``"none"``.

    ``"hadamard"``: ``diag(s) @ H`` with random signs ``s`` drawn from ``seed`` and ``H`` the normalized
    Sylvester Hadamard matrix, block-diagonal in blocks of the largest power of two dividing ``D``. The
    same ``seed`` always gives the same matrix, so a saved cache is read back with the rotation it was
    written with. One shared, read-only matrix per (kind, size, dtype, device), like a model's rotary
    tables: no cache holds a copy.
    """
    if kind == "none":
        return None
    if not kind.startswith("hadamard"):
        raise ValueError(f"rotation must be one of {list(ROTATIONS)}, got {kind!r}")
    return _hadamard_float64(head_dim, seed).to(dtype=dtype, device=device)


def key_ropes(model: nn.Module, layout: AttentionLayout) -> list[KeyRotator | None]:
    """Each layer's rotary embedding for ``keys=pre_rope``; ``None`` for layers that apply none."""
    try:
        rotary = find_rotary_module(model)
    except ValueError:
        raise ValueError(
            f"keys='pre_rope' needs a model with one rotary embedding; {type(model).__name__} has several; "
            "use keys='post_rope'"
        ) from None
    modules = attention_modules(model)
    if rotary is None or len(modules) != layout.num_layers:
        raise ValueError(
            "keys='pre_rope' needs a model whose attention layers apply a rotary embedding; "
            f"{type(model).__name__} has {'none' if rotary is None else 'attention modules we cannot find'}; "
            "use keys='post_rope'"
        )
    return layer_rotators(rotary, modules, layout.layer_types)


def layer_rotators(
    rotary_module: nn.Module, modules: list[nn.Module], layer_types: tuple[str, ...]
) -> list[KeyRotator | None]:
    """Each attention module's RoPE (the table of its kind of layer), ``None`` for modules that apply none."""
    return [
        KeyRotator(rotary_module, kind) if applies_rope(module) else None
        for kind, module in zip(layer_types, modules, strict=True)
    ]


class StoredSpace:
    """Mixin for the packed store (:class:`~.packed_store.PackedTokens`): the space its tokens are quantized
    in. The host sets ``rotation_kind``, ``key_rope`` (a :class:`~hf_kvcache.model_hooks.KeyRotator` for
    ``keys=pre_rope``, else ``None``), ``first_position`` (the cache position of its first token),
    ``entry_dtype`` (the tokens' dtype, which the rotation takes) and ``group_scale`` (whose device it
    takes)."""

    @property
    def rotation(self) -> torch.Tensor | None:
        """The shared rotation matrix ``[D, D]`` (:mod:`.rotation`), or ``None``; in float32 at least, since a
        bf16 product would add its own rounding to the codes'."""
        like = self.group_scale
        dtype = torch.promote_types(self.entry_dtype, torch.float32)
        return rotation_matrix(self.rotation_kind, like.shape[-1], dtype, like.device)

    def _positions(self, start: int, count: int, device: torch.device) -> torch.Tensor:
        return torch.arange(start, start + count, device=device)

    def _to_stored(self, keys: torch.Tensor, values: torch.Tensor, position: int):
        """Keys and values as they are quantized: rotary embedding undone (``pre_rope``), then rotated."""
        if self.key_rope is not None:
            keys = self.key_rope.at_positions(
                keys, self._positions(position, keys.shape[2], keys.device), True
            )
        rotation = self.rotation
        rotate_keys, rotate_values = rotated_tensors(self.rotation_kind)
        if rotate_keys:
            keys = keys.to(rotation.dtype) @ rotation
        if rotate_values:
            values = values.to(rotation.dtype) @ rotation
        return keys, values

    def _from_stored(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Inverse of :meth:`_to_stored`, in place on dequantized ``keys``/``values`` (output views)."""
        # The output views cannot be matmul's `out`; keys stored as the model made them stay where they are.
        restored = self.keys_from_stored(keys)
        if restored is not keys:
            keys.copy_(restored)
        if rotated_tensors(self.rotation_kind)[1]:
            values.copy_(values.to(self.rotation.dtype) @ self.rotation.T)

    def keys_from_stored(self, keys: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Dequantized keys ``[B, H, n, D]`` of the store from its token ``start`` (default 0) as the model
        made them: rotation undone (an orthogonal matrix's inverse is its transpose), then the rotary
        embedding of their positions applied (``pre_rope``)."""
        if rotated_tensors(self.rotation_kind)[0]:
            keys = keys.to(self.rotation.dtype) @ self.rotation.T
        if self.key_rope is not None:
            positions = self._positions(self.first_position + start, keys.shape[2], keys.device)
            keys = self.key_rope.at_positions(keys, positions)
        return keys
