"""The Triton sums of a packed decoding step (:mod:`hf_kvcache.kernels.triton_packed`) against float64 sums
from the definition, decoding through them against "dequantize, then attend", and their errors.

On a GPU they run as compiled kernels on CUDA tensors. Without one they run in Triton's interpreter on CPU
tensors (``TRITON_INTERPRET=1``, which ``tests/conftest.py`` sets before Triton is first imported): the same
kernel code, indexing and masks, without the speed. Skipped where Triton is not installed.
"""

import importlib.util
import os
from types import SimpleNamespace

import pytest
import torch

ON_GPU = torch.cuda.is_available()
pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed"),
    # tests/conftest.py turns the interpreter on before anything imports Triton, where there is no driver.
    pytest.mark.skipif(
        not ON_GPU and os.environ.get("TRITON_INTERPRET") != "1",
        reason="no CUDA device, and Triton's interpreter is off (TRITON_INTERPRET=1 before Triton's import)",
    ),
]

from hf_kvcache import build_cache  # noqa: E402
from hf_kvcache.kernels import triton_packed  # noqa: E402
from hf_kvcache.model_hooks import KeyRotator  # noqa: E402
from hf_kvcache.strategies import packed_attention  # noqa: E402
from hf_kvcache.strategies.packed_attention import ATTENTION_BACKENDS  # noqa: E402
from hf_kvcache.strategies.packed_store import PackedTokens  # noqa: E402
from hf_kvcache.strategies.packing import TorchCodec  # noqa: E402
from hf_kvcache.strategies.quantized import QuantizedLayer  # noqa: E402
from hf_kvcache.strategies.rotation import hadamard_signs  # noqa: E402
from tests.conftest import make_tiny_model, random_ids  # noqa: E402
from tests.helpers import decode, record_calls  # noqa: E402
from tests.test_packed_attention import STORED_SPACES, packed_history  # noqa: E402
from tests.test_pre_rope_attention import float64_keys, rotary_module  # noqa: E402

DEVICE = torch.device("cuda" if ON_GPU else "cpu")
# Groups of 16 tokens: the tiny models' heads have 16 channels, which value groups must divide.
GROUPS = "group_size=16,residual_length=4"


def sums(nbits, head_dim, group_size, queries, groups=3, buffer_rows=0):
    """The Triton scores and outputs for a random packed history, with the float64 sums over its
    dequantized codes. ``buffer_rows``: the codes are the first rows of a longer buffer (a strided view),
    as a growing store holds them."""
    stored, keys, values = packed_history(nbits, head_dim, group_size, groups)
    stored = {name: tensor.to(DEVICE) for name, tensor in stored.items()}
    if buffer_rows:
        for name in ("key_codes", "value_codes"):
            codes = stored[name]
            buffer = torch.zeros(*codes.shape[:2], codes.shape[2] + buffer_rows, head_dim, dtype=torch.uint8)
            buffer = buffer.to(DEVICE)
            buffer[:, :, : codes.shape[2]] = codes
            stored[name] = buffer[:, :, : codes.shape[2]]
    q = torch.randn(2, 3, queries, head_dim)
    weights = torch.softmax(torch.randn(2, 3, queries, keys.shape[2]), -1)
    scores = triton_packed.triton_packed_scores(
        stored["key_codes"], q.to(DEVICE), stored["key_scale"], stored["key_zero"], group_size, nbits
    )
    output = triton_packed.triton_packed_values(
        stored["value_codes"],
        weights.to(DEVICE),
        stored["value_scale"],
        stored["value_zero"],
        group_size,
        nbits,
    )
    return (scores, q.double() @ keys.transpose(-1, -2)), (output, weights.double() @ values)


@pytest.mark.parametrize("nbits", [2, 3, 4, 8])
@pytest.mark.parametrize(("head_dim", "group_size"), [(16, 16), (64, 32), (128, 64), (96, 32)])
@pytest.mark.parametrize("queries", [1, 20])  # 20: two blocks of query rows, the second one masked
def test_triton_sums_equal_float64_sums_over_dequantized_codes(nbits, head_dim, group_size, queries):
    (scores, expected_scores), (output, expected_output) = sums(nbits, head_dim, group_size, queries)
    assert scores.dtype == output.dtype == torch.float32
    torch.testing.assert_close(scores.cpu().double(), expected_scores, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(output.cpu().double(), expected_output, rtol=1e-4, atol=1e-5)


def test_codes_read_through_a_strided_view_and_values_split_across_programs(monkeypatch):
    """The value sum split over several programs per row (partial sums added) equals the float64 sum, and
    codes that are the first rows of a longer buffer are read at their strides."""
    monkeypatch.setattr(triton_packed, "PROGRAMS_PER_SM", 10**4)  # as many splits as groups
    (scores, expected_scores), (output, expected_output) = sums(3, 64, 32, 4, groups=5, buffer_rows=24)
    torch.testing.assert_close(scores.cpu().double(), expected_scores, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(output.cpu().double(), expected_output, rtol=1e-4, atol=1e-5)


def test_an_empty_history_gives_empty_scores_and_a_zero_output():
    codes = torch.zeros(1, 2, 0, 16, dtype=torch.uint8, device=DEVICE)
    query, weights = torch.randn(1, 2, 1, 16, device=DEVICE), torch.zeros(1, 2, 1, 0, device=DEVICE)
    scale = torch.zeros(1, 2, 0, 16, device=DEVICE)
    assert triton_packed.triton_packed_scores(codes, query, scale, scale, 16, 2).shape == (1, 2, 1, 0)
    output = triton_packed.triton_packed_values(codes, weights, scale[..., :1], scale[..., :1], 16, 2)
    assert torch.equal(output.cpu(), torch.zeros(1, 2, 1, 16))


@pytest.mark.parametrize("nbits", [2, 3, 4, 8])
@pytest.mark.parametrize(("head_dim", "group_size"), [(16, 16), (64, 32), (128, 64)])
@pytest.mark.parametrize("rotation", ["none", "hadamard"])
@pytest.mark.parametrize("queries", [1, 20])
def test_triton_rope_scores_equal_float64_keys_turned_to_their_positions(
    nbits, head_dim, group_size, rotation, queries
):
    # Angles in float32, as the model's rotary embedding computes them: exact to their rounding at 40.
    generator = torch.Generator().manual_seed(nbits + head_dim)
    keys = torch.randn(2, 3, 3 * group_size, head_dim, generator=generator)
    codec = TorchCodec(nbits)
    rope = KeyRotator(rotary_module(head_dim))
    packed = PackedTokens(group_size, (codec, codec), False, keys[..., :0, :], rotation, rope)
    packed.append(keys, torch.randn(keys.shape, generator=generator), position=40)
    query = torch.randn(2, 3, queries, head_dim, generator=generator)
    expected = query.double() @ float64_keys(packed, head_dim, 40).transpose(-1, -2)
    signs = hadamard_signs(head_dim, DEVICE) if rotation == "hadamard" else None
    stored = [t.to(DEVICE) for t in (packed.key_codes, query, packed.group_scale, packed.group_zero)]
    inv_freq = rope.rotary_module.inv_freq.to(DEVICE)
    scores = triton_packed.triton_rope_scores(*stored, group_size, nbits, inv_freq, 40, signs)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores.cpu().double(), expected, rtol=1e-4, atol=1e-4)


def test_the_triton_rope_kernel_names_what_it_cannot_turn():
    inv_freq = rotary_module(32).inv_freq
    assert triton_packed.unsupported_rope(64, inv_freq) == (
        "a rotary embedding over 32 of 64 channels (partial rotary)"
    )
    assert triton_packed.unsupported_rope(96, rotary_module(96).inv_freq) == (
        "head_dim=96: the Triton RoPE kernel takes powers of two from 16"
    )
    assert triton_packed.unsupported_rope(64, rotary_module(64).inv_freq) is None
    codes, query, scale = (
        torch.zeros(1, 1, 16, 96, dtype=torch.uint8),
        torch.zeros(1, 1, 1, 96),
        torch.ones(1, 1, 1, 96),
    )
    with pytest.raises(ValueError, match=r"cannot read these keys: head_dim=96: the Triton RoPE kernel"):
        triton_packed.triton_rope_scores(codes, query, scale, scale, 16, 8, rotary_module(96).inv_freq, 0)


@pytest.mark.parametrize("arch", ["llama-gqa", "phi3", "gemma3", "gpt-oss"])
@pytest.mark.parametrize("space", STORED_SPACES)
def test_decoding_through_the_triton_sums_matches_dequantize_then_attend(arch, space, monkeypatch):
    stored_calls = record_calls(monkeypatch, QuantizedLayer, "attend_stored")
    kernel_calls = []

    def counted(name, function):
        return lambda *arguments: kernel_calls.append(name) or function(*arguments)

    for name in ("triton_packed_scores", "triton_packed_values"):
        monkeypatch.setattr(triton_packed, name, counted(name, getattr(triton_packed, name)))
    rope = SimpleNamespace(rope_scores=counted("rope_scores", packed_attention.TRITON_ROPE.rope_scores))
    monkeypatch.setattr(packed_attention, "TRITON_ROPE", rope)
    model, ids = make_tiny_model(arch).to(DEVICE), random_ids(40).to(DEVICE)
    dense_tokens, dense_logits, _ = decode(model, f"quantized:{space},{GROUPS},attention=dense", ids, new=10)
    tokens, logits, _ = decode(model, f"quantized:{space},{GROUPS},attention=triton", ids, new=10)
    assert stored_calls, "no decoding step read the packed storage"
    # Pre-RoPE keys are turned by the Triton RoPE kernel; phi3's partial rotary embedding by torch.
    scores = "rope_scores" if "pre_rope" in space else "triton_packed_scores"
    expected = ["triton_packed_values"] + ([] if "pre_rope" in space and arch == "phi3" else [scores])
    assert sorted(kernel_calls) == sorted(expected * len(stored_calls))
    assert torch.equal(tokens, dense_tokens)
    torch.testing.assert_close(logits, dense_logits, rtol=1e-4, atol=1e-4)


def test_auto_takes_the_triton_sums_on_cuda_only():
    assert "triton" in ATTENTION_BACKENDS
    assert triton_packed.triton_sums("auto", 32, torch.device("cpu")) is None
    assert triton_packed.triton_sums("torch", 32, torch.device("cuda")) is None
    assert triton_packed.triton_sums("auto", 24, torch.device("cuda")) is None  # a group it cannot tile
    assert triton_packed.triton_sums("auto", 32, torch.device("cuda")) == (
        triton_packed.triton_packed_scores,
        triton_packed.triton_packed_values,
    )


def test_triton_attention_is_refused_off_cuda_without_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = make_tiny_model("llama")
    with pytest.raises(
        ValueError, match=r"attention='triton' runs Triton kernels on a CUDA device; this layer"
    ):
        build_cache(f"quantized:{GROUPS},attention=triton", model)


def test_triton_attention_names_a_group_size_it_cannot_tile_and_a_missing_triton(monkeypatch):
    model = make_tiny_model("llama").to(DEVICE)
    with pytest.raises(ValueError, match=r"group_size=8: the Triton kernels take powers of two from 16"):
        build_cache("quantized:group_size=8,attention=triton", model)
    monkeypatch.setattr(triton_packed, "triton_available", lambda: False)
    with pytest.raises(ValueError, match=r"attention='triton' needs Triton, which is not installed"):
        build_cache(f"quantized:{GROUPS},attention=triton", model)
    build_cache(f"quantized:{GROUPS},attention=auto", model)  # auto falls back to torch
