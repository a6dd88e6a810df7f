"""Decoding steps of ``eviction+quantized`` compositions in place, over packed slots: the same tokens, logits
and held entries as the general path (``attention=dense``: dequantize everything, attend, gather) on every
test architecture, with padding, beam search and every code width; the slot kernel against float64 sums;
no dequantized copy and no gather of the packed store on a decoding step; the general path, saving and
loading after slots."""

import pytest
import torch

from hf_kvcache import build_cache, load_cache
from hf_kvcache import kernels as kernel_module
from hf_kvcache.strategies.packed_slots import EMPTY_SLOT, PackedSlots
from hf_kvcache.strategies.packed_store import PackedTokens
from hf_kvcache.strategies.packing import TorchCodec
from tests import helpers
from tests.conftest import ARCHITECTURES, MORE_ARCHITECTURES, left_padded_ids, make_tiny_model, random_ids
from tests.helpers import record_calls, stream

QUANTIZED = "quantized:nbits={nbits},group_size=8,residual_length=8"
WINDOW = "sliding-window:window_length=36,num_sink_tokens=4+" + QUANTIZED
H2O = "heavy-hitter:heavy_budget=16,recent_budget=12+" + QUANTIZED
SPECS = {"window": WINDOW, "h2o": H2O}


def decode(model, spec, ids, mask=None, mode: str = "greedy", new: int = 30):
    """:func:`tests.helpers.decode`, 30 new tokens by default: several key groups packed and evicted."""
    return helpers.decode(model, spec, ids, mask, mode, new)


@pytest.fixture
def slot_steps(monkeypatch):
    """The layers whose attention ran over packed slots, one entry per call."""
    return record_calls(monkeypatch, PackedSlots, "attend_stored")


def assert_same_run(run, dense_run) -> None:
    (tokens, logits, cache), (dense_tokens, dense_logits, dense_cache) = run, dense_run
    assert torch.equal(tokens, dense_tokens)
    torch.testing.assert_close(logits, dense_logits, rtol=1e-4, atol=1e-4)
    for layer, dense_layer in zip(cache.layers, dense_cache.layers, strict=True):
        torch.testing.assert_close(layer.keys, dense_layer.keys, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(layer.values, dense_layer.values, rtol=1e-4, atol=1e-4)
    assert cache.get_seq_length() == dense_cache.get_seq_length()


@pytest.mark.parametrize("arch", sorted({*ARCHITECTURES, *MORE_ARCHITECTURES}))
@pytest.mark.parametrize("strategy", sorted(SPECS))
def test_slot_decoding_equals_the_general_path_on_every_architecture(arch, strategy, slot_steps):
    model = make_tiny_model(arch)
    spec = SPECS[strategy].format(nbits=2)
    ids = random_ids(40)
    dense = decode(model, spec + ",attention=dense", ids)
    assert not slot_steps
    run = decode(model, spec, ids)
    global_layers = sum(isinstance(layer, PackedSlots) for layer in run[2].layers)
    # Every decoding step but the first (the prompt's last chunk leaves the residual to settle) runs in place.
    assert len(slot_steps) == global_layers * 29
    assert_same_run(run, dense)


@pytest.mark.parametrize("nbits", [3, 4, 8])
@pytest.mark.parametrize("backend", ["torch", "compiled"])
@pytest.mark.parametrize("strategy", sorted(SPECS))
def test_every_width_and_backend_equals_the_general_path(nbits, backend, strategy, slot_steps):
    model = make_tiny_model("llama-gqa")
    spec = SPECS[strategy].format(nbits=nbits) + f",attention={backend}"
    ids = random_ids(50, seed=2)
    dense = decode(model, SPECS[strategy].format(nbits=nbits) + ",attention=dense", ids)
    run = decode(model, spec, ids)
    assert slot_steps
    assert_same_run(run, dense)


@pytest.mark.parametrize("mode", ["greedy", "beam"])
@pytest.mark.parametrize("strategy", sorted(SPECS))
def test_left_padded_batches_and_beam_search_equal_the_general_path(mode, strategy, slot_steps):
    model = make_tiny_model("llama", num_key_value_heads=2)
    ids, mask = left_padded_ids(30, pads=(0, 5, 11), seed=3)
    spec = SPECS[strategy].format(nbits=4)
    dense = decode(model, spec + ",attention=dense", ids, mask, mode, new=40)
    run = decode(model, spec, ids, mask, mode, new=40)
    assert slot_steps  # once the padding is evicted, steps run in place
    assert_same_run(run, dense)


@pytest.mark.parametrize("options", ["nbits=2,rotation=hadamard", "nbits=4,nbits_keys=2"])
def test_rotated_and_mixed_width_stores_take_the_torch_step(options, slot_steps):
    model = make_tiny_model("llama")
    spec = WINDOW.replace("nbits={nbits}", options)
    ids = random_ids(40, seed=4)
    dense = decode(model, spec + ",attention=dense", ids)
    run = decode(model, spec, ids)
    assert slot_steps
    assert_same_run(run, dense)


def slot_store(nbits: int, head_dim: int, slots: int, seed: int = 0):
    """A scattered store of ``slots`` random tokens in key groups of 8, about a third of its slots marked
    empty; and the float64 keys and values it holds."""
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(2, 3, slots, head_dim, generator=generator)
    values = torch.randn(2, 3, slots, head_dim, generator=generator)
    store = PackedTokens(8, (TorchCodec(nbits), TorchCodec(nbits)), scattered=True, like=keys)
    store.append(keys, values)
    dense_keys, dense_values = torch.empty_like(keys), torch.empty_like(values)
    store.dequantize_into(dense_keys, dense_values)
    stamps = torch.arange(slots, dtype=torch.int32).expand(2, 3, slots).contiguous()
    empty = torch.rand(2, 3, slots, generator=generator) < 0.3
    return store, stamps.masked_fill(empty, EMPTY_SLOT), dense_keys.double(), dense_values.double()


@pytest.mark.parametrize("nbits", [2, 3, 4, 8])
@pytest.mark.parametrize("head_dim", [16, 64, 128, 96])
def test_the_slot_kernel_equals_float64_attention_without_the_empty_slots(nbits, head_dim):
    store, stamps, packed_keys, packed_values = slot_store(nbits, head_dim, slots=48)
    generator = torch.Generator().manual_seed(1)
    sinks = [torch.randn(2, 3, 4, head_dim, generator=generator) for _ in range(2)]
    residual = [torch.randn(2, 3, 9, head_dim, generator=generator) for _ in range(2)]
    query = torch.randn(2, 3, 2, head_dim, generator=generator)
    out, weights = kernel_module.load_packed_kernels().slots_decode(
        query, sinks, store, stamps, residual, 0.3
    )
    keys = torch.cat([sinks[0].double(), packed_keys, residual[0].double()], 2)
    values = torch.cat([sinks[1].double(), packed_values, residual[1].double()], 2)
    logits = 0.3 * query.double() @ keys.transpose(-1, -2)
    filled = torch.nn.functional.pad(stamps != EMPTY_SLOT, (4, 9), value=True).unsqueeze(2)
    expected = torch.softmax(logits.masked_fill(~filled, float("-inf")), -1)
    torch.testing.assert_close(weights.double(), expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.double(), expected @ values, rtol=1e-4, atol=1e-5)


def test_a_decoding_step_neither_dequantizes_nor_gathers_the_packed_store(monkeypatch, slot_steps):
    model = make_tiny_model("llama")
    cache = build_cache(H2O.format(nbits=2), model)
    ids = random_ids(60, seed=5)
    stream(model, ids[:, :30], cache, 30)
    stream(model, ids[:, 30:32], cache, 1)
    touched = []
    for name in ("dequantize_into", "keep"):
        original = getattr(PackedTokens, name)

        def recording(self, *args, _original=original, _name=name):
            touched.append(_name)
            return _original(self, *args)

        monkeypatch.setattr(PackedTokens, name, recording)
    stream(model, ids[:, 32:60], cache, 1)
    assert len(slot_steps) > 2 * 28 - 2 and touched == []
    layer = cache.layers[0]
    # Empty slots are refilled: the slots never outgrow what a step can leave empty before a key group packs.
    assert layer.packed.length - layer.packed_length <= 8


def test_a_prompt_chunk_after_slot_steps_continues_like_the_general_path(slot_steps):
    model = make_tiny_model("llama-gqa")
    ids = random_ids(120, seed=6)
    runs = []
    for spec in (H2O.format(nbits=2), H2O.format(nbits=2) + ",attention=dense"):
        cache = build_cache(spec, model)
        pieces = [stream(model, ids[:, :30], cache, 30), stream(model, ids[:, 30:60], cache, 1)]
        pieces += [stream(model, ids[:, 60:80], cache, 20), stream(model, ids[:, 80:], cache, 1)]
        runs.append((torch.cat(pieces, 1), cache))
    (logits, cache), (dense_logits, dense_cache) = runs
    assert slot_steps and cache.layers[0].packed_stamps is not None
    torch.testing.assert_close(logits, dense_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cache.layers[1].keys, dense_cache.layers[1].keys, rtol=1e-4, atol=1e-4)


def test_a_cache_saved_between_slot_steps_continues_token_for_token(tmp_path, slot_steps):
    model = make_tiny_model("llama")
    ids = random_ids(40, seed=8)
    tokens, _, cache = decode(model, WINDOW.format(nbits=2), ids, new=20)
    assert cache.layers[0].packed_stamps is not None
    path = cache.save(tmp_path / "cache.safetensors")
    loaded = load_cache(path, model)
    assert loaded.nbytes == cache.nbytes
    continued, _, _ = decode(model, cache, tokens, new=20)
    again, _, _ = decode(model, loaded, tokens, new=20)
    assert torch.equal(continued, again)


def test_a_mask_that_hides_cached_entries_is_refused_on_a_slot_step():
    model = make_tiny_model("llama")
    cache = build_cache(WINDOW.format(nbits=2), model)
    ids = random_ids(50, seed=9)
    stream(model, ids[:, :40], cache, 40)
    stream(model, ids[:, 40:42], cache, 1)
    layer = cache.layers[0]
    assert layer.store_for_attention(*[torch.randn(1, 4, 1, 16)] * 2)
    hidden = torch.ones(1, 1, 1, layer.stored, dtype=torch.bool)
    hidden[..., 5] = False
    with pytest.raises(RuntimeError, match="attention mask that hides cached entries"):
        layer.attend_stored(torch.randn(1, 4, 1, 16), hidden, 0.25)
