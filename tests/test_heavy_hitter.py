import pytest
import torch
from transformers import DynamicCache

from hf_kvcache import HeavyHitterKVCache
from tests.conftest import assert_left_padded_rows_match_unpadded_runs, make_tiny_model, random_ids
from tests.helpers import eager_weights, stream


def grouped_eager_attention(model_arch, ids, layer):
    """Reference scores: eager attention weights of a cache-free forward, summed over queries, per KV head."""
    weights = eager_weights(model_arch, ids, layer)  # [B, Hq, T, T]
    config = make_tiny_model(model_arch).config
    groups = config.num_attention_heads // config.num_key_value_heads
    batch, _, _, length = weights.shape
    return weights.sum(2).reshape(batch, -1, groups, length).sum(2)  # [B, Hkv, T]


def test_budgets_covering_everything_equal_dynamic_cache(tiny_model):
    model = tiny_model
    ids = random_ids(45, batch=2)
    expected = stream(model, ids, DynamicCache(config=model.config), 6)
    assert torch.equal(stream(model, ids, HeavyHitterKVCache(model, 30, 15), 6), expected)


@pytest.mark.parametrize("arch", ["llama", "llama-gqa", "qwen3", "phi3"])
@pytest.mark.parametrize("chunk", [1, 5, 40])
def test_accumulated_scores_equal_eager_attention_weights(arch, chunk):
    model = make_tiny_model(arch)  # SDPA: the scores come from the captured queries
    ids = random_ids(40, batch=2, seed=4)
    cache = HeavyHitterKVCache(model, heavy_budget=30, recent_budget=10)  # nothing evicted yet
    stream(model, ids, cache, chunk)
    for layer in (0, 1):
        torch.testing.assert_close(cache.layers[layer].scores, grouped_eager_attention(arch, ids, layer))


@pytest.mark.parametrize("arch", ["llama", "llama-gqa"])
def test_kept_set_is_recent_window_plus_top_scores(arch):
    model = make_tiny_model(arch)
    ids = random_ids(50, seed=6)
    heavy, recent = 12, 8
    cache = HeavyHitterKVCache(model, heavy, recent)
    reference = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, past_key_values=cache)  # one prefill: evicts once, after attending over all 50 tokens
        model(ids, past_key_values=reference)
    for layer in (0, 1):
        scores = grouped_eager_attention(arch, ids, layer)[0]  # [Hkv, 50]
        for head in range(scores.shape[0]):
            top = scores[head, : 50 - recent].topk(heavy).indices
            kept = torch.cat([top, torch.arange(50 - recent, 50)]).sort().values
            expected_keys = reference.layers[layer].keys[0, head, kept]
            assert torch.equal(cache.layers[layer].keys[0, head], expected_keys), (layer, head)


def test_sdpa_and_eager_give_the_same_results_with_eviction():
    ids = random_ids(70, batch=2, seed=2)
    runs = {}
    for attn in ("sdpa", "eager"):
        model = make_tiny_model("llama-gqa", attn=attn)
        cache = HeavyHitterKVCache(model, 10, 6)
        runs[attn] = (stream(model, ids, cache, 3), cache.layers[1].keys)
    torch.testing.assert_close(runs["sdpa"][0], runs["eager"][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(runs["sdpa"][1], runs["eager"][1])


@pytest.mark.parametrize("chunk", [1, 4, 33])
def test_memory_is_bounded(chunk):
    model = make_tiny_model("llama")
    cache = HeavyHitterKVCache(model, 9, 7)
    ids = random_ids(100)
    with torch.no_grad():
        for s in range(0, 100, chunk):
            model(ids[:, s : s + chunk], past_key_values=cache)
            assert cache.layers[0].keys.shape[2] == min(s + chunk, 16)
        model(ids[:, :1], past_key_values=cache)  # a decoding step: evicts in place
    # Per layer: 17 slots (the budget and the slot the next step refills) of keys + values (4 heads x 16 x 4
    # bytes each), of int32 token positions and of float32 scores; two int64 counters; the victim per head.
    slots = 4 * 17
    assert cache.nbytes == 2 * (slots * 16 * 4 * 2 + slots * 4 + slots * 4 + 2 * 8 + 4 * 8)


def test_left_padded_rows_match_their_unpadded_runs():
    model = make_tiny_model("llama-gqa")
    assert_left_padded_rows_match_unpadded_runs(
        model, lambda: HeavyHitterKVCache(model, 6, 6), length=26, pads=(0, 4, 15), max_new_tokens=14, seed=8
    )


def test_padding_is_never_a_heavy_hitter():
    model = make_tiny_model("llama")
    ids = random_ids(30, batch=2, seed=1)
    mask = torch.ones_like(ids)
    mask[1, :10] = 0
    cache = HeavyHitterKVCache(model, 8, 4)
    with torch.no_grad():
        model(ids, attention_mask=mask, past_key_values=cache)
    padding_key = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, attention_mask=mask, past_key_values=padding_key)
    padded = padding_key.layers[0].keys[1, :, :10]  # [H, 10, D]
    held = cache.layers[0].keys[1]  # [H, 12, D]
    matches = (held[:, :, None, :] == padded[:, None, :, :]).all(-1)
    assert not matches.any()
    assert int(cache.layers[0].cached_real[1]) == 12


def test_model_behaves_as_before_after_serving_heavy_hitter_caches():
    model = make_tiny_model("llama")
    first, second = random_ids(40, seed=1), random_ids(40, seed=2)
    before = stream(model, first, DynamicCache(config=model.config), 5)
    fresh = make_tiny_model("llama")
    h2o_before = stream(fresh, second, HeavyHitterKVCache(fresh, 6, 6), 5)
    stream(model, first, HeavyHitterKVCache(model, 8, 4), 5)
    assert torch.equal(stream(model, first, DynamicCache(config=model.config), 5), before)
    assert torch.equal(stream(model, second, HeavyHitterKVCache(model, 6, 6), 5), h2o_before)


def test_a_cache_used_with_another_model_is_refused():
    model, other = make_tiny_model("llama"), make_tiny_model("llama")
    with pytest.raises(RuntimeError, match="got no queries for this layer"):
        stream(other, random_ids(10), HeavyHitterKVCache(model, 4, 4), 5)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"heavy_budget": -1}, "heavy_budget must be a number of tokens >= 0 or a fraction .*, got -1"),
        ({"recent_budget": 2.5}, "recent_budget=2.5 is a fraction of the tokens seen, which must lie in"),
        ({"heavy_budget": 0, "recent_budget": 0}, "must be at least 1"),
    ],
)
def test_bad_options_are_named(llama, options, message):
    with pytest.raises(ValueError, match=message):
        HeavyHitterKVCache(llama, **options)


@pytest.mark.parametrize("block_elements", [1, 3000])
def test_scores_computed_in_small_query_blocks_are_the_same(monkeypatch, block_elements):
    # 1 element forces one query per block; 3000 a few queries per block with a ragged last block.
    monkeypatch.setattr("hf_kvcache.strategies.scoring.SCORE_BLOCK_ELEMENTS", block_elements)
    model = make_tiny_model("llama-gqa")
    ids = random_ids(40, batch=2, seed=4)
    cache = HeavyHitterKVCache(model, heavy_budget=30, recent_budget=10)
    stream(model, ids, cache, 40)
    for layer in (0, 1):
        torch.testing.assert_close(
            cache.layers[layer].scores, grouped_eager_attention("llama-gqa", ids, layer)
        )
