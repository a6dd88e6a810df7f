"""Compositions eviction+quantized: bytes held at 8k tokens in bfloat16, perplexity, decode time at 8k.

    python eval/bench_composition.py [--out eval/results/composition.json]   # about 25 minutes on 2 CPU cores

1. Bytes. The embedded model in bfloat16 reads 8192 corpus tokens through each composition with
   ``prefill(chunk_size=512)``; the bytes it holds then are compared with what ``DynamicCache`` holds for 8192
   tokens. For heavy-hitter+quantized the key-group table is reported too: how many packed tokens share a
   group's per-channel scale, since a heavy hitter that outlives its group-mates pays for that row alone.
2. Perplexity. Held-out text, 2048 tokens, chunks of 16, float32: each composition against the same eviction
   strategy unquantized.
3. Decode. After an 8192-token prompt (float32, chunked prefill): ms per token of each composition and of its
   two halves alone, medians and min-max of interleaved rounds.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_long_context import child_decode  # noqa: E402

PAIRS = [
    ("sliding-window:window_length=512", "sliding-window:window_length=512+quantized:nbits=4"),
    (
        "heavy-hitter:heavy_budget=256,recent_budget=256",
        "heavy-hitter:heavy_budget=256,recent_budget=256+quantized:nbits=4",
    ),
]
QUANTIZED_ALONE = "quantized:nbits=4"


@torch.no_grad()
def held_bytes_at(length: int) -> dict:
    from hf_kvcache import build_cache, cache_nbytes, prefill
    from hf_kvcache.evaluation import load_corpus, load_model
    from hf_kvcache.evaluation.corpus import corpus_token_ids
    from hf_kvcache.evaluation.harness import full_cache_bytes

    model, tokenizer = load_model(dtype="bfloat16")
    ids = corpus_token_ids(tokenizer, load_corpus(), length)
    full = full_cache_bytes(model, length)
    rows = {"full": {"held_bytes": full}}
    for _, spec in PAIRS:
        cache = prefill(model, ids, build_cache(spec, model), chunk_size=512)
        row = {"held_bytes": cache_nbytes(cache), "fraction_of_full": cache_nbytes(cache) / full}
        layers = [layer for layer in cache.layers if hasattr(layer, "group_members")]
        live = sum(int((layer.group_members > 0).sum()) for layer in layers)
        packed = sum(layer.key_group.numel() for layer in layers)
        row["packed_tokens_per_live_key_group"] = packed / max(live, 1)
        rows[spec] = row
        print(
            f"{spec}: {row['held_bytes'] / 2**20:.2f} MiB = 1/{1 / row['fraction_of_full']:.1f} of "
            f"DynamicCache; {row['packed_tokens_per_live_key_group']:.1f} packed tokens per key group",
            flush=True,
        )
    return rows


def perplexities(tokens: int) -> dict:
    from hf_kvcache import build_cache
    from hf_kvcache.evaluation import load_corpus, load_model, perplexity
    from hf_kvcache.evaluation.corpus import corpus_token_ids

    model, tokenizer = load_model()
    ids = corpus_token_ids(tokenizer, load_corpus(), tokens)
    rows = {}
    for alone, composed in PAIRS:
        for spec in (alone, composed):
            rows[spec] = perplexity(model, ids, build_cache(spec, model), 16).perplexity
        ratio = rows[composed] / rows[alone]
        print(
            f"{composed}: ppl {rows[composed]:.3f} vs {rows[alone]:.3f} unquantized ({ratio:.4f}x)",
            flush=True,
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="eval/results/composition.json")
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--skip", nargs="*", default=[], choices=["bytes", "perplexity", "decode"])
    args = parser.parse_args()
    report = {"length": args.length}
    if "bytes" not in args.skip:
        report["bytes_bfloat16"] = held_bytes_at(args.length)
    if "perplexity" not in args.skip:
        report["perplexity_2048_chunk16"] = perplexities(2048)
    if "decode" not in args.skip:
        specs = [spec for pair in PAIRS for spec in pair] + [QUANTIZED_ALONE]
        decode = child_decode(args.length, specs, args.rounds, args.steps, 512)
        for alone, composed in PAIRS:
            slower = max(decode[alone]["decode_ms_per_token"], decode[QUANTIZED_ALONE]["decode_ms_per_token"])
            decode[composed]["slower_half_ms"] = slower
        for spec, row in decode.items():
            print(f"{spec}: {row['decode_ms_per_token']:.1f} ms/token ({row['min']:.1f}-{row['max']:.1f})")
        report["decode_ms_per_token"] = decode
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
