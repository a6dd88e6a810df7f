"""``head_budgets=adaptive`` on knorm and expected attention: the prompt is held whole, then each layer (or
every layer together) keeps its highest priorities whatever their KV head, against cache-free references in
float64; the ragged store's honest size; DynamicCache where nothing is lost; padding; errors."""

import pytest
import torch
from transformers import DynamicCache

from hf_kvcache import build_cache, cache_nbytes, load_cache, prefill, save_cache
from tests.conftest import (
    MORE_ARCHITECTURES,
    VOCAB,
    assert_left_padded_rows_match_unpadded_runs,
    left_padded_ids,
    make_tiny_model,
    random_ids,
)
from tests.helpers import check_generates_in_every_mode, check_generates_like_dynamic_cache, eager_weights
from tests.test_expected_attention import expected_priorities
from tests.test_snapkv import held_positions

LENGTH, BUDGET, SINKS, RECENT = 40, 12, 2, 3
KNORM = f"knorm:budget={BUDGET},num_sink_tokens={SINKS},recent={RECENT},head_budgets=adaptive"
EXPECTED = (
    f"expected-attention:budget={BUDGET},num_sink_tokens={SINKS},recent={RECENT},horizon=32,"
    "head_budgets=adaptive"
)
# A spec per strategy that compresses the tiny model's prompts, and one that loses nothing on them.
LOSSY = {
    "knorm": KNORM,
    "expected-attention": EXPECTED + ",layer_budgets=adaptive",
    "heavy-hitter": "heavy-hitter:heavy_budget=6,recent_budget=4,head_budgets=adaptive",
    "tova": f"tova:budget={BUDGET},head_budgets=adaptive,layer_budgets=adaptive",
}
LOSSLESS = {
    "knorm": "knorm:budget=64,recent=16,head_budgets=adaptive,layer_budgets=adaptive",
    "expected-attention": (
        "expected-attention:budget=64,recent=16,head_budgets=adaptive,layer_budgets=adaptive"
    ),
    "heavy-hitter": "heavy-hitter:heavy_budget=48,recent_budget=16,head_budgets=adaptive",
    "tova": "tova:budget=64,head_budgets=adaptive",
}


def reference_keep(
    priorities: list[torch.Tensor], sinks: int = SINKS, recent: int = RECENT, budget: int = BUDGET
) -> list[list[set[int]]]:
    """Per layer and KV head, the token positions kept when ``priorities`` (``[H, T]`` per layer) share one
    budget of ``budget`` per head: sinks and recent first, then the highest priorities of all."""
    protected = set(range(sinks)) | set(range(LENGTH - recent, LENGTH))
    keep = [[set(protected) for _ in range(p.shape[0])] for p in priorities]
    free = [
        (p[head, t].item(), layer, head, t)
        for layer, p in enumerate(priorities)
        for head in range(p.shape[0])
        for t in range(LENGTH)
        if t not in protected
    ]
    room = sum(p.shape[0] for p in priorities) * (budget - len(protected))
    for _, layer, head, t in sorted(free, reverse=True)[:room]:
        keep[layer][head].add(t)
    return keep


def distinct_ids(length: int, seed: int) -> torch.Tensor:
    """Token ids without repeats: a repeated token has the same layer-0 key norm (RoPE keeps norms), a tie."""
    return (torch.randperm(VOCAB - 3, generator=torch.Generator().manual_seed(seed))[:length] + 3)[None]


def assert_holds(cache, reference: DynamicCache, expected: list[list[set[int]]]) -> bool:
    """The ragged store of each layer holds exactly the expected entries, in age order; whether uneven."""
    uneven = False
    for index, keep in enumerate(expected):
        layer = cache.layers[index]
        counts = layer.ragged.counts[0].tolist()
        assert counts == [len(k) for k in keep]
        uneven |= len(set(counts)) > 1
        start = 0
        for head, count in enumerate(counts):
            held = held_positions(
                layer.ragged.keys[start : start + count], reference.layers[index].keys[0, head]
            )
            assert set(held.tolist()) == keep[head] and torch.equal(held, held.sort().values)
            start += count
    return uneven


def fill(model, spec, ids, chunk, end):
    cache, reference = build_cache(spec, model), DynamicCache(config=model.config)
    with torch.no_grad():
        prefill(model, ids[:, :LENGTH], cache, chunk_size=chunk, leave_last=False)
        assert cache.layers[0].stored == LENGTH  # held whole until the prompt ends
        if end == "compress_context":
            cache.compress_context()
            assert cache.layers[0].stored == 0
        model(ids[:, LENGTH:], past_key_values=cache)  # appended after the compressed prompt
        model(ids[:, :LENGTH], past_key_values=reference)
    assert all(layer.stored == 1 for layer in cache.layers)
    return cache, reference


@pytest.mark.parametrize("end", ["one-token forward", "compress_context"])
@pytest.mark.parametrize("chunk", [LENGTH, 16])
@pytest.mark.parametrize("layers", ["uniform", "adaptive"])
def test_knorm_keeps_the_smallest_key_norms_over_all_heads(end, chunk, layers):
    model = make_tiny_model("llama-gqa")
    cache, reference = fill(
        model, f"{KNORM},layer_budgets={layers}", distinct_ids(LENGTH + 1, seed=4), chunk, end
    )
    norms = [-layer.keys[0].double().norm(dim=-1) for layer in reference.layers]
    expected = [reference_keep([n])[0] for n in norms] if layers == "uniform" else reference_keep(norms)
    assert assert_holds(cache, reference, expected)  # the split is by score, not even
    if layers == "adaptive":
        totals = [layer.ragged.counts.sum().item() for layer in cache.layers]
        assert sum(totals) == BUDGET * 2 * len(totals)


@pytest.mark.parametrize("end", ["one-token forward", "compress_context"])
@pytest.mark.parametrize("chunk", [LENGTH, 16])
def test_expected_attention_keeps_the_highest_expected_attention_over_all_heads(end, chunk):
    model = make_tiny_model("llama-gqa")
    attention = model.model.layers[0].self_attn
    projected = []
    hook = attention.q_proj.register_forward_hook(lambda module, args, out: projected.append(out))
    try:
        cache, reference = fill(model, EXPECTED, distinct_ids(LENGTH + 1, seed=6), chunk, end)
    finally:
        hook.remove()
    queries = projected[-1][0].view(LENGTH, -1, attention.head_dim).transpose(0, 1)  # the reference's
    keys, values = reference.layers[0].keys[0], reference.layers[0].values[0]
    priorities = expected_priorities(
        queries,
        keys,
        values,
        LENGTH,
        inv_freq=model.model.rotary_emb.inv_freq,
        horizon=32,
        epsilon=0.02,
        scaling=attention.scaling,
    )
    assert assert_holds(cache, reference, reference_keep([priorities]))


def accumulated_attention(weights: torch.Tensor, groups: int) -> torch.Tensor:
    """H2O's score ``[H_kv, T]``: the attention every query paid each entry, summed over a KV head's query
    heads (``weights`` ``[1, H_q, T, T]`` of an eager forward)."""
    return weights[0].double().sum(1).view(-1, groups, LENGTH).sum(1)


def newest_attention(weights: torch.Tensor, groups: int) -> torch.Tensor:
    """TOVA's score ``[H_kv, T]``: the attention of the last query, summed over a KV head's query heads."""
    return weights[0, :, -1].double().view(-1, groups, LENGTH).sum(1)


@pytest.mark.parametrize("end", ["one-token forward", "compress_context"])
@pytest.mark.parametrize("chunk", [LENGTH, 16])
@pytest.mark.parametrize(
    "spec, score, protected, seed",
    [
        ("heavy-hitter:heavy_budget=9,recent_budget=3,head_budgets=adaptive", accumulated_attention, 3, 2),
        (f"tova:budget={BUDGET},head_budgets=adaptive,layer_budgets=adaptive", newest_attention, 0, 1),
    ],
)
def test_attention_scores_rank_the_prompt_over_all_heads(end, chunk, spec, score, protected, seed):
    arch = "llama-gqa"
    model = make_tiny_model(arch)
    ids = distinct_ids(LENGTH + 1, seed=seed)
    cache, reference = fill(model, spec, ids, chunk, end)
    groups = model.config.num_attention_heads // model.config.num_key_value_heads
    scores = [score(eager_weights(arch, ids[:, :LENGTH], index), groups) for index in (0, 1)]
    if "layer_budgets=adaptive" in spec:
        expected = reference_keep(scores, 0, protected)
    else:
        expected = [reference_keep([s], 0, protected)[0] for s in scores]
    assert assert_holds(cache, reference, expected)
    # H2O's accumulated attention now describes the tail alone (the new token).
    assert all(getattr(layer, "accumulated", torch.zeros(1, 1, 1)).shape[-1] == 1 for layer in cache.layers)


@pytest.mark.parametrize(
    "spec, budget", [(KNORM, BUDGET), ("snapkv:budget=20,window_size=6,head_budgets=adaptive", 20)]
)
def test_the_ragged_store_is_counted_entry_by_entry(spec, budget):
    model = make_tiny_model("llama-gqa")
    cache = build_cache(spec, model)
    with torch.no_grad():
        model(random_ids(LENGTH, seed=3), past_key_values=cache)
        cache.compress_context()
    heads = model.config.num_key_value_heads
    dim = model.config.hidden_size // model.config.num_attention_heads
    # float32 keys and values of `budget` entries per head on average, and an int64 count per head.
    assert all(layer.ragged.nbytes == 2 * budget * heads * dim * 4 + heads * 8 for layer in cache.layers)
    # Besides them: each layer's empty tail and two int64 row counters (real tokens seen and held).
    assert cache.nbytes == sum(layer.ragged.nbytes + 16 for layer in cache.layers)


@pytest.mark.parametrize("arch", ["llama-gqa", "gemma2"])
@pytest.mark.parametrize("strategy", sorted(LOSSLESS))
def test_a_budget_above_the_prompt_is_dynamic_cache(arch, strategy):
    model = make_tiny_model(arch)
    ids = random_ids(30, seed=2)
    greedy = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, output_scores=True)
    greedy["return_dict_in_generate"] = True
    expected = model.generate(ids, past_key_values=DynamicCache(config=model.config), **greedy)
    spec = LOSSLESS[strategy]
    got = model.generate(ids, past_key_values=build_cache(spec, model), **greedy)
    assert torch.equal(got.sequences, expected.sequences)
    torch.testing.assert_close(torch.stack(got.scores), torch.stack(expected.scores), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("spec", sorted(LOSSY.values()))
def test_left_padded_rows_match_their_unpadded_runs(spec):
    model = make_tiny_model("llama-gqa")
    assert_left_padded_rows_match_unpadded_runs(
        model, lambda: build_cache(spec, model), length=26, pads=(0, 4, 15), max_new_tokens=10, seed=8
    )


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("spec", sorted(LOSSY.values()))
def test_adaptive_budgets_generate_in_every_mode(arch, spec):
    check_generates_in_every_mode(make_tiny_model(arch), spec)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("knorm:head_budgets=even", "head_budgets must be one of \\['uniform', 'adaptive'\\], got 'even'"),
        (
            "expected-attention:layer_budgets=adaptive",
            "layer_budgets=adaptive .* needs head_budgets=adaptive, got head_budgets='uniform'",
        ),
        (
            "knorm:budget=20,recent=11,head_budgets=adaptive+quantized:nbits=2,group_size=8,residual_length=4",
            "knorm:head_budgets=adaptive .* does not compose with \\+quantized",
        ),
        ("knorm:layer_budgets=steep", "layer_budgets must be one of \\['uniform', 'pyramid', 'adaptive'\\]"),
        (
            "heavy-hitter:heavy_budget=8,recent_budget=8,head_budgets=adaptive+quantized:group_size=8,"
            "residual_length=4",
            "heavy-hitter:head_budgets=adaptive .* does not compose with \\+quantized",
        ),
        ("tova:head_budgets=per-layer", "head_budgets must be one of \\['uniform', 'adaptive'\\]"),
    ],
)
def test_bad_options_are_named(spec, message):
    with pytest.raises(ValueError, match=message):
        build_cache(spec, make_tiny_model("llama"))


def test_a_model_the_entry_point_cannot_serve_is_named(monkeypatch):
    monkeypatch.setattr("hf_kvcache.base.install_storage_attention", lambda *args: "it runs flash attention")
    with pytest.raises(
        ValueError, match="it runs flash attention; use expected-attention:head_budgets=uniform"
    ):
        build_cache("expected-attention:head_budgets=adaptive", make_tiny_model("llama-gqa"))


@pytest.mark.parametrize("arch", sorted(MORE_ARCHITECTURES))
@pytest.mark.parametrize("strategy", sorted(LOSSY))
def test_every_architecture_generates_and_loses_nothing_under_a_budget_above_the_prompt(arch, strategy):
    model = make_tiny_model(arch)
    check_generates_like_dynamic_cache(model, LOSSLESS[strategy], "greedy")
    check_generates_in_every_mode(model, LOSSY[strategy])


@pytest.mark.parametrize("spec", sorted(LOSSY.values()))
def test_a_saved_compressed_cache_continues_token_for_token(tmp_path, spec):
    model = make_tiny_model("llama-gqa")
    ids, mask = left_padded_ids(30, pads=(0, 4, 11), seed=2)
    original = prefill(model, ids, build_cache(spec, model), chunk_size=7, attention_mask=mask)
    original.compress_context()
    restored = load_cache(save_cache(original, tmp_path / "cache.safetensors"), model)
    assert all(layer.context_done and layer.holds_ragged for layer in restored.layers)
    assert cache_nbytes(restored) == cache_nbytes(original)
    greedy = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, attention_mask=mask)
    expected = model.generate(ids, past_key_values=original, **greedy)
    assert torch.equal(model.generate(ids, past_key_values=restored, **greedy), expected)
