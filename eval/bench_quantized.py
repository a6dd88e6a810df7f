"""Quantized cache benchmark: ours (KIVI-style, packed) beside transformers' QuantizedCache(backend="quanto").

    python eval/bench_quantized.py [--max-tokens 2048] [--out eval/results/quantized.json]

Perplexity on the embedded model and corpus (streaming, chunk 16), cache bytes at 4096 tokens for a 16-bit
model (bf16 keys/values through each cache's layers), and decode tokens/s after a 1024-token prompt (median of
interleaved rounds).
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import DynamicCache, QuantizedCache

from hf_kvcache import QuantizedKVCache, cache_nbytes
from hf_kvcache.evaluation import load_corpus, load_model, perplexity
from hf_kvcache.evaluation.corpus import corpus_token_ids
from hf_kvcache.evaluation.speed import measure_speed_interleaved
from hf_kvcache.layout import attention_layout


def candidates(model):
    return {
        "full": lambda: DynamicCache(config=model.config),
        "ours 4-bit": lambda: QuantizedKVCache(model, nbits=4, group_size=32, residual_length=128),
        "ours 2-bit": lambda: QuantizedKVCache(model, nbits=2, group_size=32, residual_length=128),
        "transformers quanto 4-bit": lambda: QuantizedCache(
            "quanto", model.config, nbits=4, q_group_size=32, residual_length=128
        ),
        "transformers quanto 2-bit": lambda: QuantizedCache(
            "quanto", model.config, nbits=2, q_group_size=32, residual_length=128
        ),
    }


def bytes_at(model, make_cache, tokens: int, dtype=torch.bfloat16) -> int:
    """Feed ``tokens`` random bf16 keys/values through every layer of the cache and count what it holds."""
    layout = attention_layout(model)
    cache = make_cache()
    generator = torch.Generator().manual_seed(0)
    for layer in range(layout.num_layers):
        for begin in range(0, tokens, 512):
            shape = (1, layout.num_key_value_heads, min(512, tokens - begin), layout.head_dim)
            keys = torch.randn(shape, generator=generator).to(dtype)
            cache.update(keys, keys.clone(), layer)
    return cache_nbytes(cache)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-tokens", type=int, default=2048)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved decode timings per cache")
    parser.add_argument("--out", default="eval/results/quantized.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_model()
    ids = corpus_token_ids(tokenizer, load_corpus(), args.max_tokens)
    rows = {}
    full_ppl = full_bytes = None
    for name, make_cache in candidates(model).items():
        start = time.perf_counter()
        ppl = perplexity(model, ids, cache=make_cache(), chunk_size=16).perplexity
        elapsed = time.perf_counter() - start
        nbytes = bytes_at(model, make_cache, 4096)
        full_ppl = full_ppl or ppl
        full_bytes = full_bytes or nbytes
        rows[name] = {
            "perplexity": ppl,
            "ppl_ratio": ppl / full_ppl,
            "bytes_4096_bf16": nbytes,
            "bytes_ratio": nbytes / full_bytes,
            "stream_tokens_per_s": args.max_tokens / elapsed,
        }
        print(f"{name:28s} " + "  ".join(f"{k}={v:.4g}" for k, v in rows[name].items()), flush=True)
    runs = measure_speed_interleaved(
        model, ids[:, :1024], candidates(model), args.rounds, decode_tokens=args.decode_tokens
    )
    for name, results in runs.items():
        timings = [r.decode_tokens_per_s for r in results]
        rows[name]["decode_tokens_per_s"] = statistics.median(timings)
        rows[name]["decode_tokens_per_s_rounds"] = timings
        print(f"{name:28s} decode tok/s median {statistics.median(timings):.2f} of {timings}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps({"tokens": args.max_tokens, "chunk_size": 16, "rows": rows}, indent=2)
    )
    print("| cache | perplexity | × full | bytes @4096 (bf16) | × full | decode tok/s |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(
            f"| {name} | {r['perplexity']:.3f} | {r['ppl_ratio']:.4f} | {r['bytes_4096_bf16'] / 2**20:.2f} "
            f"MiB | {r['bytes_ratio']:.3f} | {r['decode_tokens_per_s']:.1f} |"
        )


if __name__ == "__main__":
    main()
