import pytest
import torch

from hf_kvcache.evaluation import load_corpus
from hf_kvcache.evaluation.corpus import corpus_token_ids
from hf_kvcache.evaluation.model import resolve_device, resolve_dtype


def test_local_text_file(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("It was the best of times.\nIt was the worst of times.", encoding="utf-8")
    assert load_corpus(str(path)) == path.read_text(encoding="utf-8")
    assert load_corpus(str(path), max_chars=6) == "It was"


def test_missing_text_file_is_named(tmp_path):
    missing = str(tmp_path / "nope.txt")
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_corpus(missing)


def test_unreachable_dataset_gets_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="could not load dataset 'no-such-org/no-such-dataset'"):
        load_corpus("no-such-org/no-such-dataset")


def test_bad_dtype_and_device_are_named():
    with pytest.raises(ValueError, match="unknown dtype 'float7'"):
        resolve_dtype("float7", "cpu")
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")
    assert resolve_dtype(None, "cpu") is torch.float32


class _CharTokenizer:
    def __call__(self, text, return_tensors, add_special_tokens):
        class Out:
            input_ids = torch.tensor([[ord(c) for c in text]])

        return Out


def test_corpus_token_ids_takes_prefix():
    ids = corpus_token_ids(_CharTokenizer(), "abcdefghij" * 10, max_tokens=25)
    assert ids.shape == (1, 25)
    assert ids[0, 0].item() == ord("a")
    assert corpus_token_ids(_CharTokenizer(), "abc", max_tokens=25).shape == (1, 3)
