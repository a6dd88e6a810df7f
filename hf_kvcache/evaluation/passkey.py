"""Long-context retrieval: a random pass key hidden at a chosen depth of filler text, to be repeated back."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import Cache, PreTrainedModel

from hf_kvcache.evaluation.bootstrap import ratio_table
from hf_kvcache.evaluation.metric import Column, Metric, register_metric
from hf_kvcache.evaluation.report import save_figure, spec_label

NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "\n\nWhat is the pass key? The pass key is"


@dataclass(frozen=True)
class PasskeyPrompt:
    """Token ids of one trial and where the needle landed."""

    input_ids: torch.Tensor  # [1, T]
    key: str
    needle_start: int  # token index where the needle begins
    depth: float  # requested depth in [0, 1]


def make_passkey_prompt(
    tokenizer, filler_text: str, length: int, depth: float, seed: int = 0
) -> PasskeyPrompt:
    """A prompt of about ``length`` tokens: filler, with the needle starting at ``depth`` of the filler.

    Args:
        tokenizer: the model's tokenizer.
        filler_text: text to fill the context with (the corpus).
        length: total prompt tokens (filler + needle + question).
        depth: fraction of the filler before the needle, in [0, 1].
        seed: picks the 5-digit key and where in ``filler_text`` the filler starts.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be between 0 and 1, got {depth}")
    rng = random.Random(seed)
    key = str(rng.randint(10000, 99999))

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False).input_ids

    needle = encode(" " + NEEDLE.format(key=key) + " ")
    question = encode(QUESTION)
    filler_length = length - len(needle) - len(question)
    if filler_length < 16:
        raise ValueError(
            f"length {length} is too short for the needle and question ({len(needle) + len(question)})"
        )
    start = rng.randrange(0, max(1, len(filler_text) - filler_length * 8))
    filler = encode(filler_text[start : start + filler_length * 8])
    if len(filler) < filler_length:
        raise ValueError(f"the filler text is too short for a {length}-token prompt")
    filler = filler[:filler_length]
    cut = round(depth * filler_length)
    ids = filler[:cut] + needle + filler[cut:] + question
    return PasskeyPrompt(torch.tensor([ids]), key, cut, depth)


@torch.no_grad()
def run_passkey(
    model: PreTrainedModel, tokenizer, prompt: PasskeyPrompt, cache: Cache, chunk_size: int = 512
) -> bool:
    """Feed the prompt in chunks through ``cache``, decode greedily, and check the key comes back."""
    ids = prompt.input_ids.to(model.device)
    for start in range(0, ids.shape[1], chunk_size):
        logits = model(ids[:, start : start + chunk_size], past_key_values=cache, use_cache=True).logits
    generated = []
    token = logits[:, -1:].argmax(-1)
    for _ in range(8):
        generated.append(int(token))
        token = model(token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
    return prompt.key in tokenizer.decode(generated)


@dataclass(frozen=True)
class PasskeyOptions:
    """Options of the passkey metric."""

    lengths: tuple[int, ...] = field(default=(1024, 2048), metadata={"help": "prompt lengths in tokens"})
    depths: tuple[float, ...] = field(
        default=(0.1, 0.5, 0.9),
        metadata={"help": "needle depths, fractions of the filler in [0, 1]"},
    )
    trials: int = field(default=1, metadata={"help": "keys per (length, depth)"})

    def __post_init__(self):
        if not self.lengths or any(not isinstance(n, int) or n < 64 for n in self.lengths):
            raise ValueError(
                f"passkey lengths must be integers of at least 64 tokens, got {list(self.lengths)}"
            )
        if not self.depths or any(not 0 <= depth <= 1 for depth in self.depths):
            raise ValueError(f"passkey depths must lie in [0, 1], got {list(self.depths)}")
        if not isinstance(self.trials, int) or self.trials < 1:
            raise ValueError(f"passkey trials must be a positive integer, got {self.trials!r}")


@register_metric
class PasskeyMetric(Metric):
    """Pass-key retrieval accuracy per (length, depth), prompts fed through the cache in chunks of 512."""

    name = "passkey"
    summary = "long-context passkey retrieval accuracy"
    options_class = PasskeyOptions
    columns = (Column("accuracy", "passkey", "{:.0%}"),)

    def work(self, run) -> int:
        return self.options.trials * len(self.options.depths) * sum(self.options.lengths)

    def measure(self, run, spec: str, tick) -> dict:
        from hf_kvcache.registry import build_cache

        cells = []
        for length in self.options.lengths:
            for depth in self.options.depths:
                scores = []
                for trial in range(self.options.trials):
                    prompt = make_passkey_prompt(run.tokenizer, run.text, length, depth, seed=trial)
                    found = run_passkey(run.model, run.tokenizer, prompt, build_cache(spec, run.model))
                    scores.append(float(found))
                    tick(length)
                cells.append(
                    {
                        "length": length,
                        "depth": depth,
                        "correct": int(sum(scores)),
                        "trials": self.options.trials,
                        # Per trial, in seed order: every strategy meets the same prompts, which pairs them.
                        "scores": scores,
                    }
                )
        total = sum(c["trials"] for c in cells)
        return {"cells": cells, "accuracy": sum(c["correct"] for c in cells) / total}

    def plots(self, records: list[dict], out: Path) -> list[Path]:
        """``passkey.png``: a heat map of accuracy per (length, depth) and strategy; ``passkey.md``: the same
        as a table (``found / trials`` per cell) and each strategy's accuracy as a fraction of the full
        cache's, with a paired bootstrap interval."""
        import matplotlib.pyplot as plt

        columns = [(c["length"], c["depth"]) for c in records[0]["values"]["cells"]]
        grid = [[c["correct"] / c["trials"] for c in r["values"]["cells"]] for r in records]
        labels = [spec_label(r["spec"]) for r in records]
        height = 1.5 + 0.14 * sum(label.count("\n") + 1 for label in labels)
        figure, axis = plt.subplots(figsize=(4 + 0.6 * len(columns), height))
        axis.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        axis.set_xticks(range(len(columns)), [f"{n}\n{d:.0%}" for n, d in columns], fontsize=7)
        axis.set_yticks(range(len(records)), labels, fontsize=6)
        axis.set_xlabel("prompt tokens / needle depth")
        axis.set_title("Passkey retrieval accuracy")
        lines = [
            "| strategy | " + " | ".join(f"{n} at {d:.0%}" for n, d in columns) + " | accuracy |",
            "|---|" + "---|" * (len(columns) + 1),
        ]
        for record in records:
            shown = [f"{c['correct']}/{c['trials']}" for c in record["values"]["cells"]]
            lines.append(
                f"| `{record['spec']}` | " + " | ".join(shown) + f" | {record['values']['accuracy']:.0%} |"
            )
        (out / "passkey.md").write_text(
            "Passkeys found per prompt length and needle depth, of the trials run.\n\n"
            + "\n".join(lines)
            + "\n"
            + ratio_table(records, lambda values: values["accuracy"], ("length", "depth"), "passkey accuracy")
        )
        return [save_figure(figure, out / "passkey.png"), out / "passkey.md"]
