"""The arguments of the ``hf-kvcache`` subcommands: which model and text, which metrics and their options, how
many processes. Every metric option becomes a ``--<metric>-<option>`` flag, read from the metric's options
dataclass, which also checks the value."""

from __future__ import annotations

import argparse
import dataclasses


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


def _option_flags(metric: str, option: dataclasses.Field) -> list[str]:
    return [f"--{metric}-{option.name}".replace("_", "-"), *option.metadata.get("aliases", ())]


def add_metric_option_arguments(parser: argparse.ArgumentParser, metric_names: list[str]) -> None:
    """A ``--<metric>-<option>`` flag per field of each metric's options dataclass (which checks values)."""
    import typing

    from hf_kvcache.evaluation import get_metric

    for name in metric_names:
        options_class = get_metric(name).options_class
        hints = typing.get_type_hints(options_class)
        group = parser.add_argument_group(f"{name} metric options")
        for option in dataclasses.fields(options_class):
            kind, many = hints[option.name], False
            if typing.get_origin(kind) is tuple:
                kind, many = typing.get_args(kind)[0], True
            group.add_argument(
                *_option_flags(name, option),
                dest=f"metric_option:{name}:{option.name}",
                metavar=kind.__name__.upper(),
                type=kind,
                nargs="+" if many else None,
                default=None,
                help=f"{option.metadata.get('help', option.name)} (default: {option.default})",
            )


def metric_options_from_args(args: argparse.Namespace, metric_names: list[str]) -> dict:
    """Each metric's options dataclass, built from the flags given; a bad value exits with its message."""
    from hf_kvcache.evaluation import get_metric

    options = {}
    for name in metric_names:
        options_class = get_metric(name).options_class
        given = {}
        for option in dataclasses.fields(options_class):
            value = getattr(args, f"metric_option:{name}:{option.name}", None)
            if value is not None:
                given[option.name] = tuple(value) if isinstance(value, list) else value
        try:
            options[name] = options_class(**given)
        except ValueError as error:
            raise SystemExit(f"error: {error}") from None
    return options


def add_harness_arguments(
    parser: argparse.ArgumentParser, default_strategies: list[str], metric_names: list[str]
) -> None:
    parser.add_argument(
        "--strategies", nargs="+", default=default_strategies, help="strategy specs to compare"
    )
    parser.add_argument("--out", default=None, help="folder for results.json, results.csv, results.md, plots")
    parser.add_argument("--force", action="store_true", help="recompute records already in results.json")
    add_parallel_argument(parser)
    add_metric_option_arguments(parser, metric_names)


def add_parallel_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--num-processes",
        type=_positive_int,
        default=1,
        help="split the work between this many processes through accelerate (one device each); the same as "
        "'accelerate launch --num_processes N -m hf_kvcache.cli ...'",
    )


def add_frontier_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``hf-kvcache frontier``: families, ratios, protocols, the RULER cells, output."""
    from hf_kvcache.evaluation.frontier import DEFAULT_FAMILIES, DEFAULT_RATIOS
    from hf_kvcache.evaluation.ruler import PROTOCOLS
    from hf_kvcache.evaluation.ruler_tasks import RULER_TASKS

    parser.add_argument(
        "--families", nargs="+", default=list(DEFAULT_FAMILIES), help="strategies (or specs) to sweep"
    )
    parser.add_argument(
        "--ratios",
        nargs="+",
        type=float,
        default=list(DEFAULT_RATIOS),
        help="budgets, fractions of the context",
    )
    parser.add_argument(
        "--protocol", nargs="+", choices=PROTOCOLS, default=["compress-first"], help="one table per protocol"
    )
    parser.add_argument(
        "--tasks", nargs="+", choices=RULER_TASKS, default=list(RULER_TASKS), help="RULER tasks"
    )
    parser.add_argument(
        "--lengths", nargs="+", type=int, default=[1024, 4096], help="prompt lengths in tokens"
    )
    parser.add_argument("--trials", type=_positive_int, default=5, help="seeded prompts per task and length")
    parser.add_argument("--out", default="results/frontier", help="folder for results.json, frontier.md/.png")
    parser.add_argument("--force", action="store_true", help="recompute records already in results.json")
    add_parallel_argument(parser)
    return parser


def add_calibrate_arguments(calibrate: argparse.ArgumentParser) -> None:
    """``calibrate``: the setting, how its cost is probed, and where the file goes."""
    from hf_kvcache.calibration import PROBES

    calibrate.add_argument(
        "--strategy",
        default="quantized",
        help="the quantized setting to calibrate: group size, residual, sinks, rotation, keys; or duo "
        "(its window and sinks) (default: quantized)",
    )
    calibrate.add_argument(
        "--probe-tokens",
        type=_positive_int,
        default=256,
        help="last tokens whose predictions are compared (default 256)",
    )
    calibrate.add_argument(
        "--probe",
        choices=PROBES,
        default="text",
        help="quantized: what the probe tokens are: the text's own continuation; spans of the context "
        "repeated, whose predictions need the model to find them again; or both, their costs summed "
        "(default: text)",
    )
    calibrate.add_argument(
        "--prompts", type=int, default=4, help="duo: passkey prompts of --max-tokens tokens (default 4)"
    )
    calibrate.add_argument(
        "--out", help="file to write (default: the one calibrated_bits, or duo, reads for this model)"
    )
