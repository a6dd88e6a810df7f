"""The tasks of the RULER-style suite (:mod:`.ruler`), generated offline from the corpus.

Six synthetic tasks at any prompt length, each trial seeded so that every strategy answers the same prompts:

* ``niah_single``: one needle, "One of the special magic numbers for <key> is: <number>.", hidden in corpus
  text; asked for the key's number.
* ``niah_multikey``: the same with three distractor needles for other keys.
* ``niah_multivalue``: four needles give one key four numbers; all four must come back.
* ``niah_multiquery``: four needles for four keys; two of them are asked for.
* ``variable_tracking``: a chain "VAR A = <number>. VAR B = VAR A. ..." spread through the text; every
  variable holding the number must be named.
* ``common_words``: a numbered list of words where ten appear far more often than the rest; the ten must be
  named.

Every prompt is a context followed by a question; a trial knows how many tokens the question takes.
"""

from __future__ import annotations

import itertools
import random
import re
from dataclasses import dataclass

import torch

RULER_TASKS = (
    "niah_single",
    "niah_multikey",
    "niah_multivalue",
    "niah_multiquery",
    "variable_tracking",
    "common_words",
)
NEEDLE = "One of the special magic numbers for {key} is: {value}."
ANSWER_TOKENS = {
    "niah_single": 12,
    "niah_multikey": 12,
    "niah_multivalue": 48,
    "niah_multiquery": 32,
    "variable_tracking": 32,
    "common_words": 64,
}


@dataclass(frozen=True)
class RulerTrial:
    """One prompt: token ids ``[1, T]``, the items the answer must contain, its task, and how many of the
    last tokens are the question (the rest is the context)."""

    task: str
    input_ids: torch.Tensor
    expected: tuple[str, ...]
    question_tokens: int = 0


class _Builder:
    """Seeded material for one trial: corpus words for keys, numbers for values, filler text in tokens."""

    def __init__(self, tokenizer, corpus: str, seed: str):
        self.tokenizer, self.corpus, self.rng = tokenizer, corpus, random.Random(seed)
        self.words = sorted({w.lower() for w in re.findall(r"\b[A-Za-z]{5,10}\b", corpus[:200_000])})

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def distinct_words(self, count: int) -> list[str]:
        return self.rng.sample(self.words, count)

    def number(self) -> str:
        return str(self.rng.randint(1_000_000, 9_999_999))

    def filler(self, tokens: int) -> list[int]:
        start = self.rng.randrange(0, max(1, len(self.corpus) - tokens * 8))
        ids = self.encode(self.corpus[start : start + tokens * 8])
        if len(ids) < tokens:
            raise ValueError(f"the corpus is too short for {tokens} tokens of filler")
        return ids[:tokens]

    def word_start(self, ids: list[int], cut: int) -> int:
        """The first position at or after ``cut`` (within a few tokens) where a new word begins, so that a
        needle never splits a word of the filler."""
        for position in range(cut, min(cut + 24, len(ids))):
            if self.tokenizer.decode(ids[position : position + 1])[:1].isspace():
                return position
        return cut

    def haystack(self, length: int, needles: list[str], question: str, task: str) -> torch.Tensor:
        """``length`` tokens: filler with ``needles`` at seeded depths (in order), then ``question``."""
        pieces = [self.encode(" " + needle + " ") for needle in needles]
        tail = self.encode(question)
        self.question_tokens = len(tail)
        budget = length - sum(map(len, pieces)) - len(tail)
        if budget < 16:
            raise ValueError(
                f"ruler length {length} is too short for task {task!r}: its needles and question alone take "
                f"{length - budget} tokens"
            )
        filler = self.filler(budget)
        cuts = sorted(self.word_start(filler, self.rng.randrange(0, budget + 1)) for _ in pieces)
        ids, last = [], 0
        for cut, piece in zip(cuts, pieces, strict=True):
            ids += filler[last:cut] + piece
            last = cut
        return torch.tensor([ids + filler[last:] + tail])


def make_ruler_trial(tokenizer, corpus: str, task: str, length: int, seed: int = 0) -> RulerTrial:
    """The prompt of ``task`` at about ``length`` tokens, generated from ``corpus`` with ``seed``."""
    if task not in RULER_TASKS:
        raise ValueError(f"unknown ruler task {task!r}; allowed: {list(RULER_TASKS)}")
    b = _Builder(tokenizer, corpus, f"{task}:{seed}")
    ask = (
        "\n\nWhat is the special magic number for {key} mentioned in the provided text? "
        "The special magic number for {key} mentioned in the provided text is"
    )
    if task in ("niah_single", "niah_multikey"):
        keys = b.distinct_words(1 if task == "niah_single" else 4)
        values = [b.number() for _ in keys]
        needles = [NEEDLE.format(key=k, value=v) for k, v in zip(keys, values, strict=True)]
        b.rng.shuffle(needles)
        ids = b.haystack(length, needles, ask.format(key=keys[0]), task)
        return RulerTrial(task, ids, (values[0],), b.question_tokens)
    if task == "niah_multivalue":
        key, values = b.distinct_words(1)[0], [b.number() for _ in range(4)]
        needles = [NEEDLE.format(key=key, value=v) for v in values]
        question = (
            f"\n\nWhat are all the special magic numbers for {key} mentioned in the provided text? "
            f"The special magic numbers for {key} mentioned in the provided text are"
        )
        ids = b.haystack(length, needles, question, task)
        return RulerTrial(task, ids, tuple(values), b.question_tokens)
    if task == "niah_multiquery":
        keys, values = b.distinct_words(4), [b.number() for _ in range(4)]
        needles = [NEEDLE.format(key=k, value=v) for k, v in zip(keys, values, strict=True)]
        b.rng.shuffle(needles)
        question = (
            f"\n\nWhat are the special magic numbers for {keys[0]} and {keys[1]} mentioned in the provided "
            f"text? The special magic numbers for {keys[0]} and {keys[1]} mentioned in the provided text are"
        )
        ids = b.haystack(length, needles, question, task)
        return RulerTrial(task, ids, tuple(values[:2]), b.question_tokens)
    if task == "variable_tracking":
        names = [name.upper() for name in b.distinct_words(5)]
        value = b.number()
        chain = [f"VAR {names[0]} = {value}."] + [f"VAR {n} = VAR {p}." for p, n in itertools.pairwise(names)]
        question = (
            f"\n\nFind all variables that are assigned the value {value} in the text above. Answer: "
            f"According to the chain of variable assignments in the text above, {len(names)} variables are "
            f"assigned the value {value}, they are:"
        )
        ids = b.haystack(length, chain, question, task)
        return RulerTrial(task, ids, tuple(names), b.question_tokens)
    return _common_words_trial(b, length)


def _common_words_trial(b: _Builder, length: int) -> RulerTrial:
    question = (
        "\n\nWhat are the 10 most common words in the above list? "
        "Answer: The top 10 words that appear most often in the list are:"
    )
    tail = b.encode(question)
    budget, vocabulary = length - len(tail), len(b.words)
    if vocabulary < 20:
        raise ValueError(
            f"task 'common_words' needs at least 20 distinct words in the corpus, got {vocabulary}"
        )
    # Items take about four tokens ("12. word"); the ten common words fill 40 % of the list, each at least
    # three times as often as any other word. Shrink the list until it fits.
    items = max(40, budget // 4)
    for _ in range(6):
        per_common = max(3, items * 2 // 50)
        rare_each = max(1, per_common // 3)
        words = b.distinct_words(10 + min(vocabulary - 10, max(0, items - 10 * per_common) // rare_each))
        listed = [w for w in words[:10] for _ in range(per_common)] + [
            w for w in words[10:] for _ in range(rare_each)
        ]
        b.rng.shuffle(listed)
        ids = b.encode(
            "Below is a numbered list of words.\n" + "\n".join(f"{i + 1}. {w}" for i, w in enumerate(listed))
        )
        if len(ids) <= budget:
            return RulerTrial("common_words", torch.tensor([ids + tail]), tuple(words[:10]), len(tail))
        items = items * budget // len(ids) - 1
    raise ValueError(
        f"ruler length {length} is too short for task 'common_words': ten words three times each do not fit"
    )
