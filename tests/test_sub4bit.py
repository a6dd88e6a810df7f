"""Below 4 bits: 3-bit packing, keys and values at different widths, and the Hadamard rotation, checked
against float64 quantize-dequantize from the definition, byte counts from the storage walk, DynamicCache where
nothing is lost, and every test architecture."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DynamicCache

from hf_kvcache import build_cache, cache_nbytes, load_cache, prefill, save_cache
from hf_kvcache.strategies.packing import pack_codes, unpack_codes
from hf_kvcache.strategies.quantized import QuantizedLayer, QuantizedOptions
from hf_kvcache.strategies.rotation import rotation_matrix
from tests.conftest import MORE_ARCHITECTURES, left_padded_ids, make_tiny_model, random_ids
from tests.helpers import QUANTIZATION_VARIANTS as VARIANTS
from tests.helpers import (
    check_generates_in_every_mode,
    check_generates_like_dynamic_cache,
    check_never_more_bytes_than_dynamic_cache,
    stream,
)


@given(rows=st.integers(1, 4), units=st.integers(1, 6), seed=st.integers(0, 99))
@settings(max_examples=40, deadline=None)
def test_three_bit_codes_round_trip_in_three_bytes_per_eight(rows, units, seed):
    codes = torch.randint(0, 8, (rows, 8 * units), generator=torch.Generator().manual_seed(seed)).to(
        torch.uint8
    )
    packed = pack_codes(codes, 3)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, 3 * units)
    assert torch.equal(unpack_codes(packed, 3), codes)


def test_three_bit_layout_is_a_two_bit_plane_then_a_one_bit_plane():
    codes = torch.tensor([[7, 0, 5, 2, 1, 6, 3, 4]], dtype=torch.uint8)
    low, high = [c & 3 for c in codes[0].tolist()], [c >> 2 for c in codes[0].tolist()]
    # low bits as 2-bit planar codes: code i in byte i % 2, slot i // 2; high bits: code i in bit i of byte 0
    expected = [sum(low[byte + 2 * slot] << (2 * slot) for slot in range(4)) for byte in range(2)]
    expected.append(sum(bit << i for i, bit in enumerate(high)))
    assert pack_codes(codes, 3).tolist() == [expected]


def test_hadamard_rotation_is_orthogonal_fixed_and_mixes_every_channel_of_a_block():
    for head_dim, block in ((64, 64), (80, 16), (6, 2)):
        r = rotation_matrix("hadamard", head_dim, torch.float64, torch.device("cpu"))
        assert torch.allclose(r @ r.T, torch.eye(head_dim, dtype=torch.float64), atol=1e-12)
        assert torch.equal(r, rotation_matrix("hadamard", head_dim, torch.float64, torch.device("cpu")))
        nonzero = (r != 0).sum(1)
        assert (nonzero == block).all() and torch.allclose(
            r.abs()[r != 0], torch.tensor(block**-0.5).double()
        )
    assert rotation_matrix("none", 64, torch.float32, torch.device("cpu")) is None


def reference_quantize(x: torch.Tensor, nbits: int, dim: int) -> torch.Tensor:
    """Asymmetric min-max quantize-dequantize of float64 ``x``, one scale and zero per group along ``dim``."""
    low, high = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    step = (high - low) / (2**nbits - 1)
    # A constant group (range 0) is held exactly.
    codes = torch.round((x - low) / step.clamp(min=1e-300)).clamp(0, 2**nbits - 1)
    return codes * step + low


def reference_dequantized(keys, values, nbits_keys, nbits_values, size, rotation, rotate_keys=True):
    """What the packed store should give back for whole groups of tokens ``[B, H, n * G, D]``, from the
    definition in float64: rotate, keys per channel over groups of ``size`` tokens, values per token over
    groups of ``size`` channels, rotate back."""
    r = torch.eye(keys.shape[-1], dtype=torch.float64) if rotation is None else rotation.double()
    batch, heads, length, dim = keys.shape
    rk = r if rotate_keys else torch.eye(dim, dtype=torch.float64)
    k = (keys.double() @ rk).view(batch, heads, length // size, size, dim)
    v = (values.double() @ r).view(batch, heads, length, dim // size, size)
    k = reference_quantize(k, nbits_keys, 3).view(batch, heads, length, dim)
    v = reference_quantize(v, nbits_values, 4).view(batch, heads, length, dim)
    return k @ rk.T, v @ r.T


@pytest.mark.parametrize(
    "nbits, nbits_keys, nbits_values, rotation",
    [
        (3, None, None, "none"),
        (2, 4, None, "none"),
        (3, None, 2, "hadamard"),
        (4, 3, 8, "hadamard"),
        (2, 3, None, "hadamard-values"),
    ],
)
def test_packed_tokens_equal_float64_quantize_dequantize_from_the_definition(
    nbits, nbits_keys, nbits_values, rotation
):
    generator = torch.Generator().manual_seed(nbits * 10 + (nbits_keys or 0))
    keys = torch.randn(2, 3, 70, 32, generator=generator) * 3 + 1
    values = torch.randn(2, 3, 70, 32, generator=generator)
    keys[..., 5] *= 20  # an outlier channel, which the rotation spreads
    options = QuantizedOptions(
        nbits, 16, 6, num_sink_tokens=0, nbits_keys=nbits_keys, nbits_values=nbits_values
    )
    options = QuantizedOptions(**{**options.__dict__, "rotation": rotation})
    layer = QuantizedLayer(options)
    layer.update(keys[..., :40, :], values[..., :40, :])
    for t in range(40, 70):
        layer.update(keys[..., t : t + 1, :], values[..., t : t + 1, :])
    packed = layer.packed_length
    assert packed == 64
    r = rotation_matrix(rotation, 32, torch.float32, torch.device("cpu"))
    want_keys, want_values = reference_dequantized(
        keys[..., :packed, :],
        values[..., :packed, :],
        options.key_nbits,
        options.value_nbits,
        16,
        r,
        rotate_keys=rotation == "hadamard",
    )
    scale = keys.abs().max()
    assert torch.allclose(layer.keys[..., :packed, :].double(), want_keys, atol=2e-5 * scale, rtol=0)
    assert torch.allclose(layer.values[..., :packed, :].double(), want_values, atol=2e-5, rtol=0)
    assert torch.equal(layer.keys[..., packed:, :], keys[..., packed:, :])  # the residual is untouched


@pytest.mark.parametrize("nbits_keys, nbits_values", [(3, 3), (4, 2), (2, 3), (8, 3)])
def test_nbytes_counts_each_code_width_from_the_storage(nbits_keys, nbits_values):
    model = make_tiny_model("llama-gqa")  # 2 KV heads of size 16, 2 layers, float32
    spec = f"quantized:nbits_keys={nbits_keys},nbits_values={nbits_values},group_size=8,residual_length=12"
    cache = build_cache(spec + ",rotation=hadamard", model)
    with torch.no_grad():
        model(random_ids(74, batch=3), past_key_values=cache)
    batch, heads, dim, layers, fp = 3, 2, 16, 2, 4
    quantized, exact = 56, 18  # 4 sinks + 14 residual tokens in full precision
    codes = batch * heads * quantized * dim * (nbits_keys + nbits_values) // 8
    scales = 2 * batch * heads * (quantized // 8) * dim * fp + 2 * batch * heads * quantized * (dim // 8) * fp
    assert cache.nbytes == layers * (codes + scales + 2 * batch * heads * exact * dim * fp)
    walked = sum(t.untyped_storage().nbytes() for layer in cache.layers for t in layer.held_tensors())
    assert cache.nbytes == walked == cache_nbytes(cache)


@pytest.mark.parametrize("rotation", ["none", "hadamard"])
def test_a_residual_covering_everything_is_exactly_dynamic_cache(rotation):
    model = make_tiny_model("llama-gqa")
    ids = random_ids(40, batch=2)
    spec = f"quantized:nbits=3,nbits_values=2,group_size=8,residual_length=40,rotation={rotation}"
    expected = stream(model, ids, DynamicCache(config=model.config), 5)
    assert torch.equal(stream(model, ids, build_cache(spec, model), 5), expected)


def test_eight_bit_with_rotation_stays_close_to_dynamic_cache_and_three_bit_is_further():
    model = make_tiny_model("llama-gqa")
    ids = random_ids(80, batch=2)
    expected = stream(model, ids, DynamicCache(config=model.config), 4)
    errors = {}
    for nbits in (8, 3):
        spec = f"quantized:nbits={nbits},group_size=8,residual_length=8,num_sink_tokens=0,rotation=hadamard"
        errors[nbits] = (stream(model, ids, build_cache(spec, model), 4) - expected).abs().max()
    assert errors[8] <= 0.01 * expected.abs().max()
    assert errors[3] > 5 * errors[8]


@pytest.mark.parametrize("spec", VARIANTS)
def test_every_variant_generates_in_every_mode_and_saves(tmp_path, spec):
    model = make_tiny_model("llama-gqa")
    check_generates_in_every_mode(model, spec)
    ids, mask = left_padded_ids(30, pads=(0, 4, 11), seed=2)
    original = prefill(model, ids, build_cache(spec, model), chunk_size=7, attention_mask=mask)
    restored = load_cache(save_cache(original, tmp_path / "c.safetensors", model=model), model)
    greedy = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, attention_mask=mask)
    assert torch.equal(
        model.generate(ids, past_key_values=restored, **greedy),
        model.generate(ids, past_key_values=original, **greedy),
    )


@pytest.mark.parametrize("arch", sorted(MORE_ARCHITECTURES))
def test_every_variant_serves_every_architecture(arch):
    model = make_tiny_model(arch)
    for spec in VARIANTS:
        check_never_more_bytes_than_dynamic_cache(model, spec)
    lossless = "quantized:nbits=3,nbits_keys=2,group_size=8,residual_length=64,rotation=hadamard"
    check_generates_like_dynamic_cache(model, lossless, "greedy")


def rope_float64(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE from its definition, in float64: channel pair (i, i + D/2) turns by ``p * f_i``."""
    angles = positions.double()[:, None] * inv_freq.double()[None, :]
    cos, sin = angles.cos(), angles.sin()
    first, second = x.double().chunk(2, dim=-1)
    return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)


@pytest.mark.parametrize("window", [None, 40])
def test_pre_rope_keys_are_quantized_before_the_rotary_embedding_of_their_position(window):
    from hf_kvcache.model_hooks import KeyRotator, find_rotary_module

    model = make_tiny_model("llama-gqa")
    rotary = find_rotary_module(model)
    inv_freq = rotary.inv_freq
    # Every token's key is one vector c turned to the token's position: undone, all keys are c, so each
    # channel of a key group is constant and quantizes exactly; quantized as they come they do not.
    c = torch.randn(1, 2, 1, 16, generator=torch.Generator().manual_seed(3)).expand(1, 2, 96, 16)
    keys = rope_float64(c, torch.arange(96), inv_freq).float()
    values = torch.randn(1, 2, 96, 16)
    errors = {}
    for mode in ("pre_rope", "post_rope"):
        options = QuantizedOptions(nbits=2, group_size=8, residual_length=8, num_sink_tokens=4, keys=mode)
        rope = KeyRotator(rotary) if mode == "pre_rope" else None
        layer = QuantizedLayer(options, window=window, key_rope=rope)
        layer.update(keys[:, :, :30], values[:, :, :30])
        for t in range(30, 96):
            layer.update(keys[:, :, t : t + 1], values[:, :, t : t + 1])
        start = layer.dropped + layer.sink_keys.shape[2]  # the cache position of the first packed key
        packed = layer.packed_length
        assert packed >= 24 and (window is None or layer.dropped > 0)
        held = layer.keys[:, :, layer.sink_keys.shape[2] :][:, :, :packed]
        errors[mode] = (held - keys[:, :, start : start + packed]).abs().max().item()
    assert errors["pre_rope"] < 1e-5 < 0.05 < errors["post_rope"]


def test_pre_rope_is_refused_under_eviction_and_without_rotary_embeddings():
    with pytest.raises(ValueError, match="keys='pre_rope' is an option of quantized alone"):
        build_cache("sliding-window:window_length=20+quantized:keys=pre_rope", make_tiny_model("llama"))
    with pytest.raises(ValueError, match="keys must be one of \\['post_rope', 'pre_rope'\\], got 'rope'"):
        QuantizedOptions(keys="rope")
