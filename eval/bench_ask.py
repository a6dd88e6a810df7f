"""Compress once, ask many: what ``hf_kvcache.ask`` saves over a prefill per question, what a copy costs.

    OMP_WAIT_POLICY=PASSIVE python eval/bench_ask.py --context-tokens 4096 --questions 4

On the embedded model and corpus: a context of ``--context-tokens`` corpus tokens, then ``--questions``
pass-key style questions about needles hidden in it. For each strategy: the seconds of one ``ask`` call (one
prefill, a copy per question), the seconds of answering the same questions with a fresh prefill each, the
bytes of the compressed cache and of one copy (``cache_nbytes``), the seconds one copy takes, and whether the
answers agree.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

STRATEGIES = ["full", "snapkv:budget=512", "tova:budget=0.125", "quantized:nbits=4"]


@torch.no_grad()
def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--context-tokens", type=int, default=4096)
    parser.add_argument("--questions", type=int, default=4)
    parser.add_argument("--strategies", nargs="+", default=STRATEGIES)
    parser.add_argument("--out", default="eval/results/ask.json")
    args = parser.parse_args()

    from hf_kvcache import ask, build_cache, cache_nbytes, prefill
    from hf_kvcache.ask import copy_cache
    from hf_kvcache.evaluation import load_corpus, load_model

    model, tokenizer = load_model()
    corpus = load_corpus()
    words = tokenizer.decode(tokenizer(corpus[: args.context_tokens * 6]).input_ids[: args.context_tokens])
    keys = [f"{1000 + 17 * i}" for i in range(args.questions)]
    pieces = words.split(". ")
    step = max(1, len(pieces) // (args.questions + 1))
    for index, key in enumerate(keys):
        pieces.insert((index + 1) * step, f"The code of box {index} is {key}")
    context = ". ".join(pieces)
    questions = [
        f"\n\nQuestion: what is the code of box {i}?\nAnswer: The code of box {i} is"
        for i in range(len(keys))
    ]
    rows = []
    for spec in args.strategies:
        start = time.perf_counter()
        answers = ask(model, tokenizer, context, questions, cache=spec, max_new_tokens=6)
        once = time.perf_counter() - start
        start, separate = time.perf_counter(), []
        for question in questions:
            separate += ask(model, tokenizer, context, [question], cache=spec, max_new_tokens=6)
        each = time.perf_counter() - start
        cache = build_cache(spec, model)
        prefill(
            model, tokenizer(context, return_tensors="pt").input_ids, cache, chunk_size=512, leave_last=False
        )
        start = time.perf_counter()
        copied = copy_cache(cache)
        copy_s = time.perf_counter() - start
        row = {
            "spec": spec,
            "ask_seconds": once,
            "separate_prefills_seconds": each,
            "cache_bytes": cache_nbytes(cache),
            "copy_bytes": cache_nbytes(copied),
            "copy_seconds": copy_s,
            "answers_agree": answers == separate,
            "keys_found": sum(key in answer for key, answer in zip(keys, answers, strict=True)),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
