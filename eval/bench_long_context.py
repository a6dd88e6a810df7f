"""Long-context cost of every strategy: prefill time, peak memory growth and decode time at 2k, 8k and 32k.

    python eval/bench_long_context.py [--out eval/results/long_context.json]   # about an hour on 2 CPU cores

Three parts, all on the embedded model and corpus:

1. Prefill. Each (length, strategy, mode) runs in a fresh Python process, so allocator caches and earlier
   peaks cannot hide or inflate its memory: the model is loaded and warmed up, the peak resident set is reset
   (``/proc/self/clear_refs``), and the prompt goes in either with one ``model.generate(max_new_tokens=1)``
   call (``one-shot``, what a new user writes; lengths up to ``--one-shot-max``) or with
   ``hf_kvcache.prefill(chunk_size=512)`` (``chunked``). Reported: seconds, peak RSS growth over the loaded
   model, bytes the cache holds.
2. Decode. For each length in ``--decode-lengths`` one process prefills every strategy's cache (chunked),
   then times ``--steps`` greedy steps per cache per round, one cache after another, for ``--rounds``
   rounds: medians and min-max of ms/token, so every strategy meets the same machine load.
3. Stream. ``--stream-tokens`` tokens of text go through the eviction caches in chunks of 512: held bytes and
   the median per-token time of the chunks of each 10k-token stretch, which must stay flat.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

DEFAULT_STRATEGIES = [
    "full",
    "sliding-window:window_length=512",
    "heavy-hitter:heavy_budget=256,recent_budget=256",
    "quantized:nbits=2",
]
STREAM_STRATEGIES = ["sliding-window:window_length=512", "heavy-hitter:heavy_budget=256,recent_budget=256"]


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def _reset_peak_rss() -> None:
    # Writing 5 resets VmHWM to the current RSS (Linux >= 4.0).
    Path("/proc/self/clear_refs").write_text("5")


def _setup(length: int):
    from transformers.utils import logging

    from hf_kvcache.evaluation import load_corpus, load_model
    from hf_kvcache.evaluation.corpus import corpus_token_ids

    logging.disable_progress_bar()
    torch.manual_seed(0)
    model, tokenizer = load_model()
    ids = corpus_token_ids(tokenizer, load_corpus(), length)
    if ids.shape[1] < length:
        raise SystemExit(f"the corpus has only {ids.shape[1]} tokens, fewer than {length}")
    return model, ids


@torch.no_grad()
def child_prefill(length: int, spec: str, mode: str, chunk_size: int) -> dict:
    """One prefill in this (fresh) process; returns its figures."""
    from hf_kvcache import build_cache, cache_nbytes, prefill

    model, ids = _setup(length)
    # Warm-up on a short prompt so lazy initialisation is not charged to the prefill.
    warm = build_cache(spec, model)
    model.generate(ids[:, :64], past_key_values=warm, max_new_tokens=2, do_sample=False)
    del warm
    cache = build_cache(spec, model)
    _reset_peak_rss()
    baseline = _status_kib("VmRSS")
    start = time.perf_counter()
    if mode == "one-shot":
        model.generate(ids, past_key_values=cache, max_new_tokens=1, do_sample=False)
    else:
        prefill(model, ids, cache, chunk_size=chunk_size)
        model(ids[:, -1:], past_key_values=cache, logits_to_keep=1)
    seconds = time.perf_counter() - start
    return {
        "length": length,
        "spec": spec,
        "mode": mode,
        "prefill_s": seconds,
        "peak_rss_growth_bytes": (_status_kib("VmHWM") - baseline) * 1024,
        "held_bytes": cache_nbytes(cache),
    }


@torch.no_grad()
def child_decode(length: int, specs: list[str], rounds: int, steps: int, chunk_size: int) -> dict:
    """Prefill one cache per strategy, then time decode steps in interleaved rounds."""
    from hf_kvcache import build_cache, cache_nbytes, prefill

    model, ids = _setup(length)
    caches, tokens = {}, {}
    for spec in specs:
        caches[spec] = prefill(model, ids, build_cache(spec, model), chunk_size=chunk_size)
        logits = model(ids[:, -1:], past_key_values=caches[spec], logits_to_keep=1).logits
        tokens[spec] = logits[:, -1:].argmax(-1)
        print(f"  decode {length}: prefilled {spec}", file=sys.stderr, flush=True)
    for spec in specs:  # warm-up step each
        tokens[spec] = model(tokens[spec], past_key_values=caches[spec]).logits[:, -1:].argmax(-1)
    per_round = {spec: [] for spec in specs}
    for _ in range(rounds):
        for spec in specs:
            start = time.perf_counter()
            for _ in range(steps):
                tokens[spec] = model(tokens[spec], past_key_values=caches[spec]).logits[:, -1:].argmax(-1)
            per_round[spec].append(1000 * (time.perf_counter() - start) / steps)
    return {
        spec: {
            "decode_ms_per_token": statistics.median(values),
            "min": min(values),
            "max": max(values),
            "rounds": values,
            "held_bytes": cache_nbytes(caches[spec]),
        }
        for spec, values in per_round.items()
    }


@torch.no_grad()
def child_stream(tokens: int, spec: str, chunk_size: int) -> dict:
    """Stream ``tokens`` tokens through one cache; time and bytes per 10k-token stretch."""
    from hf_kvcache import build_cache, cache_nbytes

    model, ids = _setup(tokens)
    cache = build_cache(spec, model)
    stretch, marks, chunk_ms = 10_000, [], []
    for begin in range(0, tokens, chunk_size):
        end = min(begin + chunk_size, tokens)
        start = time.perf_counter()
        model(ids[:, begin:end], past_key_values=cache, logits_to_keep=1)
        chunk_ms.append(1000 * (time.perf_counter() - start) / (end - begin))
        if end // stretch > begin // stretch or end == tokens:
            # The median chunk of the stretch: a burst of load on a shared machine does not move it.
            marks.append(
                {
                    "tokens": end,
                    "ms_per_token": statistics.median(chunk_ms),
                    "held_bytes": cache_nbytes(cache),
                }
            )
            chunk_ms = []
            print(f"  stream {spec}: {end} tokens", file=sys.stderr, flush=True)
    return {"spec": spec, "tokens": tokens, "stretches": marks}


def run_child(*args: str) -> dict:
    command = [sys.executable, __file__, "--child", *args]
    done = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def mib(value: float) -> str:
    return f"{value / 2**20:.0f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lengths", type=int, nargs="*", default=[2048, 8192, 32768])
    parser.add_argument("--strategies", nargs="+", default=DEFAULT_STRATEGIES)
    parser.add_argument("--one-shot-max", type=int, default=8192, help="longest prompt also run in one call")
    parser.add_argument("--chunk-size", type=int, default=512)
    parser.add_argument("--decode-lengths", type=int, nargs="*", default=[2048, 8192])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4, help="decode steps per cache per round")
    parser.add_argument("--stream-tokens", type=int, default=100_000, help="0 skips the stream")
    parser.add_argument("--stream-strategies", nargs="+", default=STREAM_STRATEGIES)
    parser.add_argument("--out", default="eval/results/long_context.json")
    args = parser.parse_args()
    report = {"prefill": [], "decode": {}, "stream": [], "settings": vars(args)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        out.write_text(json.dumps(report, indent=2))

    for length in args.lengths:
        modes = ["one-shot", "chunked"] if length <= args.one_shot_max else ["chunked"]
        for mode in modes:
            for spec in args.strategies:
                row = run_child("prefill", str(length), spec, mode, str(args.chunk_size))
                report["prefill"].append(row)
                save()
                print(
                    f"{length:>6} {mode:<8} {spec:<50} prefill {row['prefill_s']:7.1f} s  "
                    f"peak RSS +{mib(row['peak_rss_growth_bytes']):>9}  held {mib(row['held_bytes'])}",
                    flush=True,
                )
    for length in args.decode_lengths:
        rows = run_child(
            "decode",
            str(length),
            json.dumps(args.strategies),
            str(args.rounds),
            str(args.steps),
            str(args.chunk_size),
        )
        report["decode"][str(length)] = rows
        save()
        for spec, row in rows.items():
            print(
                f"{length:>6} decode {spec:<50} {row['decode_ms_per_token']:7.1f} ms/token "
                f"({row['min']:.1f}-{row['max']:.1f})",
                flush=True,
            )
    if args.stream_tokens:
        for spec in args.stream_strategies:
            row = run_child("stream", str(args.stream_tokens), spec, str(args.chunk_size))
            report["stream"].append(row)
            save()
            stretches = row["stretches"]
            first, last = stretches[min(1, len(stretches) - 1)], stretches[-1]
            print(
                f"stream {spec}: {first['tokens']} tokens {first['ms_per_token']:.2f} ms/token "
                f"{mib(first['held_bytes'])}; {last['tokens']} tokens {last['ms_per_token']:.2f} ms/token "
                f"{mib(last['held_bytes'])} (ratio {last['ms_per_token'] / first['ms_per_token']:.3f})",
                flush=True,
            )


def child_main(argv: list[str]) -> None:
    kind, *rest = argv
    if kind == "prefill":
        length, spec, mode, chunk = rest
        result = child_prefill(int(length), spec, mode, int(chunk))
    elif kind == "decode":
        length, specs, rounds, steps, chunk = rest
        result = child_decode(int(length), json.loads(specs), int(rounds), int(steps), int(chunk))
    else:
        tokens, spec, chunk = rest
        result = child_stream(int(tokens), spec, int(chunk))
    print(json.dumps(result))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child_main(sys.argv[2:])
    else:
        main()
