"""Does a QJL-style 1-bit sign sketch of the 2-bit key residual pay for its bit? Logit error on real keys.

    OMP_WAIT_POLICY=PASSIVE python eval/bench_sign_sketch.py

The embedded model reads 2048 corpus tokens; for three layers, the keys of ``quantized:nbits=2`` and
``quantized:nbits=3`` (no sinks, no residual: every key packed) are compared with the exact keys by the RMS
error of the logits ``q . k`` for isotropic queries of the keys' scale. The sketch (QJL, Zandieh et al.,
https://arxiv.org/abs/2406.03482) stores ``sign(S r)`` for the residual ``r = k - k_2bit`` with a Gaussian
``S`` of ``D x D`` (one bit per channel, like one more bit of code) and the residual's norm, and estimates
``q . r`` as ``sqrt(pi / 2) / m * |r| * (S q) . sign(S r)``: unbiased, with a variance of about
``pi / 2 * |q|^2 |r|^2 / m``, more than the ``|q|^2 |r|^2 / D`` error of ignoring ``r`` unless ``m > 1.57 D``.
"""

from __future__ import annotations

import math

import torch
from transformers import DynamicCache

from hf_kvcache import build_cache, prefill
from hf_kvcache.evaluation import load_corpus, load_model


@torch.no_grad()
def main() -> None:
    model, tokenizer = load_model(device="cpu")
    ids = tokenizer(load_corpus()[:30000], return_tensors="pt").input_ids[:, :2048]
    caches = {"exact": DynamicCache(config=model.config)}
    for bits in (2, 3):
        caches[bits] = build_cache(f"quantized:nbits={bits},residual_length=0,num_sink_tokens=0", model)
    for cache in caches.values():
        prefill(model, ids, cache, chunk_size=512, leave_last=False)
    generator = torch.Generator().manual_seed(0)
    for layer in (2, 18, 28):
        exact_keys = caches["exact"].layers[layer].keys[0].float()  # [H, N, D]
        two, three = (caches[bits].layers[layer].keys[0].float() for bits in (2, 3))
        heads, _, dim = exact_keys.shape
        scale = exact_keys.norm(dim=-1).mean() / math.sqrt(dim)
        queries = torch.randn(heads, 256, dim, generator=generator) * scale
        residual = exact_keys - two
        projection = torch.randn(dim, dim, generator=generator)
        signs = torch.sign(residual @ projection.T)
        sketch = math.sqrt(math.pi / 2) / dim * residual.norm(dim=-1, keepdim=True) * (signs @ projection)
        exact = queries @ exact_keys.transpose(-1, -2)
        errors = [
            ((queries @ keys.transpose(-1, -2) - exact) ** 2).mean().sqrt().item()
            for keys in (two, two + sketch, three)
        ]
        print(
            f"layer {layer}: logit RMS error  2-bit {errors[0]:.3f} | 2-bit + sign sketch {errors[1]:.3f} | "
            f"3-bit {errors[2]:.3f}"
        )


if __name__ == "__main__":
    main()
