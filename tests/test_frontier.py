"""``hf-kvcache frontier``: budgets as fractions of the context, families that cannot be swept skipped with a
message, bytes and scores read from the ruler records, the frontier named, and a resumable run end to end."""

import json

import pytest

from hf_kvcache.cli import main
from hf_kvcache.evaluation.frontier import (
    DEFAULT_FAMILIES,
    check_ratios,
    frontier_markdown,
    frontier_points,
    point_values,
)
from hf_kvcache.registry import parse_spec


@pytest.mark.parametrize("family", DEFAULT_FAMILIES)
def test_every_default_family_holds_the_ratio_it_is_given(family):
    (point,), skipped = frontier_points([family], [0.25])
    assert not skipped and point[:2] == (family, 0.25)
    _, options = parse_spec(point[2])
    budgets = {
        "sliding-window": ["window_length"],
        "heavy-hitter": ["heavy_budget", "recent_budget"],
    }.get(family.split("+")[0].split(":")[0], ["budget"])
    assert sum(getattr(options, name) for name in budgets) == 0.25
    assert ("+" in family) == (getattr(options, "quantization", None) is not None)
    if "+" in family:
        assert options.quantization.nbits == 4


@pytest.mark.parametrize("ratio", [0, 1, 1.0, 1.5, -0.25, True])
def test_a_ratio_outside_zero_one_is_named(ratio):
    with pytest.raises(
        ValueError, match=f"ratio {ratio!r} must be a fraction of the context strictly between"
    ):
        check_ratios([0.5, ratio])


def test_families_without_a_budget_are_skipped_with_a_message_and_the_rest_run():
    points, skipped = frontier_points(["quantized", "tova", "full"], [0.5, 0.125])
    assert [p[2] for p in points] == ["tova:budget=0.5", "tova:budget=0.125"]
    assert len(skipped) == 2 and "frontier skips quantized: 'quantized' has no budget" in skipped[0]
    assert skipped[1].startswith("frontier skips full:")


def record(spec, score, held, fingerprint="f"):
    cells = [{"task": "niah_single", "length": 64, "partial": score, "correct": 0, "held_bytes": held}]
    return {
        "strategy": spec,
        "metric": "ruler",
        "fingerprint": fingerprint,
        "values": {"ruler_score": score, "cells": cells},
    }


def test_the_frontier_names_the_best_score_at_or_below_each_byte_fraction():
    points = [("a", 0.5, "a:0.5"), ("a", 0.25, "a:0.25"), ("b", 0.5, "b:0.5"), ("b", 0.25, "b:0.25")]
    records = [
        record("full", 0.8, 1000),
        record("a:0.5", 0.6, 520),
        record("a:0.25", 0.2, 260),
        record("b:0.5", 0.7, 600),  # more bytes than its ratio says: it counts at 0.6
        record("b:0.25", 0.16, 240),
        record("a:0.5", 0.0, 10, fingerprint="another run"),
    ]
    full, rows = point_values(records, points, "f")
    assert [round(r["bytes"], 3) for r in rows] == [0.52, 0.26, 0.6, 0.24]
    table = frontier_markdown(full, rows, "compress-first", [0.5, 0.25]).splitlines()
    assert table[0] == "### compress-first: full cache 80%"
    # At half the bytes, a:0.5 (0.52) and b:0.5 (0.6) hold too much: a:0.25 is the best that fits.
    assert table[-2:] == ["| 0.5 | 20% | 25% | `a:0.25` |", "| 0.25 | 16% | 20% | `b:0.25` |"]
    with pytest.raises(ValueError, match="no ruler record of the full cache"):
        point_values(records[1:], points, "f")


def test_the_command_sweeps_resumes_and_draws(tiny_model_dir, filler_file, tmp_path, capsys):
    argv = [
        "frontier",
        "--model",
        tiny_model_dir,
        "--text-file",
        filler_file,
        "--device",
        "cpu",
        "--out",
        str(tmp_path),
        "--families",
        "tova",
        "kvzip:prompt=none",
        "quantized",
        "--ratios",
        "0.5",
        "0.25",
        "--tasks",
        "niah_single",
        "--lengths",
        "256",
        "--trials",
        "1",
        "--protocol",
        "compress-first",
        "question-inside",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "frontier skips quantized" in out
    records = json.loads((tmp_path / "results.json").read_text())["records"]
    assert len(records) == 2 * 5 + 5 and {r["metric"] for r in records} == {"ruler", "continuation"}
    finished = sorted(r["finished_at"] for r in records)
    records = [r for r in records if r["metric"] == "ruler"]
    held = {(r["strategy"], r["fingerprint"]): r["values"]["cells"][0]["held_bytes"] for r in records}
    for (spec, fingerprint), count in held.items():
        # Each point holds about its ratio of the full cache's bytes under the same protocol (kvzip: the ids
        # of its prompt gone, a count per head added; compress-first measures before the question is in).
        ratio = float(spec.split("budget=")[1].split(",")[0]) if spec != "full" else 1.0
        assert count / held[("full", fingerprint)] == pytest.approx(ratio, rel=0.08), spec
    table = (tmp_path / "frontier.md").read_text()
    assert "### compress-first" in table and "### question-inside" in table
    rows = [line for line in table.splitlines() if line.startswith("| tova |")]
    assert len(rows) == 4 and all(float(line.split("|")[6]) > 0 for line in rows)  # perplexity × full
    assert (tmp_path / "frontier.png").stat().st_size > 0
    assert main(argv) == 0  # resumed: nothing measured again
    again = json.loads((tmp_path / "results.json").read_text())["records"]
    assert sorted(r["finished_at"] for r in again) == finished
