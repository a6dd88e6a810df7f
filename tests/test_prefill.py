import pytest
import torch
from transformers import DynamicCache

from hf_kvcache import build_cache, prefill
from tests.conftest import left_padded_ids, make_tiny_model, random_ids
from tests.helpers import LOSSLESS, LOSSY

GREEDY = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0)


def generate_after_prefill(model, cache, ids, mask, chunk):
    prefill(model, ids, cache, chunk_size=chunk, attention_mask=mask)
    return model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, **GREEDY)


def test_prefill_then_generate_equals_one_generate_call():
    model = make_tiny_model("llama-gqa")
    ids, mask = left_padded_ids(40, pads=(0, 6, 17), seed=3)
    expected = model.generate(
        input_ids=ids, attention_mask=mask, past_key_values=DynamicCache(config=model.config), **GREEDY
    )
    for chunk in (1, 7, 64):
        got = generate_after_prefill(model, DynamicCache(config=model.config), ids, mask, chunk)
        assert torch.equal(got, expected), chunk


@pytest.mark.parametrize("strategy", sorted(LOSSLESS))
@pytest.mark.parametrize("arch", ["llama-gqa", "phi3"])
def test_lossless_caches_equal_dynamic_cache_through_prefill(strategy, arch):
    model = make_tiny_model(arch)
    ids, mask = left_padded_ids(30, pads=(0, 5, 11), seed=5)
    expected = generate_after_prefill(model, DynamicCache(config=model.config), ids, mask, 8)
    got = generate_after_prefill(model, build_cache(LOSSLESS[strategy], model), ids, mask, 8)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("strategy", sorted(LOSSLESS))
def test_transformers_chunked_prefill_works_with_every_cache(strategy):
    model = make_tiny_model("llama-gqa")
    ids, mask = left_padded_ids(30, pads=(0, 5, 11), seed=5)
    run = dict(input_ids=ids, attention_mask=mask, prefill_chunk_size=8, **GREEDY)
    expected = model.generate(past_key_values=DynamicCache(config=model.config), **run)
    assert torch.equal(
        model.generate(past_key_values=build_cache(LOSSLESS[strategy], model), **run), expected
    )
    lossy = build_cache(LOSSY[strategy], model)
    assert model.generate(past_key_values=lossy, **run).shape == expected.shape


@pytest.mark.parametrize(
    "spec, held",
    [
        ("sliding-window:window_length=16,num_sink_tokens=4", 16),
        ("heavy-hitter:heavy_budget=8,recent_budget=8", 16),
        ("tova:budget=16", 16),
        ("snapkv:budget=16,window_size=4", 16),
    ],
)
def test_eviction_caches_hold_their_budget_after_a_long_prefill(spec, held):
    model = make_tiny_model("llama")
    ids = random_ids(300, batch=2, seed=2)
    cache = prefill(model, ids, build_cache(spec, model), chunk_size=32)
    assert cache.get_seq_length() == 299
    assert all(layer.keys.shape[-2] == held for layer in cache.layers)
    out = model.generate(input_ids=ids, past_key_values=cache, **GREEDY)
    assert out.shape == (2, 310) and torch.equal(out[:, :300], ids)


def test_rows_of_a_padded_batch_match_their_own_runs_through_prefill():
    model = make_tiny_model("llama-gqa")
    spec = "heavy-hitter:heavy_budget=6,recent_budget=6"
    ids, mask = left_padded_ids(40, pads=(0, 9, 25), seed=8)
    batch = generate_after_prefill(model, build_cache(spec, model), ids, mask, 5)
    for row in range(3):
        alone = ids[row : row + 1, mask[row].bool()]
        single = generate_after_prefill(model, build_cache(spec, model), alone, None, 5)
        assert torch.equal(batch[row, -10:], single[0, -10:]), row


def test_prefill_continues_a_cache_that_already_holds_a_prefix():
    model = make_tiny_model("llama")
    ids = random_ids(50, seed=4)
    cache = prefill(model, ids[:, :21], DynamicCache(config=model.config), chunk_size=8)
    prefill(model, ids, cache, chunk_size=8)
    reference = prefill(model, ids, DynamicCache(config=model.config), chunk_size=50)
    assert cache.get_seq_length() == 49
    torch.testing.assert_close(cache.layers[1].keys, reference.layers[1].keys, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"chunk_size": 0}, ValueError, "chunk_size must be a positive integer, got 0"),
        ({"input_ids": torch.tensor([[5]])}, ValueError, "at least 2 tokens, got \\(1, 1\\)"),
        ({"attention_mask": torch.ones(1, 3)}, ValueError, "attention_mask of shape \\(1, 3\\) must match"),
        ({"cache": [1, 2]}, TypeError, "cache must be a transformers Cache, got list"),
    ],
)
def test_bad_arguments_are_named(llama, kwargs, error, message):
    arguments = {"input_ids": random_ids(10), "cache": DynamicCache(config=llama.config), **kwargs}
    with pytest.raises(error, match=message):
        prefill(llama, **arguments)


def test_a_cache_built_for_another_model_is_named():
    cache = build_cache("sliding-window:window_length=16", make_tiny_model("llama"))
    other = make_tiny_model("llama-gqa", num_layers=3)
    with pytest.raises(
        ValueError, match="built for a model with 2 layers .* 4 KV heads .* LlamaForCausalLM has 3 layers"
    ):
        prefill(other, random_ids(20), cache)
