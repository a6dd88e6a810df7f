"""The RULER-style suite: prompts hold what their task says, scoring is exact, the metric runs end to end."""

import collections
import json
import re
from pathlib import Path

import pytest

from hf_kvcache.cli import main
from hf_kvcache.evaluation.ruler import RULER_TASKS, RulerOptions, make_ruler_trial, score_answer
from tests.helpers import compare_args


@pytest.fixture(scope="module")
def smollm():
    from hf_kvcache.evaluation import load_model

    return load_model()


@pytest.fixture(scope="module")
def tokenizer(smollm):
    return smollm[1]


@pytest.fixture(scope="module")
def corpus():
    from hf_kvcache.evaluation import load_corpus

    return load_corpus()


def prompt_text(tokenizer, trial) -> str:
    return tokenizer.decode(trial.input_ids[0])


@pytest.mark.integration
@pytest.mark.parametrize("task", RULER_TASKS)
def test_trials_are_seeded_and_hold_their_answers(tokenizer, corpus, task):
    trial = make_ruler_trial(tokenizer, corpus, task, 600, seed=3)
    again = make_ruler_trial(tokenizer, corpus, task, 600, seed=3)
    other = make_ruler_trial(tokenizer, corpus, task, 600, seed=4)
    assert trial.input_ids.equal(again.input_ids) and trial.expected == again.expected
    assert trial.expected != other.expected
    assert trial.input_ids.shape[1] <= 600
    if task != "common_words":
        assert trial.input_ids.shape[1] == 600
    text = prompt_text(tokenizer, trial)
    for item in trial.expected:
        assert item.lower() in text.lower()


@pytest.mark.integration
def test_needle_tasks_ask_for_the_right_key(tokenizer, corpus):
    trial = make_ruler_trial(tokenizer, corpus, "niah_multikey", 800, seed=1)
    text = prompt_text(tokenizer, trial)
    needles = re.findall(r"magic numbers for (\w+) is: (\d+)\.", text)
    assert len(needles) == 4 and len({key for key, _ in needles}) == 4
    asked = re.search(r"What is the special magic number for (\w+)", text).group(1)
    assert trial.expected == (dict(needles)[asked],)
    multi = make_ruler_trial(tokenizer, corpus, "niah_multivalue", 800, seed=1)
    values = re.findall(r"magic numbers for \w+ is: (\d+)\.", prompt_text(tokenizer, multi))
    assert sorted(values) == sorted(multi.expected)


@pytest.mark.integration
def test_variable_tracking_chain_leads_every_name_to_the_value(tokenizer, corpus):
    trial = make_ruler_trial(tokenizer, corpus, "variable_tracking", 800, seed=2)
    text = prompt_text(tokenizer, trial)
    assignments = dict(re.findall(r"VAR (\w+) = (VAR \w+|\d+)\.", text))
    value = re.search(r"assigned the value (\d+) in the text", text).group(1)

    def resolve(name):
        target = assignments[name]
        return target if target.isdigit() else resolve(target[4:])

    assert sorted(n for n in assignments if resolve(n) == value) == sorted(trial.expected)


@pytest.mark.integration
def test_common_words_are_the_ten_most_frequent(tokenizer, corpus):
    trial = make_ruler_trial(tokenizer, corpus, "common_words", 1000, seed=0)
    listed = re.findall(r"^\d+\. (\w+)$", prompt_text(tokenizer, trial), flags=re.MULTILINE)
    counts = collections.Counter(listed).most_common()
    top = {word for word, _ in counts[:10]}
    assert top == set(trial.expected)
    assert counts[9][1] > counts[10][1]  # strictly more frequent than any other word


@pytest.mark.integration
def test_the_embedded_model_with_a_full_cache_finds_a_single_needle(smollm, corpus):
    from hf_kvcache import build_cache
    from hf_kvcache.evaluation.ruler import answer_trial

    model, tokenizer = smollm
    trial = make_ruler_trial(tokenizer, corpus, "niah_single", 1024, seed=0)
    correct, fraction, text = answer_trial(model, tokenizer, trial, build_cache("full", model))
    assert correct and fraction == 1.0, text


def test_scoring_is_whole_word_exact_match():
    assert score_answer(" 1234567.", ("1234567",)) == (True, 1.0)
    assert score_answer(" 12345678", ("1234567",)) == (False, 0.0)
    assert score_answer("Alpha and BETA", ("alpha", "beta", "gamma")) == (False, 2 / 3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            dict(tasks=("niah_single", "haystack")),
            "unknown ruler tasks ['haystack']; allowed: ['niah_single'",
        ),
        (dict(lengths=(32,)), "ruler lengths must be integers of at least 64 tokens, got [32]"),
        (dict(trials=0), "ruler trials must be a positive integer, got 0"),
        (
            dict(protocol="question-first"),
            "ruler protocol must be one of ['question-inside', 'compress-first'], got 'question-first'",
        ),
    ],
)
def test_bad_ruler_options_are_refused(kwargs, message):
    with pytest.raises(ValueError) as error:
        RulerOptions(**kwargs)
    assert message in str(error.value)


@pytest.mark.integration
def test_too_short_a_length_for_the_task_says_so(tokenizer, corpus):
    with pytest.raises(ValueError, match="ruler length 70 is too short for task 'niah_multivalue'"):
        make_ruler_trial(tokenizer, corpus, "niah_multivalue", 70)


def test_ruler_metric_runs_through_compare_and_plots(tiny_model_dir, filler_file, tmp_path):
    args = compare_args(tiny_model_dir, filler_file, tmp_path)
    args = args[: args.index("--strategies")] + [
        "--strategies",
        "full",
        "sliding-window:window_length=64+quantized:nbits=4,group_size=8,residual_length=16",
        "--metrics",
        "ruler",
        "--ruler-tasks",
        "niah_single",
        "common_words",
        "--ruler-lengths",
        "256",
        "384",
        "--ruler-trials",
        "1",
    ]
    assert main(args) == 0
    records = json.loads((tmp_path / "results.json").read_text())["records"]
    assert {r["metric"] for r in records} == {"ruler"} and len(records) == 2
    for record in records:
        cells = record["values"]["cells"]
        assert [(c["task"], c["length"]) for c in cells] == [
            (t, n) for t in ("niah_single", "common_words") for n in (256, 384)
        ]
        # RULER's score is the mean fraction of items found; "all found" counts whole trials.
        assert record["values"]["ruler_score"] == pytest.approx(sum(c["partial"] for c in cells) / 4)
        assert record["values"]["ruler_all_found"] == sum(c["correct"] for c in cells) / 4
        assert all(len(c["scores"]) == 1 and c["scores"][0] == c["partial"] for c in cells)
    assert (tmp_path / "ruler.png").stat().st_size > 0
    table = (tmp_path / "ruler.md").read_text().splitlines()
    header = next(line for line in table if line.startswith("| strategy"))
    assert (
        header
        == "| strategy | niah_single 256 | niah_single 384 | common_words 256 | common_words 384 | mean |"
    )
    against_at = table.index("| strategy | ÷ reference | 95 % interval |")
    rows = [line for line in table[:against_at] if line.startswith("| `")]
    assert [row.split(" | ")[0] for row in rows] == ["| `full`", f"| `{records[1]['spec']}`"]
    first = records[0]["values"]["cells"][0]
    assert rows[0].split(" | ")[1] == f"{first['partial']:.0%} ({first['correct']}/1)"
    assert "ruler score" in (tmp_path / "results.md").read_text()
    against = table[against_at + 2]
    assert against.startswith(f"| `{records[1]['spec']}` | ")


def cells_of(*scores):
    return [{"task": "niah_single", "length": 1024 * (i + 1), "scores": s} for i, s in enumerate(scores)]


def test_the_bootstrap_interval_resamples_the_same_trials_for_both_strategies():
    from hf_kvcache.evaluation.bootstrap import paired_ratio_interval

    # Identical per-trial scores: every paired resample gives 1 (an unpaired one would range widely).
    same = cells_of([0.0, 1.0, 0.0, 1.0], [1.0, 0.5, 0.0, 0.0])
    assert paired_ratio_interval(same, same) == (1.0, 1.0)
    # Half of the reference in every trial: exactly one half.
    half = cells_of([0.0, 0.5, 0.0, 0.5], [0.5, 0.25, 0.0, 0.0])
    assert paired_ratio_interval(same, half) == pytest.approx((0.5, 0.5))
    # One cell of two trials, reference [1, 1] and [0, 1]: resampled ratios are 0, 1/2 or 1 with
    # probabilities 1/4, 1/2, 1/4, so the 2.5 % and 97.5 % quantiles are 0 and 1.
    assert paired_ratio_interval(cells_of([1.0, 1.0]), cells_of([0.0, 1.0])) == (0.0, 1.0)


def test_no_interval_without_per_trial_scores_or_with_other_trials():
    from hf_kvcache.evaluation.bootstrap import paired_ratio_interval

    reference = cells_of([1.0, 0.0], [1.0, 1.0])
    assert paired_ratio_interval(reference, [{"task": "niah_single", "length": 1024, "partial": 0.5}]) is None
    assert paired_ratio_interval(reference, cells_of([1.0, 0.0, 1.0], [1.0, 1.0, 1.0])) is None
    assert paired_ratio_interval(reference, cells_of([1.0, 0.0])) is None  # a cell missing


def test_ruler_headline_of_a_record_written_before_scores_existed():
    from hf_kvcache.evaluation.ruler import RulerMetric

    cells = [
        {"task": "niah_multivalue", "length": 1024, "correct": 0, "trials": 2, "partial": 0.75},
        {"task": "niah_single", "length": 1024, "correct": 2, "trials": 2, "partial": 1.0},
    ]
    assert RulerMetric().headline({"cells": cells, "ruler_accuracy": 0.5}) == {
        "ruler_score": 0.875,
        "ruler_all_found": 0.5,
    }


def test_compare_does_not_run_ruler_unless_asked():
    from hf_kvcache.evaluation.harness import default_metrics

    assert "ruler" not in default_metrics() and "speed" in default_metrics()


def test_compress_first_feeds_the_question_after_the_compressed_context(tiny_model_dir, filler_file):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_kvcache import build_cache
    from hf_kvcache.evaluation.ruler import answer_trial

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    corpus = Path(filler_file).read_text(encoding="utf-8")
    trial = make_ruler_trial(tokenizer, corpus, "niah_single", 256, seed=1)
    question = tokenizer.decode(trial.input_ids[0, -trial.question_tokens :])
    assert question.replace(" ", "").startswith("Whatisthespecialmagicnumber")
    # A full cache answers the same whatever the protocol: only the chunks change.
    answers = {
        protocol: answer_trial(model, tokenizer, trial, build_cache("full", model), 64, protocol)[2]
        for protocol in ("question-inside", "compress-first")
    }
    assert answers["question-inside"] == answers["compress-first"]
    # kvzip compresses the context before the question arrives: the question's tokens are all held after it.
    cache, held = build_cache("kvzip:budget=0.25,prompt=none", model), []
    answer_trial(
        model,
        tokenizer,
        trial,
        cache,
        64,
        "compress-first",
        on_context=lambda c: held.append(c.layers[0].stored),
    )
    assert held == [0] and cache.layers[0].stored >= trial.question_tokens


def passkey_record(spec, *scores):
    cells = [
        {"length": 1024, "depth": depth, "correct": int(sum(s)), "trials": len(s), "scores": s}
        for depth, s in zip((0.1, 0.9), scores, strict=True)
    ]
    accuracy = sum(c["correct"] for c in cells) / sum(c["trials"] for c in cells)
    return {"spec": spec, "values": {"cells": cells, "accuracy": accuracy}}


def test_passkey_table_gives_each_strategy_a_paired_interval_against_the_full_cache(tmp_path):
    from hf_kvcache.evaluation.bootstrap import paired_ratio_interval
    from hf_kvcache.evaluation.passkey import PasskeyMetric

    full = passkey_record("full", [1.0, 1.0, 0.0, 1.0], [0.0, 1.0, 1.0, 0.0])
    # The same trials found but the first: paired, no resample can find more than the full cache (an
    # unpaired one would), and a third of them lack that trial, so the upper bound is exactly 1.
    worse = passkey_record("window:window_length=64", [0.0, 1.0, 0.0, 1.0], [0.0, 1.0, 1.0, 0.0])
    written = PasskeyMetric().plots([full, worse], tmp_path)
    assert tmp_path / "passkey.md" in written
    table = (tmp_path / "passkey.md").read_text()
    assert "| `full` | 3/4 | 2/4 | 62% |" in table
    assert "| `window:window_length=64` | 2/4 | 2/4 | 50% |" in table
    low, high = paired_ratio_interval(full["values"]["cells"], worse["values"]["cells"], ("length", "depth"))
    assert low < 0.8 and high == 1.0
    assert f"| `window:window_length=64` | 0.80 | {low:.2f}-{high:.2f} |" in table
    # Cells are named by length and depth: the passkey cells carry no task.
    with pytest.raises(KeyError):
        paired_ratio_interval(full["values"]["cells"], worse["values"]["cells"])
