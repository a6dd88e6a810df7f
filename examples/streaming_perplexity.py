"""Streaming perplexity of the embedded model on the embedded corpus with any registered strategy.

python examples/streaming_perplexity.py full 1024
"""

import sys

from hf_kvcache import build_cache
from hf_kvcache.evaluation import load_corpus, load_model, perplexity
from hf_kvcache.evaluation.corpus import corpus_token_ids

spec = sys.argv[1] if len(sys.argv) > 1 else "full"
max_tokens = int(sys.argv[2]) if len(sys.argv) > 2 else 1024

model, tokenizer = load_model()
input_ids = corpus_token_ids(tokenizer, load_corpus(), max_tokens)
result = perplexity(model, input_ids, cache=build_cache(spec, model), chunk_size=16)
print(f"{spec}: perplexity {result.perplexity:.3f} over {result.num_tokens} tokens")
