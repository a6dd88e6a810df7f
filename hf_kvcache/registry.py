"""One registry from strategy names and spec strings to caches, used by the CLI, the harness and the tests.

A spec string is ``name`` or ``name:option=value,option=value``, for example
``"quantized:nbits=2,group_size=32"``. Option names and types come from the strategy's frozen options
dataclass, which also checks the values. A composition joins an eviction strategy and a storage format with
``+``, e.g. ``"sliding-window:window_length=512+quantized:nbits=4"``: the eviction strategy's options declare
a field with ``metadata={"composes": "quantized"}``, which holds the second half's options.
This module imports no strategy: each built-in registers itself when ``hf_kvcache.strategies`` is imported,
which ``import hf_kvcache`` does.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from transformers import Cache, PreTrainedModel

from hf_kvcache.budget import Budget, parse_budget


@dataclass(frozen=True)
class Strategy:
    """A registered strategy: its options dataclass, how to build its cache, and a one-line summary."""

    name: str
    options_class: type
    build: Callable[[PreTrainedModel, Any], Cache]
    summary: str


_STRATEGIES: dict[str, Strategy] = {}
# Field metadata of an option that a canonical spec names only when it is not at its default.
WHEN_SET = {"spelled": "when set"}


def register_strategy(
    name: str, summary: str, options_class: type | None = None, build: Callable | None = None
):
    """Register a strategy under ``name``.

    As a class decorator on a :class:`~hf_kvcache.base.KVCache` subclass, it takes the options from the
    class's ``options_class`` and builds caches as ``cls(model, options)``::

        @register_strategy("tova", "TOVA: evict the entry the current query attends to least")
        class TOVAKVCache(ScoringCache): ...

    For a cache that is not ours (the ``full`` baseline), pass ``options_class`` and ``build(model,
    options)``.
    """

    def add(options_class: type, build: Callable) -> None:
        if not dataclasses.is_dataclass(options_class):
            raise TypeError(f"options of strategy {name!r} must be a dataclass, got {options_class!r}")
        if name in _STRATEGIES:
            raise ValueError(f"strategy {name!r} is already registered")
        _STRATEGIES[name] = Strategy(name, options_class, build, summary)

    if build is not None:
        add(options_class, build)
        return build

    def decorate(cache_class: type) -> type:
        add(cache_class.options_class, cache_class)
        return cache_class

    return decorate


def unregister_strategy(name: str) -> None:
    """Remove the strategy ``name`` (registered for a while by a test); ``ValueError`` if unknown."""
    get_strategy(name)
    del _STRATEGIES[name]


def check_int(name: str, value: object, minimum: int, why: str = "") -> None:
    """For an options dataclass: ``ValueError`` naming ``name`` unless ``value`` is an integer (not a bool) of
    at least ``minimum``; ``why`` says where the minimum comes from."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}{why}, got {value!r}")


def list_strategies() -> list[str]:
    """Names of all registered strategies, sorted."""
    return sorted(_STRATEGIES)


def get_strategy(name: str) -> Strategy:
    """The registered strategy ``name``, with a "did you mean" on a typo."""
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


def _optional(kind: Any) -> Any:
    """``int`` for ``int | None``; ``None`` for a type that does not admit ``None``."""
    arguments = typing.get_args(kind)
    if type(None) in arguments and len(arguments) == 2:
        return next(a for a in arguments if a is not type(None))
    return None


def _convert(value: str, kind: type, option: str, strategy: str) -> Any:
    declared = kind
    if _optional(kind) is not None:
        if value.lower() == "none":
            return None
        kind = _optional(kind)
    if kind == Budget:
        return parse_budget(value, option, strategy)
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
    raise ValueError(
        f"option {option}={value!r} of strategy {strategy!r} must be of type {_type_name(declared)}"
    )


def _type_name(kind: Any) -> str:
    if _optional(kind) is not None:
        return f"{_type_name(_optional(kind))} or None"
    return "tokens or fraction" if kind == Budget else getattr(kind, "__name__", str(kind))


def _plain_fields(options_class: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(options_class) if f.init and "composes" not in f.metadata]


def _composed_fields(options_class: type) -> dict[str, str]:
    """Strategy name -> the field of ``options_class`` that holds that strategy's options in a composition."""
    return {
        f.metadata["composes"]: f.name for f in dataclasses.fields(options_class) if "composes" in f.metadata
    }


def compositions() -> list[str]:
    """Every composition the registered strategies allow, as ``"eviction+storage"``."""
    return sorted(
        f"{name}+{other}" for name, s in _STRATEGIES.items() for other in _composed_fields(s.options_class)
    )


def _parse_one(spec: str, whole: str) -> tuple[Strategy, Any]:
    name, raw = split_spec(spec)
    strategy = get_strategy(name)
    hints = typing.get_type_hints(strategy.options_class)
    fields = [f.name for f in _plain_fields(strategy.options_class)]
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        allowed = ", ".join(f"{f} ({_type_name(hints[f])})" for f in fields) or "none"
        raise ValueError(
            f"unknown option(s) {unknown} for strategy {name!r} in {whole!r}; allowed options: {allowed}"
        )
    options = {key: _convert(value, hints[key], key, name) for key, value in raw.items()}
    return strategy, strategy.options_class(**options)


def parse_spec(spec: str) -> tuple[Strategy, Any]:
    """Turn a spec string (one strategy, or ``eviction+storage``) into its strategy and validated options."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a strategy spec must be a non-empty string like 'quantized:nbits=2', got {spec!r}")
    parts = spec.split("+")
    strategy, options = _parse_one(parts[0], spec)
    if len(parts) == 1:
        return strategy, options
    allowed = f"allowed compositions: {', '.join(compositions())} (eviction first, then storage)"
    if len(parts) > 2:
        raise ValueError(f"spec {spec!r} joins {len(parts)} strategies; a composition joins two; {allowed}")
    second, second_options = _parse_one(parts[1], spec)
    slots = _composed_fields(strategy.options_class)
    if second.name not in slots:
        if any(strategy.name in _composed_fields(s.options_class) for s in _STRATEGIES.values()):
            reason = f"{strategy.name!r} is a storage format and goes second"
        else:
            reason = f"{strategy.name!r} cannot be composed with {second.name!r}"
        raise ValueError(f"cannot compose {spec!r}: {reason}; {allowed}")
    return strategy, dataclasses.replace(options, **{slots[second.name]: second_options})


def is_spelled(field: dataclasses.Field, options: Any) -> bool:
    """Whether an option belongs in what identifies ``options`` (a canonical spec, a record's fingerprint):
    always, unless it is marked :data:`WHEN_SET` and left at its default."""
    return (
        field.metadata.get("spelled") != WHEN_SET["spelled"] or getattr(options, field.name) != field.default
    )


def _spelled(name: str, options: Any) -> str:
    # Options added after a strategy's first release say `metadata={"spelled": "when set"}`: they appear only
    # when not at their default, so the canonical spec (the key of stored results) stays what it was.
    fields = [f for f in _plain_fields(type(options)) if is_spelled(f, options)]
    spelled = ",".join(f"{f.name}={getattr(options, f.name)}" for f in fields)
    return f"{name}:{spelled}" if spelled else name


def canonical_spec(spec: str) -> str:
    """The spec with every option spelled out, e.g. ``"quantized"`` ->
    ``"quantized:nbits=4,group_size=32,..."``; a composition spells out both halves."""
    strategy, options = parse_spec(spec)
    return _spec_of_options(strategy.name, options)


def _spec_of_options(name: str, options: Any) -> str:
    text = _spelled(name, options)
    for other, field_name in _composed_fields(type(options)).items():
        if getattr(options, field_name) is not None:
            text += "+" + _spelled(other, getattr(options, field_name))
    return text


def spec_of(cache: Cache) -> str:
    """The canonical spec that builds a cache like ``cache`` (one of the registered strategies' caches)."""
    for strategy in _STRATEGIES.values():
        if type(cache) is strategy.build:
            return _spec_of_options(strategy.name, cache.options)
    if type(cache).__name__ == "DynamicCache":
        return "full"
    raise ValueError(f"{type(cache).__name__} is not the cache of a registered strategy")


def build_cache(spec: str, model: PreTrainedModel) -> Cache:
    """Build a fresh cache for ``model`` from a spec string such as ``"full"`` or ``"quantized:nbits=2"``."""
    strategy, options = parse_spec(spec)
    return strategy.build(model, options)
