"""The lm-eval model ``hf-kvcache`` on tasks shipped in tests/lm_eval_tasks (local files, no network), on the
embedded model: with the full cache it scores as lm-eval's own ``hf`` model does, with a compressing cache its
loglikelihoods are the per-token log-probabilities of our streaming perplexity."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval", reason="the lm-eval extra: pip install 'hf-kvcache[lm-eval]'")
pytestmark = pytest.mark.integration

TASKS = Path(__file__).parent / "lm_eval_tasks"


@pytest.fixture(scope="module")
def embedded_dir():
    from hf_kvcache.evaluation.model import embedded_model_dir

    return str(embedded_model_dir())


def evaluate(model_type: str, model_args: str, task: str, monkeypatch) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    import hf_kvcache.lm_eval  # noqa: F401  (registers the model type)

    monkeypatch.chdir(TASKS)  # the task files name their data files relative to here
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    manager = TaskManager(include_path=str(TASKS))
    options = dict(batch_size=2, device="cpu", log_samples=True)
    return simple_evaluate(
        model=model_type, model_args=model_args, tasks=[task], task_manager=manager, **options
    )


def samples(result: dict, task: str) -> list:
    return [(s["doc_id"], s["filtered_resps"]) for s in result["samples"][task]]


@pytest.mark.parametrize("task", ["kvcache_mc", "kvcache_gen"])
def test_with_the_full_cache_scores_equal_lm_evals_own_hf_model(embedded_dir, task, monkeypatch):
    own = evaluate("hf", f"pretrained={embedded_dir}", task, monkeypatch)
    ours = evaluate("hf-kvcache", f"pretrained={embedded_dir},cache=full", task, monkeypatch)
    assert ours["results"][task] == own["results"][task]
    for (doc, mine), (_, theirs) in zip(samples(ours, task), samples(own, task), strict=True):
        if task == "kvcache_gen":
            assert mine == theirs, doc
        else:  # (loglikelihood, is greedy) per choice: streamed in chunks of 16 instead of one forward
            for (log_p, greedy), (their_log_p, their_greedy) in zip(mine, theirs, strict=True):
                assert log_p == pytest.approx(their_log_p, rel=1e-4, abs=1e-4) and greedy == their_greedy


def test_a_compressing_cache_scores_what_streaming_perplexity_says(embedded_dir):
    from hf_kvcache.evaluation import perplexity
    from hf_kvcache.lm_eval import KVCacheLM
    from hf_kvcache.registry import build_cache

    spec, chunk = "sliding-window:window_length=24,num_sink_tokens=4", 4
    lm = KVCacheLM(pretrained=embedded_dir, cache=spec.replace(",", ";"), chunk_size=chunk, batch_size=1)
    full = KVCacheLM(pretrained=embedded_dir, cache="full", chunk_size=chunk, batch_size=1)
    text = (TASKS / "mc.jsonl").read_text()
    ids = lm.tok_encode(text)[:80]
    context, continuation = ids[:60], ids[60:]
    log_p = lm._loglikelihood_tokens([(("", ""), context, continuation)])[0][0]
    full_log_p = full._loglikelihood_tokens([(("", ""), context, continuation)])[0][0]
    cache = build_cache(spec, lm.model)
    reference = perplexity(lm.model, torch.tensor([ids]), cache=cache, chunk_size=chunk, keep_token_nll=True)
    expected = -reference.token_nll[0, -len(continuation) :]
    # Per token: the same forwards; log-softmax over a 49k vocabulary in float32 rounds in the 4th decimal.
    per_token = lm._stream_log_probs([ids[:-1]], len(continuation))[0].gather(
        1, torch.tensor(continuation)[:, None]
    )
    torch.testing.assert_close(per_token[:, 0].double(), expected, rtol=0, atol=1e-3)
    assert log_p == pytest.approx(float(expected.sum()), abs=5e-3)
    assert abs(log_p - full_log_p) > 0.1  # the window really forgot part of the context


def test_the_subcommand_hands_over_to_lm_evals_command_line(embedded_dir, tmp_path, monkeypatch, capsys):
    from hf_kvcache.cli import main

    monkeypatch.chdir(TASKS)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    model_args = f"pretrained={embedded_dir},cache=tova:budget=32"
    argv = ["lm-eval", "--model-args", model_args, "--tasks", "kvcache_mc", "--include_path", str(TASKS)]
    argv += ["--device", "cpu", "--output_path", str(tmp_path)]
    assert main(argv) == 0
    written = list(tmp_path.rglob("results_*.json"))
    assert written and "kvcache_mc" in json.loads(written[0].read_text())["results"]
    assert "hf-kvcache" in capsys.readouterr().out


def test_options_split_by_lm_eval_commas_are_named(embedded_dir):
    from hf_kvcache.lm_eval import KVCacheLM

    with pytest.raises(
        ValueError, match="write the spec's options with ';' \\(cache=quantized:group_size=8\\)"
    ):
        KVCacheLM(pretrained=embedded_dir, cache="quantized:nbits=2", group_size=8)


def test_without_lm_eval_the_subcommand_says_how_to_install_it(monkeypatch):
    from hf_kvcache.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a)
    )
    with pytest.raises(SystemExit, match="pip install 'hf-kvcache\\[lm-eval\\]' \\(nothing was run\\)"):
        main(["lm-eval", "--tasks", "kvcache_mc"])
