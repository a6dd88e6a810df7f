"""``quantized:outliers=F``: each token's outlying entries kept exact in a sparse store, checked against a
float64 split-quantize-restore from the definition, byte counts from the storage walk, and its errors."""

import math

import pytest
import torch

from hf_kvcache import build_cache, cache_nbytes
from hf_kvcache.calibration import calibrated_options
from hf_kvcache.strategies.quantized import QuantizedLayer, QuantizedOptions
from tests.conftest import make_tiny_model, random_ids
from tests.test_sub4bit import reference_quantize


def reference_split(x: torch.Tensor, count: int, size: int, per_channel: bool):
    """Float64, one token at a time: the ``count`` entries farthest from their group's mean are outliers;
    each is replaced by the mean of the rest of its group."""
    x = x.double()
    batch, heads, length, dim = x.shape
    dense, outlier = x.clone(), torch.zeros_like(x, dtype=torch.bool)
    for b in range(batch):
        for h in range(heads):
            for t in range(length):
                start = t // size * size
                centers = [
                    x[b, h, start : start + size, c].mean()
                    if per_channel
                    else x[b, h, t, c // size * size :][:size].mean()
                    for c in range(dim)
                ]
                deviation = [(x[b, h, t, c] - centers[c]).abs().item() for c in range(dim)]
                for c in sorted(range(dim), key=lambda c: -deviation[c])[:count]:
                    outlier[b, h, t, c] = True
    for b in range(batch):
        for h in range(heads):
            for t in range(length):
                for c in range(dim):
                    if not outlier[b, h, t, c]:
                        continue
                    if per_channel:
                        start = t // size * size
                        group, others = (
                            x[b, h, start : start + size, c],
                            ~outlier[b, h, start : start + size, c],
                        )
                    else:
                        start = c // size * size
                        group, others = (
                            x[b, h, t, start : start + size],
                            ~outlier[b, h, t, start : start + size],
                        )
                    dense[b, h, t, c] = group[others].mean() if others.any() else 0.0
    return dense, outlier


@pytest.mark.parametrize("fraction_keys, fraction_values", [(0.1, 0.1), (0.2, 0.0), (0.0, 0.05)])
def test_outliers_are_exact_and_the_rest_equals_float64_quantize_dequantize(fraction_keys, fraction_values):
    generator = torch.Generator().manual_seed(7)
    keys = torch.randn(1, 2, 40, 16, generator=generator)
    values = torch.randn(1, 2, 40, 16, generator=generator)
    spikes = torch.rand(1, 2, 40, 16, generator=generator) < 0.05
    keys, values = keys + 30 * spikes, values - 25 * spikes  # scattered entries that stretch a group's range
    options = QuantizedOptions(
        2, 8, 0, num_sink_tokens=0, outliers_keys=fraction_keys, outliers_values=fraction_values
    )
    layer = QuantizedLayer(options)
    layer.update(keys, values)
    assert layer.packed_length == 40
    for x, fraction, per_channel, held in (
        (keys, fraction_keys, True, layer.keys),
        (values, fraction_values, False, layer.values),
    ):
        count = math.ceil(fraction * 16)
        dense, outlier = reference_split(x, count, 8, per_channel)
        shape = (1, 2, 5, 8, 16) if per_channel else (1, 2, 40, 2, 8)
        want = reference_quantize(dense.view(shape), 2, 3 if per_channel else 4).view(x.shape)
        want = torch.where(outlier, x.double(), want)
        assert int(outlier.sum()) == 2 * 40 * count
        assert torch.allclose(held.double(), want, atol=1e-5 * x.abs().max().item(), rtol=0)
        assert torch.equal(held[outlier], x[outlier])  # exact: stored in the model's dtype (float32 here)


def test_outliers_cut_the_error_of_spiky_tokens_and_bytes_come_from_the_storage_walk():
    generator = torch.Generator().manual_seed(3)
    keys, values = (
        torch.randn(2, 2, 48, 16, generator=generator),
        torch.randn(2, 2, 48, 16, generator=generator),
    )
    keys[..., 5, 3] += 40.0  # one entry per head that stretches its channel's key group
    values[..., 9, 11] -= 40.0
    errors, nbytes = {}, {}
    for fraction in (0.0, 0.0625):
        layer = QuantizedLayer(QuantizedOptions(2, 8, 0, num_sink_tokens=0, outliers=fraction))
        layer.update(keys, values)
        errors[fraction] = max(
            (layer.keys - keys).abs().max().item(), (layer.values - values).abs().max().item()
        )
        nbytes[fraction] = layer.nbytes
    assert errors[0.0625] < errors[0.0] / 4
    # one exact entry per token, head and tensor: a uint8 channel index and a float32 value
    assert nbytes[0.0625] - nbytes[0.0] == 2 * (2 * 2 * 48 * 1 * (1 + 4))


def test_cache_bytes_count_the_sparse_store_and_compositions_evict_it_with_the_tokens():
    model = make_tiny_model("llama-gqa")  # 2 layers, 2 KV heads of size 16, float32
    ids = random_ids(74, batch=2)
    sizes = {}
    for spec in (
        "quantized:nbits=2,group_size=8,residual_length=8",
        "quantized:nbits=2,group_size=8,residual_length=8,outliers=0.2",
    ):
        cache = build_cache(spec, model)
        with torch.no_grad():
            model(ids, past_key_values=cache)
        walked = sum(t.untyped_storage().nbytes() for layer in cache.layers for t in layer.held_tensors())
        assert cache.nbytes == walked == cache_nbytes(cache)
        sizes[spec] = cache.nbytes, cache.layers[0].packed_length
    (plain, packed), (with_outliers, _) = sizes.values()
    assert with_outliers - plain == 2 * 2 * (2 * 2 * packed * math.ceil(0.2 * 16) * (1 + 4))
    spec = "sliding-window:window_length=40+quantized:nbits=2,group_size=8,residual_length=4,outliers=0.1"
    cache = build_cache(spec, model)
    with torch.no_grad():
        model(ids, past_key_values=cache)
        for token in range(6):
            model(ids[:, token : token + 1], past_key_values=cache)
    for layer in cache.layers:
        packed = layer.packed
        assert packed.key_outlier_index.shape == (2, 2, packed.length, 2) == packed.value_outlier_value.shape
        assert packed.key_outlier_index.dtype == torch.uint8


@pytest.mark.parametrize(
    "spec, message",
    [
        (
            "quantized:outliers=1.0",
            "outliers must be a fraction in \\[0, 1\\) of each token's entries to keep exact, got 1.0",
        ),
        ("quantized:outliers_keys=-0.1", "outliers_keys must be a fraction in \\[0, 1\\).*got -0.1"),
        ("quantized:outliers_values=2", "outliers_values must be a fraction in \\[0, 1\\).*got 2"),
    ],
)
def test_bad_outlier_fractions_are_named(spec, message):
    with pytest.raises(ValueError, match=message):
        build_cache(spec, make_tiny_model("llama"))


def test_a_calibration_setting_names_outliers_only_when_set():
    assert "outliers" not in calibrated_options(QuantizedOptions())
    assert calibrated_options(QuantizedOptions(outliers_keys=0.02))["outliers_keys"] == 0.02
