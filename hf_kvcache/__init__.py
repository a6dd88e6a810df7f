"""KV-cache compression strategies for Hugging Face ``transformers``.

Every cache is a ``transformers.Cache`` that you pass as ``model.generate(..., past_key_values=cache)``.
Build one by name with :func:`build_cache`, e.g. ``build_cache("quantized:nbits=2", model)``.

Tensor shape convention: keys and values are ``[B, H, S, D]`` (batch, KV heads, sequence, head dim).
"""

from hf_kvcache.ask import ask, register_pipeline
from hf_kvcache.attention import use_storage_attention
from hf_kvcache.base import KVCache, cache_nbytes
from hf_kvcache.prefill import prefill
from hf_kvcache.registry import build_cache, canonical_spec, list_strategies, parse_spec, register_strategy
from hf_kvcache.saving import load_cache, save_cache
from hf_kvcache.strategies import *  # noqa: F403  (registers the built-ins)
from hf_kvcache.strategies import __all__ as _strategy_exports

__version__ = "0.1.0"

__all__ = [
    "KVCache",
    "ask",
    "build_cache",
    "cache_nbytes",
    "canonical_spec",
    "list_strategies",
    "load_cache",
    "parse_spec",
    "prefill",
    "register_pipeline",
    "register_strategy",
    "save_cache",
    "use_storage_attention",
    *_strategy_exports,
]
