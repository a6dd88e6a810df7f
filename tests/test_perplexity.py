import math

import pytest
import torch

from hf_kvcache.evaluation import perplexity
from tests.conftest import make_tiny_model, random_ids


def full_forward_nll(model, ids):
    """Reference: one forward pass over the whole sequence, no cache."""
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
    ).item()


@pytest.mark.parametrize("chunk_size", [1, 3, 16, 50, 200])
def test_streaming_equals_one_forward_pass(tiny_model, chunk_size):
    ids = random_ids(50, batch=2)
    result = perplexity(tiny_model, ids, chunk_size=chunk_size)
    reference = full_forward_nll(tiny_model, ids)
    assert result.num_tokens == 2 * 49
    assert result.mean_nll == pytest.approx(reference, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(reference), rel=1e-5)


def test_every_token_scored_once_with_ragged_last_chunk():
    model = make_tiny_model("llama")
    ids = random_ids(37)
    assert perplexity(model, ids, chunk_size=10).num_tokens == 36
    assert perplexity(model, ids[0], chunk_size=36).num_tokens == 36


@pytest.mark.parametrize("bad", [0, -1, 2.5])
def test_bad_chunk_size_is_rejected(llama, bad):
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        perplexity(llama, random_ids(10), chunk_size=bad)


def test_too_short_input_is_rejected(llama):
    with pytest.raises(ValueError, match="T >= 2"):
        perplexity(llama, random_ids(1))


def test_token_nll_and_segments_match_the_mean():
    model = make_tiny_model("llama")
    ids = random_ids(41)
    result = perplexity(model, ids, chunk_size=7, keep_token_nll=True)
    assert result.token_nll.shape == (1, 40)
    assert float(result.token_nll.mean()) == pytest.approx(result.mean_nll)
    segments = result.segment_perplexities(10)
    assert len(segments) == 4
    assert math.exp(sum(math.log(p) for p in segments) / 4) == pytest.approx(result.perplexity)
    with pytest.raises(ValueError, match="keep_token_nll=True"):
        perplexity(model, ids).segment_perplexities(10)
