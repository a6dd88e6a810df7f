"""Decode cost of every strategy after a long prompt: ms per token in interleaved rounds, aten ops per step.

    OMP_WAIT_POLICY=PASSIVE python eval/bench_decode.py --lengths 1024 8192 --out eval/results/decode.json

For each length, one process prefills a cache per strategy (``hf_kvcache.prefill``, chunks of 512) with the
first tokens of the corpus, then times ``--steps`` greedy decoding steps per cache per round, one cache after
another, for ``--rounds`` rounds: every strategy meets the same machine load, and the medians and min-max of
ms/token are reported. ``--profile`` also counts the aten operators one decoding step runs (torch profiler),
next to the full cache's, and on CUDA the kernels it launches and their summed device time; each cache's
prefill time is printed too (one run each, so only indicative).
``--compile`` adds, for every strategy, a second cache decoded through ``torch.compile(model.forward)`` (rows
named ``<spec> [compiled]``), timed in the same rounds; compilation and the one recompilation that makes the
token count dynamic happen in untimed warm-up steps, and the compiled tokens are checked against eager. Only
the public API is used, so the same script times another checkout of the package
(``PYTHONPATH=/path/to/checkout``), which is how before/after figures are taken.

On a GPU: ``--device cuda --dtype bfloat16``, and ``--geometry llama-3.1-8b`` (or ``llama-3.2-1b``) builds a
model of that published shape with random weights on the device (no download; decode cost does not depend on
the weights' values) fed seeded random tokens, ``--batch`` rows of them. Each cache also reports its
prefill's peak memory (the prompt and the first forward after it, where kvzip compresses) and one decoding
step's, above what was allocated before each (``PeakMemory``: CUDA's allocator peak; on CPU the process's
resident-set high-water mark, process-wide).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from hf_kvcache.evaluation.harness import DEFAULT_STRATEGIES
from hf_kvcache.evaluation.memory import PeakMemory

# Published shapes of two Llama models (config.json on the Hub), built with random weights.
_LLAMA_3 = dict(num_attention_heads=32, num_key_value_heads=8)
GEOMETRIES = {
    "llama-3.2-1b": dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, head_dim=64, tie_word_embeddings=True
    ),
    "llama-3.1-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        head_dim=128,
        tie_word_embeddings=False,
    ),
}


def random_weight_model(geometry: str, device: str, dtype: torch.dtype):
    """A Llama of ``geometry``'s shape with random weights, initialised on ``device`` (fast on a GPU)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}  # fmt: skip
    config = LlamaConfig(vocab_size=128256, max_position_embeddings=131072, rope_parameters=rope,
                         **_LLAMA_3, **GEOMETRIES[geometry])  # fmt: skip
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def profile_step(model, cache, token) -> tuple[dict, torch.Tensor]:
    """One decoding step under the torch profiler: the aten operators it runs and, on CUDA, the kernels it
    launches and their summed device time next to the step's wall time (a step whose kernels take a small
    part of its wall time is bound by the host, not the GPU). Also the step's next token."""
    from torch.profiler import ProfilerActivity, profile

    on_cuda = token.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        token = model(token, past_key_values=cache).logits[:, -1:].argmax(-1)
        if on_cuda:
            torch.cuda.synchronize(token.device)
        wall_ms = 1000 * (time.perf_counter() - start)
    events = prof.events()
    figures = {"aten_ops_per_step": sum(1 for event in events if event.name.startswith("aten::"))}
    if on_cuda:
        host = [event for event in events if event.device_type == torch.autograd.DeviceType.CPU]
        launched = sum(1 for event in events if event.device_type == torch.autograd.DeviceType.CUDA)
        figures["kernels_per_step"] = launched or sum(len(event.kernels) for event in host)
        figures["kernel_ms_per_step"] = sum(event.self_device_time_total for event in host) / 1000
        figures["profiled_step_ms"] = wall_ms  # slowed by the profiler itself
    return figures, token


COMPILED = " [compiled]"
WARMUP_STEPS = 3  # untimed: first calls, and under --compile the compilation and its one recompilation


@torch.no_grad()
def measure(
    model,
    ids: torch.Tensor,
    specs: list[str],
    rounds: int,
    steps: int,
    profile: bool,
    compile: bool = False,
    chunk_size: int = 512,
) -> dict:
    from hf_kvcache import build_cache, cache_nbytes, prefill

    forwards = {spec: model.forward for spec in specs}
    if compile:
        # One compiled forward serves every strategy, each with its own guards: allow them all.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * len(specs))
        compiled_forward = torch.compile(model.forward)
        forwards.update({spec + COMPILED: compiled_forward for spec in specs})
    caches, tokens, results, prefill_s, produced, memory = {}, {}, {}, {}, {}, {}
    for name in list(forwards):
        start = time.perf_counter()
        try:  # a spec this model cannot run is reported, and the others are still measured
            cache = build_cache(name.removesuffix(COMPILED), model)
            with PeakMemory(ids.device) as prefill_memory:
                prefill(model, ids, cache, chunk_size=chunk_size)
                # kvzip compresses at the first forward after the prompt: its cost belongs here.
                tokens[name] = model(ids[:, -1:], past_key_values=cache).logits[:, -1:].argmax(-1)
        except (ValueError, TypeError, RuntimeError) as error:
            print(f"  {ids.shape[1]}: {name} failed: {error}", file=sys.stderr, flush=True)
            results[name] = {"error": f"{type(error).__name__}: {error}"}
            del forwards[name]
            continue
        prefill_s[name] = time.perf_counter() - start
        memory[name] = {"prefill_peak_bytes": prefill_memory.growth, "peak_memory_kind": prefill_memory.kind}
        caches[name], produced[name] = cache, []
        print(f"  {ids.shape[1]}: prefilled {name}", file=sys.stderr, flush=True)

    def step(name: str) -> None:
        model.forward = forwards[name]  # replaced, not called directly: the model's hooks still run around it
        logits = model(tokens[name], past_key_values=caches[name]).logits
        tokens[name] = logits[:, -1:].argmax(-1)
        produced[name].append(int(tokens[name][0, 0]))  # also waits for the device

    for name in forwards:
        start = time.perf_counter()
        for _ in range(WARMUP_STEPS - 1):
            step(name)
        with PeakMemory(ids.device) as step_memory:
            step(name)
        memory[name]["decode_step_peak_bytes"] = step_memory.growth
        if name.endswith(COMPILED):
            print(f"  compiled {name} in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    timings = {name: [] for name in forwards}
    for _ in range(rounds):
        for name in forwards:
            start = time.perf_counter()
            for _ in range(steps):
                step(name)
            timings[name].append(1000 * (time.perf_counter() - start) / steps)
    model.__dict__.pop("forward", None)  # the class's own forward again
    for spec in forwards:
        values = timings[spec]
        results[spec] = {
            "ms_per_token": statistics.median(values),
            "min": min(values),
            "max": max(values),
            "rounds": values,
            "held_bytes": cache_nbytes(caches[spec]),
            "prefill_s": prefill_s[spec],  # one run each, not interleaved: indicative only
            **memory[spec],
        }
        if spec.endswith(COMPILED):
            eager = produced[spec.removesuffix(COMPILED)]
            same = sum(a == b for a, b in zip(eager, produced[spec], strict=True))
            results[spec]["tokens_as_eager"] = f"{same}/{len(eager)}"
        elif profile:
            try:  # a profiler failure costs its figures, not the timings
                figures, tokens[spec] = profile_step(model, caches[spec], tokens[spec])
                results[spec].update(figures)
            except RuntimeError as error:
                results[spec]["profile_error"] = str(error)
    return results


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 8192])
    parser.add_argument("--strategies", nargs="+", default=list(DEFAULT_STRATEGIES))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8, help="decoding steps per cache per round")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="count aten operators per decoding step (on CUDA also kernels and their time)",
    )
    parser.add_argument("--compile", action="store_true", help="also decode through torch.compile")
    parser.add_argument("--label", default="", help="a name for this run in the JSON (e.g. 'before')")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--geometry", choices=sorted(GEOMETRIES), help="random weights of this shape")
    parser.add_argument("--batch", type=int, default=1, help="rows decoded together")
    parser.add_argument("--chunk-size", type=int, default=512, help="prefill chunk")
    parser.add_argument("--out", default="eval/results/decode.json")
    args = parser.parse_args()

    import hf_kvcache
    from hf_kvcache.evaluation import load_corpus, load_model
    from hf_kvcache.evaluation.corpus import corpus_token_ids

    dtype = getattr(torch, args.dtype)
    if args.geometry:
        model = random_weight_model(args.geometry, args.device, dtype)
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(
            1000, model.config.vocab_size, (args.batch, max(args.lengths)), generator=generator
        )
    else:
        model, tokenizer = load_model(dtype=dtype, device=args.device)
        ids = corpus_token_ids(tokenizer, load_corpus(), max(args.lengths)).repeat(args.batch, 1)
    ids = ids.to(args.device)
    report = {"label": args.label, "package": hf_kvcache.__file__, "settings": vars(args), "lengths": {}}
    if args.device.startswith("cuda"):
        report["hardware"] = torch.cuda.get_device_name(args.device)
    for length in args.lengths:
        rows = measure(
            model,
            ids[:, :length],
            args.strategies,
            args.rounds,
            args.steps,
            args.profile,
            args.compile,
            args.chunk_size,
        )
        report["lengths"][str(length)] = rows
        for spec, row in rows.items():
            if "error" in row:
                print(f"{length:>6} {spec:<72} {row['error']}", flush=True)
                continue
            ops = f"  {row['aten_ops_per_step']} aten ops" if "aten_ops_per_step" in row else ""
            if "kernels_per_step" in row:
                ops += f", {row['kernels_per_step']} kernels taking {row['kernel_ms_per_step']:.1f} ms"
            if "tokens_as_eager" in row:
                ops = f"  {row['tokens_as_eager']} tokens as eager"
            held, peak, step = (
                row[key] / 2**30 for key in ("held_bytes", "prefill_peak_bytes", "decode_step_peak_bytes")
            )
            ops += f"  held {held:.2f} GiB, prefill peak {peak:.2f}, step peak {step:.2f}"
            print(
                f"{length:>6} {spec:<72} {row['ms_per_token']:7.1f} ms/token "
                f"({row['min']:.1f}-{row['max']:.1f}){ops}  prefill {row['prefill_s']:.1f} s",
                flush=True,
            )
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))  # after every length: a cut run keeps them


if __name__ == "__main__":
    main()
