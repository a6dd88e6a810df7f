"""Bits per entry of each cache: its bytes after a context, divided by the key and value elements it holds.

    OMP_WAIT_POLICY=PASSIVE python eval/bits_per_entry.py --tokens 4096 --dtype bfloat16

The count of issue 23: the embedded model in ``--dtype`` (bfloat16 by default) reads ``--tokens`` corpus
tokens through each cache (chunks of 512), then lets a cache that compresses a whole context at once do it
(``compress_context``, as the compress-first protocol does); bits per entry = ``cache_nbytes * 8`` over the
number of key and value elements held (``keys.numel() + values.numel()`` summed over layers). Scales, zero
points, sinks and the full-precision residual all count, so the full cache reads 16 in bfloat16.
``of_full`` is the cache's bytes over the full cache's for the same tokens (the byte fraction of
``hf-kvcache frontier``, here in ``--dtype``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

STRATEGIES = [
    "full",
    "quantized:nbits=4",
    "quantized:nbits=2",
    "quantized:nbits=3",
    "quantized:nbits=2,nbits_keys=4",
    "quantized:nbits=2,group_size=64,residual_length=32",
]


def held_entries(cache) -> int:
    """Key and value elements a cache holds (a quantized layer's ``keys``: its held tokens, dequantized; a
    ragged layer's: the count of each head's kept entries, plus the tokens after them)."""
    total = 0
    for layer in cache.layers:
        if getattr(layer, "holds_ragged", False):
            tail = layer.key_buffer[:, :, : layer.stored]
            total += 2 * (int(layer.ragged.counts.sum()) * tail.shape[-1] + tail.numel())
        else:
            total += layer.keys.numel() + layer.values.numel()
    return total


def full_entries(model, ids: torch.Tensor) -> int:
    """Key and value elements ``DynamicCache`` holds after ``ids`` (fewer than ``tokens × layers`` on models
    with sliding-window layers)."""
    from transformers import DynamicCache

    from hf_kvcache import prefill

    cache = prefill(model, ids, DynamicCache(config=model.config), chunk_size=512, leave_last=False)
    return held_entries(cache)


@torch.no_grad()
def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--strategies", nargs="+", default=STRATEGIES)
    parser.add_argument("--out", default="eval/results/bits_per_entry.json")
    args = parser.parse_args()

    from hf_kvcache import build_cache, cache_nbytes, prefill
    from hf_kvcache.evaluation import load_corpus, load_model
    from hf_kvcache.evaluation.corpus import corpus_token_ids

    model, tokenizer = load_model(dtype=args.dtype, device="cpu")
    ids = corpus_token_ids(tokenizer, load_corpus(), args.tokens)
    full = full_entries(model, ids)
    rows = []
    for spec in args.strategies:
        cache = prefill(model, ids, build_cache(spec, model), chunk_size=512, leave_last=False)
        if hasattr(cache, "compress_context"):
            cache.compress_context()
        nbytes, entries = cache_nbytes(cache), held_entries(cache)
        row = {"spec": spec, "tokens": ids.shape[1], "cache_bytes": nbytes, "entries": entries}
        row["bits_per_entry"] = 8 * nbytes / entries
        # Every element of the full cache costs the dtype's bytes, whoever holds the context.
        row["of_full"] = nbytes / (full * model.dtype.itemsize)
        rows.append(row)
        bits, of_full, mib = row["bits_per_entry"], row["of_full"], nbytes / 2**20
        print(f"{bits:6.3f} bits/entry  {of_full:.4f} of full  {mib:8.2f} MiB  {spec}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
