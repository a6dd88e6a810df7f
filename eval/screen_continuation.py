"""Continuation perplexity of caches at several places in the corpus: a quick screen before a RULER run.

    OMP_WAIT_POLICY=PASSIVE python eval/screen_continuation.py --offsets 0 60000 \
        --strategies full "kvzip:budget=0.22,recent=64+quantized:nbits=4,group_size=64,rotation=hadamard"

For each corpus token offset, the embedded model (float32) reads ``--context`` tokens from there through each
cache in chunks of 512, the cache compresses what it holds if it can (``compress_context``, the
compress-first protocol), and the next ``--tokens`` tokens are scored in chunks of 16: what ``hf-kvcache
compare --metrics continuation`` measures at offset 0, and at other offsets too, so that a setting is not
chosen on one passage. Prints one line per cache and offset and the ratio to the first strategy (the
reference, ``full`` by default), and writes them to ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--strategies", nargs="+", required=True, help="specs; the first is the reference")
    parser.add_argument("--offsets", nargs="+", type=int, default=[0], help="corpus token offsets")
    parser.add_argument("--context", type=int, default=4096, help="tokens held (and compressed) first")
    parser.add_argument("--tokens", type=int, default=256, help="continuation tokens scored")
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the results")
    args = parser.parse_args()

    from hf_kvcache import build_cache, prefill
    from hf_kvcache.base import cache_nbytes
    from hf_kvcache.evaluation.corpus import corpus_token_ids, load_corpus
    from hf_kvcache.evaluation.model import load_model
    from hf_kvcache.evaluation.perplexity import perplexity

    model, tokenizer = load_model()
    span = args.context + args.tokens
    ids = corpus_token_ids(tokenizer, load_corpus(), max(args.offsets) + span)
    if ids.shape[1] < max(args.offsets) + span:
        raise SystemExit(f"the corpus has {ids.shape[1]} tokens, fewer than offset + context + tokens")
    rows = []
    for offset in args.offsets:
        passage, reference = ids[:, offset : offset + span], None
        for spec in args.strategies:
            cache = build_cache(spec, model)
            prefill(model, passage[:, : args.context], cache, chunk_size=512, leave_last=False)
            if hasattr(cache, "compress_context"):
                cache.compress_context()
            held = cache_nbytes(cache)
            result = perplexity(model, passage[:, args.context :], cache, 16).perplexity
            reference = reference or result
            ratio = result / reference
            rows.append({"offset": offset, "spec": spec, "perplexity": result, "ratio": ratio, "bytes": held})
            print(f"offset {offset:>6}  {result:8.3f}  x{ratio:.4f}  {held:>11,} B  {spec}", flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
