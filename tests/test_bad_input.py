"""Rough edges found while trying the package as a new user: each gets an error that names what is wrong and
what to do, before anything breaks deep in torch."""

import os
import time

import pytest
import torch

from hf_kvcache import build_cache
from hf_kvcache.evaluation.records import ResultStore
from hf_kvcache.strategies.packing import wait_for_quanto_build
from tests.conftest import make_tiny_model, random_ids
from tests.helpers import LOSSY


@pytest.mark.parametrize("strategy", sorted(set(LOSSY) - {"full"}))
def test_reusing_a_cache_with_another_batch_size_names_both(strategy):
    model = make_tiny_model("llama-gqa")
    cache = build_cache(LOSSY[strategy], model)
    with torch.no_grad():
        model(random_ids(20, batch=2), past_key_values=cache)
        message = "holds a batch of 2 rows, but the model was called with 3: .* Build a fresh cache"
        with pytest.raises(ValueError, match=message):
            model(random_ids(4, batch=3), past_key_values=cache)


@pytest.mark.parametrize("spec", ["heavy-hitter", "tova", "snapkv", "heavy-hitter+quantized:group_size=8"])
def test_flex_attention_with_score_based_caches_on_cpu_is_refused_up_front(spec):
    model = make_tiny_model("llama", attn="flex_attention")
    with pytest.raises(ValueError, match="attn_implementation='flex_attention' on CPU .*'sdpa' or 'eager'"):
        build_cache(spec, model)


def test_a_stale_quanto_build_lock_is_named(tmp_path, monkeypatch):
    from optimum.quanto.library.extensions import get_extension

    monkeypatch.setattr(get_extension("quanto_cpp"), "build_directory", str(tmp_path))
    lock = tmp_path / "lock"
    lock.touch()
    stale = time.time() - 3600
    os.utime(lock, (stale, stale))
    with pytest.raises(RuntimeError, match=f"locked for 3[0-9]{{3}} s by {lock}: .* remove {lock} and run"):
        wait_for_quanto_build(timeout_s=300)
    with pytest.raises(RuntimeError, match="remove .*lock and run again"):
        build_cache("quantized:backend=quanto", make_tiny_model("llama", head_dim=32))
    lock.unlink()
    wait_for_quanto_build(timeout_s=300)  # no lock: returns at once


def test_a_fresh_lock_is_waited_for_until_it_goes(tmp_path, monkeypatch):
    from optimum.quanto.library.extensions import get_extension

    monkeypatch.setattr(get_extension("quanto_cpp"), "build_directory", str(tmp_path))
    lock = tmp_path / "lock"
    lock.touch()
    with pytest.raises(RuntimeError, match="locked for"):
        wait_for_quanto_build(timeout_s=0.5)  # another process still compiling: waited, then named


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"schema_version": 1, "records": [', "is not valid JSON \\(line 1, column 35"),
        ('{"schema_version": 1, "records": [{"strategy": "full"}]}', "has no list of records with"),
        ('{"schema_version": 7, "records": []}', "has schema 7, expected 1"),
    ],
)
def test_a_damaged_results_file_is_named_and_left_as_it_is(tmp_path, content, message):
    path = tmp_path / "results.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        ResultStore(path)
    assert path.read_text() == content


def test_a_damaged_results_file_stops_compare_before_any_work(tiny_model_dir, filler_file, tmp_path):
    from hf_kvcache.cli import main
    from tests.helpers import compare_args

    (tmp_path / "results.json").write_text('{"schema_version": 1, "records": [\n  {"strategy": "full",')
    with pytest.raises(ValueError, match="results.json is not valid JSON \\(line 2"):
        main(compare_args(tiny_model_dir, filler_file, tmp_path))
    assert (tmp_path / "results.json").read_text().endswith('"full",')
