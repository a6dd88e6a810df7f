"""Shared base classes: byte accounting and the cache container that every strategy uses.

Tensor shape convention: see :mod:`hf_kvcache.layout` (``[B, H, S, D]``).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from transformers import Cache


def held_tensors(obj: object) -> Iterator[torch.Tensor]:
    """Yield every tensor an object holds in its attributes, also inside lists, tuples and dicts."""
    stack = list(vars(obj).values())
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            yield item
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())


def tensors_nbytes(tensors: Iterator[torch.Tensor]) -> int:
    """Bytes of the storages behind ``tensors``; a storage shared by several views counts once.

    Storages rather than views are counted because a slice keeps its whole parent buffer alive.
    """
    seen: dict[tuple[torch.device, int], int] = {}
    pending = list(tensors)
    while pending:
        tensor = pending.pop()
        if type(tensor) is not torch.Tensor and hasattr(tensor, "__tensor_flatten__"):
            # Wrapper subclasses (quanto's packed tensors) own no storage; their inner tensors do.
            names, _ = tensor.__tensor_flatten__()
            pending.extend(getattr(tensor, name) for name in names)
            continue
        storage = tensor.untyped_storage()
        seen[(tensor.device, storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


def cache_nbytes(cache: Cache) -> int:
    """Bytes held by any ``transformers`` cache: ours report ``nbytes``, others are walked layer by layer."""
    if isinstance(cache, KVCache):
        return cache.nbytes
    if not isinstance(cache, Cache):
        raise TypeError(f"cache_nbytes expects a transformers Cache, got {type(cache).__name__}")
    return tensors_nbytes(t for layer in cache.layers for t in held_tensors(layer))


class KVCache(Cache):
    """A ``transformers.Cache`` made of hf-kvcache layers, with its strategy ``config`` and honest ``nbytes``."""

    def __init__(self, layers: list, config: object):
        super().__init__(layers=layers)
        self.config = config

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors this cache holds right now (packed data, scales, full-precision parts)."""
        return tensors_nbytes(t for layer in self.layers for t in held_tensors(layer))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config}, layers={len(self.layers)}, nbytes={self.nbytes})"
