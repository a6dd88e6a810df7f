import pytest
import torch
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel

from hf_kvcache import SlidingWindowKVCache, build_cache, cache_nbytes
from tests.conftest import assert_left_padded_rows_match_unpadded_runs, make_tiny_model, random_ids
from tests.helpers import stream


@pytest.mark.parametrize("positions", ["shifted", "original"])
def test_window_covering_everything_equals_dynamic_cache(tiny_model, positions):
    ids = random_ids(48, batch=2)
    expected = stream(tiny_model, ids, DynamicCache(config=tiny_model.config), 5)
    got = stream(tiny_model, ids, SlidingWindowKVCache(tiny_model, 48, 4, positions), 5)
    assert torch.equal(got, expected)


def next_logits_after_stream(model, ids, cache, chunk, next_token=7):
    stream(model, ids, cache, chunk)
    with torch.no_grad():
        return model(torch.tensor([[next_token]]), past_key_values=cache).logits[0, -1]


@pytest.mark.parametrize(
    "arch",
    ["llama", "llama-gqa", "mistral", "qwen2", "qwen3", "phi3", "gemma3", "olmo2", "granite", "gpt-neox"],
)
@pytest.mark.parametrize("positions", ["shifted", "original"])
@pytest.mark.parametrize("chunk", [1, 6])
def test_next_token_equals_fresh_pass_over_kept_tokens(arch, positions, chunk):
    """Reference: a one-layer model, recomputed from scratch without a cache over exactly the kept tokens."""
    model = make_tiny_model(arch, num_layers=1, layer_types=["full_attention"])
    length, window, sinks = 61, 20, 4
    ids = random_ids(length, seed=3)
    got = next_logits_after_stream(model, ids, SlidingWindowKVCache(model, window, sinks, positions), chunk)
    kept = list(range(sinks)) + list(range(length - (window - sinks), length))
    sequence = torch.cat([ids[:, kept], torch.tensor([[7]])], dim=1)
    if positions == "shifted":
        position_ids = torch.arange(window + 1)[None]
    else:
        position_ids = torch.tensor([kept + [length]])
    with torch.no_grad():
        expected = model(sequence, position_ids=position_ids).logits[0, -1]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_linear_and_llama3_rope_scaling_are_followed():
    for rope in (
        {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
            "rope_theta": 10000.0,
        },
    ):
        model = make_tiny_model("llama", num_layers=1, rope_parameters=rope)
        ids = random_ids(50, seed=1)
        got = next_logits_after_stream(model, ids, SlidingWindowKVCache(model, 16, 4), 1)
        kept = list(range(4)) + list(range(50 - 12, 50))
        with torch.no_grad():
            expected = model(torch.cat([ids[:, kept], torch.tensor([[7]])], 1)).logits[0, -1]
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 7, 40])
def test_memory_never_exceeds_window_plus_chunk(chunk):
    model = make_tiny_model("llama-gqa")
    cache = SlidingWindowKVCache(model, window_length=16, num_sink_tokens=2)
    ids = random_ids(120)
    peak = 0
    with torch.no_grad():
        for s in range(0, 120, chunk):
            model(ids[:, s : s + chunk], past_key_values=cache)
            peak = max(peak, cache.layers[0].keys.shape[2])
        model(ids[:, :1], past_key_values=cache)  # a decoding step: evicts in place
    assert peak == 16 and cache.get_seq_length() == 121
    # Per layer: 17 slots (the window and the slot the next step refills) of keys + values (2 KV heads x 16 x
    # 4
    # bytes each) and int32 positions; the 2 sinks' unshifted keys; two int64 counters; the victim per head.
    slots = 2 * 17
    assert cache.nbytes == 2 * (slots * 16 * 4 * 2 + slots * 4 + 2 * 2 * 16 * 4 + 2 * 8 + 2 * 8)


def test_left_padded_rows_match_their_unpadded_runs():
    """Each row of a left-padded batch evicts on its own and keeps its own first real tokens as sinks."""
    model = make_tiny_model("llama")
    assert_left_padded_rows_match_unpadded_runs(
        model,
        lambda: SlidingWindowKVCache(model, 12, 3),
        length=30,
        pads=(0, 6, 19),
        max_new_tokens=15,
        seed=9,
    )


@pytest.mark.parametrize(
    "options, message",
    [
        (
            {"window_length": 4, "num_sink_tokens": 4},
            "window_length must be larger than num_sink_tokens=4, got 4",
        ),
        ({"num_sink_tokens": -1}, "num_sink_tokens must be an integer >= 0, got -1"),
        ({"positions": "relative"}, "positions must be one of \\['shifted', 'original'\\]"),
    ],
)
def test_bad_options_are_named(llama, options, message):
    with pytest.raises(ValueError, match=message):
        SlidingWindowKVCache(llama, **options)


def test_model_without_rope_works_original_and_is_refused_shifted():
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=96, n_positions=256)).eval()
    with pytest.raises(ValueError, match="needs a RoPE model; GPT2LMHeadModel has no rotary embedding"):
        SlidingWindowKVCache(gpt2, 16, 4, "shifted")
    ids = random_ids(40)
    expected = stream(gpt2, ids, DynamicCache(config=gpt2.config), 4)
    assert torch.equal(stream(gpt2, ids, SlidingWindowKVCache(gpt2, 40, 4, "original"), 4), expected)


def test_right_padding_is_refused(llama):
    ids = random_ids(10, batch=2)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0
    with pytest.raises(ValueError, match="left padding only"), torch.no_grad():
        llama(ids, attention_mask=mask, past_key_values=build_cache("sliding-window:window_length=8", llama))


def test_other_caches_are_unaffected_after_serving_a_sliding_window(llama):
    ids = random_ids(30)
    before = stream(llama, ids, DynamicCache(config=llama.config), 4)
    stream(llama, ids, SlidingWindowKVCache(llama, 8, 2), 4)
    assert torch.equal(stream(llama, ids, DynamicCache(config=llama.config), 4), before)


def test_before_any_eviction_the_window_holds_what_dynamic_cache_holds():
    model = make_tiny_model("llama-gqa")
    ids = random_ids(48, batch=2)
    window, reference = SlidingWindowKVCache(model, 64, 4), DynamicCache(config=model.config)
    stream(model, ids, window, 5)
    stream(model, ids, reference, 5)
    # Token positions are implicit until something is evicted: only the two [2] int64 row counters remain.
    assert window.nbytes == cache_nbytes(reference) + 2 * (2 * 2 * 8)
