"""Per-layer code widths from a calibration pass: the measured cost against a from-scratch recomputation, the
greedy allocation against a hand-worked case, the file format and its errors, and the CLI command."""

import json

import pytest
import torch
from transformers import DynamicCache

from hf_kvcache import build_cache, cache_nbytes
from hf_kvcache.calibration import (
    calibrate_quantization,
    default_calibration_path,
    load_calibration,
    recall_probe,
)
from hf_kvcache.cli import main
from hf_kvcache.strategies.quantized import QuantizedOptions
from hf_kvcache.width_allocation import CLIPPED, allocate_clipping, allocate_widths
from tests.conftest import make_tiny_model, random_ids
from tests.test_clipping import searched_from_definition

SETTING = dict(group_size=8, residual_length=0, num_sink_tokens=0)


def reference_quantized_keys(keys: torch.Tensor, nbits: int) -> torch.Tensor:
    """Keys ``[B, H, 40, D]`` quantized per channel over groups of 8 tokens in float64, by definition."""
    groups = keys.double().unflatten(2, (-1, 8))
    low, high = groups.amin(3, keepdim=True), groups.amax(3, keepdim=True)
    step = (high - low) / (2**nbits - 1)
    return (torch.round((groups - low) / step) * step + low).flatten(2, 3).to(keys.dtype)


@torch.no_grad()
def divergence_over_first_keys(model, ids: torch.Tensor, coarse) -> float:
    """KL divergence of the last 8 tokens' predictions when the first layer's keys of the 40-token context are
    ``coarse(keys)``, from those over the exact keys: the cost recomputed from scratch."""
    context = DynamicCache(config=model.config)
    model(ids[:, :40], past_key_values=context)
    layers = [(layer.keys, layer.values) for layer in context.layers]
    runs = []
    for first_keys in (layers[0][0], coarse(layers[0][0])):
        cache = DynamicCache(config=model.config)
        for index, (keys, values) in enumerate([(first_keys, layers[0][1]), *layers[1:]]):
            cache.update(keys, values, index)
        runs.append(model(ids[:, 40:], past_key_values=cache).logits.double().log_softmax(-1))
    return (runs[0].exp() * (runs[0] - runs[1])).sum(-1).mean().item()


def test_the_cost_of_a_width_is_the_kl_divergence_of_a_run_over_those_coarse_keys():
    model = make_tiny_model("llama-gqa")
    ids = random_ids(48, seed=4)  # a 40-token context (five whole key groups) and 8 probe tokens
    record = calibrate_quantization(model, ids, QuantizedOptions(**SETTING), probe_tokens=8)
    expected = divergence_over_first_keys(model, ids, lambda keys: reference_quantized_keys(keys, 2))
    assert record["kl_divergence"]["keys"]["2"][0] == pytest.approx(expected, rel=1e-3, abs=1e-7)
    costs = record["kl_divergence"]
    assert set(costs) == {"keys", "values"} and all(len(costs[k][w]) == 2 for k in costs for w in costs[k])
    for kind in costs:  # coarser codes never cost less, summed over layers
        assert sum(costs[kind]["2"]) > sum(costs[kind]["3"]) > sum(costs[kind]["4"]) > sum(costs[kind]["8"])


def test_the_recall_probe_copies_spans_from_evenly_spaced_depths_of_the_context():
    # 14 context tokens; spans of 2, 2, 1, 1 tokens start at int((i + 0.5) / 4 * (14 - length)).
    probed = recall_probe(torch.arange(20)[None], 6)
    assert probed.tolist() == [[*range(14), 1, 2, 4, 5, 8, 11]]


def test_a_recall_calibration_costs_the_divergence_over_copied_probe_tokens():
    model = make_tiny_model("llama-gqa")
    ids = random_ids(48, seed=4)
    options = QuantizedOptions(**SETTING)
    record = calibrate_quantization(model, ids, options, probe_tokens=8, probe="recall")
    copied = torch.cat([ids[:, :40], ids[:, 4:6], ids[:, 14:16], ids[:, 23:25], ids[:, 33:35]], 1)
    expected = divergence_over_first_keys(model, copied, lambda keys: reference_quantized_keys(keys, 2))
    assert record["kl_divergence"]["keys"]["2"][0] == pytest.approx(expected, rel=1e-3, abs=1e-7)
    text = calibrate_quantization(model, ids, options, probe_tokens=8)
    assert (record["probe"], text["probe"]) == ("recall", "text")
    assert record["kl_divergence"]["keys"]["2"][0] != pytest.approx(text["kl_divergence"]["keys"]["2"][0])


def test_a_text_and_recall_calibration_sums_the_two_costs_of_every_layer_and_width():
    model = make_tiny_model("llama-gqa")
    ids = random_ids(48, seed=4)
    options = QuantizedOptions(**SETTING, clipping="calibrated")
    both = calibrate_quantization(model, ids, options, probe_tokens=8, probe="text+recall")
    text = calibrate_quantization(model, ids, options, probe_tokens=8, probe="text")
    recall = calibrate_quantization(model, ids, options, probe_tokens=8, probe="recall")
    assert both["probe"] == "text+recall" and both["options"] == text["options"]
    for entry in ("kl_divergence", "kl_divergence_mse"):
        for kind in ("keys", "values"):
            for width in ("2", "3", "4", "8"):
                pairs = zip(text[entry][kind][width], recall[entry][kind][width], strict=True)
                assert both[entry][kind][width] == pytest.approx([a + b for a, b in pairs], rel=1e-6)


@pytest.mark.parametrize(
    "probe, probe_tokens, message",
    [
        ("needle", 8, "probe must be one of \\['text', 'recall', 'text\\+recall'\\], got 'needle'"),
        ("recall", 3, "it needs probe_tokens >= 4 and a context at least as long, got probe_tokens=3 of 48"),
        ("recall", 30, "got probe_tokens=30 of 48 tokens"),
    ],
)
def test_bad_probes_are_named(probe, probe_tokens, message):
    options = QuantizedOptions(**SETTING)
    with pytest.raises(ValueError, match=message):
        calibrate_quantization(make_tiny_model("llama"), random_ids(48), options, probe_tokens, probe)


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
    assert allocate_widths(record, 4.0) == [(4, 4), (4, 4)]  # a record of widths 2-4 (made before 8)
    assert allocate_widths(record, 8.0) == [(4, 4), (4, 4)]


def test_a_step_to_8_bits_costs_4_bits_and_is_taken_by_its_saving_per_bit():
    record = hand_record(
        keys={"2": [0.9, 0.2], "3": [0.3, 0.16], "4": [0.2, 0.12], "8": [0.0, 0.1]},  # 4 -> 8: .05 per bit
        values={"2": [0.1, 0.4], "3": [0.08, 0.15], "4": [0.07, 0.115], "8": [0.07, 0.115]},
    )
    assert allocate_widths(record, 2.75) == [(4, 2), (2, 3)]  # saving .6, .25, .1 for one bit each
    assert allocate_widths(record, 3.75) == [(8, 2), (2, 3)]  # then .05 per bit for four
    # Four bits do not fit in 3.5: the next one-bit steps, .04, .04 and .035, do.
    assert allocate_widths(record, 3.5) == [(4, 2), (4, 4)]
    assert allocate_widths(record, 8.0) == [(8, 8), (8, 8)]


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


def test_a_layer_given_8_bit_codes_keeps_its_scales_in_the_model_dtype_and_counts_them(tmp_path):
    model = make_tiny_model("llama-gqa")
    record = calibrate_quantization(
        model, random_ids(48, seed=4), QuantizedOptions(**SETTING), probe_tokens=8
    )
    # Only layer 0's keys cost anything, 2/bit from 4 to 8 bits: at 3.5 bits they take 8 (1 + 1 + 4 bits).
    for costs in record["kl_divergence"].values():
        for width in costs:
            costs[width] = [0.0, 0.0]
    record["kl_divergence"]["keys"].update({"2": [10.0, 0.0], "3": [9.0, 0.0], "4": [8.0, 0.0]})
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(record))
    setting = "group_size=8,residual_length=0,num_sink_tokens=0"
    cache = build_cache(f"quantized:calibrated_bits=3.5,calibration={path},scales=float8,{setting}", model)
    assert [(layer.options.key_nbits, layer.options.value_nbits) for layer in cache.layers] == [
        (8, 2),
        (2, 2),
    ]
    assert [layer.options.scales for layer in cache.layers] == ["model", "float8"]
    ids = random_ids(64, seed=5)
    with torch.no_grad():
        model(ids, past_key_values=cache)
    # Layer 0 holds what a uniform cache of its widths and model-dtype scales holds.
    alone = build_cache(f"quantized:nbits=2,nbits_keys=8,{setting}", model)
    with torch.no_grad():
        model(ids, past_key_values=alone)
    assert torch.equal(cache.layers[0].keys, alone.layers[0].keys)
    batch, heads, dim, tokens = 1, 2, 16, 64

    def scales(size: int) -> int:
        return 2 * batch * heads * (tokens // 8) * dim * size + 2 * batch * heads * tokens * (dim // 8) * size

    codes = sum(batch * heads * tokens * dim * (k + v) // 8 for k, v in [(8, 2), (2, 2)])
    assert cache_nbytes(cache) == codes + scales(4) + scales(1)  # float32 model, float8 scales


def test_a_calibration_made_before_8_bit_codes_gives_widths_it_measured_or_an_error(tmp_path):
    model = make_tiny_model("llama-gqa")
    record = calibrate_quantization(
        model, random_ids(48, seed=4), QuantizedOptions(**SETTING), probe_tokens=8
    )
    for kind in record["kl_divergence"]:
        del record["kl_divergence"][kind]["8"]
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(record))
    setting = f"calibration={path},group_size=8,residual_length=0,num_sink_tokens=0"
    cache = build_cache(f"quantized:calibrated_bits=4,{setting}", model)
    assert [(layer.options.key_nbits, layer.options.value_nbits) for layer in cache.layers] == [(4, 4)] * 2
    with pytest.raises(
        ValueError, match=r"calibrated_bits=5.0 is above the widest codes .* measured \(4 bits\)"
    ):
        build_cache(f"quantized:calibrated_bits=5,{setting}", model)
    record["options"]["clipping"], record[CLIPPED] = "calibrated", record["kl_divergence"]
    path.write_text(json.dumps(record))
    with pytest.raises(
        ValueError, match=r"nbits_keys=8 with clipping='calibrated': .* measured widths \[2, 3, 4\]"
    ):
        build_cache(f"quantized:nbits=2,nbits_keys=8,clipping=calibrated,{setting}", model)


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
        ("quantized:calibrated_bits=1.5", "calibrated_bits must be a number in \\[2, 8\\], got 1.5"),
        ("quantized:calibrated_bits=8.5", "calibrated_bits must be a number in \\[2, 8\\], got 8.5"),
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
    assert json.loads(path.read_text())["probe"] == "text"
    assert (
        main([*argv, "--max-tokens", "96", "--probe-tokens", "16", "--strategy", spec, "--probe", "recall"])
        == 0
    )
    assert json.loads(path.read_text())["probe"] == "recall"
    cache = build_cache(spec.replace("quantized:", "quantized:calibrated_bits=3,"), model)
    assert {layer.options.key_nbits for layer in cache.layers} <= {2, 3, 4}


def test_calibrated_clipping_measures_every_width_without_and_with_clipping():
    model, ids = make_tiny_model("llama-gqa"), random_ids(48, seed=4)
    record = calibrate_quantization(model, ids, QuantizedOptions(**SETTING, clipping="calibrated"), 8)
    for clipping, entry in (("none", "kl_divergence"), ("mse", CLIPPED)):
        alone = calibrate_quantization(model, ids, QuantizedOptions(**SETTING, clipping=clipping), 8)
        assert record[entry] == alone["kl_divergence"]
    # The clipped cost of 2-bit keys in layer 0, against a run over keys clipped by definition.
    expected = divergence_over_first_keys(
        model,
        ids,
        lambda keys: searched_from_definition(keys.unflatten(2, (-1, 8)), 3, 2).flatten(2, 3).float(),
    )
    assert record[CLIPPED]["keys"]["2"][0] == pytest.approx(expected, rel=1e-3, abs=1e-7)


def test_each_layer_takes_the_width_and_clipping_that_cost_least():
    record = hand_record(
        keys={"2": [0.9, 0.2], "3": [0.3, 0.1], "4": [0.1, 0.05]},
        values={"2": [0.1, 0.4], "3": [0.05, 0.15], "4": [0.0, 0.1]},
    )
    assert allocate_widths(record, 2.25) == [(3, 2), (2, 2)]  # without clipping, keys of layer 0 (.6)
    record[CLIPPED] = {
        "keys": {"2": [0.35, 0.3], "3": [0.3, 0.1], "4": [0.2, 0.01]},  # layer 0 at 2 bits: .35 clipped
        "values": {"2": [0.2, 0.1], "3": [0.1, 0.12], "4": [0.05, 0.1]},
    }
    # Least costs: keys of layer 0 now save .05 a step, layer 1's .1; values of layer 1 cost .1 clipped.
    widths = allocate_widths(record, 2.25)
    assert widths == [(2, 2), (3, 2)]
    # Layer 0: keys clipped (.35 < .9), values not (.2 > .1); layer 1: keys tie (.1), values clipped.
    assert allocate_clipping(record, widths) == ["mse-keys", "mse-values"]
    assert allocate_clipping(record, [(4, 4), (4, 4)]) == ["none", "mse-keys"]


@pytest.mark.parametrize("widths", ["calibrated_bits=2.5", "nbits=2"])
def test_a_cache_with_calibrated_clipping_clips_each_layer_as_chosen(tmp_path, widths):
    model, ids = make_tiny_model("llama-gqa"), random_ids(48, seed=4)
    record = calibrate_quantization(model, ids, QuantizedOptions(**SETTING, clipping="calibrated"), 8)
    plain = record["kl_divergence"]
    # Clipping wins keys in layer 0 and values in layer 1, whatever the tiny model measured.

    def clipped(kind: str, layer: int) -> float:
        return 0.5 if (layer == 0) == (kind == "keys") else 2.0

    record[CLIPPED] = {
        kind: {w: [c * clipped(kind, i) for i, c in enumerate(costs)] for w, costs in plain[kind].items()}
        for kind in plain
    }
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(record))
    setting = "group_size=8,residual_length=0,num_sink_tokens=0"
    cache = build_cache(f"quantized:{widths},clipping=calibrated,calibration={path},{setting}", model)
    assert [layer.options.clipping for layer in cache.layers] == ["mse-keys", "mse-values"]
    layer_widths = [(layer.options.key_nbits, layer.options.value_nbits) for layer in cache.layers]
    if widths == "nbits=2":
        assert layer_widths == [(2, 2), (2, 2)]
    else:
        assert layer_widths == allocate_widths(record, 2.5)
    with torch.no_grad():
        model(ids, past_key_values=cache)
    for index, layer in enumerate(cache.layers):
        nbits = f"nbits_keys={layer.options.key_nbits},nbits_values={layer.options.value_nbits}"
        uniform = {}
        for clipping in ("none", "mse"):
            uniform[clipping] = build_cache(f"quantized:{nbits},clipping={clipping},{setting}", model)
            with torch.no_grad():
                model(ids, past_key_values=uniform[clipping])
        keys_from, values_from = ("mse", "none") if index == 0 else ("none", "mse")
        assert torch.equal(layer.keys, uniform[keys_from].layers[index].keys)
        assert torch.equal(layer.values, uniform[values_from].layers[index].values)


@pytest.mark.parametrize(
    "spec, message",
    [
        (
            "sliding-window+quantized:clipping=calibrated",
            "clipping='calibrated' is an option of quantized alone",
        ),
        ("kvzip+quantized:clipping=calibrated", "clipping='calibrated'"),
    ],
)
def test_bad_calibrated_clipping_is_named(spec, message):
    with pytest.raises(ValueError, match=message):
        build_cache(spec, make_tiny_model("llama"))


def test_a_missing_clipping_calibration_gives_the_command_that_makes_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_KVCACHE_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="--strategy 'quantized:group_size=8.*clipping=calibrated'"):
        build_cache("quantized:nbits=2,group_size=8,clipping=calibrated", make_tiny_model("llama"))
