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
    ],
)
def test_bad_options_are_named(llama, options, message):
    with pytest.raises(ValueError, match=message):
        SnapKVCache(llama, **options)
