"""Every strategy on a CUDA device: the same logits as on CPU, every held tensor on its layer's device.

The rest of the suite runs on CPU. Here the same seeded tiny models run on both devices, fed the same
tokens (teacher-forced, so that a near-tie between two tokens cannot send the runs apart), and the CUDA run
must match the CPU run: logits within float32 rounding of the two devices' kernels, the same bytes held.
Skipped where torch sees no CUDA device. ``HF_KVCACHE_TEST_DEVICE`` names another device to compare with
CPU (``cpu`` itself checks this module's own logic on a machine without a GPU).
"""

from __future__ import annotations

import os

import pytest
import torch
from transformers import DynamicCache

from hf_kvcache import build_cache, cache_nbytes
from hf_kvcache.base import layer_tensors
from tests.conftest import ARCHITECTURES, MORE_ARCHITECTURES, left_padded_ids, make_tiny_model, random_ids
from tests.helpers import LOSSLESS, LOSSY, QUANTIZATION_VARIANTS

DEVICE = torch.device(os.environ.get("HF_KVCACHE_TEST_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(
    DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="torch sees no CUDA device"
)

SPECS = sorted(set(LOSSY.values()) | set(QUANTIZATION_VARIANTS))
# Architectures that stress different paths: grouped-query heads, partial rotary, hybrid local/global
# layers with their own RoPE, attention sinks with eager-only attention.
VARIED = ["llama-gqa", "phi3", "gemma3", "gpt-oss"]
PROMPT, STEPS = 40, 10


def teacher_forced_logits(model, cache, ids, mask, continuation) -> torch.Tensor:
    """Last-position logits of the prompt and of each continuation token fed one at a time, ``[B, 1+N, V]``:
    the prompt in one forward, then single-token steps with the positions a left-padded ``generate`` gives."""
    device = next(model.parameters()).device
    ids, mask, continuation = ids.to(device), mask.to(device), continuation.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    steps = []
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache)
        steps.append(out.logits[:, -1])
        for index in range(continuation.shape[1]):
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
            positions = positions[:, -1:] + 1
            token = continuation[:, index : index + 1]
            out = model(input_ids=token, attention_mask=mask, position_ids=positions, past_key_values=cache)
            steps.append(out.logits[:, -1])
    return torch.stack(steps, 1).float().cpu()


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm())


def inputs(batch_pads=(0, 7)):
    ids, mask = left_padded_ids(PROMPT, pads=batch_pads, seed=3)
    return ids, mask, random_ids(STEPS, batch=len(batch_pads), seed=4)


def assert_on_layer_devices(cache, model) -> None:
    """Every tensor a cache layer holds sits on the device of the model layer it serves."""
    devices = [next(layer.parameters()).device for layer in model.base_model.layers]
    for index, (layer, device) in enumerate(zip(cache.layers, devices, strict=True)):
        for tensor in layer_tensors(layer):
            assert tensor.device == device, (
                f"layer {index} holds a tensor on {tensor.device}, its model on {device}"
            )


@pytest.mark.parametrize("arch", VARIED)
@pytest.mark.parametrize("spec", SPECS)
def test_every_strategy_gives_the_cpu_logits_and_keeps_its_tensors_on_the_device(arch, spec):
    """In float64, so that two entries whose scores differ by less than the devices' float32 rounding (which
    would let the devices evict different ones) are all but impossible; gpt-oss's expert kernels take no
    float64, so it runs in float32. Attention over packed codes sums in float32 on both devices."""
    dtype, tolerance = (torch.float32, 1e-4) if arch == "gpt-oss" else (torch.float64, 1e-5)
    ids, mask, continuation = inputs()
    on_cpu = make_tiny_model(arch, num_layers=3).to(dtype)
    on_device = make_tiny_model(arch, num_layers=3).to(DEVICE, dtype)
    cpu_cache, device_cache = build_cache(spec, on_cpu), build_cache(spec, on_device)
    expected = teacher_forced_logits(on_cpu, cpu_cache, ids, mask, continuation)
    actual = teacher_forced_logits(on_device, device_cache, ids, mask, continuation)
    assert relative_error(actual, expected) < tolerance
    assert cache_nbytes(device_cache) == cache_nbytes(cpu_cache)
    assert_on_layer_devices(device_cache, on_device)


@pytest.mark.parametrize("arch", sorted({**ARCHITECTURES, **MORE_ARCHITECTURES}))
@pytest.mark.parametrize("strategy", sorted(LOSSLESS))
def test_lossless_settings_equal_dynamic_cache_on_the_device(arch, strategy):
    """Configured to lose nothing, every strategy is DynamicCache on the device too, on every architecture."""
    ids, mask, continuation = inputs()
    model = make_tiny_model(arch).to(DEVICE)
    expected = teacher_forced_logits(model, DynamicCache(config=model.config), ids, mask, continuation)
    actual = teacher_forced_logits(model, build_cache(LOSSLESS[strategy], model), ids, mask, continuation)
    assert relative_error(actual, expected) < 1e-4


@pytest.mark.parametrize(
    "spec", ["full", LOSSY["quantized"], LOSSY["kvzip+quantized"], *QUANTIZATION_VARIANTS[3:5]]
)
def test_bfloat16_on_the_device_stays_close_to_float32(spec):
    """The dtype users run on GPUs: bfloat16 weights and cache track the float32 run within bf16 rounding."""
    ids, mask, continuation = inputs()
    model = make_tiny_model("llama-gqa", num_layers=3).to(DEVICE)
    cache = build_cache(spec, model)
    expected = teacher_forced_logits(model, cache, ids, mask, continuation)
    float32_bytes = cache_nbytes(cache)
    model = model.to(torch.bfloat16)
    cache = build_cache(spec, model)
    actual = teacher_forced_logits(model, cache, ids, mask, continuation)
    assert torch.isfinite(actual).all()
    # Rounding alone stays under 3 %; an eviction whose bfloat16 scores keep a few other entries, under 10 %.
    assert relative_error(actual, expected) < (0.1 if spec.startswith("kvzip") else 3e-2)
    assert cache_nbytes(cache) < float32_bytes  # held in the model's dtype, not widened to float32
