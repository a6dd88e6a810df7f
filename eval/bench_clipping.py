"""What ``clipping=mse`` buys, and what it costs: squared error against fidelity to the full cache.

    OMP_WAIT_POLICY=PASSIVE python eval/bench_clipping.py --offsets 0 60000

At each corpus token offset the embedded model (float32) reads ``--context`` tokens into a ``DynamicCache``
and, in chunks of 512, into ``quantized`` caches of ``--setting`` with keys and values at 2 and 3 bits, with
min-max ranges (``clipping=none``) and with ranges of least squared error (``clipping=mse``). Then the next
``--probe`` tokens are run over the full cache's keys and values with some of them swapped for a quantized
cache's: all of them, only the keys, only the values (the rest from the min-max cache). Per row it gives

* the relative squared error of the held keys and values (error energy over signal energy, averaged over
  layers; pre-RoPE keys are compared after the cache turned them back to their positions);
* the KL divergence of the probe's next-token distributions from the full cache's (fidelity);
* the probe's perplexity as a ratio to the full cache's (what ``compare`` reports, and what a change of the
  distribution can lower below 1 without being any closer to the full cache).

Results go to ``eval/results/clipping.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

SETTING = "group_size=64,residual_length=0,rotation=hadamard,keys=pre_rope"


def relative_errors(held: list[tuple], exact: list[tuple]) -> tuple[float, float]:
    """Mean over layers of ``|held - exact|^2 / |exact|^2`` for keys and for values."""
    errors = [[], []]
    for layer, reference in zip(held, exact, strict=True):
        for part in (0, 1):
            want = reference[part].float()
            errors[part].append(((layer[part].float() - want).pow(2).sum() / want.pow(2).sum()).item())
    return sum(errors[0]) / len(errors[0]), sum(errors[1]) / len(errors[1])


@torch.no_grad()
def log_probs(model, probe: torch.Tensor, layers: list[tuple]) -> torch.Tensor:
    """Next-token log-probabilities ``[T, V]`` of ``probe`` run over the keys and values ``layers``."""
    from hf_kvcache.calibration import cache_holding

    return model(probe, past_key_values=cache_holding(model, layers)).logits[0].float().log_softmax(-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--offsets", nargs="+", type=int, default=[0, 60000], help="corpus token offsets")
    parser.add_argument("--context", type=int, default=3840, help="tokens held first")
    parser.add_argument("--probe", type=int, default=256, help="tokens run over them")
    parser.add_argument("--setting", default=SETTING, help="quantized options besides widths and clipping")
    parser.add_argument("--out", type=Path, default=Path("eval/results/clipping.json"))
    args = parser.parse_args()

    from transformers import DynamicCache

    from hf_kvcache import build_cache, prefill
    from hf_kvcache.evaluation.corpus import corpus_token_ids, load_corpus
    from hf_kvcache.evaluation.model import load_model

    model, tokenizer = load_model()
    corpus = load_corpus()
    rows = []
    for offset in args.offsets:
        ids = corpus_token_ids(tokenizer, corpus, offset + args.context + args.probe)[:, offset:]
        context, probe = ids[:, : args.context], ids[:, args.context :]
        exact_cache = prefill(model, context, DynamicCache(config=model.config), leave_last=False)
        exact_layers = [(layer.keys, layer.values) for layer in exact_cache.layers]

        exact = log_probs(model, probe, exact_layers)
        exact_nll = -exact[:-1].gather(-1, probe[0, 1:, None]).mean()
        for nbits in (2, 3):
            held = {}
            for clipping in ("none", "mse"):
                spec = f"quantized:nbits={nbits},{args.setting},clipping={clipping}"
                cache = prefill(model, context, build_cache(spec, model), leave_last=False)
                held[clipping] = [(layer.keys, layer.values) for layer in cache.layers]
            variants = {
                "none": held["none"],
                "mse": held["mse"],
                "mse keys": [(c[0], n[1]) for n, c in zip(held["none"], held["mse"], strict=True)],
                "mse values": [(n[0], c[1]) for n, c in zip(held["none"], held["mse"], strict=True)],
            }
            for name, layers in variants.items():
                logits = log_probs(model, probe, layers)
                divergence = (exact.exp() * (exact - logits)).sum(-1).mean().item()
                nll = -logits[:-1].gather(-1, probe[0, 1:, None]).mean()
                keys_error, values_error = relative_errors(layers, exact_layers)
                row = {
                    "offset": offset,
                    "nbits": nbits,
                    "clipping": name,
                    "keys_relative_mse": keys_error,
                    "values_relative_mse": values_error,
                    "kl_divergence": divergence,
                    "perplexity_ratio": (nll - exact_nll).exp().item(),
                }
                rows.append(row)
                errors = f"keys {keys_error:.4f} values {values_error:.4f}"
                shown = f"KL {divergence:.4f} perplexity x{row['perplexity_ratio']:.4f}"
                print(f"offset {offset:6d} {nbits}-bit {name:10s} {errors} {shown}", flush=True)
    settings = vars(args) | {"out": str(args.out), "dtype": "float32"}
    args.out.write_text(json.dumps({"settings": settings, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
