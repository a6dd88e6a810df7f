"""CONTRIBUTING.md's walk-through of a new strategy, run as written: its value-norm strategy is defined here
from the guide's code block alone, and must pass the generic strategy tests every built-in strategy passes."""

import ast
import sys
import types
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

from hf_kvcache import build_cache
from hf_kvcache.registry import unregister_strategy
from tests.conftest import ARCHITECTURES, MORE_ARCHITECTURES, make_tiny_model, random_ids
from tests.helpers import (
    MODES,
    check_decoding_path_agrees_with_general_path,
    check_generates_in_every_mode,
    check_generates_like_dynamic_cache,
    check_never_more_bytes_than_dynamic_cache,
    check_options_are_declared_once_and_documented,
)

GUIDE = Path(__file__).parent.parent / "CONTRIBUTING.md"
LOSSLESS = "value-norm:budget=64,num_sink_tokens=4,recent=8"
LOSSY = "value-norm:budget=12,num_sink_tokens=2,recent=4"


def walkthrough_code() -> str:
    """The Python block of the guide's walk-through section."""
    section = GUIDE.read_text().split("### Walk-through", 1)[1].split("\n### ", 1)[0]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def lines_of_code(source: str) -> int:
    """Lines that are neither blank, nor comments, nor docstrings."""
    docstrings = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and ast.get_docstring(node):
            docstrings |= set(range(node.body[0].lineno, node.body[0].end_lineno + 1))
    lines = enumerate(source.splitlines(), 1)
    return sum(
        1 for n, line in lines if line.strip() and not line.strip().startswith("#") and n not in docstrings
    )


@pytest.fixture(scope="module")
def value_norm():
    module = types.ModuleType("value_norm_from_the_guide")
    sys.modules[module.__name__] = module
    exec(compile(walkthrough_code(), str(GUIDE), "exec"), module.__dict__)
    yield module
    unregister_strategy("value-norm")
    del sys.modules[module.__name__]


def test_the_walkthrough_strategy_is_at_most_20_lines_of_code():
    assert lines_of_code(walkthrough_code()) <= 20


def test_its_options_are_declared_once_and_documented(value_norm):
    check_options_are_declared_once_and_documented("value-norm")


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_lossless_value_norm_generates_like_dynamic_cache(value_norm, arch, mode):
    check_generates_like_dynamic_cache(make_tiny_model(arch), LOSSLESS, mode)


def test_compressing_value_norm_generates_in_every_mode(value_norm):
    check_generates_in_every_mode(make_tiny_model("llama-gqa"), LOSSY)


@pytest.mark.parametrize("arch", ["llama", "llama-gqa"])
def test_it_evicts_on_both_paths_and_they_agree(value_norm, arch):
    assert check_decoding_path_agrees_with_general_path(make_tiny_model(arch), LOSSY)


@pytest.mark.parametrize("arch", sorted(MORE_ARCHITECTURES))
def test_it_serves_every_architecture(value_norm, arch):
    model = make_tiny_model(arch)
    check_generates_like_dynamic_cache(model, LOSSLESS, "greedy")
    check_never_more_bytes_than_dynamic_cache(model, LOSSY)


def test_it_keeps_the_sinks_the_recent_and_the_largest_values(value_norm):
    """Reference: layer 0's values depend on the tokens alone, so DynamicCache gives them exactly."""
    model = make_tiny_model("llama-gqa")
    ids = random_ids(50, batch=2, seed=3)
    cache, reference = build_cache(LOSSY, model), DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, past_key_values=cache)
        model(ids, past_key_values=reference)
    values = reference.layers[0].values  # [B, H, 50, D]
    for row in range(2):
        for head in range(values.shape[1]):
            # Repeated tokens have equal values: of those tied, the newer is kept.
            norms = values[row, head].norm(dim=-1).tolist()
            top = sorted(range(2, 46), key=lambda position: (norms[position], position))[-(12 - 2 - 4) :]
            kept = sorted([0, 1, *top, 46, 47, 48, 49])
            assert torch.equal(cache.layers[0].values[row, head], values[row, head, kept]), (row, head)


def test_its_bad_options_are_named(value_norm):
    model = make_tiny_model("llama")
    with pytest.raises(
        ValueError, match=r"recent must be a number of tokens >= 0 or a fraction in \(0, 1\], got -1"
    ):
        build_cache("value-norm:recent=-1", model)
    with pytest.raises(
        ValueError, match=r"budget must be an integer >= 36 \(the num_sink_tokens=4 \+ recent=32"
    ):
        build_cache("value-norm:budget=8", model)
