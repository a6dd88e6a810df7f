import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DynamicCache

from hf_kvcache import QuantizedKVCache, build_cache
from hf_kvcache.strategies.packing import make_codec, pack_codes, unpack_codes, unpack_slots
from hf_kvcache.strategies.quantized import QuantizedLayer, QuantizedOptions
from tests.conftest import make_tiny_model, random_ids


def stream_logits(model, ids, cache, prefill):
    """Prefill ``prefill`` tokens, then decode the rest one by one; return all logits."""
    with torch.no_grad():
        outs = [model(ids[:, :prefill], past_key_values=cache).logits]
        for t in range(prefill, ids.shape[1]):
            outs.append(model(ids[:, t : t + 1], past_key_values=cache).logits)
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("backend", ["torch", "quanto"])
def test_residual_covering_everything_is_exactly_dynamic_cache(tiny_model, backend):
    ids = random_ids(40, batch=2)
    cache = QuantizedKVCache(tiny_model, nbits=2, group_size=8, residual_length=40, backend=backend)
    expected = stream_logits(tiny_model, ids, DynamicCache(config=tiny_model.config), 25)
    assert torch.equal(stream_logits(tiny_model, ids, cache, 25), expected)
    assert cache.layers[0].packed_length == 0


@pytest.mark.parametrize("backend", ["torch", "quanto"])
def test_eight_bit_stays_close_to_dynamic_cache(tiny_model, backend):
    ids = random_ids(80, batch=2)
    cache = QuantizedKVCache(tiny_model, 8, 8, 8, backend, num_sink_tokens=0)
    expected = stream_logits(tiny_model, ids, DynamicCache(config=tiny_model.config), 50)
    got = stream_logits(tiny_model, ids, cache, 50)
    assert cache.layers[0].packed_length == 72
    scale = expected.abs().max()
    assert (got - expected).abs().max() <= 0.01 * scale
    # ... and quantization really happened: 2-bit is much further away than 8-bit
    coarse = stream_logits(tiny_model, ids, QuantizedKVCache(tiny_model, 2, 8, 8, backend, 0), 50)
    assert (coarse - expected).abs().max() > 5 * (got - expected).abs().max()


@given(
    nbits=st.sampled_from([2, 4, 8]),
    rows=st.integers(1, 5),
    bytes_per_row=st.sampled_from([1, 2, 3, 6, 8, 16, 24]),
    seed=st.integers(0, 99),
)
@settings(max_examples=80, deadline=None)
def test_pack_unpack_round_trips(nbits, rows, bytes_per_row, seed):
    width = bytes_per_row * 8 // nbits
    codes = torch.randint(0, 2**nbits, (rows, width), generator=torch.Generator().manual_seed(seed)).to(
        torch.uint8
    )
    packed = pack_codes(codes, nbits)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, bytes_per_row)
    assert torch.equal(unpack_codes(packed, nbits), codes)
    quanto = make_codec(nbits, "quanto")
    assert torch.equal(quanto.pack(codes), packed), "both backends must lay out the same bytes"
    assert torch.equal(quanto.unpack(packed), codes)


@given(
    nbits=st.sampled_from([2, 4, 8]), bytes_per_row=st.sampled_from([1, 3, 8, 16]), seed=st.integers(0, 99)
)
@settings(max_examples=40, deadline=None)
def test_unpack_slots_puts_each_bit_slot_of_every_byte_in_its_own_row(nbits, bytes_per_row, seed):
    packed = torch.randint(0, 256, (3, 2, bytes_per_row), generator=torch.Generator().manual_seed(seed))
    slots = unpack_slots(packed.to(torch.uint8), nbits)
    assert slots.shape == (3, 2, 8 // nbits, bytes_per_row) and slots.dtype == torch.uint8
    for slot in range(8 // nbits):  # reference: integer arithmetic on every byte
        assert torch.equal(slots[..., slot, :].long(), packed // 2 ** (slot * nbits) % 2**nbits)


@pytest.mark.parametrize("nbits", [2, 4])
@pytest.mark.parametrize("offset", [0, 1, 3, 8])
def test_unpack_reads_a_contiguous_slice_at_any_byte_offset(nbits, offset):
    codes = torch.randint(0, 2**nbits, (2, 16 * 8 // nbits), generator=torch.Generator().manual_seed(offset))
    packed = pack_codes(codes, nbits)  # [2, 16]
    storage = torch.zeros(offset + packed.numel(), dtype=torch.uint8)
    storage[offset:] = packed.flatten()
    sliced = storage[offset:].view(2, 16)  # contiguous, but its first byte need not start an 8-byte word
    assert sliced.is_contiguous() and sliced.storage_offset() == offset
    assert torch.equal(unpack_codes(sliced, nbits), codes.to(torch.uint8))


def test_two_bit_packing_layout_is_four_codes_per_byte():
    # planar: code i of a row of n goes to byte i % (n / 4), bit slot i // (n / 4)
    codes = torch.tensor([[3, 2, 1, 0, 0, 1, 2, 3]], dtype=torch.uint8)
    assert pack_codes(codes, 2).tolist() == [[0b10_00_01_11, 0b11_01_00_10]]
    assert pack_codes(torch.tensor([[5, 12]], dtype=torch.uint8), 4).tolist() == [[12 * 16 + 5]]


def filled_layer(nbits, backend="torch", tokens=96, group_size=16, residual=20, seed=0):
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(2, 3, tokens, 32, generator=generator) * 3 + 1
    values = torch.randn(2, 3, tokens, 32, generator=generator)
    config = QuantizedOptions(nbits, group_size, residual, backend, num_sink_tokens=0)
    layer = QuantizedLayer(config)
    layer.update(keys[..., :50, :], values[..., :50, :])
    for t in range(50, tokens):
        layer.update(keys[..., t : t + 1, :], values[..., t : t + 1, :])
    return layer, keys, values


@pytest.mark.parametrize("backend", ["torch", "quanto"])
@pytest.mark.parametrize("nbits", [2, 4, 8])
def test_every_element_within_half_a_step(nbits, backend):
    layer, keys, values = filled_layer(nbits, backend)
    length, size = layer.packed_length, 16
    assert length == 64  # (96 - 20) // 16 whole groups
    deq_keys, deq_values = layer.keys[..., :length, :], layer.values[..., :length, :]
    # The step of every element, recomputed from the stored scales by broadcasting them independently.
    key_step = layer.packed.group_scale.repeat_interleave(size, dim=2)
    value_step = layer.packed.value_scale.repeat_interleave(size, dim=3)
    slack = 1 + 1e-5
    assert ((deq_keys - keys[..., :length, :]).abs() <= key_step / 2 * slack + 1e-6).all()
    assert ((deq_values - values[..., :length, :]).abs() <= value_step / 2 * slack + 1e-6).all()
    # The residual is stored untouched.
    assert torch.equal(layer.key_buffer, keys[..., length:, :])
    assert torch.equal(layer.value_buffer, values[..., length:, :])


def test_quantized_data_is_never_requantized():
    layer, keys, values = filled_layer(2, tokens=60)
    codes, scale = layer.packed.key_codes.clone(), layer.packed.group_scale.clone()
    for _ in range(40):
        layer.update(torch.randn(2, 3, 1, 32) * 100, torch.randn(2, 3, 1, 32))
    assert torch.equal(layer.packed.key_codes[..., : codes.shape[2], :], codes)
    assert torch.equal(layer.packed.group_scale[..., : scale.shape[2], :], scale)


def test_long_prompt_is_quantized_group_by_group_at_prefill():
    config = QuantizedOptions(4, 16, 20, num_sink_tokens=4)
    layer = QuantizedLayer(config)
    keys = torch.randn(1, 2, 104, 32)
    out_keys, _ = layer.update(keys, keys)
    assert torch.equal(out_keys, keys)  # the prompt itself attends in full precision
    assert torch.equal(layer.sink_keys, keys[..., :4, :])  # the sinks are stored exactly
    assert layer.packed_length == 80 and layer.key_buffer.shape[2] == 20
    assert layer.packed.group_scale.shape == (1, 2, 5, 32) and layer.packed.value_scale.shape == (1, 2, 80, 2)


@pytest.mark.parametrize("sinks", [0, 4])
@pytest.mark.parametrize("nbits", [2, 4, 8])
def test_nbytes_counts_packed_codes_scales_and_residual(nbits, sinks):
    model = make_tiny_model("llama-gqa")  # 2 KV heads of size 16, 2 layers, float32
    cache = QuantizedKVCache(model, nbits=nbits, group_size=8, residual_length=12, num_sink_tokens=sinks)
    with torch.no_grad():
        model(random_ids(70 + sinks, batch=3), past_key_values=cache)
    batch, heads, dim, layers, fp = 3, 2, 16, 2, 4
    quantized, residual = 56, 14 + sinks  # (70 - 12) // 8 * 8 quantized; residual and sinks in full precision
    codes = 2 * batch * heads * quantized * dim * nbits // 8
    key_params = 2 * batch * heads * (quantized // 8) * dim * fp
    value_params = 2 * batch * heads * quantized * (dim // 8) * fp
    full_precision = 2 * batch * heads * residual * dim * fp
    assert cache.nbytes == layers * (codes + key_params + value_params + full_precision)
    assert cache.layers[0].packed.key_codes.dtype == torch.uint8


@pytest.mark.parametrize(
    "options, message",
    [
        ({"nbits": 5}, "nbits must be one of \\[2, 3, 4, 8\\], got 5"),
        ({"nbits_keys": 1}, "nbits_keys must be one of \\[2, 3, 4, 8\\], got 1"),
        ({"nbits_values": 16}, "nbits_values must be one of \\[2, 3, 4, 8\\], got 16"),
        ({"nbits": 3, "group_size": 4}, "group_size=4 must be a multiple of 8 for nbits=3"),
        ({"nbits_values": 3, "group_size": 4}, "group_size=4 must be a multiple of 8 for nbits_values=3"),
        (
            {"nbits": 3, "group_size": 8, "backend": "quanto"},
            "nbits=3 is not supported with backend='quanto'",
        ),
        ({"rotation": "qr"}, "rotation must be one of \\['none', 'hadamard', 'hadamard-values'\\], got 'qr'"),
        ({"group_size": 0}, "group_size must be an integer >= 1, got 0"),
        ({"group_size": 12}, "group_size=12 must divide the model's head dimension 16"),
        ({"residual_length": -1}, "residual_length must be an integer >= 0, got -1"),
        ({"backend": "hqq"}, "backend must be one of \\['torch', 'quanto'\\]"),
        ({"num_sink_tokens": -2}, "num_sink_tokens must be an integer >= 0, got -2"),
    ],
)
def test_bad_options_are_named(llama, options, message):
    with pytest.raises(ValueError, match=message):
        QuantizedKVCache(llama, **options)


def test_group_size_that_does_not_fill_whole_bytes_is_named():
    model = make_tiny_model("llama", hidden_size=24)  # 4 heads of size 6
    with pytest.raises(ValueError, match="group_size=6 must be a multiple of 4 for nbits=2"):
        QuantizedKVCache(model, nbits=2, group_size=6)
    cache = QuantizedKVCache(model, nbits=4, group_size=6, residual_length=0, num_sink_tokens=0)
    with torch.no_grad():
        model(random_ids(12), past_key_values=cache)
    # 12 tokens x 6 channels of 4-bit codes in 36 bytes
    assert cache.layers[0].packed.key_codes.shape == (1, 4, 6, 6)


def test_codes_are_packed_along_the_tokens_of_each_group():
    options = QuantizedOptions(nbits=2, group_size=8, residual_length=0, num_sink_tokens=0)
    layer = QuantizedLayer(options)
    # Keys 0..7 per channel quantize to codes 0, 0, 1, 1, 2, 2, 3, 3 (scale 7 / 3, round to nearest).
    keys = torch.arange(8.0).view(1, 1, 8, 1).expand(1, 1, 8, 8).contiguous()
    layer.update(keys, keys)
    codes = [0, 0, 1, 1, 2, 2, 3, 3]  # token i in byte row i % 2, bit slot i // 2
    expected = [sum(codes[row + 2 * slot] << (2 * slot) for slot in range(4)) for row in range(2)]
    assert layer.packed.key_codes[0, 0, :, 0].tolist() == expected


def test_spec_options_are_typed(llama):
    cache = build_cache("quantized:nbits=2,group_size=8,residual_length=0", llama)
    assert (cache.options.nbits, cache.options.group_size, cache.options.residual_length) == (2, 8, 0)
    with pytest.raises(ValueError, match="nbits='two' of strategy 'quantized' must be of type int"):
        build_cache("quantized:nbits=two", llama)


def test_model_with_non_attention_layers_is_rejected():
    model = make_tiny_model("llama")
    model.config.layer_types = ["full_attention", "linear_attention"]
    with pytest.raises(ValueError, match="cannot manage layer 1 of kind 'linear_attention'"):
        QuantizedKVCache(model)


def test_sinks_stay_exact_while_later_tokens_are_quantized(llama):
    cache = QuantizedKVCache(llama, nbits=2, group_size=8, residual_length=8, num_sink_tokens=3)
    reference = DynamicCache(config=llama.config)
    ids = random_ids(60)
    stream_logits(llama, ids, cache, 30)
    stream_logits(llama, ids, reference, 30)
    layer = cache.layers[1]
    assert torch.equal(layer.sink_keys, reference.layers[1].keys[..., :3, :])
    assert layer.packed_length == 48 and cache.get_seq_length() == 60


def test_crop_is_exact_in_residual_and_on_group_boundaries():
    layer, _, _ = filled_layer(4, tokens=96)  # 64 quantized + 32 residual
    layer.crop(-10)
    assert layer.get_seq_length() == 86 and layer.packed_length == 64
    with pytest.raises(ValueError, match="falls inside a quantized group of 16"):
        layer.crop(40)
    layer.crop(32)
    assert layer.get_seq_length() == 32 and layer.packed.group_scale.shape[2] == 2


def test_reset_empties_the_cache(llama):
    cache = QuantizedKVCache(llama, group_size=8, residual_length=8)
    with torch.no_grad():
        llama(random_ids(40), past_key_values=cache)
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.nbytes == 0
