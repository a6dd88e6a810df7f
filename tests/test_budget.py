"""Budgets in tokens or as a fraction of the tokens seen: the grammar, what a fraction keeps, its errors."""

import math

import pytest
import torch
from transformers import DynamicCache

from hf_kvcache import build_cache, cache_nbytes, canonical_spec, parse_spec, prefill
from hf_kvcache.budget import tokens
from tests.conftest import make_tiny_model, random_ids
from tests.helpers import (
    MODES,
    check_decoding_path_agrees_with_general_path,
    check_generates_like_dynamic_cache,
    stream,
)

FRACTIONS = {
    "tova": "tova:budget=0.25",
    "heavy-hitter": "heavy-hitter:heavy_budget=0.125,recent_budget=0.125",
    "sliding-window": "sliding-window:window_length=0.25,num_sink_tokens=2",
    "snapkv": "snapkv:budget=0.25,window_size=4",
    "sliding-window+quantized": (
        "sliding-window:window_length=0.5+quantized:nbits=4,group_size=8,residual_length=8"
    ),
    "heavy-hitter+quantized": (
        "heavy-hitter:heavy_budget=0.25,recent_budget=16+quantized:nbits=4,group_size=8,residual_length=8"
    ),
}


@pytest.mark.parametrize(
    "spec, field, value",
    [
        ("tova:budget=256", "budget", 256),
        ("tova:budget=1", "budget", 1),
        ("tova:budget=0.25", "budget", 0.25),
        ("tova:budget=1.0", "budget", 1.0),
        ("tova:budget=1e-1", "budget", 0.1),
        ("heavy-hitter:heavy_budget=0.125,recent_budget=64", "heavy_budget", 0.125),
    ],
)
def test_an_integer_is_tokens_and_a_decimal_is_a_fraction(spec, field, value):
    _, options = parse_spec(spec)
    assert getattr(options, field) == value and type(getattr(options, field)) is type(value)
    assert canonical_spec(canonical_spec(spec)) == canonical_spec(spec)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("tova:budget=1.5", r"budget=1.5 is a fraction of the tokens seen, which must lie in \(0, 1\]"),
        ("tova:budget=0.0", r"budget=0.0 is a fraction of the tokens seen, which must lie in \(0, 1\]"),
        ("tova:budget=0", "budget must be an integer >= 1, got 0"),
        (
            "tova:budget=half",
            "option budget='half' .* a number of tokens .* or a fraction of the tokens seen",
        ),
        ("heavy-hitter:heavy_budget=-0.5", r"heavy_budget=-0.5 is a fraction .* must lie in \(0, 1\]"),
        (
            "sliding-window:num_sink_tokens=0.5",
            "option num_sink_tokens=.0.5. of strategy .sliding-window. must be of type int",
        ),
        (
            "heavy-hitter:recent_budget=0.25+quantized",
            "recent_budget=0.25 must be in tokens .* when the kept tokens are quantized",
        ),
    ],
)
def test_a_fraction_out_of_range_is_named(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_spec(spec)


def test_tokens_of_a_fraction_round_up_and_keep_at_least_one():
    assert (
        tokens(0.25, 100) == 25 and tokens(0.25, 101) == 26 and tokens(0.01, 3) == 1 and tokens(7, 1000) == 7
    )


@pytest.mark.parametrize("chunk", [1, 7])
def test_a_fraction_of_the_tokens_seen_is_what_each_layer_holds(chunk):
    model = make_tiny_model("llama-gqa")
    ids = random_ids(90, batch=2, seed=4)
    for spec, held in [
        ("tova:budget=0.25", lambda n: math.ceil(0.25 * n)),
        ("sliding-window:window_length=0.25,num_sink_tokens=2", lambda n: max(math.ceil(0.25 * n), 2)),
        ("heavy-hitter:heavy_budget=0.125,recent_budget=0.125", lambda n: 2 * math.ceil(0.125 * n)),
    ]:
        cache, expected = build_cache(spec, model), 0
        with torch.no_grad():
            for start in range(0, 90, chunk):
                model(ids[:, start : start + chunk], past_key_values=cache)
                seen = min(start + chunk, 90)
                # What was evicted is gone: the cache grows by at most the new tokens.
                expected = min(expected + seen - start, held(seen))
                assert cache.layers[0].keys.shape[-2] == expected, (spec, seen)


def test_memory_is_the_fraction_of_the_full_cache():
    model = make_tiny_model("llama")
    ids = random_ids(200, seed=2)
    cache, full = build_cache("sliding-window:window_length=0.25,num_sink_tokens=4", model), DynamicCache()
    prefill(model, ids, cache, chunk_size=200, leave_last=False)
    prefill(model, ids, full, chunk_size=200, leave_last=False)
    keys = sum(layer.key_buffer.nbytes + layer.value_buffer.nbytes for layer in cache.layers)
    assert keys == cache_nbytes(full) // 4


@pytest.mark.parametrize("mode", sorted(MODES))
def test_a_fraction_of_one_keeps_everything(mode):
    model = make_tiny_model("llama-gqa")
    for spec in ("tova:budget=1.0", "heavy-hitter:heavy_budget=0.5,recent_budget=0.5"):
        check_generates_like_dynamic_cache(model, spec, mode)


@pytest.mark.parametrize("strategy", sorted(FRACTIONS))
def test_fractional_budgets_evict_the_same_on_both_paths(strategy):
    check_decoding_path_agrees_with_general_path(make_tiny_model("llama-gqa"), FRACTIONS[strategy], length=60)


def test_a_fractional_cache_streams_and_decodes(tiny_model):
    for spec in FRACTIONS.values():
        logits = stream(tiny_model, random_ids(50, batch=2), build_cache(spec, tiny_model), 6)
        assert torch.isfinite(logits).all(), spec
