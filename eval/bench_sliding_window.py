"""Sliding-window (StreamingLLM) benchmark on the embedded model and corpus, chunk size 16.

    python eval/bench_sliding_window.py [--out eval/results/sliding_window.json]

1. Perplexity at 2048 tokens: full cache, window 256 with 4 sinks, window 256 without sinks.
2. Streaming 12,288 tokens (past SmolLM2's 8192 trained positions), window 256 + 4 sinks: perplexity of every
   1k-token segment.
3. Decode time per token after 1k and after 8k tokens seen.
"""

import argparse
import json
from pathlib import Path

from hf_kvcache import SlidingWindowKVCache
from hf_kvcache.evaluation import load_corpus, load_model, perplexity
from hf_kvcache.evaluation.corpus import corpus_token_ids
from hf_kvcache.evaluation.speed import measure_speed


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="eval/results/sliding_window.json")
    parser.add_argument("--stream-tokens", type=int, default=12288)
    args = parser.parse_args()
    model, tokenizer = load_model()
    ids = corpus_token_ids(tokenizer, load_corpus(), max(args.stream_tokens, 8192 + 64))
    report = {"chunk_size": 16, "trained_positions": model.config.max_position_embeddings}

    quality = {}
    for name, cache in {
        "full": None,
        "window 256, 4 sinks": SlidingWindowKVCache(model, 256, 4),
        "window 256, no sinks": SlidingWindowKVCache(model, 256, 0),
    }.items():
        quality[name] = perplexity(model, ids[:, :2048], cache=cache, chunk_size=16).perplexity
        print(
            f"2048 tokens  {name:22s} ppl={quality[name]:.3f}  x full={quality[name] / quality['full']:.4f}",
            flush=True,
        )
    report["perplexity_2048"] = quality

    streamed = {}
    for name, sinks in (("4 sinks", 4), ("no sinks", 0)):
        result = perplexity(
            model,
            ids[:, : args.stream_tokens],
            SlidingWindowKVCache(model, 256, sinks),
            16,
            keep_token_nll=True,
        )
        streamed[name] = {
            "perplexity": result.perplexity,
            "per_1k_segment": result.segment_perplexities(1024),
        }
        print(
            f"{args.stream_tokens} tokens, {name}: "
            + " ".join(f"{p:.2f}" for p in streamed[name]["per_1k_segment"])
        )
    report["stream"] = streamed

    speed = {}
    for seen in (1024, 8192):
        result = measure_speed(
            model,
            ids[:, :seen],
            lambda: SlidingWindowKVCache(model, 256, 4),
            decode_tokens=32,
            prefill_chunk_size=512,
        )
        speed[seen] = result.decode_ms_per_token
        print(f"decode after {seen} tokens seen: {result.decode_ms_per_token:.1f} ms/token", flush=True)
    report["decode_ms_per_token"] = speed
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
