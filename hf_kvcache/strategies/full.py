"""The uncompressed baseline: transformers' own ``DynamicCache``."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import DynamicCache, PreTrainedModel

from hf_kvcache.registry import register_strategy


@dataclass(frozen=True)
class FullCacheOptions:
    """The full cache has no options."""


def build_full_cache(model: PreTrainedModel, options: FullCacheOptions) -> DynamicCache:
    """A ``DynamicCache`` for ``model``; measure its bytes with :func:`hf_kvcache.cache_nbytes`."""
    return DynamicCache(config=model.config)


register_strategy("full", "transformers DynamicCache, nothing dropped", FullCacheOptions, build_full_cache)
