"""Text to evaluate on: the embedded Wikipedia sample from gensim, a ``datasets`` dataset, or a local file."""

from __future__ import annotations

import bz2
import importlib.util
import re
from pathlib import Path

EMBEDDED_CORPUS = "wikipedia-gensim"
_WIKI_DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"

_HEADING = re.compile(r"^\s*=+\s*(.*?)\s*=+\s*$", re.MULTILINE)
_EMPHASIS = re.compile(r"'{2,}")
_TABLE_LINE = re.compile(r"^\s*[{|!}].*$", re.MULTILINE)
_BLANK_RUNS = re.compile(r"\n\s*\n(\s*\n)+")


def _clean_article(title: str, text: str) -> str:
    from gensim.corpora.wikicorpus import filter_wiki

    body = filter_wiki(text)
    body = _HEADING.sub(r"\1", body)
    body = _EMPHASIS.sub("", body)
    body = _TABLE_LINE.sub("", body)
    body = _BLANK_RUNS.sub("\n\n", body).strip()
    return f"{title}\n\n{body}"


def embedded_wikipedia_articles() -> list[str]:
    """The English Wikipedia articles in gensim's test data, cleaned, redirects dropped, in dump order."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "the embedded default corpus ships with gensim, which is not installed: pip install "
            "'hf-kvcache[eval]'"
        )
    from gensim.corpora.wikicorpus import extract_pages

    dump = Path(spec.origin).parent / "test" / "test_data" / _WIKI_DUMP
    articles = []
    with bz2.open(dump, "rb") as stream:
        for title, text, _page_id in extract_pages(stream):
            if text.lstrip().lower().startswith("#redirect"):
                continue
            article = _clean_article(title, text)
            if len(article) > len(title) + 200:
                articles.append(article)
    return articles


def _load_dataset_text(
    name: str, config: str | None, split: str, text_field: str, max_chars: int | None
) -> str:
    import datasets

    try:
        rows = datasets.load_dataset(name, config, split=split, streaming=True)
        pieces, total = [], 0
        for row in rows:
            if text_field not in row:
                raise ValueError(
                    f"dataset {name!r} has no field {text_field!r}; its fields are {sorted(row)}"
                )
            pieces.append(row[text_field])
            total += len(row[text_field])
            if max_chars is not None and total >= max_chars:
                break
    except ValueError:
        raise
    except Exception as error:  # network, auth and missing-dataset errors all look different
        raise RuntimeError(
            f"could not load dataset {name!r} (config {config!r}, split {split!r}): {error}. "
            "Datasets need network access to the Hugging Face Hub; offline, pass a local text file instead."
        ) from error
    return "\n\n".join(piece for piece in pieces if piece.strip())


def load_corpus(
    name: str | None = None,
    *,
    config: str | None = None,
    split: str = "test",
    text_field: str = "text",
    max_chars: int | None = None,
) -> str:
    """Return evaluation text.

    Args:
        name: ``None`` (default) or ``"wikipedia-gensim"`` for the embedded Wikipedia sample (~100 articles,
            ~480k words); a path to a local text file; or a ``datasets`` id such as ``"wikitext"`` or
            ``"pg19"``, optionally written ``"wikitext:wikitext-2-raw-v1"`` to name its config.
        config: the dataset config, e.g. ``"wikitext-2-raw-v1"``. Default ``None``.
        split: the dataset split. Default ``"test"``.
        text_field: the column holding the text. Default ``"text"``.
        max_chars: stop reading once this many characters are gathered. Default ``None``: everything.
    """
    if max_chars is not None and max_chars <= 0:
        raise ValueError(f"max_chars must be positive, got {max_chars}")
    if name is None or name == EMBEDDED_CORPUS:
        text = "\n\n".join(embedded_wikipedia_articles())
    elif Path(name).is_file():
        text = Path(name).read_text(encoding="utf-8")
    elif Path(name).suffix in (".txt", ".md", ".text"):
        raise FileNotFoundError(f"text file {name!r} does not exist")
    else:
        dataset, _, inline_config = name.partition(":")
        text = _load_dataset_text(dataset, config or inline_config or None, split, text_field, max_chars)
    if not text.strip():
        raise ValueError(f"corpus {name!r} is empty")
    return text[:max_chars] if max_chars is not None else text


def corpus_token_ids(tokenizer, text: str, max_tokens: int):
    """The first ``max_tokens`` token ids of ``text``, ``[1, T]`` (fewer if the text is shorter)."""
    if max_tokens < 2:
        raise ValueError(f"max_tokens must be at least 2, got {max_tokens}")
    # Tokenizing a generous prefix is much faster than tokenizing the whole corpus.
    chars = max_tokens * 8
    while True:
        ids = tokenizer(text[:chars], return_tensors="pt", add_special_tokens=False).input_ids
        if ids.shape[1] >= max_tokens or chars >= len(text):
            return ids[:, :max_tokens]
        chars *= 2
