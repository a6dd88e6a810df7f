import pytest
import torch
from transformers import DynamicCache

from hf_kvcache import SnapKVCache
from tests.conftest import assert_left_padded_rows_match_unpadded_runs, make_tiny_model, random_ids
from tests.helpers import eager_weights


def reference_scores(weights, groups, window, kernel):
    """SnapKV's scores from one cache-free eager forward: per KV head, the attention each token before the
    observation window gets from the window's queries (summed over them and the group's query heads), then
    max-pooled over ``kernel`` neighbouring positions. ``[H_kv, prefix]``."""
    _, heads, length, _ = weights.shape
    votes = weights[0, :, -window:, : length - window].sum(1)  # [H_q, prefix]
    votes = votes.reshape(heads // groups, groups, -1).sum(1)  # [H_kv, prefix]
    half = kernel // 2
    return torch.stack(
        [votes[:, max(0, i - half) : i + half + 1].amax(-1) for i in range(votes.shape[-1])], -1
    )


def held_positions(held_keys, all_keys):
    """Token index of each held key row ``[K, D]`` among ``all_keys`` ``[T, D]`` (keys are distinct)."""
    matches = (held_keys[:, None, :] - all_keys[None, :, :]).abs().amax(-1) < 1e-5  # [K, T]
    assert (matches.sum(-1) == 1).all()
    return matches.float().argmax(-1)


@pytest.mark.parametrize("arch", ["llama", "llama-gqa", "qwen3", "phi3"])
@pytest.mark.parametrize("kernel", [1, 5])
def test_prompt_compression_matches_eager_attention_reference(arch, kernel):
    model = make_tiny_model(arch)
    length, budget, window = 50, 20, 6
    ids = random_ids(length, seed=6)
    cache, reference = SnapKVCache(model, budget, window, kernel), DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, past_key_values=cache)
        model(ids, past_key_values=reference)
    groups = model.config.num_attention_heads // model.config.num_key_value_heads
    for layer in (0, 1):
        scores = reference_scores(eager_weights(arch, ids, layer), groups, window, kernel)
        for head in range(scores.shape[0]):
            held = held_positions(cache.layers[layer].keys[0, head], reference.layers[layer].keys[0, head])
            assert torch.equal(held[-window:], torch.arange(length - window, length))
            chosen = torch.zeros(length - window, dtype=torch.bool)
            chosen[held[:-window]] = True
            assert int(chosen.sum()) == budget - window
            # Pooling makes ties, which either side may break its own way: the kept scores must dominate.
            assert scores[head][chosen].min() >= scores[head][~chosen].max() - 1e-6, (layer, head)
            if kernel == 1:  # no pooling, no ties: exactly the reference's top entries
                top = scores[head].topk(budget - window).indices.sort().values
                assert torch.equal(held[:-window], top)


def test_generated_tokens_are_appended_uncompressed():
    model = make_tiny_model("llama-gqa")
    ids = random_ids(40, seed=1)
    cache = SnapKVCache(model, budget=16, window_size=4)
    out = model.generate(ids, past_key_values=cache, max_new_tokens=9, min_new_tokens=9, do_sample=False)
    # The last generated token is returned but never fed back, so 8 decoding steps were cached.
    assert cache.layers[0].keys.shape[-2] == 16 + 8
    assert cache.get_seq_length() == 40 + 8 and out.shape[1] == 49
    reference = DynamicCache(config=model.config)
    with torch.no_grad():
        model(out[:, :-1], past_key_values=reference)
    # Decoded tokens are held exactly as computed: the same as a full cache's where the history agrees.
    torch.testing.assert_close(cache.layers[0].keys[..., -8:, :], reference.layers[0].keys[..., -8:, :])


def test_a_prompt_within_budget_is_kept_whole():
    model = make_tiny_model("llama")
    cache = SnapKVCache(model, budget=32, window_size=4)
    with torch.no_grad():
        model(random_ids(30), past_key_values=cache)
    assert cache.layers[0].keys.shape[-2] == 30


def test_left_padded_rows_match_their_unpadded_runs():
    model = make_tiny_model("llama-gqa")
    assert_left_padded_rows_match_unpadded_runs(
        model, lambda: SnapKVCache(model, 12, 4, 3), length=26, pads=(0, 4, 15), max_new_tokens=10, seed=8
    )


@pytest.mark.parametrize(
    "options, message",
    [
        ({"budget": 0}, "budget must be an integer >= 32 \\(the window_size=32 it protects\\), got 0"),
        (
            {"budget": 16, "window_size": 17},
            "budget must be an integer >= 17 \\(the window_size=17 it protects",
        ),
        ({"window_size": 0}, "window_size must be an integer >= 1, got 0"),
        ({"kernel_size": 4}, "kernel_size must be an odd integer >= 1, got 4"),
        (
            {"budget": 64, "max_prefill": 63},
            "max_prefill must be an integer >= 64 \\(the budget and the window",
        ),
    ],
)
def test_bad_options_are_named(llama, options, message):
    with pytest.raises(ValueError, match=message):
        SnapKVCache(llama, **options)


@pytest.mark.parametrize("pads", [(0,), (0, 6)])
def test_a_deferred_prompt_keeps_what_one_forward_over_the_whole_prompt_keeps(pads):
    """With max_prefill, a prompt fed in chunks is compressed by its own last queries at the first one-token
    forward: the prompt entries held then equal those SnapKV keeps from one forward over the whole prompt,
    and differ from chunk-by-chunk compression. (That step's own token attended over the whole prompt, so
    past layer 0 its entry differs.)"""
    from hf_kvcache import build_cache, prefill
    from tests.conftest import left_padded_ids
    from tests.helpers import held_entries

    model = make_tiny_model("llama-gqa")
    ids, mask = left_padded_ids(60, pads=pads, seed=11)
    spec = "snapkv:budget=16,window_size=4,kernel_size=3"
    runs = {}
    for name, chunk, options in [
        ("one forward", 64, ""),
        ("deferred", 16, ",max_prefill=100"),
        ("per chunk", 16, ""),
    ]:
        cache = build_cache(spec + options, model)
        prefill(model, ids, cache, chunk_size=chunk, attention_mask=mask)
        with torch.no_grad():
            model(ids[:, -1:], attention_mask=mask, past_key_values=cache)
        assert all(layer.stored == 17 and layer.window_queries is None for layer in cache.layers)
        runs[name] = torch.cat([held_entries(layer)[0][:, :, :-1] for layer in cache.layers])
    torch.testing.assert_close(runs["deferred"], runs["one forward"], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(runs["per chunk"], runs["one forward"], atol=1e-3)


def test_a_deferred_prompt_past_max_prefill_is_compressed_and_its_window_still_votes():
    from hf_kvcache import build_cache

    model = make_tiny_model("llama-gqa")
    ids = random_ids(80, seed=12)
    cache = build_cache("snapkv:budget=16,window_size=4,kernel_size=3,max_prefill=40", model)
    held = []
    with torch.no_grad():
        for start in range(0, 64, 16):
            model(ids[:, start : start + 16], past_key_values=cache)
            held.append(cache.layers[0].stored)
        assert held == [16, 32, 16, 32]  # the third chunk would have made 48 > 40
        assert cache.layers[0].window_queries.shape[-2] == 4
        model(ids[:, 64:65], past_key_values=cache)
    assert cache.layers[0].stored == 17 and cache.layers[0].window_queries is None
    for _ in range(3):  # generated tokens are appended
        with torch.no_grad():
            model(ids[:, 65:66], past_key_values=cache)
    assert cache.layers[0].stored == 20
