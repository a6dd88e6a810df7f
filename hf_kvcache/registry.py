"""One registry from strategy names and spec strings to caches, used by the CLI, the harness and the tests.

A spec string is ``name`` or ``name:option=value,option=value``, for example ``"quantized:nbits=2,group_size=32"``.
Option names and types come from the strategy's frozen config dataclass, which also checks the values.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from transformers import Cache, PreTrainedModel


@dataclass(frozen=True)
class Strategy:
    """A registered strategy: how to build its config from options and its cache from a model and config."""

    name: str
    config_class: type
    build: Callable[[PreTrainedModel, Any], Cache]
    summary: str


_STRATEGIES: dict[str, Strategy] = {}


def register_strategy(name: str, config_class: type, build: Callable, summary: str) -> None:
    """Add a strategy under ``name``; ``build(model, config)`` returns the cache."""
    if not dataclasses.is_dataclass(config_class):
        raise TypeError(f"config_class for {name!r} must be a dataclass, got {config_class!r}")
    if name in _STRATEGIES:
        raise ValueError(f"strategy {name!r} is already registered")
    _STRATEGIES[name] = Strategy(name, config_class, build, summary)


def list_strategies() -> list[str]:
    """Names of all registered strategies, sorted."""
    _load_builtin_strategies()
    return sorted(_STRATEGIES)


def get_strategy(name: str) -> Strategy:
    """The registered strategy ``name``, with a "did you mean" on a typo."""
    _load_builtin_strategies()
    try:
        return _STRATEGIES[name]
    except KeyError:
        close = difflib.get_close_matches(name, _STRATEGIES, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"unknown strategy {name!r}.{hint} Known strategies: {sorted(_STRATEGIES)}"
        ) from None


def split_spec(spec: str) -> tuple[str, dict[str, str]]:
    """Split ``"name:a=1,b=2"`` into ``("name", {"a": "1", "b": "2"})`` without interpreting values."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a strategy spec must be a non-empty string like 'quantized:nbits=2', got {spec!r}")
    name, _, rest = spec.strip().partition(":")
    options: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ValueError(f"bad option {item!r} in spec {spec!r}: options are written 'name=value'")
        key = key.strip().replace("-", "_")
        if key in options:
            raise ValueError(f"option {key!r} is given twice in spec {spec!r}")
        options[key] = value.strip()
    return name.strip(), options


def _convert(value: str, kind: type, option: str, strategy: str) -> Any:
    if kind is bool:
        lowered = value.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
    else:
        try:
            return kind(value)
        except ValueError:
            pass
    raise ValueError(f"option {option}={value!r} of strategy {strategy!r} must be of type {kind.__name__}")


def parse_spec(spec: str) -> tuple[Strategy, Any]:
    """Turn a spec string into its strategy and a validated config instance."""
    name, raw = split_spec(spec)
    strategy = get_strategy(name)
    hints = typing.get_type_hints(strategy.config_class)
    fields = [f.name for f in dataclasses.fields(strategy.config_class) if f.init]
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        allowed = ", ".join(f"{f} ({hints[f].__name__})" for f in fields) or "none"
        raise ValueError(f"unknown option(s) {unknown} for strategy {name!r}; allowed options: {allowed}")
    options = {key: _convert(value, hints[key], key, name) for key, value in raw.items()}
    return strategy, strategy.config_class(**options)


def canonical_spec(spec: str) -> str:
    """The spec with every option spelled out, e.g. ``"quantized"`` -> ``"quantized:nbits=4,group_size=32,..."``."""
    strategy, config = parse_spec(spec)
    options = ",".join(f"{f.name}={getattr(config, f.name)}" for f in dataclasses.fields(config) if f.init)
    return f"{strategy.name}:{options}" if options else strategy.name


def build_cache(spec: str, model: PreTrainedModel) -> Cache:
    """Build a fresh cache for ``model`` from a spec string such as ``"full"`` or ``"quantized:nbits=2"``."""
    strategy, config = parse_spec(spec)
    return strategy.build(model, config)


_builtins_loaded = False


def _load_builtin_strategies() -> None:
    # Built-in strategies register themselves when their modules are imported; importing lazily keeps
    # `import hf_kvcache.registry` cheap and free of cycles.
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        from hf_kvcache import strategies  # noqa: F401
