"""``eval/sub4bit_frontier.py``: ratios to the full cache of the same run, the largest run, the frontier."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "eval" / "sub4bit_frontier.py"
RULER = {"tasks": ["niah_single", "common_words"], "lengths": [1024, 4096]}


def load_script():
    spec = importlib.util.spec_from_file_location("sub4bit_frontier", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ruler(strategy: str, score: float, trials: int) -> dict:
    options = {**RULER, "trials": trials}
    return {
        "strategy": strategy,
        "metric": "ruler",
        "values": {"ruler_score": score},
        "settings": {"options": options, "max_tokens": 1024},
    }


def perplexity(strategy: str, value: float) -> dict:
    return {
        "strategy": strategy,
        "metric": "perplexity",
        "values": {"perplexity": value, "num_tokens": 2047},
        "settings": {"options": {}, "max_tokens": 2048},
    }


def write(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"schema_version": 1, "records": records}))


@pytest.fixture
def measured(tmp_path):
    two, three = "quantized:nbits=2", "quantized:nbits=3"
    # Five trials: full 0.40, 2-bit 0.20 and 0.10. Ten trials (another run, another full score): 0.50, 0.45.
    first = [ruler("full", 0.4, 5), ruler(two, 0.2, 5), perplexity("full", 20.0)]
    write(tmp_path / "a" / "results.json", first)
    write(tmp_path / "c" / "results.json", [ruler("full", 0.4, 5), ruler(two, 0.1, 5)])
    write(
        tmp_path / "b" / "results.json",
        [ruler("full", 0.5, 10), ruler(two, 0.45, 10), ruler(three, 0.3, 10), perplexity(three, 21.0)],
    )
    write(tmp_path / "a" / "more.json", [perplexity("full", 20.0), perplexity(two, 22.0)])
    (tmp_path / "a" / "not_records.json").write_text(json.dumps([1, 2]))
    bits = {"settings": {"tokens": 4096, "dtype": "bfloat16"}, "rows": []}
    for spec, value in (("full", 16.0), (two, 3.5), (three, 4.5)):
        bits["rows"].append({"spec": spec, "bits_per_entry": value})
    (tmp_path / "bits_per_entry_x.json").write_text(json.dumps(bits))
    short = [{"spec": two, "bits_per_entry": 9.0}]
    other = {"settings": {"tokens": 1024, "dtype": "bfloat16"}, "rows": short}
    (tmp_path / "bits_per_entry_1k.json").write_text(json.dumps(other))
    return tmp_path


def test_ratios_come_from_the_full_record_of_the_same_run_and_the_largest_run_wins(measured):
    rows = load_script().frontier_rows(measured, measured)
    two, three = rows
    assert two["spec"] == "quantized:nbits=2" and two["bits"] == 3.5
    assert two["ruler"] == (pytest.approx(0.9), 40)  # 0.45 / 0.50 at ten trials, not a five-trial run's
    assert two["perplexity"] == (pytest.approx(1.1), 2047)
    # No full perplexity in its own file: a ratio against another run's full record would not be side by side.
    assert "perplexity" not in three and three["ruler"] == (pytest.approx(0.6), 40)


def test_the_frontier_holds_only_settings_no_cheaper_one_matches(measured):
    script = load_script()
    rows = script.frontier_rows(measured, measured)
    assert [row["frontier"] for row in rows] == [True, False]
    table = script.markdown(rows)
    assert "| `quantized:nbits=2` (baseline) | 3.50 | 0.90 (40 prompts) |" in table
