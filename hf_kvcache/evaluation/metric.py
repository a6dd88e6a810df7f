"""Metrics as plug-ins: what the harness measures for each strategy, one module per metric.

A metric subclasses :class:`Metric`, declares its options as a frozen dataclass (they become
``--<metric>-<option>`` flags of the CLI and part of its records' fingerprint), its table columns, how it
measures one strategy and, optionally, its plots; ``@register_metric`` makes ``hf-kvcache compare --metrics
NAME`` and ``hf-kvcache NAME`` run it. Example, a metric counting cache bytes per prompt token::

    @register_metric
    class BytesPerToken(Metric):
        name, summary = "bytes-per-token", "cache bytes per prompt token"
        columns = (Column("bytes_per_token", "B/token", "{:.0f}"),)

        def measure(self, run, spec, tick):
            cache = run.stream(spec, tick).cache_bytes
            return {"bytes_per_token": cache / run.prompt_tokens}
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar


@dataclass(frozen=True)
class Column:
    """One column of the results table: ``key`` in a metric's headline figures, its title and format.

    ``format`` is a ``str.format`` pattern, or ``"mib"`` for bytes shown in MiB.
    """

    key: str
    title: str
    format: str


@dataclass(frozen=True)
class NoOptions:
    """A metric without options."""


class Metric:
    """Base of every metric; see the module docstring.

    Class attributes: ``name`` (as on the command line), ``summary`` (one line), ``options_class`` (a frozen
    dataclass whose ``__post_init__`` checks values), ``columns`` (table columns), ``uses_stream`` (True when
    :meth:`measure` reads the shared perplexity stream, whose tokens the progress bar then counts once).
    A metric whose figures drift with the machine's load (timings) overrides :meth:`measure_many` to measure
    all strategies together, in interleaved rounds.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    options_class: ClassVar[type] = NoOptions
    columns: ClassVar[tuple[Column, ...]] = ()
    uses_stream: ClassVar[bool] = False
    in_defaults: ClassVar[bool] = True  # measured by ``compare`` unless ``--metrics`` names others

    def __init__(self, options: Any = None):
        self.options = self.options_class() if options is None else options

    def work(self, run) -> int:
        """Progress units (prompt tokens through the model) :meth:`measure` will report for one strategy."""
        return 0

    def measure(self, run, spec: str, tick: Callable[[int], None]) -> dict:
        """Measure strategy ``spec`` on ``run`` (model, tokenizer, text, prompt); return JSON-ready values."""
        raise NotImplementedError

    def measure_many(self, run, specs: list[str], tick: Callable[[int], None]) -> dict[str, dict]:
        """Measure every strategy of ``specs``; by default one after another with :meth:`measure`."""
        return {spec: self.measure(run, spec, tick) for spec in specs}

    def headline(self, values: dict) -> dict:
        """The figures of ``values`` that go into the summary table (by default, the columns' keys)."""
        return {c.key: values[c.key] for c in self.columns if c.key in values}

    def finish_rows(self, rows: list[dict]) -> None:
        """Add figures that compare strategies (e.g. ratios to the full cache) to the summary rows."""

    def plots(self, records: list[dict], out: Path) -> list[Path]:
        """Write this metric's plots from its ``records`` into ``out``; return their paths."""
        return []


_METRICS: dict[str, type[Metric]] = {}


def register_metric(metric_class: type[Metric]) -> type[Metric]:
    """Class decorator: add a :class:`Metric` subclass under its ``name``."""
    if not dataclasses.is_dataclass(metric_class.options_class):
        raise TypeError(f"options of metric {metric_class.name!r} must be a dataclass")
    if metric_class.name in _METRICS:
        raise ValueError(f"metric {metric_class.name!r} is already registered")
    _METRICS[metric_class.name] = metric_class
    return metric_class


def unregister_metric(name: str) -> None:
    """Remove the metric ``name`` (registered for a while by a test); ``ValueError`` if unknown."""
    get_metric(name)
    del _METRICS[name]


def default_metric_names() -> list[str]:
    """The metrics ``compare`` measures when ``--metrics`` is not given, in registration order."""
    return [name for name, metric in _METRICS.items() if metric.in_defaults]


def list_metrics() -> list[str]:
    """Names of the registered metrics, in registration order (the order of the table's columns)."""
    return list(_METRICS)


def get_metric(name: str) -> type[Metric]:
    """The metric class registered as ``name``, with a "did you mean" on a typo."""
    try:
        return _METRICS[name]
    except KeyError:
        close = difflib.get_close_matches(name, _METRICS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown metric {name!r}.{hint} Known metrics: {list(_METRICS)}") from None
