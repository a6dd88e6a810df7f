"""Data-parallel harness runs through accelerate: the work is split, merged results equal one process's."""

import json

import pytest

from hf_kvcache.cli import main
from hf_kvcache.evaluation.distributed import work_units
from hf_kvcache.evaluation.metric import get_metric
from tests.helpers import compare_args, scale_args

TIMED = {"speed"}


def comparable(records: list[dict]) -> list[tuple]:
    """Records without what legitimately differs between runs: timings, clocks, peak memory."""
    rows = []
    for r in records:
        values = {} if r["metric"] in TIMED else dict(r["values"])
        values.pop("peak_memory_bytes", None)
        values.pop("seconds", None)
        values.pop("stream_tokens_per_s", None)
        rows.append(
            (r["strategy"], r["spec"], r["metric"], r["fingerprint"], json.dumps(r["settings"]), values)
        )
    return rows


def test_two_processes_give_the_results_of_one(tiny_model_dir, filler_file, tmp_path, capfd):
    single, double = tmp_path / "one", tmp_path / "two"
    assert main(compare_args(tiny_model_dir, filler_file, single)) == 0
    capfd.readouterr()
    assert main([*compare_args(tiny_model_dir, filler_file, double), "--num-processes", "2"]) == 0
    said = capfd.readouterr().err
    # 4 strategies: 4 stream units, the speed unit, 4 passkey units; split 5 + 4.
    assert "process 0 of 2 measures 5 of 9 units" in said and "process 1 of 2 measures 4 of 9 units" in said
    one = json.loads((single / "results.json").read_text())["records"]
    two = json.loads((double / "results.json").read_text())["records"]
    a, b = comparable(one), comparable(two)
    assert [row[:5] for row in a] == [row[:5] for row in b]
    for (*_, left), (*_, right) in zip(a, b, strict=True):
        assert left.keys() == right.keys()
        for key in left:
            if isinstance(left[key], float):
                assert right[key] == pytest.approx(left[key], rel=1e-4), key
            else:
                assert right[key] == left[key], key
    # Both processes measured: the merged run holds records finished by each.
    assert len({r["environment"]["device"] for r in two}) == 1
    assert (double / "pareto.png").stat().st_size > 0


def test_scale_splits_lengths_between_processes(tiny_model_dir, filler_file, tmp_path, capfd):
    assert main([*scale_args(tiny_model_dir, filler_file, tmp_path), "--num-processes", "2"]) == 0
    said = capfd.readouterr().err
    assert "process 0 of 2 measures 2 of 3 units" in said and "process 1 of 2 measures 1 of 3 units" in said
    records = json.loads((tmp_path / "results.json").read_text())["records"]
    assert [r["values"]["length"] for r in records] == [64, 64, 128, 128, 256, 256]


def test_work_units_keep_a_strategys_stream_and_an_interleaved_metric_together():
    metrics = {name: get_metric(name)() for name in ("perplexity", "memory", "speed", "passkey")}
    todo = [(s, m) for s in ("a", "b") for m in metrics]
    units = work_units(todo, metrics)
    assert units == [
        [("a", "perplexity"), ("a", "memory")],
        [("b", "perplexity"), ("b", "memory")],
        [("a", "speed"), ("b", "speed")],
        [("a", "passkey")],
        [("b", "passkey")],
    ]


def test_parallel_runs_without_accelerate_say_how_to_get_it(
    monkeypatch, tiny_model_dir, filler_file, tmp_path
):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else real(name, *a)
    )
    with pytest.raises(
        SystemExit, match="--num-processes 2 .* accelerate, which is not installed: pip install"
    ):
        main([*compare_args(tiny_model_dir, filler_file, tmp_path), "--num-processes", "2"])
    assert not (tmp_path / "results.json").exists()
