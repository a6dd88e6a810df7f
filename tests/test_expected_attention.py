"""Expected-attention eviction against a float64 simulation from the definition, over the model's exact
layer-0 keys, values and (unrotated) queries, with RoPE written out as explicit rotation matrices."""

import pytest
import torch
from transformers import DynamicCache

from hf_kvcache import ExpectedAttentionKVCache, build_cache, parse_spec
from tests.conftest import make_tiny_model, random_ids


def rope_matrix(inv_freq: torch.Tensor, position: float) -> torch.Tensor:
    """``[D, D]`` RoPE rotation by ``position`` in the rotate-half layout: channel ``i`` pairs with ``i +
    D/2`` and turns by ``position * inv_freq[i]``."""
    angle = position * inv_freq.double()
    cos, sin = torch.diag(angle.cos()), torch.diag(angle.sin())
    return torch.cat([torch.cat([cos, -sin], 1), torch.cat([sin, cos], 1)], 0)


def expected_priorities(queries, keys, values, seen: int, inv_freq, horizon: int, epsilon: float, scaling):
    """``[H_kv, seen]`` priorities of the first ``seen`` entries once ``seen`` queries went in (``queries``
    ``[H_q, T, D]`` before RoPE, ``keys`` after it, ``values`` ``[H_kv, T, D]``)."""
    query_heads, kv_heads = queries.shape[0], keys.shape[0]
    groups = query_heads // kv_heads
    now = rope_matrix(inv_freq, seen - 1)
    ahead = sum(rope_matrix(inv_freq, j) for j in range(1, horizon + 1)) / horizon
    moved = queries[:, :seen].double() @ now.T  # every query as if asked at the last position
    mean = moved.mean(1)  # [H_q, D]
    covariance = torch.stack([(m - mu).T @ (m - mu) / seen for m, mu in zip(moved, mean, strict=True)])
    covariance = covariance.view(kv_heads, groups, *covariance.shape[1:]).mean(1)
    future_mean = (mean @ ahead.T).view(kv_heads, groups, -1)
    future_covariance = ahead @ covariance @ ahead.T
    k = keys[:, :seen].double()
    logits = scaling * torch.einsum("hgd,hnd->hgn", future_mean, k)
    logits = logits + scaling**2 / 2 * torch.einsum("hnd,hde,hne->hn", k, future_covariance, k)[:, None]
    expected = torch.softmax(logits, -1).mean(1)
    return (expected + epsilon) * values[:, :seen].double().norm(dim=-1)


def simulate(queries, keys, values, chunks, budget, sinks, recent, **scoring) -> list[list[int]]:
    """Per KV head, the token indices kept after feeding ``chunks`` tokens at a time: after each forward that
    leaves more than ``budget`` entries, the unprotected ones of highest priority are kept."""
    kept, seen = [[] for _ in range(keys.shape[0])], 0
    for size in chunks:
        seen += size
        priority = expected_priorities(queries, keys, values, seen, **scoring)
        for head, held in enumerate(kept):
            held.extend(range(seen - size, seen))
            if len(held) > budget:
                protected = [t for t in held if t < sinks or t >= seen - recent]
                free = sorted(
                    (t for t in held if t not in protected), key=lambda t: (-priority[head, t].item(), -t)
                )
                held[:] = sorted(protected + free[: budget - len(protected)])
    return kept


@pytest.mark.parametrize("chunks, horizon", [([16, *[1] * 24], 32), ([8, 8, 8, *[1] * 16], 1), ([40], 512)])
def test_kept_entries_follow_the_simulation(chunks, horizon):
    model = make_tiny_model("llama-gqa")
    ids = random_ids(40, seed=5)
    budget, sinks, recent, epsilon = 14, 2, 3, 0.02
    cache = ExpectedAttentionKVCache(
        model, budget=budget, num_sink_tokens=sinks, recent=recent, horizon=horizon, epsilon=epsilon
    )
    projected = []
    attention = model.model.layers[0].self_attn
    hook = attention.q_proj.register_forward_hook(lambda module, args, out: projected.append(out))
    with torch.no_grad():
        start = 0
        for size in chunks:
            model(ids[:, start : start + size], past_key_values=cache)
            start += size
        hook.remove()
        reference = DynamicCache(config=model.config)
        hook = attention.q_proj.register_forward_hook(lambda module, args, out: projected.append(out))
        model(ids, past_key_values=reference)
        hook.remove()
    queries = projected[-1][0].view(40, -1, attention.head_dim).transpose(0, 1)  # [H_q, T, D], unrotated
    keys, values = reference.layers[0].keys[0], reference.layers[0].values[0]
    scoring = dict(
        inv_freq=model.model.rotary_emb.inv_freq, horizon=horizon, epsilon=epsilon, scaling=attention.scaling
    )
    for head, indices in enumerate(simulate(queries, keys, values, chunks, budget, sinks, recent, **scoring)):
        torch.testing.assert_close(cache.layers[0].keys[0, head], keys[head, indices])
    assert cache.layers[1].keys.shape[2] == budget and cache.get_seq_length() == 40


def test_statistics_leave_out_padding_queries():
    # A left-padded row holds the statistics of its real tokens only: those of the same row unpadded.
    model = make_tiny_model("llama-gqa")
    ids = random_ids(20, seed=2)
    padded = torch.cat([torch.zeros(1, 6, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 6, dtype=torch.long), torch.ones(1, 20, dtype=torch.long)], 1)
    caches = [build_cache("expected-attention:budget=8,num_sink_tokens=2,recent=2", model) for _ in "ab"]
    with torch.no_grad():
        model(ids, past_key_values=caches[0])
        positions = (mask.cumsum(1) - 1).clamp(min=0)  # as generate numbers a left-padded row
        model(padded, attention_mask=mask, position_ids=positions, past_key_values=caches[1])
    for name in ("mean_query", "query_moment", "queries_seen"):
        torch.testing.assert_close(getattr(caches[1].layers[0], name), getattr(caches[0].layers[0], name))


@pytest.mark.parametrize(
    "spec, message",
    [
        ("expected-attention:horizon=0", "horizon must be an integer >= 1"),
        ("expected-attention:epsilon=-0.5", "epsilon must be a number >= 0, got -0.5"),
        ("expected-attention:budget=4,num_sink_tokens=2,recent=4", "budget must be an integer >= 6"),
    ],
)
def test_bad_options_are_named(spec, message):
    with pytest.raises(ValueError, match=message):
        build_cache(spec, make_tiny_model("llama"))


def test_recent_defaults_to_16_or_to_what_the_quantized_residual_holds():
    assert parse_spec("expected-attention")[1].protected_recent == 16
    composed = parse_spec("expected-attention+quantized:group_size=8,residual_length=4")[1]
    assert composed.protected_recent == 11 and composed.recent is None
    with pytest.raises(ValueError, match="recent=8 must be at least residual_length \\+ group_size - 1 = 11"):
        parse_spec("expected-attention:recent=8+quantized:group_size=8,residual_length=4")
