"""The ``hf-kvcache`` command line."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from hf_kvcache.cli_arguments import (
    add_calibrate_arguments,
    add_frontier_arguments,
    add_harness_arguments,
    add_model_arguments,
    add_parallel_argument,
    metric_options_from_args,
)

EXAMPLES = """examples:
  hf-kvcache compare                                # the main job: all default strategies, embedded defaults
  hf-kvcache compare --strategies full quantized:nbits=2 heavy-hitter:heavy_budget=64 --out results/
  hf-kvcache compare --model meta-llama/Llama-3.2-1B --device-map auto --dtype bfloat16
  hf-kvcache list
  hf-kvcache scale --lengths 1024 4096 16384        # cost against context length, scale.png
  hf-kvcache speed --strategies full sliding-window --max-tokens 4096
  hf-kvcache passkey --strategies heavy-hitter --passkey-lengths 2048 4096
  hf-kvcache compare --metrics perplexity memory --strategies full tova snapkv
  hf-kvcache frontier --ratios 0.25 0.125 --families kvzip expected-attention snapkv
  hf-kvcache ppl                                    # embedded SmolLM2 + Wikipedia, full cache
  hf-kvcache ppl --strategies full quantized:nbits=2 --max-tokens 2048
  hf-kvcache ppl --model HuggingFaceTB/SmolLM2-360M --dataset wikitext:wikitext-2-raw-v1
  hf-kvcache ppl --text-file book.txt --chunk-size 1
"""


def load_inputs(args: argparse.Namespace):
    """Load the model, tokenizer and evaluation tokens the arguments name."""
    from hf_kvcache.evaluation import load_corpus, load_model
    from hf_kvcache.evaluation.corpus import corpus_token_ids

    _check_text_file(args)
    text = load_corpus(args.text_file or args.dataset, split=args.split, max_chars=None)
    device = "auto" if args.device_map == "auto" else args.device
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=device)
    input_ids = corpus_token_ids(tokenizer, text, args.max_tokens)
    return model, tokenizer, input_ids


def _check_text_file(args: argparse.Namespace) -> None:
    if args.text_file is not None and not Path(args.text_file).is_file():
        raise SystemExit(f"error: --text-file {args.text_file!r} does not exist")


def _check_specs(specs: list[str]) -> None:
    from hf_kvcache.registry import parse_spec

    for spec in specs:
        try:
            parse_spec(spec)
        except ValueError as error:
            raise SystemExit(f"error: {error}") from None


def run_list(args: argparse.Namespace) -> int:
    from hf_kvcache.registry import canonical_spec, compositions, get_strategy, list_strategies

    for name in list_strategies():
        print(f"{name:16s} {get_strategy(name).summary}\n{'':16s} default: {canonical_spec(name)}")
    print(
        "\ncompositions (eviction strategy + storage format, e.g. "
        "'sliding-window:window_length=512+quantized:nbits=4'):"
    )
    for composition in compositions():
        print(f"  {composition:30s} default: {canonical_spec(composition)}")
    return 0


def run_ppl(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from hf_kvcache.evaluation import perplexity
    from hf_kvcache.registry import build_cache

    _check_specs(args.strategies)
    model, _tokenizer, input_ids = load_inputs(args)
    for spec in args.strategies:
        cache = build_cache(spec, model)
        with tqdm(total=input_ids.shape[1], desc=spec, unit="tok", leave=False, disable=None) as bar:
            result = perplexity(
                model, input_ids, cache=cache, chunk_size=args.chunk_size, on_chunk=bar.update
            )
        print(
            f"{spec}\tperplexity={result.perplexity:.4f}\ttokens={result.num_tokens}\tnll={result.mean_nll:.5f}"
        )
    return 0


def run_harness(args: argparse.Namespace, default_out: str | None) -> int:
    import tempfile

    from hf_kvcache.evaluation.harness import CompareSettings, run_compare
    from hf_kvcache.evaluation.report import markdown_table, summarize, table_columns, write_reports

    _check_specs(args.strategies)
    _check_text_file(args)
    metrics = list(args.metrics)
    try:
        settings = CompareSettings(
            model=args.model,
            dataset=args.dataset,
            text_file=args.text_file,
            split=args.split,
            max_tokens=args.max_tokens,
            chunk_size=args.chunk_size,
            dtype=args.dtype,
            device=args.device,
            metrics=tuple(metrics),
            metric_options=metric_options_from_args(args, metrics),
        )
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    out = args.out or default_out or tempfile.mkdtemp(prefix="hf-kvcache-")
    records = run_compare(args.strategies, settings, out, force=args.force, device_map=args.device_map)
    paths = write_reports(records, out)
    print(markdown_table(summarize(records), table_columns(records)))
    print("wrote " + ", ".join(str(p) for p in [Path(out) / "results.json", *paths]))
    return 0


def run_scale_command(args: argparse.Namespace) -> int:
    from hf_kvcache.evaluation.orchestrator import DataSource
    from hf_kvcache.evaluation.scale import ScaleSettings, run_scale, scale_table, write_scale_plot

    _check_specs(args.strategies)
    _check_text_file(args)
    try:
        settings = ScaleSettings(
            tuple(args.lengths), args.rounds, args.decode_tokens, args.prefill_chunk_size
        )
        source = DataSource(args.model, args.dataset, args.text_file, args.split, args.dtype, args.device)
        records = run_scale(args.strategies, source, settings, args.out, args.force, args.device_map)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    table = scale_table(records)
    (Path(args.out) / "scale.md").write_text(table)
    plot = write_scale_plot(records, args.out)
    print(table)
    print(f"wrote {Path(args.out) / 'results.json'}, {Path(args.out) / 'scale.md'}, {plot}")
    return 0


def run_calibrate(args: argparse.Namespace) -> int:
    from hf_kvcache import calibration
    from hf_kvcache.registry import parse_spec
    from hf_kvcache.width_allocation import describe_allocation

    _check_specs([args.strategy])
    strategy, options = parse_spec(args.strategy)
    if strategy.name == "duo":
        return run_calibrate_heads(args, options)
    if strategy.name != "quantized":
        raise SystemExit(f"error: --strategy must be quantized:... or duo:..., got {args.strategy!r}")
    model, _tokenizer, input_ids = load_inputs(args)
    record = calibration.calibrate_quantization(
        model, input_ids, options, probe_tokens=args.probe_tokens, probe=args.probe
    )
    for mean_bits in (2.5, 3.0):
        print(describe_allocation(record, mean_bits))
    return _write_calibration(
        record, Path(args.out) if args.out else calibration.default_calibration_path(model, options)
    )


def _write_calibration(record: dict, out: Path) -> int:
    import json

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1))
    print(f"wrote {out}")
    return 0


def run_calibrate_heads(args: argparse.Namespace, options) -> int:
    """``calibrate --strategy duo``: score each KV head by what streaming it costs passkey retrieval."""
    from hf_kvcache.evaluation import load_corpus
    from hf_kvcache.head_calibration import calibrate_heads, default_head_calibration_path

    model, tokenizer, _ = load_inputs(args)
    text = load_corpus(args.text_file or args.dataset, split=args.split, max_chars=None)
    window, sinks = options.window, options.num_sink_tokens
    record = calibrate_heads(model, tokenizer, text, args.prompts, args.max_tokens, window, sinks)
    return _write_calibration(record, Path(args.out) if args.out else default_head_calibration_path(model))


def run_frontier_command(args: argparse.Namespace) -> int:
    from hf_kvcache.evaluation.frontier import run_frontier

    _check_text_file(args)
    source = {
        name: getattr(args, name)
        for name in ("model", "dataset", "text_file", "split", "dtype", "device", "max_tokens")
    }
    ruler = {"tasks": tuple(args.tasks), "lengths": tuple(args.lengths), "trials": args.trials}
    try:
        paths = run_frontier(
            args.families, args.ratios, args.protocol, ruler, source, args.out, args.force, args.device_map
        )
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    for path in paths[:1]:
        print(path.read_text())
    if paths:
        print("wrote " + ", ".join(str(p) for p in [Path(args.out) / "results.json", *paths]))
    return 0


def add_measuring_command(commands, name: str, summary: str) -> argparse.ArgumentParser:
    """A subcommand that loads a model and text: the shared model arguments and the examples."""
    command = commands.add_parser(
        name, help=summary, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_arguments(command)
    return command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-kvcache",
        description="KV-cache compression for transformers: measure what each strategy costs.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="list registered strategies")
    listing.set_defaults(run=run_list)
    ppl = add_measuring_command(commands, "ppl", "streaming perplexity")
    ppl.add_argument("--strategies", nargs="+", default=["full"], help="strategy specs (default: full)")
    ppl.set_defaults(run=run_ppl)
    from hf_kvcache.evaluation import get_metric, list_metrics
    from hf_kvcache.evaluation.harness import DEFAULT_STRATEGIES, default_metrics

    compare = add_measuring_command(
        commands,
        "compare",
        "the main job: every metric (perplexity, memory, speed, passkey, ...) for every strategy",
    )
    add_harness_arguments(compare, list(DEFAULT_STRATEGIES), list_metrics())
    compare.add_argument(
        "--metrics",
        nargs="+",
        choices=list_metrics(),
        default=list(default_metrics()),
        help=f"metrics to measure, of the registered {', '.join(list_metrics())} "
        f"(default: {' '.join(default_metrics())})",
    )
    compare.set_defaults(run=lambda args: run_harness(args, "results"))
    scale = add_measuring_command(
        commands, "scale", "cost against context length: bytes held, peak memory, prefill and decode time"
    )
    scale.add_argument("--strategies", nargs="+", default=list(DEFAULT_STRATEGIES), help="strategy specs")
    scale.add_argument(
        "--lengths", nargs="+", type=int, default=[1024, 2048, 4096, 8192], help="prompt lengths"
    )
    scale.add_argument("--rounds", type=int, default=3, help="timed rounds per strategy and length (>= 3)")
    scale.add_argument("--decode-tokens", type=int, default=8, help="decode steps timed per round")
    scale.add_argument("--prefill-chunk-size", type=int, default=512, help="tokens per prefill forward")
    scale.add_argument("--out", default="results/scale", help="folder for results.json, scale.md, scale.png")
    scale.add_argument("--force", action="store_true", help="recompute records already in results.json")
    add_parallel_argument(scale)
    scale.set_defaults(run=run_scale_command)
    add_frontier_arguments(
        add_measuring_command(commands, "frontier", "RULER score against bytes held, per strategy family")
    ).set_defaults(run=run_frontier_command)
    calibrate = add_measuring_command(
        commands,
        "calibrate",
        "per-layer code widths for quantized:calibrated_bits=B, or duo's retrieval heads (--strategy duo)",
    )
    add_calibrate_arguments(calibrate)
    calibrate.set_defaults(run=run_calibrate, max_tokens=2048)
    commands.add_parser(
        "lm-eval",
        add_help=False,
        help="lm-evaluation-harness through a cache: --model-args ...,cache=SPEC "
        "--tasks ... (any lm-eval flag)",
    )
    # One subcommand per metric, so that `hf-kvcache passkey ...` measures just that.
    for name in list_metrics():
        command = add_measuring_command(commands, name, get_metric(name).summary)
        add_harness_arguments(command, list(DEFAULT_STRATEGIES), [name])
        command.set_defaults(run=lambda args: run_harness(args, None), metrics=[name])
    return parser


def run_lm_eval(argv: list[str]) -> int:
    """``hf-kvcache lm-eval ...``: lm-eval's command line, with the ``hf-kvcache`` model type registered."""
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        raise SystemExit(
            "error: hf-kvcache lm-eval runs lm-evaluation-harness, which is not installed: "
            "pip install 'hf-kvcache[lm-eval]' (nothing was run)"
        )
    from hf_kvcache.lm_eval import run_cli

    return run_cli(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["lm-eval"]:  # every other argument is lm-eval's own
        return run_lm_eval(argv[1:])
    args = build_parser().parse_args(argv)
    if getattr(args, "num_processes", 1) > 1 and "WORLD_SIZE" not in os.environ:
        from hf_kvcache.evaluation.distributed import relaunch_with_accelerate

        return relaunch_with_accelerate(args.num_processes, _without_option(argv, "--num-processes"))
    return args.run(args)


def _without_option(argv: list[str], flag: str) -> list[str]:
    """``argv`` without ``flag VALUE`` or ``flag=VALUE``."""
    kept, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == flag:
            skip = True
        elif not item.startswith(flag + "="):
            kept.append(item)
    return kept


if __name__ == "__main__":
    sys.exit(main())
