"""Saved caches: a round trip continues generation token for token, the file holds what the cache holds, and a
wrong model, a damaged file or another format version gets an error that names it and changes nothing."""

import json

import pytest
import torch
from transformers import DynamicCache

from hf_kvcache import build_cache, cache_nbytes, load_cache, prefill, save_cache
from tests.conftest import left_padded_ids, make_tiny_model
from tests.helpers import LOSSLESS, LOSSY

GREEDY = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0)


def generate_from(model, cache, ids, mask):
    return model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, **GREEDY)


@pytest.mark.parametrize("spec", sorted({*LOSSY.values(), *LOSSLESS.values()}))
@pytest.mark.parametrize("arch", ["llama-gqa", "gemma3"])
def test_a_saved_cache_continues_generation_token_for_token(tmp_path, spec, arch):
    model = make_tiny_model(arch)
    ids, mask = left_padded_ids(30, pads=(0, 4, 11), seed=2)
    original = prefill(model, ids, build_cache(spec, model), chunk_size=7, attention_mask=mask)
    # A decoding step first, so that eviction layers hold slots out of age order and a pending victim.
    with torch.no_grad():
        model(ids[:, -1:], attention_mask=mask, past_key_values=original)
    path = save_cache(original, tmp_path / "cache.safetensors", model=model)
    restored = load_cache(path, model)
    assert type(restored) is type(original) and restored.get_seq_length() == original.get_seq_length()
    grown_ids = torch.cat([ids, ids[:, -1:]], 1)
    grown_mask = torch.cat([mask, mask[:, -1:]], 1)
    expected = generate_from(model, original, grown_ids, grown_mask)
    assert torch.equal(generate_from(model, restored, grown_ids, grown_mask), expected)


@pytest.mark.parametrize("spec", sorted(set(LOSSY.values())))
def test_the_file_is_the_bytes_the_cache_holds(tmp_path, spec):
    model = make_tiny_model("llama-gqa")
    ids = left_padded_ids(60, pads=(0, 9), seed=1)[0]
    cache = prefill(model, ids, build_cache(spec, model), chunk_size=16)
    path = save_cache(cache, tmp_path / "cache.safetensors", model=model)
    with open(path, "rb") as stream:
        header = int.from_bytes(stream.read(8), "little") + 8
    size = path.stat().st_size
    assert abs((size - header) - cache_nbytes(cache)) <= 0.01 * cache_nbytes(cache)


def test_packed_codes_stay_packed(tmp_path):
    model = make_tiny_model("llama")
    cache = build_cache("quantized:nbits=2,group_size=8,residual_length=8", model)
    prefill(model, left_padded_ids(60, pads=(0,), seed=1)[0], cache, chunk_size=60)
    path = save_cache(cache, tmp_path / "cache.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        codes = handle.get_tensor("layers.0.packed.key_codes")
    assert codes.dtype == torch.uint8 and torch.equal(codes, cache.layers[0].packed.key_codes)


@pytest.fixture
def saved(tmp_path):
    model = make_tiny_model("llama")
    cache = build_cache("sliding-window:window_length=16", model)
    prefill(model, left_padded_ids(40, pads=(0,), seed=3)[0], cache, chunk_size=8)
    return model, cache, save_cache(cache, tmp_path / "cache.safetensors")


def test_a_model_of_another_geometry_is_named_and_left_untouched(saved):
    _, _, path = saved
    other = make_tiny_model("llama-gqa")
    hooks = (dict(other._forward_pre_hooks), [dict(m._forward_hooks) for m in other.modules()])
    message = "'key_value_heads': 4.* but LlamaForCausalLM has .*'key_value_heads': 2"
    with pytest.raises(ValueError, match=message):
        load_cache(path, other)
    assert hooks == (dict(other._forward_pre_hooks), [dict(m._forward_hooks) for m in other.modules()])


def test_a_truncated_file_is_named(saved):
    model, _, path = saved
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="cache.safetensors is not a readable safetensors file"):
        load_cache(path, model)


def test_a_corrupted_file_is_named(saved):
    model, _, path = saved
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="cache.safetensors is corrupted"):
        load_cache(path, model)


def test_a_file_of_another_format_version_is_named(saved, monkeypatch):
    model, cache, path = saved
    monkeypatch.setattr("hf_kvcache.saving.FORMAT_VERSION", 2)
    newer = save_cache(cache, path.with_name("newer.safetensors"))
    monkeypatch.undo()
    with pytest.raises(ValueError, match="in cache format 2; this hf-kvcache reads format 1 only"):
        load_cache(newer, model)


def test_loading_leaves_other_caches_alone(saved):
    model, cache, path = saved
    before = [t.clone() for layer in cache.layers for t in layer.held_tensors()]
    load_cache(path, model)
    after = list(t for layer in cache.layers for t in layer.held_tensors())
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_the_full_cache_saves_with_its_model(tmp_path):
    model = make_tiny_model("gemma3")
    cache = DynamicCache(config=model.config)
    prefill(model, left_padded_ids(30, pads=(0,), seed=3)[0], cache, chunk_size=8)
    with pytest.raises(ValueError, match="saving a DynamicCache needs the model it serves"):
        save_cache(cache, tmp_path / "full.safetensors")
    path = save_cache(cache, tmp_path / "full.safetensors", model=model)
    meta = json.loads(json.dumps(__import__("safetensors").safe_open(str(path), "pt").metadata()))
    assert meta["spec"] == "full"
    restored = load_cache(path, model)
    assert all(torch.equal(a.keys, b.keys) for a, b in zip(cache.layers, restored.layers, strict=True))
