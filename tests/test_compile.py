"""Decoding through ``torch.compile(model.forward)``: the eviction caches trace into one graph per decoding
step (no graph break, no recompilation once the token count is dynamic) and give eager's tokens and logits;
the packed caches, which cannot trace whole, give them too, split into several graphs."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from hf_kvcache import build_cache, prefill
from tests.conftest import left_padded_ids, make_tiny_model
from tests.helpers import LOSSY

WARMUP = 3  # the first compilation, and the recompilation that makes the token count dynamic
EVICTION = ["sliding-window", "heavy-hitter", "tova", "knorm", "expected-attention", "snapkv"]
# SnapKV compresses the prompt and then grows like DynamicCache: a few recompilations while its slot count
# becomes dynamic, then none.
GROWING, GROWING_SETTLES = {"snapkv"}, 12
# A token that repeats has keys of one norm under RoPE; the compiled norm may break such a tie the other way,
# so the key-norm run uses a prompt whose decoding meets none.
PROMPT_SEED = {"knorm": 2}


def compiled(model):
    """``model`` decoding through ``torch.compile`` the usual way: its ``forward`` replaced, so that its hooks
    (which tell eviction caches each forward's mask) still run around the compiled code."""
    torch._dynamo.reset()
    counters.clear()
    model.forward = torch.compile(model.forward)
    return model


def decode_steps(model, spec: str, steps: int, compile: bool = False, after=None, seed: int = 0):
    """Prefill a left-padded batch eagerly, then ``steps`` greedy steps (the first feeds the prompt's last
    token), compiled with ``compile``; ``after(i)`` runs after step ``i``. Returns the tokens fed
    ``[B, steps]`` and the last step's logits."""
    ids, mask = left_padded_ids(20, (0, 5), seed=seed)
    cache = build_cache(spec, model)
    token, tokens = ids[:, -1:], []
    with torch.no_grad():
        prefill(model, ids, cache, attention_mask=mask)
        if compile:
            compiled(model)
        for step in range(steps):
            tokens.append(token)
            logits = model(token, attention_mask=mask, past_key_values=cache).logits
            token = logits[:, -1:].argmax(-1)
            mask = torch.cat([mask, torch.ones_like(token)], dim=-1)
            if after is not None:
                after(step)
    return torch.cat(tokens, dim=-1), logits


def compile_counts() -> tuple[int, int]:
    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


@pytest.mark.parametrize("name", EVICTION)
def test_eviction_cache_decodes_in_one_graph_as_eager(name):
    spec, seed = LOSSY[name], PROMPT_SEED.get(name, 0)
    steps, settled_after = (24, GROWING_SETTLES) if name in GROWING else (12, WARMUP)
    eager_tokens, eager_logits = decode_steps(make_tiny_model("llama", head_dim=32), spec, steps, seed=seed)
    settled = {}

    def snapshot(step):
        if step == settled_after - 1:
            settled["counts"] = compile_counts()

    model = make_tiny_model("llama", head_dim=32)
    tokens, logits = decode_steps(model, spec, steps, compile=True, after=snapshot, seed=seed)
    assert torch.equal(tokens, eager_tokens)
    torch.testing.assert_close(logits, eager_logits, rtol=1e-4, atol=1e-4)
    graphs, breaks = compile_counts()
    assert settled["counts"] == (graphs, breaks), "decoding steps compiled again or broke the graph"
    assert breaks == 0


@pytest.mark.parametrize("name", ["quantized", "sliding-window+quantized"])
def test_packed_caches_decode_as_eager_when_compiled(name):
    eager_tokens, eager_logits = decode_steps(make_tiny_model("llama", head_dim=32), LOSSY[name], 8)
    tokens, logits = decode_steps(make_tiny_model("llama", head_dim=32), LOSSY[name], 8, compile=True)
    assert torch.equal(tokens, eager_tokens)
    torch.testing.assert_close(logits, eager_logits, rtol=1e-4, atol=1e-4)


def test_compiled_step_refuses_right_padding():
    model = make_tiny_model("llama", head_dim=32)
    cache = build_cache(LOSSY["sliding-window"], model)
    ids, mask = left_padded_ids(20, (0, 5))
    with torch.no_grad():
        prefill(model, ids, cache, attention_mask=mask)
        compiled(model)
        model(ids[:, -1:], attention_mask=mask, past_key_values=cache)
        right_padded = torch.cat([mask, torch.tensor([[1], [0]])], dim=-1)
        with pytest.raises(RuntimeError, match="left padding only"):
            model(ids[:, -1:], attention_mask=right_padded, past_key_values=cache)


def test_generate_with_a_compiled_forward_keeps_the_padding_mask():
    # is_compileable stays False, so generate hands the model its 2D mask (eviction reads it) and does not
    # compile on its own; a compiled forward decodes the left-padded batch as eager does.
    ids, mask = left_padded_ids(20, (0, 5))
    runs = []
    for compile in (False, True):
        model = make_tiny_model("llama", head_dim=32)
        cache = build_cache(LOSSY["heavy-hitter"], model)
        assert cache.is_compileable is False
        if compile:
            compiled(model)
        with torch.no_grad():
            runs.append(model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=10))
    assert torch.equal(runs[0], runs[1])


def test_hybrid_model_decodes_compiled_as_eager():
    # Gemma 3 alternates local layers (transformers' DynamicSlidingWindowLayer) with global ones (eviction).
    spec = LOSSY["heavy-hitter"]
    eager_tokens, eager_logits = decode_steps(make_tiny_model("gemma3"), spec, 10)
    tokens, logits = decode_steps(make_tiny_model("gemma3"), spec, 10, compile=True)
    assert torch.equal(tokens, eager_tokens)
    torch.testing.assert_close(logits, eager_logits, rtol=1e-4, atol=1e-4)
    assert compile_counts()[1] == 0
