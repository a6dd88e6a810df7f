"""``duo`` (DuoAttention): streaming heads against a cache-free forward under the sinks-and-window mask,
retrieval and streaming heads of one layer against float64 attention from the definition, DynamicCache where
nothing is lost, honest bytes, padding, the head calibration and its errors."""

import json
import math

import pytest
import torch
from transformers import DynamicCache

from hf_kvcache import build_cache
from hf_kvcache.cli import main
from hf_kvcache.head_calibration import load_head_calibration, retrieval_heads
from hf_kvcache.model_hooks import ForwardState
from hf_kvcache.strategies import duo
from hf_kvcache.strategies.duo import DuoLayer, DuoOptions
from hf_kvcache.strategies.quantized import QuantizedOptions
from tests.conftest import left_padded_ids, make_tiny_model, random_ids
from tests.helpers import check_generates_in_every_mode, stream


def sinks_and_window(length: int, window: int, sinks: int, pad: int = 0) -> torch.Tensor:
    """``[T, T]``: query i sees key j when j <= i and j is one of the row's first ``sinks`` real tokens or
    among the ``window`` ending at i (itself included)."""
    i, j = torch.arange(length)[:, None], torch.arange(length)[None, :]
    return (j <= i) & (j >= pad) & ((j > i - window) | (j < pad + sinks))


@pytest.mark.parametrize("chunk", [1, 7, 50])
def test_streaming_heads_equal_a_cache_free_forward_under_the_sinks_and_window_mask(chunk):
    eager = make_tiny_model("llama-gqa", attn="eager")
    ids = random_ids(50, batch=1, seed=2)
    allowed = sinks_and_window(50, 8, 2)
    mask = torch.zeros(1, 1, 50, 50).masked_fill(~allowed, torch.finfo(torch.float32).min)
    with torch.no_grad():
        expected = eager(ids, attention_mask=mask).logits
    model = make_tiny_model("llama-gqa")
    cache = build_cache("duo:retrieval=0.0,window=8,num_sink_tokens=2", model)
    torch.testing.assert_close(stream(model, ids, cache, chunk), expected, rtol=1e-4, atol=1e-5)
    for layer in cache.layers:  # two sinks and the newest window - 1 = 7, nothing more
        assert layer.stream_keys.shape == (1, 2, 2 + 7, 16) and layer.retrieval_keys.shape[1] == 0


@pytest.mark.parametrize(
    "block_logits, quantization",
    [(None, None), (64, None), (None, QuantizedOptions(nbits=8, group_size=8, residual_length=0))],
)  # 64: a block of one query row at a time; 8-bit retrieval heads: within quantization error
def test_retrieval_and_streaming_heads_of_one_layer_equal_float64_attention(
    block_logits, quantization, monkeypatch
):
    if block_logits is not None:
        monkeypatch.setattr(duo, "BLOCK_LOGITS", block_logits)
    generator = torch.Generator().manual_seed(0)
    batch, kv_heads, group, length, dim, window, sinks = 2, 3, 2, 30, 8, 6, 2
    keys, values = (torch.randn(batch, kv_heads, length, dim, generator=generator) for _ in range(2))
    query = torch.randn(batch, kv_heads * group, length, dim, generator=generator)
    options = DuoOptions(retrieval=0.5, num_sink_tokens=sinks, window=window, quantization=quantization)
    layer = DuoLayer([2], kv_heads, options, ForwardState())
    outputs = []
    for start in range(0, length, 10):  # three chunks, each attending through the layer
        layer.store_for_attention(keys[:, :, start : start + 10], values[:, :, start : start + 10])
        out, _ = layer.attend_stored(query[:, :, start : start + 10], None, dim**-0.5)
        outputs.append(out)
    got = torch.cat(outputs, dim=1).transpose(1, 2).double()  # [B, H_q, T, D]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    for head in range(kv_heads * group):
        allowed = causal if head // group == 2 else sinks_and_window(length, window, sinks)
        logits = (query[:, head].double() @ keys[:, head // group].double().transpose(-1, -2)) * dim**-0.5
        weights = logits.masked_fill(~allowed, float("-inf")).softmax(-1)
        tolerance = 1e-5 if quantization is None or head // group != 2 else 2e-2
        torch.testing.assert_close(
            got[:, head], weights @ values[:, head // group].double(), rtol=0, atol=tolerance
        )
    if quantization is not None:
        # 4 sinks exact, then whole key groups of 8 packed: 24 of the other 26.
        assert layer.retrieval_keys is None and layer.retrieval_packed.packed_length == 24
        return
    # Bytes: the retrieval head holds all 30, each streaming head 2 sinks + 5 newest, float32.
    assert layer.nbytes == 2 * batch * dim * 4 * (length + 2 * (sinks + window - 1)) + 8 * batch


@pytest.mark.parametrize("spec", ["duo:retrieval=1.0", "duo:retrieval=0.0,window=64"])
@pytest.mark.parametrize("arch, chunk", [("llama-gqa", 6), ("llama-gqa", 40), ("gemma2", 40)])
def test_losing_nothing_is_dynamic_cache(spec, arch, chunk, monkeypatch):
    # Whole-prompt forwards run in blocks of a few query rows (gemma2 soft-caps: the eager path).
    monkeypatch.setattr(duo, "BLOCK_LOGITS", 2048 if chunk == 40 else duo.BLOCK_LOGITS)
    model = make_tiny_model(arch)
    ids = random_ids(40, batch=2)
    expected = stream(model, ids, DynamicCache(config=model.config), chunk)
    torch.testing.assert_close(
        stream(model, ids, build_cache(spec, model), chunk), expected, rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize("block_logits", [None, 256])
def test_a_left_padded_row_generates_what_it_generates_alone(block_logits, monkeypatch):
    if block_logits is not None:
        monkeypatch.setattr(duo, "BLOCK_LOGITS", block_logits)
    model = make_tiny_model("llama-gqa")
    ids, mask = left_padded_ids(30, pads=(0, 3, 7), seed=4)
    spec = "duo:retrieval=0.0,window=6,num_sink_tokens=3"
    greedy = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    batch = model.generate(ids, attention_mask=mask, past_key_values=build_cache(spec, model), **greedy)
    for row, pad in enumerate((0, 3, 7)):
        alone = model.generate(ids[row : row + 1, pad:], past_key_values=build_cache(spec, model), **greedy)
        assert torch.equal(batch[row, 30:], alone[0, 30 - pad :])


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma2", "gemma3"])
def test_duo_serves_hybrid_and_other_architectures_in_every_mode(arch):
    check_generates_in_every_mode(make_tiny_model(arch), "duo:retrieval=0.0,window=6")
    check_generates_in_every_mode(
        make_tiny_model(arch), "duo:retrieval=1.0+quantized:nbits=2,residual_length=0"
    )


@pytest.fixture(scope="module")
def calibration(tiny_model_dir, filler_file, tmp_path_factory):
    path = tmp_path_factory.mktemp("heads") / "heads.json"
    argv = ["calibrate", "--strategy", "duo:window=16,num_sink_tokens=2", "--model", tiny_model_dir]
    argv += ["--text-file", filler_file, "--device", "cpu", "--max-tokens", "96", "--prompts", "2"]
    assert main([*argv, "--out", str(path)]) == 0
    return path


def test_the_calibration_scores_each_head_by_the_key_loss_its_streaming_adds(calibration, tiny_model_dir):
    from hf_kvcache.evaluation import load_model

    record = json.loads(calibration.read_text())
    assert record["format"] == "hf-kvcache head calibration" and record["version"] == 1
    assert record["settings"] == {"prompts": 2, "length": 96, "window": 16, "num_sink_tokens": 2}
    model, _ = load_model(tiny_model_dir, device="cpu")
    layers, heads = model.config.num_hidden_layers, model.config.num_key_value_heads
    assert len(record["scores"]) == layers and all(len(row) == heads for row in record["scores"])
    assert all(math.isfinite(score) for row in record["scores"] for score in row)
    options = DuoOptions(retrieval=0.5, calibration=str(calibration))
    chosen = retrieval_heads(model, build_cache("duo:retrieval=1.0", model).layout, options)
    flat = sorted(((score, (i, h)) for i, row in enumerate(record["scores"]) for h, score in enumerate(row)))
    top = {pair for _, pair in flat[-round(0.5 * layers * heads) :]}
    assert {(i, h) for i, row in enumerate(chosen) for h in row} == top


def test_calibration_errors_name_the_command_and_both_models(calibration, tmp_path):
    model = make_tiny_model("llama-gqa")
    with pytest.raises(
        FileNotFoundError, match="make one with: hf-kvcache calibrate --model .* --strategy duo"
    ):
        build_cache(f"duo:retrieval=0.5,calibration={tmp_path / 'none.json'}", model)
    with pytest.raises(ValueError, match="was made for .*tiny.* not for .*geometry"):
        load_head_calibration(calibration, model)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("duo:retrieval=1.5", "retrieval must be a fraction in \\[0, 1\\] of the KV heads, got 1.5"),
        ("duo:window=0", "window must be an integer >= 1"),
        ("duo:num_sink_tokens=-1", "num_sink_tokens must be an integer >= 0"),
    ],
)
def test_bad_options_are_named(spec, message):
    with pytest.raises(ValueError, match=message):
        build_cache(spec, make_tiny_model("llama"))


def test_a_model_the_entry_point_cannot_serve_gets_an_error():
    model = make_tiny_model("llama", attn="flex_attention")
    with pytest.raises(ValueError, match="duo's heads hold different numbers of tokens.*flex_attention"):
        build_cache("duo:retrieval=1.0", model)


@pytest.mark.parametrize("chunk", [1, 7, 40])
def test_quantized_retrieval_heads_hold_and_attend_as_the_quantized_strategy(chunk):
    """Every head retrieving: duo+quantized is the quantized cache (its store, dequantized for attention),
    attention and bytes alike; the streaming part holds nothing but each row's padding count."""
    model = make_tiny_model("llama-gqa")
    ids = random_ids(40, batch=2, seed=5)
    quantization = "quantized:nbits=2,group_size=16,residual_length=8"
    expected_cache, cache = (
        build_cache(quantization, model),
        build_cache(f"duo:retrieval=1.0+{quantization}", model),
    )
    expected = stream(model, ids, expected_cache, chunk)
    torch.testing.assert_close(stream(model, ids, cache, chunk), expected, rtol=1e-4, atol=1e-5)
    assert cache.nbytes == expected_cache.nbytes + 8 * 2 * len(cache.layers)
    assert all(layer.retrieval_packed.packed_length > 0 for layer in cache.layers)


def test_eight_bit_retrieval_heads_stay_close_to_dynamic_cache():
    model = make_tiny_model("llama-gqa")
    ids = random_ids(40, batch=2)
    expected = stream(model, ids, DynamicCache(config=model.config), 6)
    cache = build_cache("duo:retrieval=1.0+quantized:nbits=8,residual_length=0,group_size=16", model)
    torch.testing.assert_close(stream(model, ids, cache, 6), expected, rtol=0.05, atol=0.01)
