"""A RULER-style long-context suite (https://arxiv.org/abs/2404.06654): answering its trials, and the metric.

The six tasks (:mod:`.ruler_tasks`) are generated offline from the corpus. A trial scores the fraction of
expected items its greedy answer contains (exact whole-word match, case-insensitive for words). Prompts go
through the cache in chunks, so a compressing cache never sees more than one chunk beyond its budget.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hf_kvcache.evaluation.bootstrap import ratio_table
from hf_kvcache.evaluation.metric import Column, Metric, register_metric
from hf_kvcache.evaluation.report import save_figure, spec_label
from hf_kvcache.evaluation.ruler_tasks import ANSWER_TOKENS, RULER_TASKS, RulerTrial, make_ruler_trial
from hf_kvcache.registry import WHEN_SET

__all__ = ["RULER_TASKS", "RulerMetric", "RulerOptions", "RulerTrial", "answer_trial", "make_ruler_trial"]
PROTOCOLS = ("question-inside", "compress-first")


@torch.no_grad()
def answer_trial(
    model,
    tokenizer,
    trial: RulerTrial,
    cache,
    chunk_size: int = 512,
    protocol: str = "question-inside",
    on_context=None,
) -> tuple[bool, float, str]:
    """Feed the prompt through ``cache`` in chunks, decode greedily: (all found, fraction found, answer).

    ``protocol``: ``question-inside`` feeds the whole prompt in chunks; ``compress-first`` feeds the context
    in chunks, lets a cache that compresses a whole context at once do it (``compress_context``), then feeds
    the question in one forward. ``on_context(cache)`` is called once the prompt (compress-first: the
    context) is in, before anything is generated."""
    ids = trial.input_ids.to(model.device)
    end = ids.shape[1] - (trial.question_tokens if protocol == "compress-first" else 0)
    for start in range(0, end, chunk_size):
        stop = min(start + chunk_size, end)
        logits = model(ids[:, start:stop], past_key_values=cache, use_cache=True).logits
    # A cache that compresses a whole prompt at once (kvzip) does it here: the context, or the prompt with
    # its question (what it would do at the first decoding step anyway).
    if hasattr(cache, "compress_context"):
        cache.compress_context()
    if on_context is not None:
        on_context(cache)
    if end < ids.shape[1]:
        logits = model(ids[:, end:], past_key_values=cache, use_cache=True).logits
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
    protocol: str = field(
        default="question-inside",
        metadata={
            "help": "question-inside (the question ends the prompt the cache compresses) or compress-first "
            "(the context is compressed, then the question is appended)",
            **WHEN_SET,
        },
    )

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
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"ruler protocol must be one of {list(PROTOCOLS)}, got {self.protocol!r}")


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
        from hf_kvcache.base import cache_nbytes
        from hf_kvcache.registry import build_cache

        cells = []
        for task in self.options.tasks:
            for length in self.options.lengths:
                correct, fractions, held = 0, [], []
                for trial_index in range(self.options.trials):
                    trial = make_ruler_trial(run.tokenizer, run.text, task, length, seed=trial_index)
                    cache = build_cache(spec, run.model)
                    protocol = self.options.protocol
                    ok, fraction, _ = answer_trial(
                        run.model,
                        run.tokenizer,
                        trial,
                        cache,
                        protocol=protocol,
                        on_context=lambda c, into=held: into.append(cache_nbytes(c)),
                    )
                    correct = correct + ok
                    fractions.append(fraction)
                    tick(length)
                cells.append(
                    {
                        "task": task,
                        "length": length,
                        "correct": correct,
                        "trials": self.options.trials,
                        "partial": sum(fractions) / self.options.trials,
                        # Per trial, in seed order: every strategy meets the same prompts, which pairs them.
                        "scores": fractions,
                        "held_bytes": sum(held) / len(held),
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
            + ratio_table(
                records, lambda values: self.headline(values)["ruler_score"], ("task", "length"), "RULER mean"
            )
        )
        return [out / "ruler.png", out / "ruler.md"]
