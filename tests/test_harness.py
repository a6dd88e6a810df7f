import dataclasses
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from transformers import AutoTokenizer, DynamicCache

from hf_kvcache.cli import main
from hf_kvcache.evaluation import Column, Metric, register_metric
from hf_kvcache.evaluation.harness import CompareSettings
from hf_kvcache.evaluation.metric import unregister_metric
from hf_kvcache.evaluation.passkey import PasskeyOptions, make_passkey_prompt
from hf_kvcache.evaluation.speed import measure_speed_interleaved
from tests.conftest import make_tiny_model, random_ids
from tests.helpers import HARNESS_STRATEGIES as STRATEGIES
from tests.helpers import compare_args


def test_compare_runs_end_to_end_and_writes_valid_results(tiny_model_dir, filler_file, tmp_path, capsys):
    assert main(compare_args(tiny_model_dir, filler_file, tmp_path)) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    records = data["records"]
    assert data["schema_version"] == 1
    assert sorted((r["spec"], r["metric"]) for r in records) == sorted(
        (s, m) for s in STRATEGIES for m in ("perplexity", "memory", "speed", "passkey")
    )
    for record in records:
        assert record["strategy"].startswith(record["spec"].split(":")[0])
        assert {"model", "dtype", "device", "versions", "hardware"} <= set(record["environment"])
        assert record["environment"]["versions"]["transformers"]
    by_key = {(r["spec"], r["metric"]): r["values"] for r in records}
    assert by_key[("full", "memory")]["ratio_to_full"] == 1.0
    assert by_key[(STRATEGIES[2], "memory")]["cache_bytes"] < by_key[("full", "memory")]["cache_bytes"] / 3
    assert by_key[("full", "perplexity")]["num_tokens"] == 127
    assert [c["depth"] for c in by_key[("full", "passkey")]["cells"]] == [0.2, 0.8]
    for spec in STRATEGIES:
        for cell in by_key[(spec, "passkey")]["cells"]:
            assert len(cell["scores"]) == cell["trials"] and sum(cell["scores"]) == cell["correct"]
    assert records[0]["strategy"] == "full"
    assert dict(r.split("=") for r in records[-1]["strategy"].split(":")[1].split(",")) == {
        "heavy_budget": "16",
        "recent_budget": "16",
    }
    for name in ("results.csv", "results.md", "pareto.png", "decode_speed.png", "passkey.png", "passkey.md"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert "| full |" in capsys.readouterr().out


def test_killed_run_loses_nothing_and_rerun_skips_finished_work(tiny_model_dir, filler_file, tmp_path):
    args = compare_args(tiny_model_dir, filler_file, tmp_path, "--chunk-size", "1", "--max-tokens", "400")
    process = subprocess.Popen(
        [sys.executable, "-m", "hf_kvcache.cli", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    results = tmp_path / "results.json"
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if results.exists() and len(json.loads(results.read_text())["records"]) >= 2:
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = {
        (r["spec"], r["metric"]): r["finished_at"] for r in json.loads(results.read_text())["records"]
    }
    assert 2 <= len(finished) < 16, "the run should have been killed part way"
    assert main(args) == 0
    records = json.loads(results.read_text())["records"]
    assert len(records) == 16
    for record in records:
        key = (record["spec"], record["metric"])
        if key in finished:
            assert record["finished_at"] == finished[key], key  # reused, not recomputed
    assert main([*args, "--force", "--strategies", "full"]) == 0
    forced = {(r["spec"], r["metric"]): r["finished_at"] for r in json.loads(results.read_text())["records"]}
    assert (
        forced[("full", "speed")]
        != {(r["spec"], r["metric"]): r["finished_at"] for r in records}[("full", "speed")]
    )


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_passkey_needle_sits_at_the_requested_depth(tiny_model_dir, filler_file, depth):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = Path(filler_file).read_text()
    prompt = make_passkey_prompt(tokenizer, text, 300, depth, seed=3)
    ids = prompt.input_ids[0].tolist()
    needle = tokenizer(" The pass key is", add_special_tokens=False).input_ids
    found = [i for i in range(len(ids)) if ids[i : i + len(needle)] == needle]
    assert found and found[0] == prompt.needle_start
    question = len(tokenizer("\n\nWhat is the pass key? The pass key is", add_special_tokens=False).input_ids)
    needle_text = f" The pass key is {prompt.key}. Remember it. {prompt.key} is the pass key. "
    needle_length = len(tokenizer(needle_text, add_special_tokens=False).input_ids)
    filler_length = len(ids) - question - needle_length
    assert abs(prompt.needle_start - depth * filler_length) <= 1
    assert prompt.key in tokenizer.decode(ids[prompt.needle_start :]).replace(" ", "")
    assert len(ids) == 300


@pytest.mark.parametrize(
    "argv, message",
    [
        (["compare", "--strategies", "slidng-window"], "Did you mean 'sliding-window'"),
        (["compare", "--text-file", "/no/such/file.txt"], "--text-file '/no/such/file.txt' does not exist"),
        (["compare", "--max-tokens", "-5"], "expected a positive integer, got -5"),
        (["passkey", "--passkey-depths", "1.5"], "passkey depths must lie in \\[0, 1\\], got \\[1.5\\]"),
        (
            ["passkey", "--passkey-lengths", "32"],
            "passkey lengths must be integers of at least 64 tokens, got \\[32\\]",
        ),
        (["speed", "--speed-decode-tokens", "0"], "speed decode_tokens must be a positive integer, got 0"),
        (
            ["speed", "--speed-rounds", "2"],
            "speed rounds must be an integer of at least 3 .a median needs them., got 2",
        ),
        (["compare", "--metrics", "latency"], "invalid choice: 'latency'"),
        (["speed", "--strategies", "quantized:nbits=5"], "nbits must be one of \\[2, 3, 4, 8\\], got 5"),
    ],
)
def test_bad_arguments_get_clear_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    shown = str(exit_info.value.code) + capsys.readouterr().err
    assert __import__("re").search(message, shown), shown


def test_settings_reject_bad_values():
    with pytest.raises(ValueError, match="max_tokens must be positive, got -1"):
        CompareSettings(max_tokens=-1)
    with pytest.raises(ValueError, match="unknown metrics \\['latency'\\]"):
        CompareSettings(metrics=("latency",))
    with pytest.raises(TypeError, match="options of metric 'speed' must be a SpeedOptions"):
        CompareSettings(metric_options={"speed": PasskeyOptions()})


def test_a_metric_record_depends_on_its_own_options_only():
    base, longer = (
        CompareSettings(),
        CompareSettings(metric_options={"passkey": PasskeyOptions(lengths=(4096,))}),
    )
    assert base.fingerprint("passkey") != longer.fingerprint("passkey")
    for name in ("perplexity", "memory", "speed"):
        assert base.fingerprint(name) == longer.fingerprint(name)
    assert base.fingerprint("memory") != CompareSettings(max_tokens=2048).fingerprint("memory")
    assert longer.record_settings("passkey")["options"] == {
        "lengths": (4096,),
        "depths": (0.1, 0.5, 0.9),
        "trials": 1,
    }


@pytest.fixture
def bytes_per_token_metric():
    """A metric declared in one place, as a contributor would add it in one file."""

    @dataclasses.dataclass(frozen=True)
    class Options:
        scale: int = 1

        def __post_init__(self):
            if self.scale < 1:
                raise ValueError(f"bytes-per-token scale must be >= 1, got {self.scale}")

    @register_metric
    class BytesPerToken(Metric):
        name, summary = "bytes-per-token", "cache bytes per prompt token"
        options_class = Options
        columns = (Column("bytes_per_token", "B/token", "{:.1f}"),)
        uses_stream = True

        def measure(self, run, spec, tick):
            return {
                "bytes_per_token": self.options.scale * run.stream(spec, tick).cache_bytes / run.prompt_tokens
            }

    yield BytesPerToken
    unregister_metric("bytes-per-token")


def test_a_metric_in_one_place_runs_through_compare(
    bytes_per_token_metric, tiny_model_dir, filler_file, tmp_path, capsys
):
    args = compare_args(tiny_model_dir, filler_file, tmp_path, "--metrics", "memory", "bytes-per-token")
    assert main([*args, "--bytes-per-token-scale", "2"]) == 0
    records = {
        (r["spec"], r["metric"]): r for r in json.loads((tmp_path / "results.json").read_text())["records"]
    }
    assert len(records) == 2 * len(STRATEGIES)
    for spec in STRATEGIES:
        memory, added = records[(spec, "memory")]["values"], records[(spec, "bytes-per-token")]
        assert added["values"]["bytes_per_token"] == 2 * memory["cache_bytes"] / 128
        assert added["settings"]["options"] == {"scale": 2}
    table = capsys.readouterr().out
    assert "| strategy | cache MiB | × full | B/token |" in table
    with pytest.raises(SystemExit, match="bytes-per-token scale must be >= 1, got 0"):
        main([*args, "--bytes-per-token-scale", "0"])


def test_speed_rounds_interleave_the_caches_and_time_each_once_per_round():
    model = make_tiny_model("llama")
    built = []

    def maker(name):
        def make():
            built.append(name)
            return DynamicCache(config=model.config)

        return make

    runs = measure_speed_interleaved(
        model, random_ids(20), {"a": maker("a"), "b": maker("b")}, rounds=3, decode_tokens=2
    )
    # measure_speed builds two caches per run (warm-up, timed); rounds alternate a, b, a, b, a, b.
    assert built == ["a", "a", "b", "b"] * 3
    assert list(runs) == ["a", "b"] and all(len(r) == 3 for r in runs.values())
    assert all(r.prefill_tokens == 20 and r.decode_tokens == 2 for rs in runs.values() for r in rs)
    with pytest.raises(ValueError, match="rounds must be positive, got 0"):
        measure_speed_interleaved(model, random_ids(20), {"a": maker("a")}, rounds=0)


def test_speed_metric_reports_medians_and_spread_of_interleaved_rounds(monkeypatch):
    import statistics
    from types import SimpleNamespace

    import hf_kvcache.registry
    from hf_kvcache.evaluation.speed import SpeedMetric, SpeedOptions

    model = make_tiny_model("llama")
    built, build = [], hf_kvcache.registry.build_cache

    def spy(spec, model):
        built.append(spec)
        return build(spec, model)

    monkeypatch.setattr(hf_kvcache.registry, "build_cache", spy)
    run = SimpleNamespace(model=model, input_ids=random_ids(80), prompt_tokens=80)
    specs = ["full", "sliding-window:window_length=16"]
    ticks = []
    values = SpeedMetric(SpeedOptions(decode_tokens=2, rounds=3)).measure_many(run, specs, ticks.append)
    # One short warm-up each, then the rounds alternate between the strategies.
    assert built == specs + specs * 3
    assert sum(ticks) == SpeedMetric(SpeedOptions(rounds=3)).work(run) * len(specs)
    for spec in specs:
        figures = values[spec]
        assert figures["rounds"] == 3 and figures["prefill_tokens"] == 80 and figures["decode_tokens"] == 2
        for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "decode_ms_per_token"):
            rounds = figures[f"{key}_rounds"]
            assert len(rounds) == 3 and figures[key] == statistics.median(rounds)
            assert figures[f"{key}_min"] == min(rounds) and figures[f"{key}_max"] == max(rounds)
        row = SpeedMetric().headline(figures)
        low, high = (float(x) for x in row["decode_tokens_per_s_spread"].split("–"))
        assert low <= row["decode_tokens_per_s"] <= high
        assert figures["other_load_cores"] is None or figures["other_load_cores"] >= 0


def test_competing_load_is_the_machine_busy_time_less_this_process_own(monkeypatch):
    import hf_kvcache.evaluation.speed as speed

    available = len(speed.os.sched_getaffinity(0))
    # (busy seconds of this process's CPUs, own CPU seconds, wall seconds) before and after.
    readings = iter([(100.0, 10.0, 50.0), (100.0 + 4.0 + 0.3 * available * 2, 14.0, 52.0)])
    monkeypatch.setattr(speed, "_cpu_counters", lambda: next(readings))
    expected = f"other processes kept {0.3 * available:.1f} of this process's {available} CPU cores busy"
    with pytest.warns(UserWarning, match=expected), speed.CompetingLoad() as load:
        pass
    assert load.cores == pytest.approx(0.3 * available)

    readings = iter([(0.0, 0.0, 0.0), (3.9, 4.0, 2.0)])  # own time counted slightly above the CPUs': not < 0
    with speed.CompetingLoad() as load:
        pass
    assert load.cores == 0.0

    monkeypatch.setattr(speed, "_cpu_counters", lambda: None)  # no /proc/stat: unknown, not zero
    with speed.CompetingLoad() as load:
        pass
    assert load.cores is None


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="reads Linux /proc/stat")
def test_competing_load_sees_a_busy_child_process_and_not_its_own_work():
    from hf_kvcache.evaluation.speed import CompetingLoad

    spin = "import time\nend = time.time() + 1.5\nwhile time.time() < end: pass"
    with CompetingLoad(warn_fraction=1.0) as own:
        end = time.time() + 1.0
        while time.time() < end:
            pass
    child = subprocess.Popen([sys.executable, "-c", spin])
    try:
        time.sleep(0.2)  # the interpreter's start-up is not what is measured
        with CompetingLoad(warn_fraction=1.0) as other:
            time.sleep(1.0)
    finally:
        child.wait()
    # One core spun by another process is seen (with room for a busy machine), this process's own is not.
    assert other.cores > 0.5 and other.cores > own.cores + 0.4


def test_pareto_frontier_keeps_exactly_the_non_dominated_strategies():
    from hf_kvcache.evaluation.report import pareto_frontier

    rows = [
        {"spec": "full", "ratio_to_full": 1.0, "perplexity": 20.0},
        {"spec": "a", "ratio_to_full": 0.25, "perplexity": 21.0},
        {"spec": "dominated", "ratio_to_full": 0.3, "perplexity": 22.0},
        {"spec": "tie-later", "ratio_to_full": 0.25, "perplexity": 21.0},
        {"spec": "small", "ratio_to_full": 0.05, "perplexity": 30.0},
        {"spec": "bigger-but-better", "ratio_to_full": 1.2, "perplexity": 19.0},
        {"spec": "no-quality", "ratio_to_full": 0.01},
    ]
    assert [r["spec"] for r in pareto_frontier(rows)] == ["small", "a", "full", "bigger-but-better"]
