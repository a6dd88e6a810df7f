"""What 8-bit scales and zero points would cost: quantization error of the model's own keys and values.

    OMP_WAIT_POLICY=PASSIVE python eval/bench_scale_format.py --tokens 4096

At ``group_size=64`` a group's scale and zero point cost 32 / 64 = 0.5 bits per entry in bfloat16; in an 8-bit
float they cost 0.25. This measures what that saving gives back: the embedded model
(float32) reads ``--tokens`` corpus tokens into a ``DynamicCache``; each layer's keys and values are rotated
by the ``hadamard`` rotation, then quantized as the packed store does (keys per channel over groups of 64
tokens, values per token over groups of 64 channels, codes computed from the stored scale and zero point),
with the scale and zero point stored

* ``bfloat16``: as ``scales=model`` stores them in a bfloat16 model;
* ``e4m3 nearest``: in ``float8_e4m3fn`` (3 mantissa bits), rounded to nearest through the library's own
  codec, which may leave a group's extremes outside the range and clip them;
* ``e4m3 covering``: the same, with the zero point rounded down and the scale up, so the range still covers
  the group;
* ``e5m2 (scales=float8)``: in ``float8_e5m2`` (2 mantissa bits, 5 exponent bits), rounded to nearest:
  what ``quantized:scales=float8`` stores. Its normal range, 6e-5 to 57344, holds the scales of any model's
  keys and values; e4m3's (0.016 to 448) does not hold the small scales of a model with small values.

It prints, per width, the relative mean squared error (error energy over signal energy, averaged over
layers) and its ratio to bfloat16's, converted to bits of code: a ``b``-bit uniform code loses about a factor
4 of squared error per bit, so a ratio ``r`` costs ``log4(r)`` bits. Results go to
``eval/results/scale_format.json``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

FLOAT8 = torch.float8_e4m3fn
GROUP = 64


def float8_up(x: torch.Tensor) -> torch.Tensor:
    """The smallest float8 value ``>= x`` for ``x >= 0`` (float32 out)."""
    nearest = x.to(FLOAT8)
    bits = nearest.view(torch.uint8).clone()
    bits[nearest.float() < x] += 1  # positive float8 bit patterns are ordered like their values
    return bits.view(FLOAT8).float()


def float8_down(x: torch.Tensor) -> torch.Tensor:
    """The largest float8 value ``<= x`` (float32 out)."""
    magnitude = x.abs()
    nearest = magnitude.to(FLOAT8)
    bits = nearest.view(torch.uint8).clone()
    below = nearest.float() > magnitude  # rounded up in magnitude: step back one
    bits[below & (x >= 0)] -= 1
    positive = bits.view(FLOAT8).float()
    return torch.where(x >= 0, positive, -float8_up(magnitude))


def dequantized(x: torch.Tensor, dim: int, nbits: int, storage: str) -> torch.Tensor:
    """``x`` quantized over ``dim`` with ``nbits`` codes and scales stored as ``storage``, then restored."""
    from hf_kvcache.strategies.packing import TorchCodec, scale_dtype

    if storage != "e4m3 covering":
        # The last one is what the option stores, taken from the library itself.
        dtype = {
            "bfloat16": torch.bfloat16,
            "e4m3 nearest": FLOAT8,
            "e5m2 (scales=float8)": scale_dtype("float8", torch.bfloat16),
        }[storage]
        codes, scale, zero = TorchCodec(nbits).quantize(x, dim, scale_dtype=dtype)
        return codes.float() * scale.float() + zero.float()
    levels = 2**nbits - 1
    low, high = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    zero = float8_down(low)
    scale = float8_up((high - zero) / levels).clamp_min(torch.finfo(torch.float32).tiny)
    return torch.round((x - zero) / scale).clamp(0, levels) * scale + zero


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096, help="corpus tokens prefilled (a multiple of 64)")
    parser.add_argument(
        "--rotation", choices=["hadamard", "none"], default="hadamard", help="before quantizing"
    )
    parser.add_argument("--out", type=Path, default=Path("eval/results/scale_format.json"))
    args = parser.parse_args()
    if args.tokens % GROUP:
        raise SystemExit(f"--tokens must be a multiple of {GROUP}, got {args.tokens}")

    from transformers import DynamicCache

    from hf_kvcache.evaluation.corpus import corpus_token_ids, load_corpus
    from hf_kvcache.evaluation.model import load_model
    from hf_kvcache.strategies.rotation import rotation_matrix

    model, tokenizer = load_model()
    ids = corpus_token_ids(tokenizer, load_corpus(), args.tokens)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        for start in range(0, ids.shape[1], 512):
            model(ids[:, start : start + 512], past_key_values=cache)
    storages = ("bfloat16", "e4m3 nearest", "e4m3 covering", "e5m2 (scales=float8)")
    rows = []
    for nbits in (2, 3, 4):
        errors = {storage: [[], []] for storage in storages}
        for layer in cache.layers:
            head_dim = layer.keys.shape[-1]
            rotation = rotation_matrix(args.rotation, head_dim, torch.float32, layer.keys.device)
            rotation = torch.eye(head_dim) if rotation is None else rotation
            keys, values = layer.keys[0].float() @ rotation, layer.values[0].float() @ rotation  # [H, T, D]
            heads, length, dim = keys.shape
            key_groups = keys.reshape(heads, length // GROUP, GROUP, dim)  # per channel over 64 tokens
            value_groups = values.reshape(heads, length, dim // GROUP, GROUP)  # per token over 64 channels
            for storage in storages:
                for part, (x, axis) in enumerate(((key_groups, 2), (value_groups, 3))):
                    error = (dequantized(x, axis, nbits, storage) - x).pow(2).sum() / x.pow(2).sum()
                    errors[storage][part].append(error.item())
        for storage in storages:
            row = {"nbits": nbits, "storage": storage}
            for part, name in enumerate(("keys", "values")):
                mean = sum(errors[storage][part]) / len(errors[storage][part])
                ratio = mean / (sum(errors["bfloat16"][part]) / len(errors["bfloat16"][part]))
                row |= {
                    f"{name}_relative_mse": mean,
                    f"{name}_ratio": ratio,
                    f"{name}_bits_lost": math.log(ratio, 4),
                }
            rows.append(row)
            print(
                f"{nbits}-bit {storage:16s} keys {row['keys_relative_mse']:.5f} (x{row['keys_ratio']:.3f}, "
                f"{row['keys_bits_lost']:.3f} bit)  values {row['values_relative_mse']:.5f} "
                f"(x{row['values_ratio']:.3f}, {row['values_bits_lost']:.3f} bit)",
                flush=True,
            )
    args.out.write_text(
        json.dumps(
            {"tokens": args.tokens, "group_size": GROUP, "rotation": args.rotation, "rows": rows}, indent=1
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
