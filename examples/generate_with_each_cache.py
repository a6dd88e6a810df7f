"""Greedy generation from one long prompt with every default strategy, and the KV-cache bytes each one holds.

python examples/generate_with_each_cache.py [prompt_tokens]

The prompt is the start of the embedded Wikipedia corpus followed by a question, so that the compressing
caches really have something to drop.
"""

import sys

from hf_kvcache import build_cache, cache_nbytes
from hf_kvcache.evaluation import load_corpus, load_model
from hf_kvcache.evaluation.corpus import corpus_token_ids
from hf_kvcache.evaluation.harness import DEFAULT_STRATEGIES

prompt_tokens = int(sys.argv[1]) if len(sys.argv) > 1 else 1024

model, tokenizer = load_model()
article = tokenizer.decode(corpus_token_ids(tokenizer, load_corpus(), prompt_tokens)[0])
prompt = article + "\n\nIn one sentence, the text above is about"
inputs = tokenizer(prompt, return_tensors="pt")

for spec in DEFAULT_STRATEGIES:
    cache = build_cache(spec, model)
    output = model.generate(**inputs, past_key_values=cache, max_new_tokens=24, do_sample=False)
    answer = tokenizer.decode(output[0, inputs.input_ids.shape[1] :], skip_special_tokens=True)
    print(f"{spec}\n  {cache_nbytes(cache) / 2**20:6.2f} MiB of KV cache | {answer.strip()!r}")
