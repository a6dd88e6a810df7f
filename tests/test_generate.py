"""generate() in every mode, for every strategy, across the tiny architectures.

LOSSLESS holds, per strategy, a spec that keeps every token of these short runs: it must reproduce
DynamicCache's output token for token. LOSSY holds specs that really compress: they must run in every mode.
"""

import pytest
import torch
from transformers import DynamicCache

from hf_kvcache import build_cache, list_strategies
from hf_kvcache.registry import compositions
from tests.conftest import left_padded_ids, make_tiny_model

PROMPT, NEW = 24, 12

LOSSLESS = {
    "full": "full",
    "quantized": "quantized:nbits=2,group_size=8,residual_length=64",
    "sliding-window": "sliding-window:window_length=64,num_sink_tokens=4",
    "heavy-hitter": "heavy-hitter:heavy_budget=32,recent_budget=32",
    "tova": "tova:budget=64",
    "snapkv": "snapkv:budget=64,window_size=8",
    "sliding-window+quantized": "sliding-window:window_length=64+quantized:nbits=2,group_size=8,residual_length=64",
    "heavy-hitter+quantized": "heavy-hitter:heavy_budget=8,recent_budget=64+quantized:group_size=8,residual_length=64",
}
LOSSY = {
    "full": "full",
    "quantized": "quantized:nbits=2,group_size=8,residual_length=8",
    "sliding-window": "sliding-window:window_length=12,num_sink_tokens=4",
    "heavy-hitter": "heavy-hitter:heavy_budget=6,recent_budget=6",
    "tova": "tova:budget=12",
    "snapkv": "snapkv:budget=12,window_size=4,kernel_size=3",
    "sliding-window+quantized": "sliding-window:window_length=16+quantized:nbits=2,group_size=8,residual_length=4",
    "heavy-hitter+quantized": "heavy-hitter:heavy_budget=8,recent_budget=8+quantized:group_size=8,residual_length=4",
}


def test_every_registered_strategy_is_in_the_tables():
    assert sorted(LOSSLESS) == sorted(list_strategies() + compositions()) == sorted(LOSSY)


def left_padded_batch():
    return left_padded_ids(PROMPT, pads=(0, 5, 11), seed=5)


MODES = {
    "greedy": dict(do_sample=False),
    "beam": dict(do_sample=False, num_beams=3),
    "sample": dict(do_sample=True, top_k=20),
}


def generate(model, cache, mode, ids, mask):
    torch.manual_seed(0)
    return model.generate(
        input_ids=ids,
        attention_mask=mask,
        past_key_values=cache,
        max_new_tokens=NEW,
        min_new_tokens=NEW,
        pad_token_id=0,
        **MODES[mode],
    )


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("strategy", sorted(LOSSLESS))
def test_lossless_configuration_generates_like_dynamic_cache(tiny_model, strategy, mode):
    ids, mask = left_padded_batch()
    expected = generate(tiny_model, DynamicCache(config=tiny_model.config), mode, ids, mask)
    got = generate(tiny_model, build_cache(LOSSLESS[strategy], tiny_model), mode, ids, mask)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("strategy", sorted(LOSSY))
def test_compressing_configuration_generates_in_every_mode(strategy, mode):
    model = make_tiny_model("llama-gqa")
    ids, mask = left_padded_batch()
    out = generate(model, build_cache(LOSSY[strategy], model), mode, ids, mask)
    assert out.shape == (3, PROMPT + NEW)
    assert torch.equal(out[:, :PROMPT], ids)
