"""The ``hf-kvcache`` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXAMPLES = """examples:
  hf-kvcache compare                                # the main job: all default strategies, embedded defaults
  hf-kvcache compare --strategies full quantized:nbits=2 heavy-hitter:heavy_budget=64 --out results/
  hf-kvcache compare --model meta-llama/Llama-3.2-1B --device-map auto --dtype bfloat16
  hf-kvcache list
  hf-kvcache speed --strategies full sliding-window --max-tokens 4096
  hf-kvcache passkey --strategies heavy-hitter --passkey-lengths 2048 4096
  hf-kvcache ppl                                    # embedded SmolLM2 + Wikipedia, full cache
  hf-kvcache ppl --strategies full quantized:nbits=2 --max-tokens 2048
  hf-kvcache ppl --model HuggingFaceTB/SmolLM2-360M --dataset wikitext:wikitext-2-raw-v1
  hf-kvcache ppl --text-file book.txt --chunk-size 1
"""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Options every measuring subcommand shares: which model, which text, how much."""
    parser.add_argument("--model", default=None, help="Hub id or local path (default: embedded SmolLM2-135M)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--text-file", default=None, help="a local UTF-8 text file to evaluate on")
    source.add_argument(
        "--dataset", default=None, help="a datasets id, optionally 'name:config' (needs network)"
    )
    parser.add_argument("--split", default="test", help="dataset split (default: test)")
    parser.add_argument(
        "--max-tokens", type=_positive_int, default=1024, help="tokens to evaluate (default 1024)"
    )
    parser.add_argument(
        "--chunk-size", type=_positive_int, default=16, help="tokens per forward (default 16)"
    )
    parser.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:N or auto (default: cuda if available)"
    )
    parser.add_argument(
        "--device-map", choices=["auto"], default=None, help="shard the model with accelerate"
    )
    parser.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: fp32 on CPU)")


def load_inputs(args: argparse.Namespace):
    """Load the model, tokenizer and evaluation tokens the arguments name."""
    from hf_kvcache.evaluation import load_corpus, load_model
    from hf_kvcache.evaluation.corpus import corpus_token_ids

    if args.text_file is not None and not Path(args.text_file).is_file():
        raise SystemExit(f"error: --text-file {args.text_file!r} does not exist")
    text = load_corpus(args.text_file or args.dataset, split=args.split, max_chars=None)
    device = "auto" if args.device_map == "auto" else args.device
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=device)
    input_ids = corpus_token_ids(tokenizer, text, args.max_tokens)
    return model, tokenizer, input_ids


def _check_specs(specs: list[str]) -> None:
    from hf_kvcache.registry import parse_spec

    for spec in specs:
        try:
            parse_spec(spec)
        except ValueError as error:
            raise SystemExit(f"error: {error}") from None


def run_list(args: argparse.Namespace) -> int:
    from hf_kvcache.registry import canonical_spec, get_strategy, list_strategies

    for name in list_strategies():
        print(f"{name:16s} {get_strategy(name).summary}\n{'':16s} default: {canonical_spec(name)}")
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


def _depth(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a depth between 0 and 1, got {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a depth between 0 and 1, got {value}")
    return value


def add_harness_arguments(parser: argparse.ArgumentParser, default_strategies: list[str]) -> None:
    parser.add_argument(
        "--strategies", nargs="+", default=default_strategies, help="strategy specs to compare"
    )
    parser.add_argument("--out", default=None, help="folder for results.json, results.csv, results.md, plots")
    parser.add_argument("--force", action="store_true", help="recompute records already in results.json")
    parser.add_argument(
        "--decode-tokens", type=_positive_int, default=16, help="timed decode steps (default 16)"
    )
    parser.add_argument("--passkey-lengths", type=_positive_int, nargs="+", default=[1024, 2048])
    parser.add_argument("--passkey-depths", type=_depth, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    parser.add_argument("--passkey-trials", type=_positive_int, default=1, help="keys per (length, depth)")


def run_harness(args: argparse.Namespace, metrics: tuple[str, ...], default_out: str | None) -> int:
    import tempfile

    from hf_kvcache.evaluation.harness import CompareSettings, run_compare
    from hf_kvcache.evaluation.report import markdown_table, summarize, write_reports

    _check_specs(args.strategies)
    if args.text_file is not None and not Path(args.text_file).is_file():
        raise SystemExit(f"error: --text-file {args.text_file!r} does not exist")
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
            decode_tokens=args.decode_tokens,
            passkey_lengths=tuple(args.passkey_lengths),
            passkey_depths=tuple(args.passkey_depths),
            passkey_trials=args.passkey_trials,
            metrics=metrics,
        )
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    out = args.out or default_out or tempfile.mkdtemp(prefix="hf-kvcache-")
    records = run_compare(args.strategies, settings, out, force=args.force, device_map=args.device_map)
    records = [r for r in records if r["metric"] in metrics]
    paths = write_reports(records, out)
    print(markdown_table(summarize(records)))
    print("wrote " + ", ".join(str(p) for p in [Path(out) / "results.json", *paths]))
    return 0


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
    ppl = commands.add_parser(
        "ppl",
        help="streaming perplexity",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(ppl)
    ppl.add_argument("--strategies", nargs="+", default=["full"], help="strategy specs (default: full)")
    ppl.set_defaults(run=run_ppl)
    from hf_kvcache.evaluation.harness import DEFAULT_STRATEGIES, METRICS

    for name, metrics, summary in (
        ("compare", METRICS, "the main job: perplexity, memory, speed and passkey for every strategy"),
        ("speed", ("speed",), "prefill and decode tokens/s"),
        ("passkey", ("passkey",), "long-context passkey retrieval accuracy"),
    ):
        command = commands.add_parser(
            name, help=summary, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        add_model_arguments(command)
        add_harness_arguments(command, list(DEFAULT_STRATEGIES))
        default_out = "results" if name == "compare" else None
        command.set_defaults(run=lambda args, m=metrics, o=default_out: run_harness(args, m, o))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
