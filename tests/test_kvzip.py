"""KVzip against a recomputation from scratch: each reconstruction pass is one cache-free eager forward over
the context followed by the pass, whose attention weights give the scores; what is kept follows from them.
The ragged store is checked against dense attention with the evicted entries masked out."""

import pytest
import torch
from transformers import AutoTokenizer, DynamicCache

from hf_kvcache import build_cache, prefill
from hf_kvcache.strategies import ragged
from hf_kvcache.strategies.kvzip import KVzipCache
from hf_kvcache.strategies.ragged import RaggedEntries, highest_entries
from hf_kvcache.strategies.reconstruction import reconstruction_prompt_ids
from tests.conftest import left_padded_ids, make_tiny_model, random_ids

CONTEXT, CHUNK, BUDGET = 40, 16, 10


def reference_scores(ids: torch.Tensor, prompt: list[int], chunk: int) -> torch.Tensor:
    """``[layers, H_kv, N]``: per context entry, the largest eager attention weight any query of any
    reconstruction pass (``prompt`` then ``chunk`` context tokens, after the whole context) gives it, over the
    query heads of its KV head. Each pass is a fresh forward over context + pass, no cache."""
    eager = make_tiny_model("llama-gqa", attn="eager")
    length, kv_heads = ids.shape[1], eager.config.num_key_value_heads
    best = None
    with torch.no_grad():
        for start in range(0, length, chunk):
            fed = torch.cat([ids, torch.tensor([prompt], dtype=torch.long), ids[:, start : start + chunk]], 1)
            weights = eager(fed, output_attentions=True).attentions
            peaks = torch.stack(
                [w[0, :, length:, :length].amax(1).view(kv_heads, -1, length).amax(1) for w in weights]
            )
            best = peaks if best is None else torch.maximum(best, peaks)
    return best


def compressed(spec: str, ids: torch.Tensor, mask=None, model=None) -> KVzipCache:
    model = model or make_tiny_model("llama-gqa")
    cache = build_cache(spec, model)
    prefill(model, ids, cache, chunk_size=CHUNK, attention_mask=mask, leave_last=False)
    cache.compress_context()
    return cache


@pytest.mark.parametrize("prompt", [[], [5, 9, 13]])
def test_uniform_budgets_keep_each_heads_highest_reconstruction_scores(monkeypatch, prompt):
    ids = random_ids(CONTEXT, seed=3)
    monkeypatch.setattr(
        "hf_kvcache.strategies.kvzip.prompt_ids", lambda *a: torch.tensor([prompt], dtype=torch.long)
    )
    spec = f"kvzip:budget={BUDGET},chunk_size={CHUNK},head_budgets=uniform,layer_budgets=uniform"
    cache = compressed(spec, ids)
    scores = reference_scores(ids, prompt, CHUNK)
    for layer, layer_scores in zip(cache.layers, scores, strict=True):
        kept = layer.slot_positions[0].sort(dim=-1).values
        expected = layer_scores.topk(BUDGET, dim=-1).indices.sort(dim=-1).values
        assert torch.equal(kept.long(), expected)
        assert layer.stored == BUDGET and layer.context_ids is None


def test_adaptive_budgets_keep_the_highest_scores_of_all_layers_and_heads_held_ragged():
    ids = random_ids(CONTEXT, seed=4)
    model = make_tiny_model("llama-gqa")
    cache = compressed(f"kvzip:budget={BUDGET},chunk_size={CHUNK},prompt=none", ids, model=model)
    scores = reference_scores(ids, [], CHUNK)  # [layers, H, N]
    threshold = scores.flatten().topk(BUDGET * scores.shape[0] * scores.shape[1]).values[-1]
    reference = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, past_key_values=reference)
    counts = []
    for index, layer in enumerate(cache.layers):
        keep = scores[index] >= threshold  # [H, N]
        assert torch.equal(layer.ragged.counts[0], keep.sum(-1))
        expected = reference.layers[index].keys[0][keep]  # heads in order, each in age order
        torch.testing.assert_close(layer.ragged.keys, expected, rtol=1e-5, atol=1e-5)
        counts.append(layer.ragged.counts)
    counts = torch.cat(counts)
    assert int(counts.sum()) == BUDGET * counts.numel() and len(set(counts.flatten().tolist())) > 1
    # Honest bytes: the entries held, their counts, nothing else (the prompt's ids are gone).
    entries = sum(layer.ragged.keys.nbytes + layer.ragged.values.nbytes for layer in cache.layers)
    bookkeeping = sum(
        8 * (2 * layer.real_seen.numel() + layer.ragged.counts.numel()) for layer in cache.layers
    )
    assert cache.nbytes == entries + bookkeeping
    with pytest.raises(ValueError, match="different number of entries per KV head"):
        cache.layers[0].held()


def protect(scores: torch.Tensor, sinks: int, recent: int) -> torch.Tensor:
    """``scores`` with the first ``sinks`` and last ``recent`` entries raised above any attention weight."""
    raised = scores.clone()
    raised[..., :sinks] = raised[..., raised.shape[-1] - recent :] = 10.0
    return raised


@pytest.mark.parametrize("layer_budgets", ["adaptive", "uniform"])
def test_protected_sinks_and_recent_entries_are_kept_in_every_head_out_of_the_budget(layer_budgets):
    ids = random_ids(CONTEXT, seed=4)
    spec = f"kvzip:budget={BUDGET},chunk_size={CHUNK},prompt=none,layer_budgets={layer_budgets}"
    cache = compressed(f"{spec},num_sink_tokens=2,recent=3", ids)
    scores = protect(reference_scores(ids, [], CHUNK), 2, 3)  # [layers, H, N]
    pools = [scores] if layer_budgets == "adaptive" else list(scores)
    thresholds = [pool.flatten().topk(BUDGET * pool[..., 0].numel()).values[-1] for pool in pools]
    for index, layer in enumerate(cache.layers):
        keep = scores[index] >= thresholds[0 if layer_budgets == "adaptive" else index]
        assert keep[:, :2].all() and keep[:, -3:].all()
        assert torch.equal(layer.ragged.counts[0], keep.sum(-1))
    unprotected = compressed(spec, ids)
    pairs = zip(cache.layers, unprotected.layers, strict=True)
    assert any(not torch.equal(a.ragged.counts, b.ragged.counts) for a, b in pairs)


def test_uniform_head_budgets_keep_the_protected_entries_then_the_highest_scores():
    ids = random_ids(CONTEXT, seed=3)
    spec = f"kvzip:budget={BUDGET},chunk_size={CHUNK},prompt=none,head_budgets=uniform,layer_budgets=uniform"
    cache = compressed(f"{spec},num_sink_tokens=1,recent=0.1", ids)  # 0.1 of 40: the 4 newest
    scores = protect(reference_scores(ids, [], CHUNK), 1, 4)
    for layer, layer_scores in zip(cache.layers, scores, strict=True):
        kept = layer.slot_positions[0].sort(dim=-1).values
        assert torch.equal(kept.long(), layer_scores.topk(BUDGET, dim=-1).indices.sort(dim=-1).values)


def test_a_left_padded_row_protects_its_first_real_tokens():
    ids, mask = left_padded_ids(CONTEXT, pads=(0, 8), seed=6)
    model = make_tiny_model("llama-gqa")
    spec = f"kvzip:budget={BUDGET},chunk_size={CHUNK},prompt=none,num_sink_tokens=3,recent=2"
    batch, alone = compressed(spec, ids, mask, model), compressed(spec, ids[1:, 8:], model=model)
    reference = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids[1:, 8:], past_key_values=reference)
    for index, (together, single) in enumerate(zip(batch.layers, alone.layers, strict=True)):
        heads = together.ragged.counts.shape[1]
        own = together.ragged.segments()[heads:]
        rows = torch.cat([together.ragged.keys[start:stop] for start, stop in own])
        torch.testing.assert_close(rows, single.ragged.keys, rtol=1e-4, atol=1e-5)
        # In age order, each head's entries start with the row's first 3 tokens and end with its newest 2.
        expected = reference.layers[index].keys[0]  # [H, N, D]
        for head, (start, stop) in enumerate(single.ragged.segments()):
            kept = single.ragged.keys[start:stop]
            torch.testing.assert_close(kept[:3], expected[head, :3], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(kept[-2:], expected[head, -2:], rtol=1e-4, atol=1e-5)


def test_head_budgets_split_each_layers_budget_by_score():
    ids = random_ids(CONTEXT, seed=5)
    cache = compressed(f"kvzip:budget={BUDGET},chunk_size={CHUNK},prompt=none,layer_budgets=uniform", ids)
    scores = reference_scores(ids, [], CHUNK)
    for layer, layer_scores in zip(cache.layers, scores, strict=True):
        threshold = layer_scores.flatten().topk(BUDGET * layer_scores.shape[0]).values[-1]
        assert torch.equal(layer.ragged.counts[0], (layer_scores >= threshold).sum(-1))


def test_a_left_padded_row_keeps_what_it_keeps_alone():
    ids, mask = left_padded_ids(CONTEXT, pads=(0, 8), seed=6)
    spec = f"kvzip:budget={BUDGET},chunk_size={CHUNK},prompt=none"
    batch = compressed(spec, ids, mask)
    alone = compressed(spec, ids[1:, 8:])
    for together, single in zip(batch.layers, alone.layers, strict=True):
        assert torch.equal(together.ragged.counts[1], single.ragged.counts[0])
        own = together.ragged.segments()[together.ragged.counts.shape[1] :]
        rows = torch.cat([together.ragged.keys[start:stop] for start, stop in own])
        torch.testing.assert_close(rows, single.ragged.keys, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("math", ["plain", "softcap and sinks", "padding mask", "several passes"])
def test_attention_over_a_ragged_store_equals_dense_attention_with_the_evicted_masked(math, monkeypatch):
    generator = torch.Generator().manual_seed(0)
    batch, heads, groups, length, tail, queries, dim = 2, 2, 3, 12, 4, 3, 8
    keys, values = (torch.randn(batch, heads, length, dim, generator=generator) for _ in "kv")
    tail_keys, tail_values = (torch.randn(batch, heads, tail, dim, generator=generator) for _ in "kv")
    query = torch.randn(batch, heads * groups, queries, dim, generator=generator)
    keep = torch.rand(batch, heads, length, generator=generator) < 0.5
    keep[1, 0] = False  # a head that kept nothing
    softcap = sinks = None
    if math == "softcap and sinks":
        softcap, sinks = 2.0, torch.randn(heads * groups, generator=generator)
    causal = torch.arange(tail)[None, :] > torch.arange(queries)[:, None] + tail - queries  # [q, tail]
    mask, hidden_tail = None, causal.expand(batch, heads, 1, -1, -1)
    if math == "padding mask":  # row 1's first tail entry is padding
        visible = ~causal.expand(batch, 1, -1, -1).clone()
        visible[1, :, :, 0] = False
        mask, hidden_tail = visible, ~visible[:, :, None]
    if math == "several passes":  # (row, head) pairs padded and attended together only while they fit
        monkeypatch.setattr(ragged, "PADDED_ELEMENTS", dim * length)
        assert len(ragged._passes(keep.sum(-1).flatten().tolist(), dim)) > 1
    store = RaggedEntries()
    store.fill(keys, values, keep)
    out = store.attend(query, tail_keys, tail_values, mask, 0.3, softcap=softcap, sinks=sinks)
    # Reference: dense logits over every entry, the evicted ones and the tail's future masked.
    all_keys, all_values = torch.cat([keys, tail_keys], 2), torch.cat([values, tail_values], 2)
    logits = torch.einsum("bhgqd,bhnd->bhgqn", query.view(batch, heads, groups, queries, dim), all_keys) * 0.3
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    hidden = torch.cat(
        [
            ~keep[:, :, None, None, :].expand(-1, -1, 1, queries, -1),
            hidden_tail.expand(batch, heads, 1, -1, -1),
        ],
        -1,
    )
    logits = logits.masked_fill(hidden, float("-inf"))
    if sinks is not None:
        sink = sinks.view(1, heads, groups, 1, 1).expand(batch, -1, -1, queries, 1)
        weights = torch.softmax(torch.cat([logits, sink], -1), -1)[..., :-1]
    else:
        weights = torch.softmax(logits, -1)
    expected = torch.einsum("bhgqn,bhnd->bhgqd", weights, all_values).reshape(batch, -1, queries, dim)
    torch.testing.assert_close(out, expected.transpose(1, 2), rtol=1e-5, atol=1e-6)


def test_ragged_rows_follow_beam_reordering():
    keys = torch.arange(2 * 2 * 5, dtype=torch.float32).view(2, 2, 5, 1)
    keep = torch.tensor([[[1, 0, 1, 0, 0], [1, 1, 1, 0, 0]], [[0, 0, 0, 0, 1], [1, 1, 0, 0, 0]]]).bool()
    store = RaggedEntries()
    store.fill(keys, keys, keep)
    store.reorder_cache(torch.tensor([1, 1, 0]))
    assert store.counts.tolist() == [[1, 2], [1, 2], [2, 3]]
    assert store.keys.flatten().tolist() == [14, 15, 16, 14, 15, 16, 0, 2, 5, 6, 7]


def test_a_ragged_store_holding_everything_decodes_like_dynamic_cache():
    model = make_tiny_model("llama-gqa")
    ids = random_ids(30, seed=8)
    cache = build_cache("kvzip:budget=8,prompt=none", model)
    prefill(model, ids[:, :20], cache, leave_last=False)
    for layer in cache.layers:  # compress to everything: the store is ragged, nothing is lost
        layer.compress(torch.ones(1, 2, 20, dtype=torch.bool))
    reference = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids[:, :20], past_key_values=reference)
        # A multi-token forward (a question) and decoding steps, both over the store plus the tail.
        for start, stop in [(20, 26), *((t, t + 1) for t in range(26, 30))]:
            ours = model(ids[:, start:stop], past_key_values=cache).logits
            expected = model(ids[:, start:stop], past_key_values=reference).logits
            torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)
    assert model.config._attn_implementation == "hf_kvcache_sdpa"


def test_the_shared_budget_breaks_ties_in_order_and_keeps_nothing_for_an_empty_quota():
    scores = [torch.tensor([[[1.0, 2.0, 2.0]]]), torch.tensor([[[2.0, 0.5, 3.0]]])]
    keep = highest_entries(scores, torch.tensor([3]))
    assert [k.int().flatten().tolist() for k in keep] == [[0, 1, 1], [0, 0, 1]]
    assert not any(k.any() for k in highest_entries(scores, torch.tensor([0])))


def test_a_hybrid_models_local_layers_are_untouched_by_the_reconstruction():
    model = make_tiny_model("gemma3")
    ids = random_ids(40, seed=9)
    cache = build_cache("kvzip:budget=8,chunk_size=16,prompt=none", model)
    prefill(model, ids, cache, chunk_size=16, leave_last=False)
    local = [i for i, layer in enumerate(cache.layers) if not hasattr(layer, "ragged")]
    before = {i: cache.layers[i].keys.clone() for i in local}
    cache.compress_context()
    assert local and all(torch.equal(cache.layers[i].keys, before[i]) for i in local)


def test_the_reconstruction_prompt_uses_the_chat_template_when_there_is_one(tiny_model_dir, tmp_path):
    plain = reconstruction_prompt_ids(tiny_model_dir, "Repeat it.")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tokenizer.decode(plain).strip() == tokenizer.decode(tokenizer("Repeat it.").input_ids).strip()
    tokenizer.chat_template = "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}<s>"
    tokenizer.save_pretrained(tmp_path)
    templated = reconstruction_prompt_ids(str(tmp_path), "Repeat it.")
    assert templated[0] == tokenizer.bos_token_id and templated[-1] == tokenizer.bos_token_id


@pytest.mark.parametrize(
    "spec, message",
    [
        ("kvzip:head_budgets=even", "head_budgets must be one of \\['adaptive', 'uniform'\\], got 'even'"),
        ("kvzip:head_budgets=uniform", "layer_budgets=adaptive .* needs head_budgets=adaptive"),
        ("kvzip:chunk_size=0", "chunk_size must be an integer >= 1 .* got 0"),
        (
            "kvzip:budget=4,num_sink_tokens=2,recent=3",
            "budget must be an integer >= 5 \\(the num_sink_tokens=2 \\+ recent=3 it protects\\), got 4",
        ),
        ("kvzip:budget=1.5", "budget=1.5 is a fraction of the tokens seen, which must lie in \\(0, 1\\]"),
    ],
)
def test_bad_options_are_named(spec, message):
    with pytest.raises(ValueError, match=message):
        build_cache(spec, make_tiny_model("llama"))


def test_a_model_without_a_tokenizer_or_without_ids_gets_a_clear_error():
    model = make_tiny_model("llama")
    cache = build_cache(
        "kvzip:budget=4", model
    )  # the default prompt needs a tokenizer; this model names none
    prefill(model, random_ids(12), cache, leave_last=False)
    with pytest.raises(
        ValueError, match="needs a tokenizer .* kvzip:tokenizer=<hub id or folder>, or prompt=none"
    ):
        cache.compress_context()
    cache = build_cache("kvzip:budget=4,prompt=none", model)
    with torch.no_grad():
        model(inputs_embeds=model.get_input_embeddings()(random_ids(12)), past_key_values=cache)
    with pytest.raises(ValueError, match="fed embeddings \\(inputs_embeds\\); feed it input_ids"):
        cache.compress_context()


def test_adaptive_budgets_need_the_attention_entry_point(monkeypatch):
    model = make_tiny_model("llama")
    monkeypatch.setattr("hf_kvcache.base.install_storage_attention", lambda *args: "it runs flash attention")
    with pytest.raises(
        ValueError, match="cannot serve this model: it runs flash attention; use kvzip:head_budgets=uniform"
    ):
        build_cache("kvzip", model)
    assert build_cache("kvzip:head_budgets=uniform,layer_budgets=uniform", model).layers


def test_heads_are_attended_in_passes_whose_padded_entries_fit_the_bound(monkeypatch):
    monkeypatch.setattr(ragged, "PADDED_ELEMENTS", 100)
    # pairs * widest count * 10 channels: [3, 4] fit (2 * 4 * 10 = 80), adding 6 would not (3 * 6 * 10);
    # 12 alone exceeds the bound and is a pass of its own; an empty head costs nothing.
    assert ragged._passes([3, 4, 6, 12, 0, 1], head_dim=10) == [(0, 2), (2, 3), (3, 4), (4, 6)]
    assert ragged._passes([], head_dim=10) == []
