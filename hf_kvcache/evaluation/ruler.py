"""A RULER-style long-context suite (https://arxiv.org/abs/2404.06654), generated offline from the corpus.

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

A trial scores the fraction of expected items its greedy answer contains (exact whole-word match,
case-insensitive for words). Prompts go through the cache in chunks, so a compressing cache never sees more
than one chunk beyond its budget.
"""

from __future__ import annotations

import itertools
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hf_kvcache.evaluation.metric import Column, Metric, register_metric
from hf_kvcache.evaluation.report import save_figure, spec_label

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
    """One prompt: token ids ``[1, T]``, the items the answer must contain, and its task."""

    task: str
    input_ids: torch.Tensor
    expected: tuple[str, ...]


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
        return RulerTrial(task, b.haystack(length, needles, ask.format(key=keys[0]), task), (values[0],))
    if task == "niah_multivalue":
        key, values = b.distinct_words(1)[0], [b.number() for _ in range(4)]
        needles = [NEEDLE.format(key=key, value=v) for v in values]
        question = (
            f"\n\nWhat are all the special magic numbers for {key} mentioned in the provided text? "
            f"The special magic numbers for {key} mentioned in the provided text are"
        )
        return RulerTrial(task, b.haystack(length, needles, question, task), tuple(values))
    if task == "niah_multiquery":
        keys, values = b.distinct_words(4), [b.number() for _ in range(4)]
        needles = [NEEDLE.format(key=k, value=v) for k, v in zip(keys, values, strict=True)]
        b.rng.shuffle(needles)
        question = (
            f"\n\nWhat are the special magic numbers for {keys[0]} and {keys[1]} mentioned in the provided "
            f"text? The special magic numbers for {keys[0]} and {keys[1]} mentioned in the provided text are"
        )
        return RulerTrial(task, b.haystack(length, needles, question, task), tuple(values[:2]))
    if task == "variable_tracking":
        names = [name.upper() for name in b.distinct_words(5)]
        value = b.number()
        chain = [f"VAR {names[0]} = {value}."] + [f"VAR {n} = VAR {p}." for p, n in itertools.pairwise(names)]
        question = (
            f"\n\nFind all variables that are assigned the value {value} in the text above. Answer: "
            f"According to the chain of variable assignments in the text above, {len(names)} variables are "
            f"assigned the value {value}, they are:"
        )
        return RulerTrial(task, b.haystack(length, chain, question, task), tuple(names))
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
            return RulerTrial("common_words", torch.tensor([ids + tail]), tuple(words[:10]))
        items = items * budget // len(ids) - 1
    raise ValueError(
        f"ruler length {length} is too short for task 'common_words': ten words three times each do not fit"
    )


@torch.no_grad()
def answer_trial(
    model, tokenizer, trial: RulerTrial, cache, chunk_size: int = 512
) -> tuple[bool, float, str]:
    """Feed the prompt through ``cache`` in chunks, decode greedily: (all found, fraction found, answer)."""
    ids = trial.input_ids.to(model.device)
    for start in range(0, ids.shape[1], chunk_size):
        logits = model(ids[:, start : start + chunk_size], past_key_values=cache, use_cache=True).logits
    token, generated = logits[:, -1:].argmax(-1), []
    for _ in range(ANSWER_TOKENS[trial.task]):
        generated.append(int(token))
        if int(token) == tokenizer.eos_token_id:
            break
        token = model(token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
    text = tokenizer.decode(generated)
    return (*score_answer(text, trial.expected), text)


def score_answer(text: str, expected: tuple[str, ...]) -> tuple[bool, float]:
    """Whether ``text`` holds every expected item as a whole word (any case), and the fraction it holds."""
    found = [re.search(rf"\b{re.escape(item)}\b", text, flags=re.IGNORECASE) is not None for item in expected]
    return all(found), sum(found) / len(found)


@dataclass(frozen=True)
class RulerOptions:
    """Options of the ruler metric."""

    tasks: tuple[str, ...] = field(default=RULER_TASKS, metadata={"help": f"tasks, of {list(RULER_TASKS)}"})
    lengths: tuple[int, ...] = field(default=(1024, 4096), metadata={"help": "prompt lengths in tokens"})
    trials: int = field(default=2, metadata={"help": "seeded prompts per (task, length)"})

    def __post_init__(self):
        unknown = [t for t in self.tasks if t not in RULER_TASKS]
        if not self.tasks or unknown:
            raise ValueError(f"unknown ruler tasks {unknown or []}; allowed: {list(RULER_TASKS)}")
        if not self.lengths or any(not isinstance(n, int) or n < 64 for n in self.lengths):
            raise ValueError(
                f"ruler lengths must be integers of at least 64 tokens, got {list(self.lengths)}"
            )
        if not isinstance(self.trials, int) or self.trials < 1:
            raise ValueError(f"ruler trials must be a positive integer, got {self.trials!r}")


@register_metric
class RulerMetric(Metric):
    """RULER-style scores per task and length (see the module docstring); not in ``compare``'s defaults,
    since it feeds ``tasks x lengths x trials`` long prompts per strategy.

    A cell's score is RULER's own: the fraction of expected items the answer holds, averaged over trials (so a
    multi-value answer with three of four numbers scores 75 %). ``all found`` counts trials with every item.
    """

    name = "ruler"
    summary = "RULER-style long-context tasks: score per task and length"
    options_class = RulerOptions
    in_defaults = False
    columns = (
        Column("ruler_score", "ruler score", "{:.0%}"),
        Column("ruler_all_found", "ruler all found", "{:.0%}"),
    )

    def work(self, run) -> int:
        return len(self.options.tasks) * sum(self.options.lengths) * self.options.trials

    def measure(self, run, spec: str, tick) -> dict:
        from hf_kvcache.registry import build_cache

        cells = []
        for task in self.options.tasks:
            for length in self.options.lengths:
                correct, partial = 0, 0.0
                for trial_index in range(self.options.trials):
                    trial = make_ruler_trial(run.tokenizer, run.text, task, length, seed=trial_index)
                    ok, fraction, _ = answer_trial(
                        run.model, run.tokenizer, trial, build_cache(spec, run.model)
                    )
                    correct, partial = correct + ok, partial + fraction
                    tick(length)
                cells.append(
                    {
                        "task": task,
                        "length": length,
                        "correct": correct,
                        "trials": self.options.trials,
                        "partial": partial / self.options.trials,
                    }
                )
        return {"cells": cells, **self.headline({"cells": cells})}

    def headline(self, values: dict) -> dict:
        # From the cells, so that records written before ``ruler_score`` existed still report it.
        cells = values["cells"]
        return {
            "ruler_score": sum(c["partial"] for c in cells) / len(cells),
            "ruler_all_found": sum(c["correct"] for c in cells) / sum(c["trials"] for c in cells),
        }

    def plots(self, records: list[dict], out: Path) -> list[Path]:
        """``ruler.png``: a task x length heat map of scores per strategy; ``ruler.md``: one table, a row per
        strategy and a column per (task, length), each cell ``score (trials with all items / trials)``."""
        import matplotlib.pyplot as plt

        figure, axes = plt.subplots(1, len(records), figsize=(3.2 * len(records), 3.6), squeeze=False)
        cells_of = [record["values"]["cells"] for record in records]
        columns = list(dict.fromkeys((c["task"], c["length"]) for cells in cells_of for c in cells))
        tasks = list(dict.fromkeys(task for task, _ in columns))
        lengths = sorted({length for _, length in columns})
        lines = [
            "| strategy | " + " | ".join(f"{t} {n}" for t, n in columns) + " | mean |",
            "|---|" + "---|" * (len(columns) + 1),
        ]
        for axis, record, cells in zip(axes[0], records, cells_of, strict=True):
            by_column = {(c["task"], c["length"]): c for c in cells}
            grid = [[by_column.get((t, n), {}).get("partial", float("nan")) for n in lengths] for t in tasks]
            axis.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
            axis.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7)
            axis.set_yticks(range(len(tasks)), tasks if axis is axes[0][0] else [""] * len(tasks), fontsize=7)
            axis.set_title(spec_label(record["spec"], 28), fontsize=6)
            shown = [
                f"{by_column[key]['partial']:.0%} ({by_column[key]['correct']}/{by_column[key]['trials']})"
                if key in by_column
                else "–"
                for key in columns
            ]
            mean = self.headline(record["values"])["ruler_score"]
            lines.append(f"| `{record['spec']}` | " + " | ".join(shown) + f" | {mean:.0%} |")
        save_figure(figure, out / "ruler.png")
        (out / "ruler.md").write_text(
            "RULER score per task and prompt length: the fraction of expected items the greedy answer holds, "
            "averaged over trials; in brackets, trials whose answer holds every item.\n\n"
            + "\n".join(lines)
            + "\n"
        )
        return [out / "ruler.png", out / "ruler.md"]
