"""``kvzip+quantized``: the compressed context held bit-packed per entry, checked against float64
quantize-dequantize from the definition, byte counts from the storage walk, the unquantized selection, 8-bit
decoding within tolerance, and its errors."""

import pytest
import torch

from hf_kvcache import build_cache, cache_nbytes
from hf_kvcache.strategies.rotation import rotation_matrix
from tests.conftest import make_tiny_model, random_ids
from tests.test_kvzip import BUDGET, CHUNK, CONTEXT, compressed
from tests.test_sub4bit import reference_quantize

PLAIN = f"kvzip:budget={BUDGET},chunk_size={CHUNK},prompt=none"


def reference_entries(x: torch.Tensor, nbits: int, size: int, rotation: str) -> torch.Tensor:
    """Float64 from the definition: rotate, min-max quantize each entry's groups of ``size`` channels, rotate
    back."""
    r = rotation_matrix(rotation, x.shape[-1], torch.float64, torch.device("cpu"))
    r = torch.eye(x.shape[-1], dtype=torch.float64) if r is None else r
    rotated = (x.double() @ r).view(x.shape[0], -1, size)
    return reference_quantize(rotated, nbits, 2).view(x.shape) @ r.T


@pytest.mark.parametrize(
    "split, quantized",
    [
        ("", "nbits=4,group_size=8,rotation=hadamard"),
        (",layer_budgets=uniform", "nbits=2,nbits_keys=3,group_size=16"),
        (",head_budgets=uniform,layer_budgets=uniform", "nbits=8,nbits_values=4,group_size=8"),
    ],
)
def test_the_packed_context_is_the_unquantized_selection_quantized_per_entry(split, quantized):
    ids = random_ids(CONTEXT, batch=2, seed=8)
    plain = compressed(PLAIN + split, ids)
    packed = compressed(f"{PLAIN}{split}+quantized:{quantized}", ids)
    options = packed.options.quantization
    for exact, layer in zip(plain.layers, packed.layers, strict=True):
        if exact.ragged.filled:
            keys, values, counts = exact.ragged.keys, exact.ragged.values, exact.ragged.counts
        else:  # uniform heads: the dense layer's held entries, heads in order
            keys, values = exact.keys.flatten(0, 2), exact.values.flatten(0, 2)
            counts = torch.full(exact.keys.shape[:2], exact.keys.shape[2])
        assert torch.equal(layer.ragged.counts, counts)
        got_keys, got_values = layer.ragged.entries()
        for got, x, nbits in ((got_keys, keys, options.key_nbits), (got_values, values, options.value_nbits)):
            want = reference_entries(x, nbits, options.group_size, options.rotation)
            assert torch.allclose(got.double(), want, atol=2e-5 * x.abs().max().item(), rtol=0)
        # Honest bytes: codes at each width, a scale and zero per entry and channel group, the counts.
        total, dim = keys.shape
        codes = total * dim * (options.key_nbits + options.value_nbits) // 8
        scales = 4 * total * (dim // options.group_size) * 4  # float32 tiny model
        assert layer.ragged.nbytes == codes + scales + 8 * counts.numel()
    walked = sum(t.untyped_storage().nbytes() for layer in packed.layers for t in layer.held_tensors())
    assert packed.nbytes == walked == cache_nbytes(packed)


def test_eight_bits_decode_within_tolerance_of_the_unquantized_context_and_two_bits_further():
    ids = random_ids(CONTEXT, batch=2, seed=9)
    outputs = {}
    for spec in (PLAIN, f"{PLAIN}+quantized:nbits=8,group_size=8", f"{PLAIN}+quantized:nbits=2,group_size=8"):
        model = make_tiny_model("llama-gqa")
        cache = compressed(spec, ids, model=model)
        with torch.no_grad():  # three decoding steps over the compressed context
            steps = [model(ids[:, t : t + 1], past_key_values=cache).logits for t in range(3)]
        outputs[spec] = torch.cat(steps, 1)
    exact, eight, two = outputs.values()
    assert (eight - exact).abs().max() <= 0.01 * exact.abs().max()
    assert (two - exact).abs().max() > 5 * (eight - exact).abs().max()


@pytest.mark.parametrize(
    "quantized, message",
    [
        (
            "residual_length=0",
            "residual_length=0: the packed store of a compressed context holds each kept entry",
        ),
        ("keys=pre_rope", "keys='pre_rope': the packed store"),
        ("outliers=0.1", "outliers=0.1: the packed store"),
        ("num_sink_tokens=0,backend=quanto", "num_sink_tokens=0, backend='quanto': the packed store"),
    ],
)
def test_settings_the_packed_context_cannot_hold_are_named(quantized, message):
    with pytest.raises(ValueError, match=message):
        build_cache(f"{PLAIN}+quantized:{quantized}", make_tiny_model("llama"))


def test_a_head_that_keeps_nothing_still_decodes_from_a_packed_store():
    from hf_kvcache.strategies.quantized import QuantizedOptions
    from hf_kvcache.strategies.ragged import RaggedEntries

    generator = torch.Generator().manual_seed(1)
    keys, values = (
        torch.randn(1, 2, 6, 16, generator=generator),
        torch.randn(1, 2, 6, 16, generator=generator),
    )
    keep = torch.zeros(1, 2, 6, dtype=torch.bool)
    keep[0, 1, :4] = True  # head 0 keeps no entry
    store = RaggedEntries(QuantizedOptions(nbits=8, group_size=8))
    store.fill(keys, values, keep)
    empty_keys, _ = store.entries(0, 0)
    assert empty_keys.shape == (0, 16)
    query = torch.randn(1, 2, 1, 16, generator=generator)
    tail = torch.randn(1, 2, 1, 16, generator=generator)
    out = store.attend(query, tail, tail, None, 0.25)
    torch.testing.assert_close(out[0, 0, 0], tail[0, 0, 0])  # head 0 sees only its tail entry


@pytest.mark.parametrize("rotation", ["none", "hadamard"])
def test_attention_over_a_packed_store_equals_attention_over_its_entries_from_the_definition(rotation):
    """The store is read with the query rotated and the output rotated back, never its entries: the result
    equals float64 attention over the entries quantize-dequantized from the definition."""
    from hf_kvcache.strategies.quantized import QuantizedOptions
    from hf_kvcache.strategies.ragged import RaggedEntries

    generator = torch.Generator().manual_seed(3)
    batch, heads, groups, length, dim = 2, 2, 2, 10, 16
    keys, values = (torch.randn(batch, heads, length, dim, generator=generator) for _ in "kv")
    keep = torch.rand(batch, heads, length, generator=generator) < 0.6
    store = RaggedEntries(QuantizedOptions(nbits=4, group_size=8, rotation=rotation))
    store.fill(keys, values, keep)
    query = torch.randn(batch, heads * groups, 1, dim, generator=generator)
    tail_keys, tail_values = (torch.randn(batch, heads, 1, dim, generator=generator) for _ in "kv")
    out = store.attend(query, tail_keys, tail_values, None, 0.25)
    for row in range(batch):
        for head in range(heads):
            held = [reference_entries(x[row, head][keep[row, head]], 4, 8, rotation) for x in (keys, values)]
            held_keys, held_values = (
                torch.cat([x, tail[row, head].double()])
                for x, tail in zip(held, (tail_keys, tail_values), strict=True)
            )
            q = query[row, head * groups : (head + 1) * groups, 0].double()
            expected = torch.softmax(q @ held_keys.T * 0.25, -1) @ held_values
            got = out[row, 0, head * groups : (head + 1) * groups].double()
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)  # float32 sums
