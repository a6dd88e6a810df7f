"""A 16k-token prompt through 512-token caches with chunked prefill: memory held, and the answer to a needle.

    python examples/long_context.py [--length 16384] [--depth 0.5] [--chunk-size 512]

A random pass key is hidden at ``--depth`` of a Wikipedia filler prompt, and the model is asked for it at the
end. Each cache holds at most 512 tokens per layer, so memory stays bounded by the budget plus one chunk
whatever the prompt length; whether the key survives depends on what the strategy chose to keep.
"""

import argparse
import resource
import time

import torch

from hf_kvcache import build_cache, cache_nbytes, prefill
from hf_kvcache.evaluation import load_corpus, load_model
from hf_kvcache.evaluation.harness import full_cache_bytes
from hf_kvcache.evaluation.passkey import make_passkey_prompt

CACHES = [
    "sliding-window:window_length=512",
    "heavy-hitter:heavy_budget=256,recent_budget=256",
    "sliding-window:window_length=512+quantized:nbits=4",
    "heavy-hitter:heavy_budget=256,recent_budget=256+quantized:nbits=4",
]

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--length", type=int, default=16384, help="prompt tokens")
parser.add_argument("--depth", type=float, default=0.5, help="where the needle sits, a fraction in [0, 1]")
parser.add_argument("--chunk-size", type=int, default=512)
args = parser.parse_args()

model, tokenizer = load_model()
prompt = make_passkey_prompt(tokenizer, load_corpus(), args.length, args.depth, seed=1)
ids = prompt.input_ids
full = full_cache_bytes(model, ids.shape[1])
print(
    f"{ids.shape[1]} prompt tokens, pass key {prompt.key} at depth {args.depth}; a full cache would hold "
    f"{full / 2**20:.0f} MiB"
)
for spec in CACHES:
    cache = build_cache(spec, model)
    start = time.perf_counter()
    with torch.no_grad():
        prefill(model, ids, cache, chunk_size=args.chunk_size)  # all but the last token
        out = model.generate(ids, past_key_values=cache, max_new_tokens=8, do_sample=False)
    answer = tokenizer.decode(out[0, ids.shape[1] :]).strip()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux
    print(
        f"{spec}\n  held {cache_nbytes(cache) / 2**20:.2f} MiB ({cache_nbytes(cache) / full:.3f} of full), "
        f"{time.perf_counter() - start:.0f} s, process peak RSS so far {peak:.0f} MiB\n"
        f"  answer: {answer!r} -> {'found' if prompt.key in answer else 'not found'}"
    )
