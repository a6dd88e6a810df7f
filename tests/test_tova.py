import pytest
import torch
from transformers import DynamicCache

from hf_kvcache import TOVAKVCache
from tests.conftest import assert_left_padded_rows_match_unpadded_runs, make_tiny_model, random_ids
from tests.helpers import eager_weights, stream


def simulate_tova_layer0(weights, groups, budget):
    """Reference TOVA on layer 0, token by token, from full-attention weights alone.

    Layer 0's keys and queries do not depend on what was evicted, so the attention the cache computes over its
    kept entries is each query head's full-attention row restricted to them and renormalized.
    Returns the kept token indices per KV head after the last token.
    """
    _, heads, length, _ = weights.shape
    kv_heads = heads // groups
    kept = [[] for _ in range(kv_heads)]
    for t in range(length):
        for kv in range(kv_heads):
            candidates = torch.tensor(kept[kv] + [t])
            rows = weights[0, kv * groups : (kv + 1) * groups, t, candidates]  # [G, len]
            score = (rows / rows.sum(-1, keepdim=True)).sum(0)
            if len(candidates) > budget:
                drop = int(score.argmin())
                candidates = torch.cat([candidates[:drop], candidates[drop + 1 :]])
            kept[kv] = candidates.tolist()
    return kept


@pytest.mark.parametrize("arch", ["llama", "llama-gqa"])
def test_token_by_token_eviction_follows_the_reference(arch):
    model = make_tiny_model(arch)
    ids = random_ids(40, seed=9)
    budget = 10
    cache = TOVAKVCache(model, budget=budget)
    stream(model, ids, cache, 1)
    reference = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, past_key_values=reference)
    groups = model.config.num_attention_heads // model.config.num_key_value_heads
    kept = simulate_tova_layer0(eager_weights(arch, ids, 0), groups, budget)
    for head, indices in enumerate(kept):
        expected = reference.layers[0].keys[0, head, sorted(indices)]
        torch.testing.assert_close(cache.layers[0].keys[0, head], expected)
    assert cache.layers[1].keys.shape[-2] == budget and cache.get_seq_length() == 40


@pytest.mark.parametrize("arch", ["llama-gqa", "qwen3", "phi3"])
def test_prefill_keeps_the_entries_the_last_query_attends_to_most(arch):
    model = make_tiny_model(arch)
    ids = random_ids(50, seed=6)
    budget = 12
    cache, reference = TOVAKVCache(model, budget=budget), DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, past_key_values=cache)  # one prefill: every layer attends over all 50, then evicts
        model(ids, past_key_values=reference)
    groups = model.config.num_attention_heads // model.config.num_key_value_heads
    for layer in (0, 1):
        last = eager_weights(arch, ids, layer)[0, :, -1]  # [H_q, 50]
        scores = last.reshape(-1, groups, 50).sum(1)
        for head in range(scores.shape[0]):
            kept = scores[head].topk(budget).indices.sort().values
            expected = reference.layers[layer].keys[0, head, kept]
            torch.testing.assert_close(cache.layers[layer].keys[0, head], expected)


def test_memory_is_the_budget_and_nothing_else():
    model = make_tiny_model("llama")
    cache = TOVAKVCache(model, budget=9)
    ids = random_ids(60)
    with torch.no_grad():
        for s in range(0, 60, 7):
            model(ids[:, s : s + 7], past_key_values=cache)
            assert cache.layers[0].keys.shape[2] == min(s + 7, 9)
        model(ids[:, :1], past_key_values=cache)  # a decoding step: evicts in place
    # Per layer: 10 slots (the budget and the slot the next step refills) of keys + values (4 heads x 16 x 4
    # bytes each) and int32 token positions; two int64 counters; the victim per head. No score is held.
    slots = 4 * 10
    assert cache.nbytes == 2 * (slots * 16 * 4 * 2 + slots * 4 + 2 * 8 + 4 * 8)


def test_left_padded_rows_match_their_unpadded_runs():
    model = make_tiny_model("llama-gqa")
    assert_left_padded_rows_match_unpadded_runs(
        model, lambda: TOVAKVCache(model, budget=9), length=26, pads=(0, 4, 15), max_new_tokens=14, seed=8
    )


@pytest.mark.parametrize(
    "budget, message",
    [
        (0, "budget must be an integer >= 1, got 0"),
        (2.5, r"budget=2.5 is a fraction of the tokens seen, which must lie in \(0, 1\]"),
        ("8", r"budget must be a number of tokens >= 1 or a fraction in \(0, 1\], got '8'"),
    ],
)
def test_bad_budget_is_named(llama, budget, message):
    with pytest.raises(ValueError, match=message):
        TOVAKVCache(llama, budget=budget)
