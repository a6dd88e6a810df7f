"""Scales and zero points stored in float8 (``scales=float8``): the packed history against a float64
quantization from the definition, the bytes from the storage walk, attention over the codes against the dense
path, and a setting that packs nothing against ``DynamicCache``. Generation in every mode, saving and every
architecture are covered by the float8 entries of ``tests.helpers.QUANTIZATION_VARIANTS``."""

import pytest
import torch
from transformers import DynamicCache

from hf_kvcache import build_cache, prefill
from tests.conftest import make_tiny_model, random_ids
from tests.helpers import check_generates_like_dynamic_cache, decode

FLOAT8 = torch.float8_e5m2
GROUP = 8


def float8(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to the nearest float8_e5m2 value, back in float64."""
    return x.to(FLOAT8).double()


def dequantized_from_definition(x: torch.Tensor, dim: int, nbits: int) -> torch.Tensor:
    """Min-max quantization of ``x`` over ``dim`` with the scale and zero point rounded to float8 first and
    the codes taken from the rounded ones, restored in float64."""
    x = x.double()
    low, high = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    levels = 2**nbits - 1
    scale, zero = float8((high - low) / levels), float8(low)
    codes = torch.round((x - zero) / scale.clamp_min(1e-30)).clamp(0, levels)
    return codes * scale + zero


@pytest.mark.parametrize("nbits", [2, 3, 4])
def test_the_packed_history_is_the_float8_quantization_of_the_definition(nbits):
    model, ids = make_tiny_model("llama-gqa"), random_ids(40, seed=1)
    spec = f"quantized:nbits={nbits},group_size={GROUP},residual_length=0,num_sink_tokens=0,scales=float8"
    cache = prefill(model, ids, build_cache(spec, model), chunk_size=40, leave_last=False)
    reference = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, past_key_values=reference)
    for layer, exact in zip(cache.layers, reference.layers, strict=True):
        packed = layer.packed
        assert packed.group_scale.dtype == packed.value_scale.dtype == FLOAT8
        length = packed.length
        keys, values = exact.keys[..., :length, :], exact.values[..., :length, :]
        batch, heads, _, head_dim = keys.shape
        key_groups = keys.reshape(batch, heads, length // GROUP, GROUP, head_dim)  # per channel over tokens
        expected_keys = dequantized_from_definition(key_groups, 3, nbits).view_as(keys)
        value_groups = values.reshape(batch, heads, length, head_dim // GROUP, GROUP)  # per token
        expected_values = dequantized_from_definition(value_groups, 4, nbits).view_as(values)
        # float32 against float64 arithmetic: a code may round the other way at an exact tie, one step off.
        for held, expected in ((layer.keys, expected_keys), (layer.values, expected_values)):
            error = (held[..., :length, :].double() - expected).abs()
            assert (error > 1e-5).float().mean() < 1e-3
        assert not torch.equal(layer.keys[..., :length, :], keys)  # it did quantize


def test_float8_scales_hold_one_byte_each():
    model, ids = make_tiny_model("llama-gqa"), random_ids(64, seed=2)
    spec = "quantized:nbits=2,group_size=8,residual_length=8"
    narrow = prefill(model, ids, build_cache(f"{spec},scales=float8", model), chunk_size=64)
    wide = prefill(model, ids, build_cache(spec, model), chunk_size=64)
    scales = sum(
        t.numel()
        for layer in narrow.layers
        for t in (
            layer.packed.group_scale,
            layer.packed.group_zero,
            layer.packed.value_scale,
            layer.packed.value_zero,
        )
    )
    assert scales > 0
    assert wide.nbytes - narrow.nbytes == scales * (torch.finfo(torch.float32).bits // 8 - 1)
    kvzip = "kvzip:budget=0.5,prompt=none+quantized:nbits=4,group_size=8"
    narrow = prefill(
        model, ids, build_cache(f"{kvzip},scales=float8", model), chunk_size=64, leave_last=False
    )
    wide = prefill(model, ids, build_cache(kvzip, model), chunk_size=64, leave_last=False)
    narrow.compress_context(), wide.compress_context()
    ragged = [layer.ragged for layer in narrow.layers]
    entries = sum(t.numel() for r in ragged for t in (r.key_scale, r.key_zero, r.value_scale, r.value_zero))
    assert {r.value_scale.dtype for r in ragged} == {FLOAT8}
    assert wide.nbytes - narrow.nbytes == entries * 3


@pytest.mark.parametrize("backend", ["torch", "compiled"])
@pytest.mark.parametrize(
    "spec",
    [
        "quantized:nbits=2,group_size=8,residual_length=4",
        "quantized:nbits=3,group_size=8,residual_length=4,keys=pre_rope,rotation=hadamard",
    ],
)
def test_attention_over_the_codes_reads_float8_scales_like_the_dense_path(spec, backend):
    model, ids = make_tiny_model("llama-gqa"), random_ids(40)
    dense_tokens, dense_logits, _ = decode(model, f"{spec},scales=float8,attention=dense", ids)
    tokens, logits, cache = decode(model, f"{spec},scales=float8,attention={backend}", ids)
    assert cache.storage_attention_off is None
    assert torch.equal(tokens, dense_tokens)
    torch.testing.assert_close(logits, dense_logits, rtol=1e-4, atol=1e-4)


def test_a_float8_cache_that_packs_nothing_generates_like_dynamic_cache():
    spec = "quantized:nbits=2,group_size=8,residual_length=64,scales=float8"
    check_generates_like_dynamic_cache(make_tiny_model("llama-gqa"), spec, "greedy")


@pytest.mark.parametrize("spec, name", [("nbits=8", "nbits"), ("nbits=2,nbits_keys=8", "nbits_keys")])
def test_eight_bit_codes_refuse_float8_scales(spec, name):
    # Rounding the zero point to float8 moves it by up to 1/8 of its magnitude, past many 8-bit steps.
    with pytest.raises(ValueError, match=f"{name}=8 with scales='float8': .* use scales='model'"):
        build_cache(f"quantized:{spec},scales=float8", make_tiny_model("llama"))


def test_an_unknown_scale_format_is_named():
    with pytest.raises(ValueError, match=r"scales must be one of \['model', 'float8'\], got 'float16'"):
        build_cache("quantized:scales=float16", make_tiny_model("llama"))
