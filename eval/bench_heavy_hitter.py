"""H2O benchmark on the embedded model and corpus, chunk size 16.

    python eval/bench_heavy_hitter.py [--out eval/results/heavy_hitter.json]

1. Perplexity at 2048 tokens with a total budget of 512 (25%), for several heavy/recent splits.
2. Decode tokens/s after a 4096-token prompt: full cache vs H2O (medians of interleaved rounds).
3. Overhead of the score capture: H2O decode vs a sliding window holding as many tokens (same gather-based
   eviction, no queries recomputed, no scores).
"""

import argparse
import json
import statistics
from pathlib import Path

from transformers import DynamicCache

from hf_kvcache import HeavyHitterKVCache, SlidingWindowKVCache
from hf_kvcache.evaluation import load_corpus, load_model, perplexity
from hf_kvcache.evaluation.corpus import corpus_token_ids
from hf_kvcache.evaluation.speed import measure_speed_interleaved

SPLITS = [(128, 384), (256, 256), (384, 128)]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="eval/results/heavy_hitter.json")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved decode timings per cache")
    args = parser.parse_args()
    model, tokenizer = load_model()
    ids = corpus_token_ids(tokenizer, load_corpus(), 4096)
    report = {"tokens": 2048, "budget": 512, "chunk_size": 16}
    full = perplexity(model, ids[:, :2048], chunk_size=16).perplexity
    rows = {"full": full}
    print(f"full ppl={full:.3f}", flush=True)
    for heavy, recent in SPLITS:
        ppl = perplexity(model, ids[:, :2048], HeavyHitterKVCache(model, heavy, recent), 16).perplexity
        rows[f"heavy {heavy} + recent {recent}"] = ppl
        print(f"heavy {heavy} + recent {recent}: ppl={ppl:.3f} x full={ppl / full:.4f}", flush=True)
    window = perplexity(model, ids[:, :2048], SlidingWindowKVCache(model, 512, 4), 16).perplexity
    rows["sliding window 512 (4 sinks), same memory"] = window
    print(f"sliding window 512: ppl={window:.3f} x full={window / full:.4f}", flush=True)
    report["perplexity"] = rows

    best_heavy, best_recent = min(SPLITS, key=lambda s: rows[f"heavy {s[0]} + recent {s[1]}"])
    makers = {
        "full": lambda: DynamicCache(config=model.config),
        f"h2o {best_heavy}+{best_recent}": lambda: HeavyHitterKVCache(model, best_heavy, best_recent),
        "sliding window 512": lambda: SlidingWindowKVCache(model, 512, 4),
    }
    timings = measure_speed_interleaved(
        model, ids, makers, args.rounds, decode_tokens=32, prefill_chunk_size=512
    )
    speed = {}
    for name, results in timings.items():
        speed[name] = {
            "decode_tokens_per_s": statistics.median(r.decode_tokens_per_s for r in results),
            "prefill_tokens_per_s": statistics.median(r.prefill_tokens_per_s for r in results),
            "decode_tokens_per_s_rounds": [r.decode_tokens_per_s for r in results],
        }
        print(
            f"4096-token prompt, {name}: decode {speed[name]['decode_tokens_per_s']:.2f} tok/s, prefill "
            f"{speed[name]['prefill_tokens_per_s']:.1f} tok/s (medians of {args.rounds} rounds)",
            flush=True,
        )
    h2o, window_speed = speed[f"h2o {best_heavy}+{best_recent}"], speed["sliding window 512"]
    report["capture_overhead_decode"] = window_speed["decode_tokens_per_s"] / h2o["decode_tokens_per_s"] - 1
    print(f"score capture overhead per decode step: {100 * report['capture_overhead_decode']:.1f}%")
    report["speed_4096"] = speed
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
