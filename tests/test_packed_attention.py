"""Attention over packed codes: the kernels against float64 sums from the definition, the entry point against
"dequantize, then attend" on every test architecture, and the fall-through to the model's own attention."""

import pytest
import torch
from transformers import DynamicCache

from hf_kvcache import build_cache, prefill, use_storage_attention
from hf_kvcache import kernels as kernel_module
from hf_kvcache.kernels import build as kernel_build
from hf_kvcache.strategies import packed_attention
from hf_kvcache.strategies.packing import (
    TorchCodec,
    pack_token_groups,
    quantize_kivi,
    torch_packed_scores,
    torch_packed_values,
)
from hf_kvcache.strategies.quantized import QuantizedLayer, QuantizedOptions
from hf_kvcache.strategies.scoring import ScoringCache, ScoringLayer
from tests.conftest import ARCHITECTURES, MORE_ARCHITECTURES, left_padded_ids, make_tiny_model, random_ids
from tests.helpers import decode, record_calls

QUICK = "group_size=8,residual_length=4"
GREEDY = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0)


def packed_history(nbits: int, head_dim: int, group_size: int, groups: int, seed: int = 0):
    """Random keys and values quantized as the grouped store holds them, and the float64 dequantization."""
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(2, 3, groups * group_size, head_dim, generator=generator)
    values = torch.randn(2, 3, groups * group_size, head_dim, generator=generator)
    codec = TorchCodec(nbits)
    kc, ks, kz, vc, vs, vz = quantize_kivi(codec, codec, keys, values, group_size, torch.float32)
    length = groups * group_size
    key_groups = kc.double().view(2, 3, groups, group_size, head_dim)
    dense_keys = (key_groups * ks.double().unsqueeze(3) + kz.double().unsqueeze(3)).view(2, 3, length, -1)
    value_groups = vc.double().view(2, 3, length, head_dim // group_size, group_size)
    dense_values = value_groups * vs.double().unsqueeze(-1) + vz.double().unsqueeze(-1)
    stored = dict(
        key_codes=pack_token_groups(codec, kc, group_size),
        value_codes=pack_token_groups(codec, vc, group_size),
        key_scale=ks,
        key_zero=kz,
        value_scale=vs,
        value_zero=vz,
    )
    return stored, dense_keys, dense_values.reshape(2, 3, length, head_dim)


@pytest.mark.parametrize("nbits", [2, 3, 4, 8])
@pytest.mark.parametrize(("head_dim", "group_size"), [(16, 8), (64, 32), (128, 64), (96, 32)])
@pytest.mark.parametrize("backend", ["torch", "compiled"])
def test_packed_scores_and_outputs_equal_float64_sums_over_dequantized_codes(
    nbits, head_dim, group_size, backend
):
    stored, keys, values = packed_history(nbits, head_dim, group_size, groups=3)
    queries = torch.randn(2, 3, 5, head_dim)
    weights = torch.softmax(torch.randn(2, 3, 5, keys.shape[2]), -1)
    expected_scores = queries.double() @ keys.transpose(-1, -2)
    expected_output = weights.double() @ values
    if backend == "torch":
        scores, values = torch_packed_scores, torch_packed_values
    else:
        scores, values = kernel_module.load_packed_kernels().functions
    key_args = stored["key_codes"], queries, stored["key_scale"], stored["key_zero"]
    value_args = stored["value_codes"], weights, stored["value_scale"], stored["value_zero"]
    scores = scores(*key_args, group_size, nbits)
    output = values(*value_args, group_size, nbits)
    torch.testing.assert_close(scores.double(), expected_scores, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(output.double(), expected_output, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("space", ["nbits=3", "nbits=2,nbits_keys=3,keys=pre_rope,rotation=hadamard"])
def test_the_torch_sums_unpack_a_bounded_slice_of_groups_at_a_time(space, monkeypatch):
    """Slices of one group (several per step) give the scores and outputs of one slice over all groups, and
    no unpacked tensor is larger than the bound."""
    from hf_kvcache.strategies import packing

    model, ids = make_tiny_model("llama-gqa"), random_ids(60)
    whole_tokens, whole_logits, _ = decode(model, f"quantized:{space},{QUICK},attention=torch", ids, new=8)
    bound = 2 * 8 * 16  # one group: 2 KV heads, 8 tokens, head size 16
    monkeypatch.setattr(packing, "UNPACKED_ELEMENTS", bound)
    largest, unpack = [], packing.unpack_codes
    monkeypatch.setattr(
        packing, "unpack_codes", lambda *a: largest.append((out := unpack(*a)).numel()) or out
    )
    tokens, logits, _ = decode(model, f"quantized:{space},{QUICK},attention=torch", ids, new=8)
    assert torch.equal(tokens, whole_tokens)
    torch.testing.assert_close(logits, whole_logits, rtol=1e-5, atol=1e-5)
    # 7 decoding steps after the prompt, 2 layers, keys and values, 6 or more groups each.
    assert max(largest) == bound and len(largest) >= 7 * 2 * 2 * 6


@pytest.fixture
def stored_calls(monkeypatch):
    """How many attention calls read a layer's storage."""
    return record_calls(monkeypatch, QuantizedLayer, "attend_stored")


# Keys after RoPE, and keys before it with 3-bit codes after a Hadamard rotation, which each step turns to
# their positions (:mod:`tests.test_pre_rope_attention`).
STORED_SPACES = ["nbits=2", "nbits=2,nbits_keys=3,keys=pre_rope,rotation=hadamard"]


@pytest.mark.parametrize("arch", sorted({*ARCHITECTURES, *MORE_ARCHITECTURES}))
@pytest.mark.parametrize("backend", ["torch", "compiled"])
@pytest.mark.parametrize("space", STORED_SPACES)
def test_decoding_over_packed_codes_matches_dequantize_then_attend_on_every_architecture(
    arch, backend, space, stored_calls
):
    tiny_model = make_tiny_model(arch)
    ids = random_ids(40)
    dense_tokens, dense_logits, _ = decode(tiny_model, f"quantized:{space},{QUICK},attention=dense", ids)
    assert not stored_calls
    tokens, logits, cache = decode(tiny_model, f"quantized:{space},{QUICK},attention={backend}", ids)
    assert cache.storage_attention_off is None
    global_layers = sum(layer.window is None for layer in cache.layers)
    assert len(stored_calls) == global_layers * 23  # every decoding step after the prompt, every global layer
    assert torch.equal(tokens, dense_tokens)
    torch.testing.assert_close(logits, dense_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("space", ["nbits=2,rotation=hadamard", "nbits=2,keys=pre_rope,rotation=hadamard"])
def test_a_float64_model_reads_a_rotated_store_like_the_dense_path(space, stored_calls):
    """A float64 model's store keeps its rotation in float64, while the sums over codes run in float32."""
    model = make_tiny_model("llama-gqa").double()
    ids = random_ids(40)
    dense_tokens, dense_logits, _ = decode(model, f"quantized:{space},{QUICK},attention=dense", ids)
    tokens, logits, _ = decode(model, f"quantized:{space},{QUICK},attention=torch", ids)
    assert len(stored_calls) == 2 * 23
    assert torch.equal(tokens, dense_tokens)
    torch.testing.assert_close(logits, dense_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["gemma2", "gpt-oss"])
def test_soft_capping_and_attention_sinks_are_applied_like_the_models_eager_attention(arch, stored_calls):
    model = make_tiny_model(arch)
    ids = random_ids(40)
    dense_tokens, dense_logits, _ = decode(model, f"quantized:nbits=2,{QUICK},attention=dense", ids)
    tokens, logits, _ = decode(model, f"quantized:nbits=2,{QUICK}", ids)
    assert stored_calls and model.config._attn_implementation == "hf_kvcache_eager"
    assert torch.equal(tokens, dense_tokens)
    torch.testing.assert_close(logits, dense_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "options",
    [
        "nbits=3",
        "nbits=2,nbits_keys=4",
        "nbits=2,rotation=hadamard",
        "nbits=3,nbits_values=2,rotation=hadamard-values",
        "nbits=4,num_sink_tokens=0",
        "nbits=2,keys=pre_rope",
        "nbits=4,keys=pre_rope,rotation=hadamard-values,num_sink_tokens=0",
        "nbits=2,nbits_keys=3,keys=pre_rope,rotation=hadamard",
    ],
)
@pytest.mark.parametrize("mode", ["greedy", "beam"])
def test_every_storage_option_decodes_left_padded_batches_like_the_dense_path(options, mode, stored_calls):
    model = make_tiny_model("llama", num_key_value_heads=2)  # grouped-query attention
    ids, mask = left_padded_ids(30, pads=(0, 5, 11), seed=3)
    dense, dense_logits, _ = decode(model, f"quantized:{options},{QUICK},attention=dense", ids, mask, mode)
    tokens, logits, _ = decode(model, f"quantized:{options},{QUICK}", ids, mask, mode)
    assert stored_calls
    assert torch.equal(tokens, dense)
    torch.testing.assert_close(logits, dense_logits, rtol=1e-4, atol=1e-4)


def test_eight_bit_storage_attention_stays_within_tolerance_of_dynamic_cache(llama, stored_calls):
    ids = random_ids(40)
    with torch.no_grad():
        full = llama.generate(ids, past_key_values=DynamicCache(), max_new_tokens=24, do_sample=False)
    tokens, _, _ = decode(llama, f"quantized:nbits=8,{QUICK}", ids)
    assert stored_calls and torch.equal(tokens, full)


def test_other_caches_fall_through_to_the_attention_the_model_was_loaded_with(llama):
    ids = random_ids(30)
    reference = make_tiny_model("llama")
    build_cache(f"quantized:{QUICK}", llama)  # switches llama to the entry point
    assert llama.config._attn_implementation == "hf_kvcache_sdpa"
    with torch.no_grad():
        ours = llama(ids, past_key_values=DynamicCache()).logits
        plain = reference(ids, past_key_values=DynamicCache()).logits
    assert reference.config._attn_implementation == "sdpa"
    assert torch.equal(ours, plain)


@pytest.mark.parametrize("keys", ["post_rope", "pre_rope"])
def test_local_layers_and_exact_outliers_attend_over_a_dense_copy(keys, stored_calls):
    model = make_tiny_model("gemma3")  # alternating local and global layers
    decode(model, f"quantized:{QUICK},keys={keys},outliers=0.25", random_ids(30), new=4)
    assert not stored_calls
    _, _, cache = decode(model, f"quantized:{QUICK},keys={keys}", random_ids(30), new=4)
    assert {layer.window for layer in stored_calls} == {None}
    assert len(stored_calls) == 3 * sum(layer.window is None for layer in cache.layers)


def test_unknown_attention_backend_is_refused_with_the_choices():
    with pytest.raises(
        ValueError, match=r"attention must be one of \['auto', 'compiled', 'triton', 'torch', 'dense'\]"
    ):
        QuantizedOptions(attention="fused")


def test_a_kernel_that_cannot_be_built_warns_once_under_auto_and_is_an_error_under_compiled(
    llama, monkeypatch, tmp_path
):
    monkeypatch.setenv("HF_KVCACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CXX", "no-such-compiler")
    monkeypatch.setattr(kernel_build.shutil, "which", lambda name: None)
    monkeypatch.setattr(packed_attention, "_warned", set())
    kernel_module._load_once.cache_clear()
    try:
        ids = random_ids(30)
        dense, _, _ = decode(llama, f"quantized:{QUICK},attention=dense", ids, new=6)
        with pytest.warns(UserWarning, match="attention='compiled'") as caught:
            tokens, _, _ = decode(llama, f"quantized:{QUICK},attention=auto", ids, new=6)
        assert sum("packed-attention kernel" in str(w.message) for w in caught) == 1
        assert torch.equal(tokens, dense)
        with pytest.raises(kernel_module.KernelUnavailable, match="no C\\+\\+ compiler"):
            decode(llama, f"quantized:{QUICK},attention=compiled", ids, new=6)
    finally:
        kernel_module._load_once.cache_clear()


def test_short_prompt_chunks_with_left_padding_read_the_storage_like_the_dense_path(stored_calls):
    # Chunks of at most MAX_STORED_QUERIES tokens take the storage path; a padding query that sees no key
    # must not turn into NaN keys and values for the next layer.
    model = make_tiny_model("llama-gqa")
    ids, mask = left_padded_ids(40, pads=(0, 6, 17), seed=3)
    results = []
    for backend in ("dense", "auto"):
        cache = build_cache(f"quantized:nbits=2,{QUICK},attention={backend}", model)
        prefill(model, ids, cache, chunk_size=5, attention_mask=mask)
        with torch.no_grad():
            results.append(
                model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, **GREEDY)
            )
    assert stored_calls
    assert torch.equal(results[1], results[0])


SCORING = ["heavy-hitter:heavy_budget=6,recent_budget=6", "tova:budget=12"]


@pytest.mark.parametrize("spec", SCORING)
@pytest.mark.parametrize("arch", ["llama-gqa", "qwen3", "gemma2", "gpt-oss", "gemma3"])
def test_scoring_caches_read_their_scores_from_the_attention_function(arch, spec, monkeypatch):
    # The decoding steps that score run in the entry point, which scores the entries from its own weights and
    # captures no queries; everything must equal the path that captures queries and scores them apart.
    served, captured = [], []
    attend, observe = ScoringLayer.attend_stored, ScoringCache.observe_queries
    monkeypatch.setattr(ScoringLayer, "attend_stored", lambda *a, **k: served.append(1) or attend(*a, **k))
    monkeypatch.setattr(ScoringCache, "observe_queries", lambda *a: captured.append(a[1]) or observe(*a))
    model = make_tiny_model(arch)
    ids, mask = left_padded_ids(30, pads=(0, 7), seed=2)
    results = []
    for entry_point in (True, False):
        cache = build_cache(spec, model)
        if not entry_point:  # back to the model's own attention: queries are captured for scoring
            model.set_attn_implementation(model.config._attn_implementation.removeprefix("hf_kvcache_"))
        served.clear(), captured.clear()
        tokens, logits, _ = decode(model, cache, ids, mask)
        layers = [layer for layer in cache.layers if isinstance(layer, ScoringLayer)]
        results.append((tokens, logits, [layer.keys for layer in layers], len(served), len(captured)))
    (tokens, logits, held, served_count, captured_count), reference = results
    assert served_count == 23 * len(held) and reference[3] == 0
    assert captured_count == len(held) and reference[4] == 24 * len(held)  # the prompt's only
    assert torch.equal(tokens, reference[0])
    torch.testing.assert_close(logits, reference[1], rtol=1e-5, atol=1e-5)
    for ours, theirs in zip(held, reference[2], strict=True):
        torch.testing.assert_close(ours, theirs)


def test_unpadded_decoding_takes_the_fused_step_and_padded_decoding_the_composed_one(monkeypatch):
    fused = []
    decode_step = kernel_module.PackedKernels.decode
    monkeypatch.setattr(
        kernel_module.PackedKernels, "decode", lambda *a, **k: fused.append(1) or decode_step(*a, **k)
    )
    model = make_tiny_model("llama-gqa")
    decode(model, f"quantized:nbits=2,{QUICK},attention=compiled", random_ids(40), new=10)
    assert len(fused) == 9 * 2  # every decoding step, both layers
    fused.clear()
    ids, mask = left_padded_ids(40, pads=(0, 5), seed=1)
    decode(model, f"quantized:nbits=2,{QUICK},attention=compiled", ids, mask, new=10)
    assert not fused  # a padding mask: the kernel's packed part composed with torch's masking


def test_forcing_the_entry_point_on_a_model_it_cannot_serve_names_what_it_serves():
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, BloomConfig, T5Config

    t5 = AutoModelForSeq2SeqLM.from_config(T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16))
    bloom = AutoModelForCausalLM.from_config(BloomConfig(hidden_size=32, n_layer=1, n_head=2))
    for model, reason in ((t5, "T5ForConditionalGeneration is an encoder-decoder"), (bloom, "ALiBi")):
        with pytest.raises(ValueError, match=f"{reason}.*decoder-only.*\\['sdpa', 'eager'\\]"):
            use_storage_attention(model)
    flash = make_tiny_model("llama", attn="flex_attention")
    with pytest.raises(ValueError, match="attn_implementation='flex_attention'.*\\['sdpa', 'eager'\\]"):
        use_storage_attention(flash)
    llama = make_tiny_model("llama")
    use_storage_attention(llama)
    assert llama.config._attn_implementation == "hf_kvcache_sdpa"


@pytest.mark.parametrize("head_dim", [16, 64])
def test_the_dense_step_reads_the_first_slots_in_place_and_equals_float64_attention(head_dim):
    generator = torch.Generator().manual_seed(4)
    keys, values = (torch.randn(2, 3, 40, head_dim, generator=generator) for _ in range(2))  # 40 slots
    query = torch.randn(2, 3, 2, head_dim, generator=generator)  # two query heads per key head
    used = 29
    out, weights = kernel_module.load_packed_kernels().dense_decode(
        query, keys[:, :, :used], values[:, :, :used], 0.25
    )
    expected = torch.softmax(query.double() @ keys[:, :, :used].double().transpose(-1, -2) * 0.25, -1)
    torch.testing.assert_close(weights.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.double(), expected @ values[:, :, :used].double(), rtol=1e-5, atol=1e-5)


def test_compiled_attention_refuses_a_model_off_the_cpu_when_the_cache_is_built():
    model = make_tiny_model("llama").to("meta")
    with pytest.raises(
        ValueError, match=r"attention='compiled' runs the native CPU kernel; the model is on \['meta'\]"
    ):
        build_cache(f"quantized:{QUICK},attention=compiled", model)
    build_cache(f"quantized:{QUICK},attention=auto", model)  # auto uses the torch sums off the CPU


@pytest.mark.parametrize("attention", ["torch", "dense"])
def test_a_new_token_attends_to_itself_in_full_precision_before_it_is_packed(attention):
    # residual_length=0: the step's token completes a key group and is packed right after this step. It must
    # attend to its own key and value in full precision first (KIVI), on both paths, which a reference that
    # holds exactly what the cache held before the step (dequantized) plus the exact new token gives.
    model = make_tiny_model("llama-gqa")
    ids = random_ids(24, batch=2, seed=5)
    spec = f"quantized:nbits=2,group_size=8,residual_length=0,num_sink_tokens=0,attention={attention}"
    cache = build_cache(spec, model)
    with torch.no_grad():
        model(ids[:, :23], past_key_values=cache)  # 16 packed, 7 in the residual
        reference = DynamicCache(config=model.config)
        for index, layer in enumerate(cache.layers):
            assert (layer.packed_length, layer.key_buffer.shape[2]) == (16, 7)
            reference.update(layer.keys.clone(), layer.values.clone(), index)
        got = model(ids[:, 23:], past_key_values=cache).logits
        want = model(ids[:, 23:], past_key_values=reference).logits
    assert all(layer.packed_length == 24 for layer in cache.layers)
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
