"""Every strategy on decoders beyond Llama: local/global hybrids (Gemma 2/3, Cohere2, gpt-oss), all-sliding
Mistral, Qwen2 with sliding layers, and models with their own attention math (Olmo2, Granite, GPT-NeoX).

The reference is always transformers' ``DynamicCache`` built from the model's config, which keeps only the
window on local layers.
"""

import pytest
import torch
from transformers import DynamicCache

from hf_kvcache import QuantizedKVCache, build_cache, cache_nbytes
from hf_kvcache.evaluation.harness import full_cache_bytes
from hf_kvcache.layout import attention_layout
from hf_kvcache.model_hooks import KeyRotator, find_rotary_module, rotate_half_rope
from hf_kvcache.strategies.quantized import QuantizedLayer, QuantizedOptions
from tests.conftest import MORE_ARCHITECTURES, WINDOW, make_tiny_model, random_ids
from tests.helpers import (
    LOSSLESS,
    LOSSY,
    check_generates_like_dynamic_cache,
    check_never_more_bytes_than_dynamic_cache,
)

ARCHS = sorted(MORE_ARCHITECTURES)
HYBRIDS = ["cohere2", "gemma2", "gemma3", "gpt-oss", "mistral-sliding", "qwen2-sliding"]


@pytest.fixture(scope="module", params=ARCHS)
def arch_model(request):
    return request.param, make_tiny_model(request.param)


def test_hybrid_configs_really_have_local_layers():
    for arch in HYBRIDS:
        layout = attention_layout(make_tiny_model(arch))
        assert "sliding_attention" in layout.layer_types, arch
        assert WINDOW in layout.windows, arch


@pytest.mark.parametrize("strategy", sorted(LOSSLESS))
def test_lossless_configuration_generates_like_dynamic_cache(arch_model, strategy):
    check_generates_like_dynamic_cache(arch_model[1], LOSSLESS[strategy], "greedy")


@pytest.mark.parametrize("spec", sorted({*LOSSLESS.values(), *LOSSY.values()}))
def test_never_more_bytes_than_dynamic_cache_at_any_length(arch_model, spec):
    check_never_more_bytes_than_dynamic_cache(arch_model[1], spec)


@pytest.mark.parametrize("arch", HYBRIDS)
def test_local_layers_hold_at_most_the_window(arch):
    model = make_tiny_model(arch)
    layout = attention_layout(model)
    cache = build_cache("heavy-hitter:heavy_budget=16,recent_budget=16", model)
    with torch.no_grad():
        model(random_ids(40), past_key_values=cache)
    for index, layer in enumerate(cache.layers):
        held = layer.keys.shape[-2]
        assert held == (WINDOW - 1 if layout.window(index) else 32), index


@pytest.mark.parametrize("arch", ["cohere2", "gemma3", "qwen2-sliding"])
def test_eight_bit_quantized_stays_close_to_dynamic_cache_past_the_window(arch):
    model = make_tiny_model(arch, sliding_window=40)
    ids = random_ids(90, batch=2, seed=2)
    logits = {}
    with torch.no_grad():
        for name, cache in [
            ("dynamic", DynamicCache(config=model.config)),
            (
                "quantized",
                QuantizedKVCache(model, nbits=8, group_size=4, residual_length=4, num_sink_tokens=0),
            ),
        ]:
            steps = [model(ids[:, :30], past_key_values=cache).logits]
            steps += [model(ids[:, t : t + 1], past_key_values=cache).logits for t in range(30, 90)]
            logits[name] = torch.cat(steps, dim=1)
            if name == "quantized":
                local = next(layer for layer in cache.layers if layer.window is not None)
                assert local.packed_length > 0 and local.dropped > 0  # really quantized, really dropped
    scale = logits["dynamic"].abs().max()
    assert (logits["quantized"] - logits["dynamic"]).abs().max() <= 0.02 * scale


@pytest.mark.parametrize("nbits", [2, 4, 8])
def test_quantized_local_layer_keeps_exactly_the_window_it_needs(nbits):
    window, size = 24, 4
    layer = QuantizedLayer(QuantizedOptions(nbits, size, residual_length=4), window)
    keys = torch.randn(1, 2, 100, 16)
    layer.update(keys[..., :30, :], keys[..., :30, :])
    for t in range(30, 100):
        held, offset = layer.get_mask_sizes(1)
        returned, _ = layer.update(keys[..., t : t + 1, :], keys[..., t : t + 1, :])
        assert returned.shape[-2] == held and layer.get_seq_length() == t + 1
        # What attention sees ends at the new token and covers the whole window before it.
        assert held >= window and torch.equal(returned[..., -1, :], keys[..., t, :])
        step = (keys[..., offset : t + 1, :] - returned).abs().amax()
        assert step <= (keys.amax() - keys.amin()) / (2**nbits - 1)
        # Between calls: nothing older than a quantization group behind the window is held.
        assert layer.dropped + layer.packed_length + layer.key_buffer.shape[-2] == t + 1
        assert layer.dropped > t + 1 - window - size
    assert layer.sink_keys.shape[-2] == 0  # sinks would be outside the window


def test_cropping_a_local_layer_after_it_dropped_tokens_is_refused():
    layer = QuantizedLayer(QuantizedOptions(4, 4, 4), window=8)
    keys = torch.randn(1, 1, 30, 8)
    layer.update(keys, keys)
    with pytest.raises(ValueError, match="cannot crop this local layer: it let go of 2[0-9] tokens"):
        layer.crop(10)


@pytest.mark.parametrize("kind", ["sliding_attention", "full_attention"])
def test_keys_are_re_rotated_with_their_own_layer_kinds_rope(kind):
    """Gemma 3 has one RoPE base for local layers and one for global ones: a key computed at position p and
    moved by delta must equal the key computed at p + delta by the model's own rotary module for that kind."""
    model = make_tiny_model("gemma3")
    rotary = find_rotary_module(model)
    raw = torch.randn(2, 4, 5, 16)
    p, delta = torch.tensor([[3, 4, 5, 6, 7]] * 2), torch.tensor([11, 40])

    def rotated(positions):
        cos, sin = rotary(raw, positions, kind)
        return rotate_half_rope(raw, cos[:, None], sin[:, None])

    moved = KeyRotator(rotary, kind).shift(rotated(p), delta)
    torch.testing.assert_close(moved, rotated(p + delta[:, None]), rtol=1e-4, atol=1e-5)
    other = "full_attention" if kind == "sliding_attention" else "sliding_attention"
    assert not torch.allclose(KeyRotator(rotary, other).shift(rotated(p), delta), moved, atol=1e-3)


@pytest.mark.parametrize("arch", ARCHS)
def test_heavy_hitter_scores_equal_the_models_eager_attention_weights(arch):
    """Scaling (Gemma, Granite), soft-capping (Gemma 2), q/k norms (Gemma 3, Olmo 2), sinks (gpt-oss) and
    fused projections (GPT-NeoX) must all be applied as the model's own eager attention applies them."""
    model, eager = make_tiny_model(arch), make_tiny_model(arch, attn="eager")
    ids = random_ids(20, batch=2, seed=4)
    cache = build_cache("heavy-hitter:heavy_budget=32,recent_budget=32", model)
    with torch.no_grad():
        model(ids, past_key_values=cache)
        weights = eager(ids, output_attentions=True).attentions
    layout = attention_layout(model)
    checked = 0
    for index, layer in enumerate(cache.layers):
        if layout.window(index) is not None:
            continue
        groups = layout.num_key_value_groups
        per_head = weights[index].sum(dim=2)  # [B, H_q, K]
        expected = per_head.view(2, layout.num_key_value_heads, groups, -1).sum(dim=2)
        torch.testing.assert_close(layer.scores, expected, rtol=1e-4, atol=1e-5)
        checked += 1
    assert checked == sum(window is None for window in layout.windows)


@pytest.mark.parametrize("arch", [*HYBRIDS, "llama"])
@pytest.mark.parametrize("tokens, chunk", [(5, None), (7, 3), (30, None), (30, 4), (31, 16)])
def test_harness_full_cache_bytes_is_what_dynamic_cache_holds(arch, tokens, chunk):
    """The memory metric's baseline: exactly the bytes a DynamicCache holds after the same stream (a local
    layer's kept view pins the storage of its last concatenation), so the full cache reads 1.000 of itself."""
    model = make_tiny_model(arch)
    cache = DynamicCache(config=model.config)
    ids = random_ids(tokens)
    with torch.no_grad():
        for start in range(0, tokens, chunk or tokens):
            model(ids[:, start : start + (chunk or tokens)], past_key_values=cache)
    assert full_cache_bytes(model, tokens, chunk) == cache_nbytes(cache)


def test_models_a_strategy_cannot_serve_get_an_error_naming_what_works():
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, BloomConfig, T5Config

    bloom = AutoModelForCausalLM.from_config(BloomConfig(vocab_size=96, hidden_size=32, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match="cannot serve BloomForCausalLM: its ALiBi .* use 'quantized'"):
        build_cache("heavy-hitter", bloom)
    with pytest.raises(ValueError, match="cannot serve BloomForCausalLM"):
        build_cache("sliding-window:positions=original", bloom)
    t5 = AutoModelForSeq2SeqLM.from_config(T5Config(vocab_size=96, d_model=32, d_kv=8, d_ff=32, num_layers=1))
    with pytest.raises(
        ValueError, match="QuantizedKVCache serves decoder-only models; T5ForConditionalGeneration"
    ):
        build_cache("quantized", t5)
