"""``snapkv:head_budgets=adaptive`` (AdaKV on SnapKV): each layer's budget goes to the window's highest
scores whatever their KV head, against an eager cache-free reference; the ragged store's honest size; the
end of the prompt by a one-token forward or by ``compress_context``; DynamicCache where nothing is lost;
padding; errors."""

import pytest
import torch
from transformers import DynamicCache

from hf_kvcache import build_cache, prefill
from tests.conftest import assert_left_padded_rows_match_unpadded_runs, make_tiny_model, random_ids
from tests.helpers import check_generates_in_every_mode, eager_weights
from tests.test_adaptive_context import assert_holds
from tests.test_snapkv import reference_scores

LENGTH, BUDGET, WINDOW = 50, 20, 6
SPEC = f"snapkv:budget={BUDGET},window_size={WINDOW},kernel_size=1,head_budgets=adaptive"


def reference_keep(weights: torch.Tensor, groups: int) -> list[set[int]]:
    """Per KV head, the token positions a layer keeps: the window, and of the rest the highest scores of all
    heads together, ``BUDGET`` times the heads in all (no pooling, so no ties)."""
    scores = reference_scores(weights, groups, WINDOW, 1)  # [H_kv, prefix]
    heads = scores.shape[0]
    chosen = scores.flatten().topk(heads * (BUDGET - WINDOW)).indices
    keep = [set(range(LENGTH - WINDOW, LENGTH)) for _ in range(heads)]
    for index in chosen.tolist():
        keep[index // scores.shape[1]].add(index % scores.shape[1])
    return keep


@pytest.mark.parametrize("end", ["one-token forward", "compress_context"])
@pytest.mark.parametrize("chunk", [LENGTH, 16])
def test_each_layer_keeps_its_highest_window_scores_over_all_heads_held_ragged(end, chunk):
    arch = "llama-gqa"
    model = make_tiny_model(arch)
    ids = random_ids(LENGTH + 1, seed=6)
    cache, reference = build_cache(SPEC, model), DynamicCache(config=model.config)
    with torch.no_grad():
        prefill(
            model, ids[:, :LENGTH], cache, chunk_size=chunk, leave_last=False
        )  # held whole until the prompt ends
        assert cache.layers[0].stored == LENGTH and cache.layers[0].window_queries.shape[-2] == WINDOW
        if end == "compress_context":
            cache.compress_context()
            assert cache.layers[0].stored == 0
        model(ids[:, LENGTH:], past_key_values=cache)  # appended after the compressed prompt
        model(ids[:, :LENGTH], past_key_values=reference)
    groups = model.config.num_attention_heads // model.config.num_key_value_heads
    expected = [reference_keep(eager_weights(arch, ids[:, :LENGTH], index), groups) for index in (0, 1)]
    uneven = assert_holds(cache, reference, expected)
    for layer in cache.layers:
        assert layer.ragged.counts.sum() == BUDGET * layer.ragged.counts.shape[1]
        assert layer.stored == 1  # the new token, in the tail
    assert uneven  # the split is by score, not even


@pytest.mark.parametrize("arch", ["llama-gqa", "gemma2"])
def test_a_budget_above_the_prompt_is_dynamic_cache(arch):
    model = make_tiny_model(arch)
    ids = random_ids(30, seed=2)
    greedy = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, output_scores=True)
    greedy["return_dict_in_generate"] = True
    expected = model.generate(ids, past_key_values=DynamicCache(config=model.config), **greedy)
    got = model.generate(
        ids, past_key_values=build_cache("snapkv:budget=64,head_budgets=adaptive", model), **greedy
    )
    assert torch.equal(got.sequences, expected.sequences)
    torch.testing.assert_close(torch.stack(got.scores), torch.stack(expected.scores), rtol=1e-4, atol=1e-4)


def test_left_padded_rows_match_their_unpadded_runs():
    model = make_tiny_model("llama-gqa")
    spec = "snapkv:budget=12,window_size=4,kernel_size=3,head_budgets=adaptive"
    assert_left_padded_rows_match_unpadded_runs(
        model, lambda: build_cache(spec, model), length=26, pads=(0, 4, 15), max_new_tokens=10, seed=8
    )


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_adaptive_snapkv_generates_in_every_mode(arch):
    check_generates_in_every_mode(
        make_tiny_model(arch), "snapkv:budget=8,window_size=4,head_budgets=adaptive"
    )


def test_uniform_compress_context_keeps_what_the_first_one_token_forward_keeps():
    model = make_tiny_model("llama-gqa")
    ids = random_ids(61, seed=11)
    spec = "snapkv:budget=16,window_size=4,kernel_size=3,max_prefill=100"
    held = []
    for early in (False, True):
        cache = build_cache(spec, model)
        with torch.no_grad():
            prefill(model, ids[:, :60], cache, chunk_size=16, leave_last=False)
            if early:
                cache.compress_context()
                assert cache.layers[0].stored == 16
            model(ids[:, 60:], past_key_values=cache)
        held.append(torch.cat([layer.keys[:, :, :16] for layer in cache.layers]))
    torch.testing.assert_close(held[0], held[1])


def test_errors_name_the_bad_value_and_the_way_out(monkeypatch):
    with pytest.raises(
        ValueError, match="head_budgets must be one of \\['uniform', 'adaptive'\\], got 'even'"
    ):
        build_cache("snapkv:head_budgets=even", make_tiny_model("llama"))
    model = make_tiny_model("llama-gqa")
    with monkeypatch.context() as patch:
        patch.setattr("hf_kvcache.base.install_storage_attention", lambda *args: "it runs flash attention")
        with pytest.raises(ValueError, match="it runs flash attention; use snapkv:head_budgets=uniform"):
            build_cache("snapkv:head_budgets=adaptive", model)
    cache = build_cache(SPEC, model)
    with torch.no_grad():
        model(random_ids(LENGTH), past_key_values=cache)
        cache.compress_context()
    with pytest.raises(ValueError, match="different number of entries per KV head.*layer.ragged"):
        _ = cache.layers[0].keys


def test_compressing_after_the_model_is_gone_says_so():
    model = make_tiny_model("llama-gqa")
    cache = build_cache(SPEC, model)
    with torch.no_grad():
        model(random_ids(LENGTH), past_key_values=cache)
    cache.model_ref = lambda: None  # what a weak reference returns once the model was collected
    with pytest.raises(RuntimeError, match="the model this cache was built for no longer exists"):
        cache.compress_context()
