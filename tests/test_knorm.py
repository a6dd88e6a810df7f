"""Key-norm eviction against a step-by-step simulation over the model's exact keys."""

import math

import pytest
import torch
from transformers import DynamicCache

from hf_kvcache import KeyNormKVCache, build_cache
from tests.conftest import make_tiny_model, random_ids
from tests.helpers import stream


def simulate_keynorm(keys: torch.Tensor, chunks: list[int], budget: int, sinks: int, recent: int) -> list:
    """Per KV head, the token indices kept after feeding ``chunks`` tokens at a time: after each forward,
    while more than ``budget`` are held, drop the unprotected one whose key has the largest norm, rounded to
    12 significant bits; of equal ones, the oldest."""

    def rounded(norm: float) -> float:
        mantissa, exponent = math.frexp(norm)
        return math.ldexp(round(mantissa * 4096) / 4096, exponent)

    norms = keys[0].double().norm(dim=-1).apply_(rounded)  # [H, T]
    kept, seen = [[] for _ in range(norms.shape[0])], 0
    for size in chunks:
        seen += size
        for head, held in enumerate(kept):
            held.extend(range(seen - size, seen))
            while len(held) > budget:
                free = [t for t in held if t >= sinks and t < seen - recent]
                held.remove(max(free, key=lambda t: norms[head, t]))
    return kept


@pytest.mark.parametrize(
    "arch, chunks, repeated",
    [
        ("llama-gqa", [1] * 40, False),
        ("phi3", [16, 9, *[1] * 15], False),
        ("llama-gqa", [24, *[1] * 16], True),
    ],
)
def test_kept_keys_follow_the_simulation(arch, chunks, repeated):
    """``repeated``: five tokens over and over, so that layer 0 holds many keys whose norms are equal in exact
    arithmetic and differ in their last bits as computed; the newest of each such tie must be kept."""
    model = make_tiny_model(arch)
    ids = random_ids(5, seed=11).repeat(1, 8) if repeated else random_ids(40, seed=11)
    budget, sinks, recent = 14, 2, 4
    cache = KeyNormKVCache(model, budget=budget, num_sink_tokens=sinks, recent=recent)
    with torch.no_grad():
        start = 0
        for size in chunks:
            model(ids[:, start : start + size], past_key_values=cache)
            start += size
        reference = DynamicCache(config=model.config)
        model(ids, past_key_values=reference)
    # Layer 0's keys depend on the tokens alone; deeper layers see the compressed history of the ones below.
    exact = reference.layers[0].keys
    for head, indices in enumerate(simulate_keynorm(exact, chunks, budget, sinks, recent)):
        torch.testing.assert_close(cache.layers[0].keys[0, head], exact[0, head, sorted(indices)])
    assert cache.layers[1].keys.shape[2] == budget and cache.get_seq_length() == 40


def test_a_budget_at_least_the_sequence_keeps_everything_like_dynamic_cache():
    model = make_tiny_model("llama-gqa")
    ids = random_ids(30, batch=2, seed=3)
    expected = stream(model, ids, DynamicCache(config=model.config), 7)
    assert torch.equal(stream(model, ids, build_cache("knorm:budget=30,recent=8", model), 7), expected)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("knorm:budget=4,num_sink_tokens=2,recent=4", "budget must be an integer >= 6"),
        ("knorm:budget=1.5", "budget=1.5 is a fraction of the tokens seen, which must lie in \\(0, 1\\]"),
        ("knorm:num_sink_tokens=-1", "num_sink_tokens must be a number of tokens >= 0"),
        (
            "knorm:recent=32+quantized:group_size=32,residual_length=8",
            "recent=32 must be at least residual_length \\+ group_size - 1 = 39 tokens",
        ),
    ],
)
def test_bad_options_are_named(spec, message):
    with pytest.raises(ValueError, match=message):
        build_cache(spec, make_tiny_model("llama"))
