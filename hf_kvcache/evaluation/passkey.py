"""Long-context retrieval: a random pass key hidden at a chosen depth of a filler prompt, to be repeated back."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from transformers import Cache, PreTrainedModel

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
