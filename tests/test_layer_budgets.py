"""``layer_budgets=pyramid``: PyramidKV's per-layer schedule from its definition, what each layer then holds,
DynamicCache where no layer loses anything, and its errors."""

import pytest
import torch
from transformers import DynamicCache

from hf_kvcache import build_cache
from hf_kvcache.budget import PYRAMID_BETA, pyramid_budgets
from tests.conftest import left_padded_ids, make_tiny_model, random_ids
from tests.helpers import check_generates_in_every_mode, held_entries, stream

PYRAMIDS = [
    "snapkv:budget=16,window_size=4,layer_budgets=pyramid",
    "tova:budget=12,layer_budgets=pyramid",
    "knorm:budget=20,num_sink_tokens=2,recent=4,layer_budgets=pyramid",
    "expected-attention:budget=20,num_sink_tokens=2,recent=4,layer_budgets=pyramid",
    "kvzip:budget=12,layer_budgets=pyramid,head_budgets=uniform,prompt=none",
]


@pytest.mark.parametrize("budget, layers, protected", [(256, 30, 36), (100, 7, 0), (64, 4, 60), (10, 3, 0)])
def test_the_pyramid_falls_linearly_from_the_first_layer_at_the_same_total(budget, layers, protected):
    got = pyramid_budgets(budget, layers, protected)
    smallest = max(budget / PYRAMID_BETA, protected)
    largest = 2 * budget - smallest
    want = [largest - (largest - smallest) * i / (layers - 1) for i in range(layers)]
    assert sum(got) == budget * layers
    assert all(abs(g - w) <= 1 for g, w in zip(got, want, strict=True))
    assert got == sorted(got, reverse=True) and got[-1] >= protected


def test_a_fractional_pyramid_is_capped_at_everything_and_a_tight_budget_stays_uniform():
    assert pyramid_budgets(0.25, 3) == pytest.approx([0.4875, 0.25, 0.0125])
    assert pyramid_budgets(0.75, 2) == pytest.approx([1.0, 0.0375])
    assert pyramid_budgets(40, 4, protected=40) == [40] * 4  # nothing left to move between layers
    assert pyramid_budgets(40, 1) == [40]


@pytest.mark.parametrize("spec", PYRAMIDS)
def test_each_layer_holds_its_share_of_the_budget(spec):
    model = make_tiny_model("llama-gqa")  # two layers
    ids = random_ids(60, batch=2)
    cache = build_cache(spec, model)
    with torch.no_grad():
        model(ids[:, :57], past_key_values=cache)  # SnapKV compresses the prompt, kvzip at the next step
        for t in range(57, 60):
            model(ids[:, t : t + 1], past_key_values=cache)
    budget = int(spec.split("budget=")[1].split(",")[0])
    recent = 4 if "window_size=4" in spec else (6 if "recent=4" in spec else 0)
    want = pyramid_budgets(budget, 2, recent)
    assert [layer.budget for layer in cache.layers] == want
    for layer, kept in zip(cache.layers, want, strict=True):
        keys, _ = held_entries(layer)
        assert keys.shape[2] == kept + (3 if spec.startswith(("snapkv", "kvzip")) else 0)


@pytest.mark.parametrize("spec", PYRAMIDS)
def test_a_pyramid_whose_smallest_layer_holds_everything_is_dynamic_cache(spec):
    model = make_tiny_model("llama-gqa")
    ids = random_ids(40, batch=2)
    budget = int(spec.split("budget=")[1].split(",")[0])
    lossless = spec.replace(f"budget={budget},", f"budget={PYRAMID_BETA * 50},", 1)
    expected = stream(model, ids, DynamicCache(config=model.config), 4)
    assert torch.allclose(stream(model, ids, build_cache(lossless, model), 4), expected, atol=1e-5, rtol=0)


def test_an_unknown_schedule_is_named():
    with pytest.raises(
        ValueError, match="layer_budgets must be one of \\['uniform', 'pyramid', 'adaptive'\\], got 'cone'"
    ):
        build_cache("tova:layer_budgets=cone", make_tiny_model("llama"))
    with pytest.raises(
        ValueError, match="layer_budgets must be one of \\['adaptive', 'uniform', 'pyramid'\\]"
    ):
        build_cache("kvzip:layer_budgets=cone", make_tiny_model("llama"))


@pytest.mark.parametrize("spec", PYRAMIDS)
def test_a_left_padded_batch_generates_what_each_row_generates_alone(spec):
    # The model's mask is shaped by the first (largest) layer; the others must read its newest columns.
    model = make_tiny_model("llama-gqa")
    ids, mask = left_padded_ids(36, pads=(0, 4, 9), seed=3)
    greedy = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    batch = model.generate(ids, attention_mask=mask, past_key_values=build_cache(spec, model), **greedy)
    for row, pad in enumerate((0, 4, 9)):
        alone = model.generate(ids[row : row + 1, pad:], past_key_values=build_cache(spec, model), **greedy)
        assert torch.equal(batch[row, 36:], alone[0, 36 - pad :])


@pytest.mark.parametrize("arch", ["gemma2", "gemma3", "qwen3"])
def test_pyramids_serve_hybrid_and_other_architectures_in_every_mode(arch):
    model = make_tiny_model(arch)
    check_generates_in_every_mode(model, "tova:budget=12,layer_budgets=pyramid")
    check_generates_in_every_mode(model, "snapkv:budget=16,window_size=4,layer_budgets=pyramid")
