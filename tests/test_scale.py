"""``hf-kvcache scale``: cost against context length, growth exponents, resumable records, clear errors."""

import json
import math
from pathlib import Path

import pytest

from hf_kvcache.cli import main
from hf_kvcache.evaluation.scale import ScaleSettings, check_lengths, growth_exponent
from tests.conftest import make_tiny_model
from tests.helpers import SCALE_STRATEGIES as STRATEGIES
from tests.helpers import scale_args


def test_scale_runs_end_to_end_resumes_and_fits_growth(tiny_model_dir, filler_file, tmp_path, capsys):
    assert main(scale_args(tiny_model_dir, filler_file, tmp_path)) == 0
    records = json.loads((tmp_path / "results.json").read_text())["records"]
    assert sorted((r["spec"], r["values"]["length"]) for r in records) == sorted(
        (s, n) for s in STRATEGIES for n in (64, 128, 256)
    )
    by_key = {(r["spec"], r["values"]["length"]): r["values"] for r in records}
    for values in by_key.values():
        for cost in ("prefill_seconds", "peak_memory_bytes", "decode_ms_per_token"):
            rounds = values[cost]["rounds"]
            assert len(rounds) == 3 and min(rounds) == values[cost]["min"] <= values[cost]["median"]
            assert values[cost]["median"] <= values[cost]["max"] == max(rounds)
        # Linux reads other processes' CPU time from /proc/stat; elsewhere it is unknown, never a made-up 0.
        assert (values["other_load_cores"] is None) != Path("/proc/stat").exists()
    # The full cache holds every token; the window stops growing once it is full.
    full = [by_key[("full", n)]["held_bytes"] for n in (64, 128, 256)]
    assert full[1] == 2 * full[0] and full[2] == 4 * full[0]
    window = [by_key[(STRATEGIES[1], n)]["held_bytes"] for n in (128, 256)]
    assert window[0] == window[1]
    for name in ("scale.md", "scale.png"):
        assert (tmp_path / name).stat().st_size > 0
    table = capsys.readouterr().out
    assert "| full | 1.00 |" in table  # held bytes grow as L^1.00
    assert f"| {STRATEGIES[1]} | 0." in table
    finished = {(r["spec"], r["values"]["length"]): r["finished_at"] for r in records}
    assert (
        main(scale_args(tiny_model_dir, filler_file, tmp_path, "--lengths", "64", "128", "256", "512")) == 0
    )
    again = json.loads((tmp_path / "results.json").read_text())["records"]
    assert {
        (r["spec"], r["values"]["length"]): r["finished_at"] for r in again if r["values"]["length"] < 512
    } == (finished)
    assert sorted(r["spec"] for r in again if r["values"]["length"] == 512) == sorted(STRATEGIES)


def test_growth_exponent_is_the_log_log_slope():
    lengths = [1024, 2048, 4096, 8192]
    assert growth_exponent(lengths, [3.0 * n**1.5 for n in lengths]) == pytest.approx(1.5)
    assert growth_exponent(lengths, [7.0] * 4) == pytest.approx(0.0)
    noisy = [n * (1.1 if i % 2 else 0.9) for i, n in enumerate(lengths)]
    assert growth_exponent(lengths, noisy) == pytest.approx(1.0, abs=0.1)
    assert growth_exponent([1024], [5.0]) is None
    assert growth_exponent(lengths, [1.0, 0.0, 1.0, 1.0]) is None
    assert math.isfinite(growth_exponent([64, 128], [1.0, 2.0]))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lengths=(32, 1024)), "scale lengths must be integers of at least 64 tokens, got [32, 1024]"),
        (dict(lengths=()), "scale lengths must be integers of at least 64 tokens, got []"),
        (dict(rounds=2), "scale rounds must be an integer of at least 3 (a median needs them), got 2"),
        (dict(decode_tokens=0), "scale decode_tokens must be a positive integer, got 0"),
    ],
)
def test_bad_scale_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError) as error:
        ScaleSettings(**kwargs)
    assert message in str(error.value)


def test_lengths_the_text_or_the_memory_cannot_hold_are_refused():
    model = make_tiny_model("llama")
    with pytest.raises(ValueError, match=r"scale lengths \[4096\] exceed the 1000 tokens the text provides"):
        check_lengths(model, (512, 4096), 1000, ["full"])
    huge = 10**12  # a full cache of 10^12 tokens needs far more than any machine's free memory
    with pytest.raises(ValueError, match=rf"scale lengths \[{huge}\] need .* GiB or more for the full cache"):
        check_lengths(model, (huge,), huge, ["full"])
    check_lengths(model, (huge,), huge, ["sliding-window"])  # bounded caches are not limited by it


def test_scale_cli_errors_name_the_bad_value(tiny_model_dir, filler_file, tmp_path):
    with pytest.raises(
        SystemExit, match="scale lengths must be integers of at least 64 tokens, got \\[16\\]"
    ):
        main(scale_args(tiny_model_dir, filler_file, tmp_path, "--lengths", "16"))
    with pytest.raises(SystemExit, match="exceed the .* tokens the text provides"):
        main(scale_args(tiny_model_dir, filler_file, tmp_path, "--lengths", "1000000"))
    assert not (tmp_path / "results.json").exists()
