"""Budgets in tokens or as a fraction of the tokens seen (the compression-ratio view of kvpress).

An eviction strategy's budget options take either an integer number of tokens (``tova:budget=256``) or a
fraction of the tokens seen so far (``tova:budget=0.25``,
``heavy-hitter:heavy_budget=0.125,recent_budget=0.125``). The grammar has no ambiguity: an integer literal is
a number of tokens, a literal with a decimal point is a fraction, which must lie in (0, 1]. So ``budget=1``
keeps one token and ``budget=1.0`` keeps every token. A fraction ``f`` of ``n`` tokens seen is ``ceil(f * n)``
tokens (never fewer than one): the cache then grows by one entry every ``1 / f`` tokens, and its memory is
that fraction of ``DynamicCache``'s at every length.
"""

from __future__ import annotations

import math
import re
from typing import Any

Budget = (
    int | float
)  # the type hint of a budget option: tokens (int) or a fraction of the tokens seen (float)


def parse_budget(text: str, option: str, strategy: str) -> Budget:
    """A budget option's value from a spec: ``"256"`` -> 256 tokens, ``"0.25"`` -> the fraction 0.25."""
    text = text.strip()
    if re.fullmatch(r"[+-]?\d+", text):
        return int(text)
    try:
        return float(text)
    except ValueError:
        raise ValueError(
            f"option {option}={text!r} of strategy {strategy!r} must be a number of tokens (an integer such "
            "as 256) or a fraction of the tokens seen (a decimal such as 0.25)"
        ) from None


def check_budget_value(name: str, value: object, minimum_tokens: int = 1) -> None:
    """``ValueError`` naming ``name`` unless ``value`` is an integer of at least ``minimum_tokens`` or a
    fraction in (0, 1]."""
    if isinstance(value, float):
        if not 0.0 < value <= 1.0:
            raise ValueError(f"{name}={value!r} is a fraction of the tokens seen, which must lie in (0, 1]")
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum_tokens:
        raise ValueError(
            f"{name} must be a number of tokens >= {minimum_tokens} or a fraction in (0, 1], got {value!r}"
        )


def tokens(budget: Budget, seen: int) -> int:
    """``budget`` in tokens once ``seen`` tokens went in: itself, or its fraction of them (at least one)."""
    return budget if isinstance(budget, int) else max(1, math.ceil(budget * seen))


def check_budget(
    options: Any, budget: str = "budget", sinks: str | None = None, recent: str | None = None
) -> None:
    """For an eviction strategy's options: the field ``budget`` in tokens (>= 1) or a fraction; the fields
    named by ``sinks`` (first tokens always kept, in tokens) and ``recent`` (newest tokens always kept, in
    tokens or a fraction); and, in tokens, what they protect fits in the budget."""
    protected, spelled = 0, []
    if sinks is not None:
        check_budget_value(sinks, getattr(options, sinks), 0)
        if isinstance(getattr(options, sinks), float):
            raise ValueError(f"{sinks} counts tokens, got the fraction {getattr(options, sinks)!r}")
    for name in (sinks, recent):
        if name is not None:
            check_budget_value(name, getattr(options, name), 0)
            value = getattr(options, name)
            if isinstance(value, int):
                protected += value
                spelled.append(f"{name}={value}")
    value = getattr(options, budget)
    why = f" (the {' + '.join(spelled)} it protects)" if spelled and isinstance(value, int) else ""
    if isinstance(value, int) and value < max(1, protected):
        raise ValueError(f"{budget} must be an integer >= {max(1, protected)}{why}, got {value!r}")
    check_budget_value(budget, value)


# Per-layer budget schedules of the score-based strategies (option ``layer_budgets``).
LAYER_SCHEDULES = ("uniform", "pyramid")
# PyramidKV's beta: the last layer keeps at least budget / PYRAMID_BETA (and never less than it protects).
PYRAMID_BETA = 20


def check_layer_budgets(options: Any, allowed: tuple[str, ...] = LAYER_SCHEDULES) -> None:
    """For an options dataclass with a ``layer_budgets`` field: ``ValueError`` unless it is in ``allowed``."""
    if options.layer_budgets not in allowed:
        raise ValueError(f"layer_budgets must be one of {list(allowed)}, got {options.layer_budgets!r}")


def pyramid_budgets(budget: Budget, count: int, protected: int = 0) -> list[Budget]:
    """PyramidKV's schedule (Cai et al., https://arxiv.org/abs/2406.02069): ``count`` layers share ``count``
    times ``budget``, the first keeping the most and each later layer less, linearly, down to the larger of
    ``budget / PYRAMID_BETA`` and ``protected`` tokens for the last. In tokens the budgets sum exactly to
    ``count * budget``; as fractions they are capped at 1 (the mean can then fall below ``budget``)."""
    smallest = budget / PYRAMID_BETA if isinstance(budget, float) else max(budget / PYRAMID_BETA, protected)
    if count == 1 or smallest >= budget:
        return [budget] * count
    largest = 2 * budget - smallest
    shares = [largest - (largest - smallest) * i / (count - 1) for i in range(count)]
    if isinstance(budget, float):
        return [min(share, 1.0) for share in shares]
    result = [math.floor(share) for share in shares]
    for i in range(count * budget - sum(result)):  # hand the rounding back, largest layers first
        result[i] += 1
    return result


def apply_layer_schedule(layers: list[Any], options: Any) -> None:
    """Under ``options.layer_budgets == "pyramid"``: set each evicting layer of ``layers`` (those with a
    ``budget``, in model order) to its share of their common budget; other schedules change nothing."""
    layers = [layer for layer in layers if getattr(layer, "budget", None) is not None]
    if getattr(options, "layer_budgets", "uniform") != "pyramid" or not layers:
        return
    recent = layers[0].recent
    protected = layers[0].sinks + (recent if isinstance(recent, int) else 0)
    for layer, budget in zip(layers, pyramid_budgets(layers[0].budget, len(layers), protected), strict=True):
        layer.budget = budget
