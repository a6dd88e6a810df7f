"""Ranges that minimize squared error (``clipping=mse``): the chosen range against a float64 search from the
definition, the packed history and the ragged store against quantization from the definition, the error never
above min-max's and well below it on Gaussian groups, bytes unchanged, calibration files kept apart, and
errors. Generation in every mode, saving and every architecture come from the clipping entries of
``tests.helpers.QUANTIZATION_VARIANTS``."""

import pytest
import torch
from transformers import DynamicCache

from hf_kvcache import build_cache, prefill
from hf_kvcache.calibration import calibrated_options, default_calibration_path
from hf_kvcache.registry import canonical_spec
from hf_kvcache.strategies import ranges
from hf_kvcache.strategies.packing import TorchCodec
from hf_kvcache.strategies.quantized import QuantizedOptions
from hf_kvcache.strategies.ragged import RaggedEntries
from hf_kvcache.strategies.ranges import SHRINK_FACTORS, mse_range
from tests.conftest import make_tiny_model, random_ids

GROUP = 8
ALLOWED = r"\['none', 'mse', 'mse-values', 'mse-keys', 'calibrated'\]"


def searched_from_definition(x: torch.Tensor, dim: int, nbits: int) -> torch.Tensor:
    """``x`` quantized over ``dim`` in float64 with, per group, the min-max range shrunk about its center by
    whichever factor of 1.0, 0.95, ..., 0.5 restores the group with the least squared error, restored."""
    x = x.double()
    low, high = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    levels = 2**nbits - 1
    candidates = []
    for tenths in range(20, 9, -1):  # factors 1.0 down to 0.5, in twentieths
        factor = tenths / 20
        start = (low + high) / 2 - factor * (high - low) / 2
        step = (factor * (high - low) / levels).clamp_min(1e-300)
        candidates.append(torch.round((x - start) / step).clamp(0, levels) * step + start)
    errors = torch.stack([(c - x).pow(2).sum(dim, keepdim=True) for c in candidates])
    best = errors.argmin(0)  # the first of equal errors: the widest range
    return torch.stack(candidates).gather(0, best.unsqueeze(0).expand(-1, *x.shape)).squeeze(0)


def test_the_shrink_factors_are_the_documented_ones():
    assert tuple(t / 20 for t in range(20, 9, -1)) == SHRINK_FACTORS


@pytest.mark.parametrize("nbits", [2, 3, 4])
def test_the_chosen_range_has_the_least_error_of_every_shrink_factor(nbits):
    generator = torch.Generator().manual_seed(nbits)
    x = torch.randn(6, 64, 32, generator=generator)
    x[:, :, ::7] *= 4  # heavy tails in some groups, where shrinking pays most
    low, high = mse_range(x, 1, nbits)
    levels = 2**nbits - 1
    step = (high - low) / levels
    restored = torch.round((x - low) / step).clamp(0, levels) * step + low
    error = (restored.double() - x.double()).pow(2).sum(1)
    best = (searched_from_definition(x, 1, nbits) - x.double()).pow(2).sum(1)
    # float32 against float64: the same factor, or one whose error is as low within rounding.
    torch.testing.assert_close(error, best, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float8_e5m2])
def test_a_large_group_set_tried_factor_by_factor_gets_the_ranges_of_all_at_once(monkeypatch, scale_dtype):
    x = torch.randn(4, 16, 64, 8, generator=torch.Generator().manual_seed(5))
    x[:, :, ::9] *= 5
    at_once = mse_range(x, 2, 2, scale_dtype)
    monkeypatch.setattr(ranges, "BATCHED_ELEMENTS", 0)  # what a long prompt's groups take
    one_by_one = mse_range(x, -2, 2, scale_dtype)
    for a, b in zip(at_once, one_by_one, strict=True):
        assert a.shape == (4, 16, 1, 8)
        # The same factors chosen: only the float32 rounding of each candidate range differs.
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float8_e5m2])
@pytest.mark.parametrize("nbits", [2, 3, 4, 8])
def test_clipping_never_loses_more_than_min_max_and_gains_most_at_two_bits(nbits, scale_dtype):
    x = torch.randn(512, 64, generator=torch.Generator().manual_seed(0))  # Gaussian groups of 64 entries
    errors = {}
    for clipping in ("none", "mse"):
        codes, scale, zero = TorchCodec(nbits, clipping).quantize(x, 1, scale_dtype)
        errors[clipping] = (codes.float() * scale.float() + zero.float() - x).pow(2).sum(1)
    # Min-max is one of the candidates, and each candidate is scored with the scale and zero point rounded
    # as they are stored: no group can lose.
    assert (errors["mse"] <= errors["none"]).all()
    ratio = (errors["mse"].sum() / errors["none"].sum()).item()
    # A step of about 1.0 sigma in place of the min-max range's 1.6 at 2 bits: about 0.55x the error
    # (ACIQ's analysis); at 8 bits with float32 scales clipping buys nothing worth a level.
    if scale_dtype == torch.float32 or nbits < 8:
        assert ratio < {2: 0.6, 3: 0.85, 4: 0.95, 8: 1.0 + 1e-6}[nbits]


@pytest.mark.parametrize("nbits", [2, 3])
def test_the_packed_history_is_the_searched_quantization_of_the_definition(nbits):
    model, ids = make_tiny_model("llama-gqa"), random_ids(40, seed=1)
    spec = f"quantized:nbits={nbits},group_size={GROUP},residual_length=0,num_sink_tokens=0"
    caches = {
        clipping: prefill(
            model, ids, build_cache(f"{spec},clipping={clipping}", model), chunk_size=40, leave_last=False
        )
        for clipping in ("none", "mse")
    }
    reference = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, past_key_values=reference)
    for index, exact in enumerate(reference.layers):
        layer = caches["mse"].layers[index]
        length = layer.packed.length
        keys, values = exact.keys[..., :length, :], exact.values[..., :length, :]
        batch, heads, _, head_dim = keys.shape
        key_groups = keys.reshape(batch, heads, length // GROUP, GROUP, head_dim)  # per channel over tokens
        value_groups = values.reshape(batch, heads, length, head_dim // GROUP, GROUP)  # per token
        expected = (
            searched_from_definition(key_groups, 3, nbits).view_as(keys),
            searched_from_definition(value_groups, 4, nbits).view_as(values),
        )
        for held, want in zip((layer.keys, layer.values), expected, strict=True):
            error = (held[..., :length, :].double() - want).abs()
            assert (error > 1e-5).float().mean() < 1e-2  # a group may tie between two factors
        plain = caches["none"].layers[index].keys
        assert not torch.equal(layer.keys[..., :length, :], plain[..., :length, :])  # the ranges moved
    assert caches["mse"].nbytes == caches["none"].nbytes  # nothing more is stored


def test_mse_values_clips_the_values_alone_and_mse_keys_the_keys_alone():
    model, ids = make_tiny_model("llama-gqa"), random_ids(40, seed=1)
    spec = f"quantized:nbits=2,group_size={GROUP},residual_length=0,rotation=hadamard,keys=pre_rope"
    caches = {
        clipping: prefill(model, ids, build_cache(f"{spec},clipping={clipping}", model), leave_last=False)
        for clipping in ("none", "mse", "mse-values", "mse-keys")
    }
    for plain, clipped, values_only, keys_only in zip(*(c.layers for c in caches.values()), strict=True):
        assert torch.equal(values_only.keys, plain.keys)
        assert torch.equal(values_only.values, clipped.values)
        assert not torch.equal(values_only.values, plain.values)
        assert torch.equal(keys_only.keys, clipped.keys) and torch.equal(keys_only.values, plain.values)
        assert not torch.equal(keys_only.keys, plain.keys)
    store = RaggedEntries(QuantizedOptions(nbits=2, group_size=GROUP, clipping="mse-values"))
    keys, values = torch.randn(1, 2, 16, 16), torch.randn(1, 2, 16, 16)
    store.fill(keys, values, torch.ones(1, 2, 16, dtype=torch.bool))
    plain = RaggedEntries(QuantizedOptions(nbits=2, group_size=GROUP))
    plain.fill(keys, values, torch.ones(1, 2, 16, dtype=torch.bool))
    assert torch.equal(store.entries()[0], plain.entries()[0])
    assert not torch.equal(store.entries()[1], plain.entries()[1])


def test_the_ragged_store_of_a_compressed_context_clips_too():
    generator = torch.Generator().manual_seed(3)
    keys, values = (
        torch.randn(2, 2, 24, 16, generator=generator),
        torch.randn(2, 2, 24, 16, generator=generator),
    )
    keep = torch.rand(2, 2, 24, generator=generator) < 0.6
    errors = {}
    for clipping in ("none", "mse"):
        store = RaggedEntries(QuantizedOptions(nbits=2, group_size=GROUP, clipping=clipping))
        store.fill(keys, values, keep)
        held_keys, held_values = store.entries()
        if clipping == "mse":  # each entry alone, per group of 8 channels
            want = searched_from_definition(keys[keep].unflatten(1, (-1, GROUP)), 2, 2).flatten(1)
            assert ((held_keys.double() - want).abs() > 1e-5).float().mean() < 1e-2
        errors[clipping] = (held_keys - keys[keep]).pow(2).sum() + (held_values - values[keep]).pow(2).sum()
    assert errors["mse"] < 0.8 * errors["none"]


def test_clipping_joins_the_calibrated_setting_only_when_set():
    model = make_tiny_model("llama")
    plain, clipped = QuantizedOptions(group_size=8), QuantizedOptions(group_size=8, clipping="mse")
    assert "clipping" not in calibrated_options(plain)  # files made before the option keep their names
    assert calibrated_options(clipped)["clipping"] == "mse"
    assert default_calibration_path(model, plain) != default_calibration_path(model, clipped)


def test_a_spec_without_clipping_keeps_its_canonical_form():
    assert "clipping" not in canonical_spec("quantized:nbits=2")  # the key of stored results
    assert canonical_spec("quantized:nbits=2,clipping=mse").endswith(",clipping=mse")


@pytest.mark.parametrize(
    "spec, message",
    [
        (
            "quantized:clipping=percentile",
            rf"clipping must be one of {ALLOWED}, got 'percentile'",
        ),
        ("quantized:clipping=mse,backend=quanto", "clipping='mse' with backend='quanto': .* backend='torch'"),
        (
            "sliding-window+quantized:clipping=max",
            rf"clipping must be one of {ALLOWED}, got 'max'",
        ),
    ],
)
def test_bad_clipping_is_named(spec, message):
    with pytest.raises(ValueError, match=message):
        build_cache(spec, make_tiny_model("llama"))
