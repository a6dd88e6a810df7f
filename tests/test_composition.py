"""Compositions ``eviction+quantized``: the spec grammar, and what the layers hold against a reference
computed from scratch.

Layer 0's keys and values are projections of the input tokens alone, so a DynamicCache fed the same tokens
gives their exact values whatever the cache under test did to attention. The reference for a packed token is
then a plain min-max quantization written here: keys per channel over the token's key group (``group_size``
consecutive tokens after the sinks), values per token over groups of channels.
"""

import pytest
import torch
from transformers import DynamicCache

from hf_kvcache import HeavyHitterKVCache, SlidingWindowKVCache, build_cache, canonical_spec, parse_spec
from hf_kvcache.strategies.packed_slots import EMPTY_SLOT
from hf_kvcache.strategies.quantized import QuantizedOptions
from tests.conftest import make_tiny_model, random_ids

SINKS, GROUP = 4, 8


def fake_quantized(x: torch.Tensor, dim: int, nbits: int) -> torch.Tensor:
    low, high = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    scale = (high - low) / (2**nbits - 1)
    codes = ((x - low) / scale.clamp_min(torch.finfo(torch.float32).tiny)).round().clamp(0, 2**nbits - 1)
    return codes * scale + low


def reference_layer0(model, ids: torch.Tensor, prompt: int, nbits: int):
    """Exact keys/values ``[H, T, D]`` of layer 0, fed as the cache under test was, and their quantized
    versions by the composition's rules."""
    cache = DynamicCache(config=model.config)
    run_token_by_token(model, cache, ids, prompt)
    keys, values = cache.layers[0].keys[0], cache.layers[0].values[0]
    heads, length, dim = keys.shape
    usable = (length - SINKS) // GROUP * GROUP
    groups = keys[:, SINKS : SINKS + usable].reshape(heads, usable // GROUP, GROUP, dim)
    quantized_keys = keys.clone()
    quantized_keys[:, SINKS : SINKS + usable] = fake_quantized(groups, 2, nbits).reshape(heads, usable, dim)
    channel_groups = values.reshape(heads, length, dim // GROUP, GROUP)
    quantized_values = fake_quantized(channel_groups, 3, nbits).reshape(heads, length, dim)
    return keys, values, quantized_keys, quantized_values


def run_token_by_token(model, cache, ids: torch.Tensor, prompt: int) -> None:
    with torch.no_grad():
        model(ids[:, :prompt], past_key_values=cache)
        for step in range(prompt, ids.shape[1]):
            model(ids[:, step : step + 1], past_key_values=cache)


def held_parts(layer):
    keys, values = layer.keys[0], layer.values[0]
    sinks, packed = layer.sink_keys.shape[2], layer.packed_length
    return keys, values, sinks, packed


@pytest.mark.parametrize("nbits", [2, 4])
def test_sliding_window_holds_exact_sinks_packed_groups_and_exact_residual(nbits):
    model = make_tiny_model("llama")
    window, residual, length = 40, 12, 90
    ids = random_ids(length, seed=3)
    cache = SlidingWindowKVCache(
        model,
        window_length=window,
        num_sink_tokens=SINKS,
        quantization=QuantizedOptions(nbits=nbits, group_size=GROUP, residual_length=residual),
    )
    run_token_by_token(model, cache, ids, prompt=30)
    exact_k, exact_v, quant_k, quant_v = reference_layer0(model, ids, 30, nbits)
    keys, values, sinks, packed = held_parts(cache.layers[0])
    full = window - sinks - packed
    assert sinks == SINKS and packed > 0 and residual - GROUP < full <= residual
    assert keys.shape[1] == window
    torch.testing.assert_close(keys[:, :SINKS], exact_k[:, :SINKS], rtol=0, atol=0)
    first_packed = length - full - packed
    tokens = slice(first_packed, length - full)
    torch.testing.assert_close(keys[:, SINKS : SINKS + packed], quant_k[:, tokens], rtol=0, atol=1e-5)
    torch.testing.assert_close(values[:, SINKS : SINKS + packed], quant_v[:, tokens], rtol=0, atol=1e-5)
    torch.testing.assert_close(keys[:, SINKS + packed :], exact_k[:, length - full :], rtol=0, atol=0)
    torch.testing.assert_close(values[:, SINKS + packed :], exact_v[:, length - full :], rtol=0, atol=0)


def test_heavy_hitter_keeps_each_packed_token_decodable_with_its_own_group():
    """H2O evicts single tokens out of key groups: every kept packed token must still decode to its own
    group's quantization, whichever of its group-mates are gone."""
    model = make_tiny_model("llama-gqa")
    heavy, recent, residual, length = 12, 16, 8, 120
    ids = random_ids(length, seed=4)
    cache = HeavyHitterKVCache(
        model,
        heavy_budget=heavy,
        recent_budget=recent,
        quantization=QuantizedOptions(nbits=4, group_size=GROUP, residual_length=residual),
    )
    run_token_by_token(model, cache, ids, prompt=20)
    exact_k, exact_v, quant_k, quant_v = reference_layer0(model, ids, 20, 4)
    layer = cache.layers[0]
    keys, values, sinks, packed = held_parts(layer)
    full = keys.shape[1] - sinks - packed
    assert sinks == SINKS and keys.shape[1] == heavy + recent and 0 < full <= residual
    torch.testing.assert_close(keys[:, :SINKS], exact_k[:, :SINKS], rtol=0, atol=0)
    torch.testing.assert_close(keys[:, SINKS + packed :], exact_k[:, length - full :], rtol=0, atol=0)
    scattered = False
    for head in range(keys.shape[0]):
        # Which token each packed entry is: the one whose quantized key it equals (and no other).
        distance = (keys[head, SINKS : SINKS + packed, None] - quant_k[head, None, : length - full]).abs()
        matches = distance.amax(-1) < 1e-5
        assert bool((matches.sum(-1) == 1).all()), f"head {head}: a packed key decodes to no token's group"
        tokens = matches.int().argmax(-1)
        assert bool((tokens.diff() > 0).all())  # age order
        torch.testing.assert_close(
            values[head, SINKS : SINKS + packed], quant_v[head, tokens], rtol=0, atol=1e-5
        )
        # The recent tokens are all kept; older ones were chosen by score, leaving holes in their groups.
        assert set(range(length - recent, length - full)) <= set(tokens.tolist())
        scattered |= len(set(tokens.tolist())) < int(tokens.max() - tokens.min()) + 1
    assert scattered
    # The group table counts each group's members exactly: the tokens in slots that are in use (decoding in
    # place leaves the slots of evicted tokens empty until a key group refills them).
    assert layer.packed_stamps is not None  # these decoding steps ran in place
    in_use = layer.packed_stamps != EMPTY_SLOT
    assert bool((in_use.sum(-1) == packed).all())
    layer.leave_slots()  # counts are exact once out of slots (in slots, whenever a key group is packed)
    store = layer.packed
    counts = torch.zeros_like(store.group_members, dtype=torch.int64)
    counts.scatter_add_(2, store.key_group.long(), torch.ones_like(store.key_group, dtype=torch.int64))
    assert torch.equal(counts, store.group_members.long())


def test_eight_bit_composition_with_a_large_budget_stays_close_to_dynamic_cache():
    model = make_tiny_model("llama-gqa")
    ids = random_ids(70, seed=6)
    specs = [
        "sliding-window:window_length=128+quantized:nbits=8,group_size=8,residual_length=8",
        "heavy-hitter:heavy_budget=64,recent_budget=64+quantized:nbits=8,group_size=8,residual_length=8",
    ]
    with torch.no_grad():
        expected = model(ids, past_key_values=DynamicCache(config=model.config)).logits[:, -1]
    for spec in specs:
        cache = build_cache(spec, model)
        with torch.no_grad():
            model(ids[:, :60], past_key_values=cache)
            for step in range(60, 69):
                model(ids[:, step : step + 1], past_key_values=cache)
            got = model(ids[:, 69:], past_key_values=cache).logits[:, -1]
        assert cache.layers[0].packed_length > 0
        torch.testing.assert_close(got, expected, rtol=0, atol=0.02 * expected.abs().max().item())


def test_codes_are_bit_packed_and_nbytes_counts_what_is_held():
    model = make_tiny_model("llama")
    cache = build_cache(
        "sliding-window:window_length=40+quantized:nbits=2,group_size=8,residual_length=8", model
    )
    run_token_by_token(model, cache, random_ids(80), prompt=60)
    layer = cache.layers[0]
    store = layer.packed
    assert store.key_codes.dtype == torch.uint8 and store.key_codes.shape[-1] == 16 * 2 // 8
    held = [layer.sink_keys, layer.sink_values, layer.key_buffer, layer.value_buffer, layer.real_seen]
    held += [layer.cached_real, store.key_codes, store.value_codes, store.value_scale, store.value_zero]
    held += [store.key_group, store.group_scale, store.group_zero, store.group_members]
    held += [layer.packed_stamps]  # the slots' age order, held while decoding in place
    expected = sum(t.untyped_storage().nbytes() for t in held)
    assert cache.nbytes == expected * len(cache.layers)
    unquantized = build_cache("sliding-window:window_length=40", model)
    run_token_by_token(model, unquantized, random_ids(80), prompt=60)
    assert cache.nbytes < 0.6 * unquantized.nbytes


def test_spec_grammar_spells_out_both_halves_and_matches_the_python_api():
    spec = "sliding-window:window_length=512+quantized:nbits=4"
    assert canonical_spec(spec) == (
        "sliding-window:window_length=512,num_sink_tokens=4,positions=shifted"
        "+quantized:nbits=4,group_size=32,residual_length=128,backend=torch,num_sink_tokens=4"
    )
    assert canonical_spec("quantized:nbits=2,rotation=hadamard") == (
        "quantized:nbits=2,group_size=32,residual_length=128,backend=torch,num_sink_tokens=4,rotation=hadamard"
    )
    assert canonical_spec(canonical_spec(spec)) == canonical_spec(spec)
    _, options = parse_spec(spec)
    model = make_tiny_model("llama", head_dim=32, num_attention_heads=2, num_key_value_heads=2)
    api = SlidingWindowKVCache(model, window_length=512, quantization=QuantizedOptions(nbits=4))
    assert api.options == options


@pytest.mark.parametrize(
    "spec, message",
    [
        ("sliding-window+heavy-hitter", "'sliding-window' cannot be composed with 'heavy-hitter'"),
        ("quantized:nbits=2+sliding-window", "'quantized' is a storage format and goes second"),
        ("quantized+quantized", "'quantized' is a storage format and goes second"),
        ("sliding-window+quantized+quantized", "a composition joins two"),
        ("sliding-window+quantised", "Did you mean 'quantized'?"),
        ("sliding-window+quantized:nbits=5", "nbits must be one of [2, 3, 4, 8], got 5"),
        (
            "heavy-hitter:recent_budget=64+quantized",
            "residual_length=128 of the quantized half must be at most",
        ),
        ("heavy-hitter:heavy_budget=2+quantized", "num_sink_tokens=4 of the quantized half must be at most"),
        ("sliding-window:quantization=4", "unknown option(s) ['quantization']"),
    ],
)
def test_bad_compositions_say_what_can_be_composed(spec, message):
    with pytest.raises(ValueError) as error:
        parse_spec(spec)
    assert message in str(error.value)
    if "compose" in message or "joins" in message or "storage format" in message:
        assert (
            "allowed compositions: duo+quantized, expected-attention+quantized, heavy-hitter+quantized, "
            "knorm+quantized, kvzip+quantized, sliding-window+quantized" in str(error.value)
        )


def test_quantization_option_must_be_quantized_options():
    with pytest.raises(ValueError, match="quantization must be None or a QuantizedOptions"):
        SlidingWindowKVCache(make_tiny_model("llama"), quantization={"nbits": 4})


def test_cli_lists_the_compositions_with_their_canonical_specs(capsys):
    from hf_kvcache.cli import main

    assert main(["list"]) == 0
    printed = capsys.readouterr().out
    assert "heavy-hitter+quantized" in printed
    assert canonical_spec("sliding-window+quantized") in printed
