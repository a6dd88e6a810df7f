"""What KVzip costs: its prefill with the reconstruction passes against a plain prefill, bytes, decoding.

    OMP_WAIT_POLICY=PASSIVE python eval/bench_kvzip.py --lengths 1024 4096 --rounds 3

On the embedded model and corpus: a context of each length goes through ``full`` (``DynamicCache``) and
each ``--specs`` cache in chunks of 512 tokens (``prefill``), then ``compress_context`` (the reconstruction
passes); then the next 256 corpus tokens, scored over the compressed context (their perplexity against the
full cache's), and ``--steps`` greedy decoding steps. Rounds interleave the caches. Per cache and length:
median seconds of the prefill and of the compression, their sum against the full cache's prefill (median
ratio and its spread over rounds), bytes held after compression, the continuation's perplexity against the
full cache's, and median milliseconds per decoding step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def measure(model, spec: str, ids: torch.Tensor, continuation: torch.Tensor, steps: int) -> dict:
    from hf_kvcache import build_cache, cache_nbytes, prefill

    cache = build_cache(spec, model)
    start = time.perf_counter()
    prefill(model, ids, cache, chunk_size=512, leave_last=False)
    filled = time.perf_counter()
    if hasattr(cache, "compress_context"):
        cache.compress_context()
    compressed = time.perf_counter()
    held = cache_nbytes(cache)
    # The continuation of the context, scored over the compressed context: its perplexity.
    logits = model(continuation, past_key_values=cache).logits
    nll = torch.nn.functional.cross_entropy(logits[0, :-1].float(), continuation[0, 1:])
    token = logits[:, -1:].argmax(-1)
    begin = time.perf_counter()
    for _ in range(steps):
        token = model(token, past_key_values=cache).logits[:, -1:].argmax(-1)
    decoded = time.perf_counter()
    return {
        "prefill_s": filled - start,
        "compress_s": compressed - filled,
        "nbytes": held,
        "decode_ms": 1000 * (decoded - begin) / steps,
        "continuation_perplexity": float(nll.exp()),
    }


@torch.no_grad()
def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--specs", nargs="+", default=["kvzip:budget=0.25", "kvzip:budget=0.125"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--out", default="eval/results/kvzip/cost.json")
    args = parser.parse_args()

    from hf_kvcache.evaluation import load_corpus, load_model

    model, tokenizer = load_model()
    corpus_ids = tokenizer(load_corpus()[: (max(args.lengths) + 256) * 8]).input_ids
    continuation_tokens = 256
    specs = ["full", *args.specs]
    results = {}
    for length in args.lengths:
        ids = torch.tensor([corpus_ids[:length]])
        continuation = torch.tensor([corpus_ids[length : length + continuation_tokens]])
        runs = {spec: [] for spec in specs}
        for _ in range(args.rounds):
            for spec in specs:
                runs[spec].append(measure(model, spec, ids, continuation, args.steps))
        full_prefill = [run["prefill_s"] for run in runs["full"]]
        for spec in specs:
            ratios = [
                (run["prefill_s"] + run["compress_s"]) / base
                for run, base in zip(runs[spec], full_prefill, strict=True)
            ]
            row = {
                key: statistics.median(run[key] for run in runs[spec])
                for key in ("prefill_s", "compress_s", "decode_ms")
            }
            full_perplexity = runs["full"][0]["continuation_perplexity"]
            row.update(
                nbytes=runs[spec][0]["nbytes"],
                bytes_of_full=runs[spec][0]["nbytes"] / runs["full"][0]["nbytes"],
                prefill_ratio=statistics.median(ratios),
                prefill_ratio_range=[min(ratios), max(ratios)],
                perplexity_ratio=runs[spec][0]["continuation_perplexity"] / full_perplexity,
            )
            results[f"{spec}@{length}"] = row
            print(
                f"{length:>6} {spec:<24} prefill {row['prefill_s']:6.2f}s compress {row['compress_s']:6.2f}s "
                f"x{row['prefill_ratio']:.2f} of full ({min(ratios):.2f}-{max(ratios):.2f}) "
                f"bytes {row['bytes_of_full']:.3f} decode {row['decode_ms']:6.1f} ms/token "
                f"perplexity x{row['perplexity_ratio']:.3f}",
                flush=True,
            )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
