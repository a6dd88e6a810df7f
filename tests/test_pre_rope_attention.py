"""Decoding over keys stored before their rotary embedding (``keys=pre_rope``) reads the packed codes: the
kernel's scores against float64 keys turned to their positions from the definition, and the fused step for
every stored space. The entry point against "dequantize, then attend" on every architecture and with left
padding and beam search is in :mod:`tests.test_packed_attention`."""

import pytest
import torch

from hf_kvcache import kernels as kernel_module
from hf_kvcache.model_hooks import KeyRotator
from hf_kvcache.strategies.packed_attention import pre_rope_scores
from hf_kvcache.strategies.packed_store import PackedTokens
from hf_kvcache.strategies.packing import TorchCodec, unpack_token_groups
from hf_kvcache.strategies.rotation import rotation_matrix
from tests.conftest import make_tiny_model, random_ids
from tests.helpers import decode

QUICK = "group_size=8,residual_length=4"


def rotary_module(rotary_dim: int) -> torch.nn.Module:
    module = torch.nn.Module()
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim
    module.register_buffer("inv_freq", 1.0 / 10000.0**exponents)
    return module


def float64_keys(packed: PackedTokens, rotary_dim: int, first: int) -> torch.Tensor:
    """The store's keys from the definition, in float64: codes times scale plus zero, the Hadamard rotation
    undone with its matrix, then each channel pair (i, i + rotary_dim / 2) turned by ``position * f_i``."""
    size, nbits = packed.group_size, packed.key_codec.nbits
    codes = unpack_token_groups(packed.key_codes, nbits, size).double()
    keys = codes * packed.group_scale.double().unsqueeze(3) + packed.group_zero.double().unsqueeze(3)
    keys = keys.flatten(2, 3)
    if packed.rotation_kind == "hadamard":
        keys = keys @ rotation_matrix("hadamard", keys.shape[-1], torch.float64, keys.device).T
    positions = torch.arange(first, first + keys.shape[2], dtype=torch.float64)
    angles = positions[:, None] * packed.key_rope.rotary_module.inv_freq.double()[None, :]
    first_half, second_half = keys[..., :rotary_dim].chunk(2, dim=-1)
    cos, sin = angles.cos(), angles.sin()
    turned = [first_half * cos - second_half * sin, second_half * cos + first_half * sin]
    return torch.cat([*turned, keys[..., rotary_dim:]], dim=-1)


@pytest.mark.parametrize("nbits", [2, 3, 4, 8])
@pytest.mark.parametrize(
    ("head_dim", "group_size", "rotary_dim"), [(16, 8, 16), (64, 32, 64), (96, 32, 96), (64, 64, 32)]
)
@pytest.mark.parametrize("rotation", ["none", "hadamard"])
@pytest.mark.parametrize("first", [4, 3000])
def test_compiled_pre_rope_scores_equal_float64_keys_turned_to_their_positions(
    nbits, head_dim, group_size, rotary_dim, rotation, first
):
    generator = torch.Generator().manual_seed(nbits + head_dim)
    keys = torch.randn(2, 3, 3 * group_size, head_dim, generator=generator)
    codec = TorchCodec(nbits)
    rope = KeyRotator(rotary_module(rotary_dim))
    packed = PackedTokens(group_size, (codec, codec), False, keys[..., :0, :], rotation, rope)
    packed.append(keys, torch.randn(keys.shape, generator=generator), position=first)
    queries = torch.randn(2, 3, 5, head_dim, generator=generator)
    expected = queries.double() @ float64_keys(packed, rotary_dim, first).transpose(-1, -2)
    scores = pre_rope_scores(packed, queries, kernel_module.load_packed_kernels())
    torch.testing.assert_close(scores.double(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rotation", ["none", "hadamard"])
def test_torch_pre_rope_scores_equal_float64_keys_turned_to_their_positions(rotation):
    # The torch path turns keys with float32 angles, as the model's rotary embedding does, so it is exact to
    # float32 angle rounding (about 1e-7 times the position, in radians).
    generator = torch.Generator().manual_seed(1)
    keys = torch.randn(2, 3, 24, 16, generator=generator)
    codec = TorchCodec(2)
    packed = PackedTokens(8, (codec, codec), False, keys[..., :0, :], rotation, KeyRotator(rotary_module(16)))
    packed.append(keys, torch.randn(keys.shape, generator=generator), position=40)
    queries = torch.randn(2, 3, 5, 16, generator=generator)
    expected = queries.double() @ float64_keys(packed, 16, 40).transpose(-1, -2)
    torch.testing.assert_close(
        pre_rope_scores(packed, queries, None).double(), expected, rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize(
    "options",
    [
        "nbits=2,keys=pre_rope",
        "nbits=2,nbits_keys=3,keys=pre_rope,rotation=hadamard",
        "nbits=4,nbits_keys=8,keys=pre_rope,rotation=hadamard-values",
        "nbits=3,nbits_values=2,rotation=hadamard-values",
        "nbits=2,nbits_keys=4,rotation=hadamard",
    ],
)
def test_unpadded_steps_of_every_stored_space_and_width_pair_take_the_fused_kernel(options, monkeypatch):
    fused = []
    decode_step = kernel_module.PackedKernels.decode
    monkeypatch.setattr(
        kernel_module.PackedKernels, "decode", lambda *a, **k: fused.append(1) or decode_step(*a, **k)
    )
    model = make_tiny_model("llama-gqa")
    ids = random_ids(40)
    dense, dense_logits, _ = decode(model, f"quantized:{options},{QUICK},attention=dense", ids)
    assert not fused
    tokens, logits, cache = decode(model, f"quantized:{options},{QUICK}", ids)
    assert len(fused) == 23 * len(cache.layers)
    assert torch.equal(tokens, dense)
    torch.testing.assert_close(logits, dense_logits, rtol=1e-4, atol=1e-4)
