"""The built-in strategies, one module each; importing this package registers them.

Shared machinery lives beside them: :mod:`.eviction` (the eviction contract and the layer that applies it),
:mod:`.slots` (per-slot bookkeeping of eviction layers), :mod:`.scoring` (attention-score strategies on top of
the contract), :mod:`.packed_store` (the one store of quantized tokens), :mod:`.quantized_storage` (that store
under an eviction strategy), :mod:`.packing` (quantization codecs) and :mod:`.rotation` (what the store
turns before quantizing).
"""

from hf_kvcache.strategies.duo import DuoKVCache
from hf_kvcache.strategies.expected_attention import ExpectedAttentionKVCache
from hf_kvcache.strategies.full import build_full_cache
from hf_kvcache.strategies.heavy_hitter import HeavyHitterKVCache
from hf_kvcache.strategies.knorm import KeyNormKVCache
from hf_kvcache.strategies.kvzip import KVzipCache
from hf_kvcache.strategies.quantized import QuantizedKVCache
from hf_kvcache.strategies.sliding_window import SlidingWindowKVCache
from hf_kvcache.strategies.snapkv import SnapKVCache
from hf_kvcache.strategies.tova import TOVAKVCache

__all__ = [
    "DuoKVCache",
    "ExpectedAttentionKVCache",
    "HeavyHitterKVCache",
    "KeyNormKVCache",
    "KVzipCache",
    "QuantizedKVCache",
    "SlidingWindowKVCache",
    "SnapKVCache",
    "TOVAKVCache",
    "build_full_cache",
]
