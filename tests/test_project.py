"""The project's own rules, checked on its source: module size, imports, and documentation that stays true."""

import ast
import dataclasses
import re
from pathlib import Path

import pytest

import hf_kvcache
from hf_kvcache.cli import main
from hf_kvcache.evaluation import Metric, register_metric
from hf_kvcache.evaluation.metric import list_metrics, unregister_metric

PACKAGE = Path(hf_kvcache.__file__).parent
ROOT = PACKAGE.parent
MODULES = sorted(PACKAGE.rglob("*.py"))
SOURCES = sorted([*MODULES, *ROOT.glob("tests/*.py"), *ROOT.glob("eval/*.py"), *ROOT.glob("examples/*.py")])


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_grows_past_350_lines(path):
    assert len(path.read_text().splitlines()) <= 350


def test_registry_imports_no_strategy():
    tree = ast.parse((PACKAGE / "registry.py").read_text())
    imported = [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module]
    imported += [
        alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
    ]
    assert not [name for name in imported if "strategies" in name]


def private_names_used(path: Path) -> list[str]:
    """``module.name`` for every private name (one leading underscore) that ``path`` imports from, or reads as
    an attribute of, a module of this project other than itself."""
    tree = ast.parse(path.read_text())
    found, modules = [], {}
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.module.startswith(("hf_kvcache", "tests"))
        ):
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"{node.module}.{alias.name}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith(("hf_kvcache", "tests")):
                    modules[alias.asname or alias.name.split(".")[0]] = alias.name
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            base = node.value
            while isinstance(base, ast.Attribute):
                base = base.value
            if isinstance(base, ast.Name) and base.id in modules:
                found.append(f"{ast.unparse(node.value)}.{node.attr}")
    return found


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_uses_another_modules_private_name(path):
    assert private_names_used(path) == []


def test_the_private_name_check_finds_both_ways_of_reaching_in(tmp_path):
    source = tmp_path / "sample.py"
    source.write_text(
        "import hf_kvcache.evaluation.speed\n"
        "from hf_kvcache.evaluation.metric import _METRICS, Metric\n"
        "hf_kvcache.evaluation.speed._cpu_counters()\n"
    )
    assert private_names_used(source) == [
        "hf_kvcache.evaluation.metric._METRICS",
        "hf_kvcache.evaluation.speed._cpu_counters",
    ]


def layout_section() -> str:
    readme = (ROOT / "README.md").read_text()
    return readme.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]


def strategy_modules() -> set[str]:
    """Modules of ``strategies/`` that register a strategy."""
    return {p.name for p in (PACKAGE / "strategies").glob("*.py") if "register_strategy(" in p.read_text()}


def test_readme_layout_names_every_module_and_only_modules_that_exist():
    """Every module but a strategy's own is named; a new strategy's module may be left out (the Layout section
    says there is one per strategy, and ``hf-kvcache list`` lists them), so that adding one touches its file,
    ``strategies/__init__.py`` and the test tables only."""
    section = layout_section()
    named = set(re.findall(r"`(?:[\w/]+/)?(\w+\.py)`", section))
    modules = {path.name for path in MODULES if path.name != "__init__.py"}
    assert sorted(modules - named - strategy_modules()) == [], "modules the Layout section does not name"
    assert sorted(named - modules - {"__init__.py"}) == [], "files the Layout section names that do not exist"
    assert "one module per strategy" in " ".join(section.split())


def test_every_strategy_module_is_imported_by_the_strategies_package():
    imported = (PACKAGE / "strategies" / "__init__.py").read_text()
    assert all(f"hf_kvcache.strategies.{name[:-3]} import" in imported for name in strategy_modules())


def test_cli_help_lists_the_registered_metrics_from_the_registry(capsys):
    @register_metric
    class Probe(Metric):
        name, summary = "probe-metric", "a metric registered only for this test"

    try:
        with pytest.raises(SystemExit):
            main(["compare", "--help"])
        helped = " ".join(capsys.readouterr().out.split())
        assert all(name in helped for name in list_metrics())
        assert "probe-metric" in helped and "also: ruler" not in helped
    finally:
        unregister_metric("probe-metric")


def test_options_dataclasses_are_frozen():
    from hf_kvcache.registry import get_strategy, list_strategies

    for name in list_strategies():
        options_class = get_strategy(name).options_class
        assert dataclasses.is_dataclass(options_class) and options_class.__dataclass_params__.frozen, name
