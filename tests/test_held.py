"""Every layer declares what it holds (hf_kvcache/held.py): nbytes, beam search and eviction read that one
declaration, so a tensor a layer keeps without declaring it would be neither counted nor moved."""

import pytest
import torch

from hf_kvcache import build_cache
from hf_kvcache.base import held_tensors
from hf_kvcache.held import HeldTensors, RowTensor, SlotTensor
from tests.conftest import left_padded_ids, make_tiny_model
from tests.helpers import LOSSLESS, LOSSY, NEW, QUANTIZATION_VARIANTS, generate, held_entries


def walked_storages(obj) -> set[int]:
    """Storage pointers of every tensor ``obj`` and the objects it declares as parts hold, found by walking
    their attributes (lists, tuples and dicts included) rather than by reading the declarations."""
    found = {t.untyped_storage().data_ptr() for t in held_tensors(obj)}
    for declared in type(obj).declared("part"):
        part = getattr(obj, declared.name)
        if part is not None:
            found |= walked_storages(part)
    return found


@pytest.mark.parametrize(
    "spec", sorted({*LOSSLESS.values(), *LOSSY.values(), *QUANTIZATION_VARIANTS} - {"full"})
)
def test_every_tensor_a_layer_holds_is_declared(spec):
    model = make_tiny_model("llama-gqa")
    cache = build_cache(spec, model)
    generate(model, cache, "beam", *left_padded_ids(24, pads=(0, 5, 11), seed=5))
    for layer in cache.layers:
        assert isinstance(layer, HeldTensors)
        declared = {t.untyped_storage().data_ptr() for t in layer.held_tensors()}
        assert declared and declared == walked_storages(layer), type(layer).__name__


def test_beam_search_moves_every_declared_tensor_with_its_row():
    class Layer(HeldTensors):
        slots = SlotTensor("per slot", torch.float32, fill=0.0)
        rows = RowTensor("per row")

        def __init__(self):
            self.slots = torch.arange(12.0).view(3, 1, 4)
            self.rows = torch.tensor([10, 11, 12])

    layer = Layer()
    layer.reorder_cache(torch.tensor([2, 2, 0]))
    assert layer.rows.tolist() == [12, 12, 10]
    assert layer.slots[:, 0, 0].tolist() == [8.0, 8.0, 0.0]
    assert layer.nbytes == 3 * 4 * 4 + 3 * 8
    layer.batch_repeat_interleave(2)
    assert layer.rows.tolist() == [12, 12, 12, 12, 10, 10]


def test_a_generation_through_each_cache_reads_nothing_it_changes():
    """Reading keys, values, nbytes and the sequence length twice gives the same and changes nothing."""
    model = make_tiny_model("llama-gqa")
    ids, mask = left_padded_ids(24, pads=(0, 5, 11), seed=5)
    for spec in sorted(set(LOSSY.values()) - {"full"}):
        cache = build_cache(spec, model)
        generate(model, cache, "greedy", ids, mask)
        # A ragged layer (kvzip) has no [B, H, N, D] view: its flat entries and tail are read instead.
        before = [tuple(t.clone() for t in held_entries(layer)) for layer in cache.layers]
        size, length = cache.nbytes, cache.get_seq_length()
        held = [t.clone() for layer in cache.layers for t in layer.held_tensors()]
        for layer, (keys, values) in zip(cache.layers, before, strict=True):
            again = held_entries(layer)
            assert torch.equal(again[0], keys) and torch.equal(again[1], values), spec
        assert cache.nbytes == size and cache.get_seq_length() == length == 24 + NEW - 1
        after = [t for layer in cache.layers for t in layer.held_tensors()]
        assert all(torch.equal(a, b) for a, b in zip(held, after, strict=True)), spec
