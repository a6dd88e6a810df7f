"""Per-layer code widths from a calibration pass: the measured cost against a from-scratch recomputation, the
greedy allocation against a hand-worked case, the file format and its errors, and the CLI command."""

import json

import pytest
import torch
from transformers import DynamicCache

from hf_kvcache import build_cache, cache_nbytes
from hf_kvcache.calibration import (
    allocate_widths,
    calibrate_quantization,
    default_calibration_path,
    load_calibration,
)
from hf_kvcache.cli import main
from hf_kvcache.strategies.quantized import QuantizedOptions
from tests.conftest import make_tiny_model, random_ids

SETTING = dict(group_size=8, residual_length=0, num_sink_tokens=0)


def reference_quantized_keys(keys: torch.Tensor, nbits: int) -> torch.Tensor:
    """Keys ``[B, H, 40, D]`` quantized per channel over groups of 8 tokens in float64, by definition."""
    groups = keys.double().unflatten(2, (-1, 8))
    low, high = groups.amin(3, keepdim=True), groups.amax(3, keepdim=True)
    step = (high - low) / (2**nbits - 1)
    return (torch.round((groups - low) / step) * step + low).flatten(2, 3).to(keys.dtype)


def test_the_cost_of_a_width_is_the_kl_divergence_of_a_run_over_those_coarse_keys():
    model = make_tiny_model("llama-gqa")
    ids = random_ids(48, seed=4)  # a 40-token context (five whole key groups) and 8 probe tokens
    record = calibrate_quantization(model, ids, QuantizedOptions(**SETTING), probe_tokens=8)
    with torch.no_grad():
        context = DynamicCache(config=model.config)
        model(ids[:, :40], past_key_values=context)
        layers = [(layer.keys, layer.values) for layer in context.layers]
        runs = {}
        for name, first_keys in (
            ("exact", layers[0][0]),
            ("coarse", reference_quantized_keys(layers[0][0], 2)),
        ):
            cache = DynamicCache(config=model.config)
            for index, (keys, values) in enumerate([(first_keys, layers[0][1]), *layers[1:]]):
                cache.update(keys, values, index)
            runs[name] = model(ids[:, 40:], past_key_values=cache).logits.double().log_softmax(-1)
    expected = (runs["exact"].exp() * (runs["exact"] - runs["coarse"])).sum(-1).mean().item()
    assert record["kl_divergence"]["keys"]["2"][0] == pytest.approx(expected, rel=1e-3, abs=1e-7)
    costs = record["kl_divergence"]
    assert set(costs) == {"keys", "values"} and all(len(costs[k][w]) == 2 for k in costs for w in costs[k])
    for kind in costs:  # coarser codes never cost less, summed over layers
        assert sum(costs[kind]["2"]) > sum(costs[kind]["3"]) > sum(costs[kind]["4"]) >= 0


def hand_record(keys: dict, values: dict) -> dict:
    return {"geometry": {"num_layers": 2}, "kl_divergence": {"keys": keys, "values": values}}


def test_allocation_buys_the_largest_saving_per_bit_until_the_mean_is_reached():
    record = hand_record(
        keys={"2": [0.9, 0.2], "3": [0.3, 0.1], "4": [0.1, 0.05]},  # steps: layer 0 saves .6 then .2
        values={"2": [0.1, 0.4], "3": [0.05, 0.15], "4": [0.0, 0.1]},  # layer 1 saves .25 then .05
    )
    assert allocate_widths(record, 2.0) == [(2, 2), (2, 2)]
    assert allocate_widths(record, 2.25) == [(3, 2), (2, 2)]  # one step: keys of layer 0 (.6)
    assert allocate_widths(record, 2.5) == [(3, 2), (2, 3)]  # then values of layer 1 (.25)
    assert allocate_widths(record, 2.75) == [(4, 2), (2, 3)]  # then keys of layer 0 again (.2)
    assert allocate_widths(record, 4.0) == [(4, 4), (4, 4)]


def test_a_calibrated_cache_gives_each_layer_its_widths_and_counts_their_bytes(tmp_path):
    model = make_tiny_model("llama-gqa")
    record = calibrate_quantization(
        model, random_ids(48, seed=4), QuantizedOptions(**SETTING), probe_tokens=8
    )
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(record))
    spec = (
        f"quantized:calibrated_bits=2.5,calibration={path},group_size=8,residual_length=0,num_sink_tokens=0"
    )
    cache = build_cache(spec, model)
    widths = allocate_widths(record, 2.5)
    assert [(layer.options.key_nbits, layer.options.value_nbits) for layer in cache.layers] == widths
    with torch.no_grad():
        model(random_ids(64, seed=5), past_key_values=cache)
    batch, heads, dim, tokens, fp = 1, 2, 16, 64, 4  # all 64 tokens packed
    scales = 2 * batch * heads * (tokens // 8) * dim * fp + 2 * batch * heads * tokens * (dim // 8) * fp
    expected = sum(batch * heads * tokens * dim * (k + v) // 8 + scales for k, v in widths)
    assert cache_nbytes(cache) == expected


def test_missing_foreign_and_mismatched_calibrations_get_errors_that_say_what_to_do(tmp_path):
    model = make_tiny_model("llama-gqa")
    options = QuantizedOptions(**SETTING)
    with pytest.raises(FileNotFoundError, match="make one with: hf-kvcache calibrate --model .* --strategy"):
        load_calibration(tmp_path / "none.json", model, options)
    record = calibrate_quantization(model, random_ids(48, seed=4), options, probe_tokens=8)
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(record))
    other = make_tiny_model("llama", num_layers=3)
    with pytest.raises(ValueError, match="geometry .*'num_layers': 2.*; .* has geometry .*'num_layers': 3"):
        load_calibration(path, other, options)
    with pytest.raises(ValueError, match="made for quantization options .*'group_size': 8.*'group_size': 16"):
        load_calibration(path, model, QuantizedOptions(group_size=16, residual_length=0, num_sink_tokens=0))
    path.write_text("{not json")
    with pytest.raises(ValueError, match="is not a calibration file"):
        load_calibration(path, model, options)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("quantized:calibrated_bits=1.5", "calibrated_bits must be a number in \\[2, 4\\], got 1.5"),
        ("quantized:calibrated_bits=3,nbits_keys=4", "nbits_keys=4 and calibrated_bits=3.0 both set"),
        (
            "quantized:calibrated_bits=3,group_size=4",
            "calibrated_bits needs a group_size that is a multiple of 8",
        ),
        ("quantized:calibration=x.json", "calibration='x.json' is read only with calibrated_bits"),
        ("sliding-window+quantized:calibrated_bits=3", "calibrated_bits=3.0 is an option of quantized alone"),
    ],
)
def test_bad_calibration_options_are_named(spec, message):
    with pytest.raises(ValueError, match=message):
        build_cache(spec, make_tiny_model("llama"))


def test_the_calibrate_command_writes_where_the_cache_reads(
    tiny_model_dir, filler_file, tmp_path, monkeypatch
):
    monkeypatch.setenv("HF_KVCACHE_HOME", str(tmp_path))
    spec = "quantized:group_size=8,residual_length=0,num_sink_tokens=0"
    argv = ["calibrate", "--model", str(tiny_model_dir), "--text-file", str(filler_file), "--device", "cpu"]
    assert main([*argv, "--max-tokens", "96", "--probe-tokens", "16", "--strategy", spec]) == 0
    from hf_kvcache.evaluation import load_model

    model, _ = load_model(str(tiny_model_dir), device="cpu")
    path = default_calibration_path(model, QuantizedOptions(**SETTING))
    assert path.is_file() and str(tmp_path) in str(path)
    cache = build_cache(spec.replace("quantized:", "quantized:calibrated_bits=3,"), model)
    assert {layer.options.key_nbits for layer in cache.layers} <= {2, 3, 4}
