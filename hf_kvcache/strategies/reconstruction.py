"""Teacher-forced reconstruction: the model repeats a context a cache holds, and the cache watches.

KVzip (:mod:`.kvzip`) scores each held entry by the attention it gets while the model, asked to repeat the
context, is fed the context again. :func:`reconstruct` runs those passes over a cache without changing what
it holds: the scoring layers score and store nothing while ``reconstructing`` is set, and every other layer
(a sliding window of a hybrid model) starts each pass from its own state.
"""

from __future__ import annotations

import copy
import functools

import torch


@functools.lru_cache(maxsize=16)
def reconstruction_prompt_ids(tokenizer_source: str, prompt: str) -> tuple[int, ...]:
    """The token ids that ask the model to repeat the context: ``prompt`` as a user turn of the tokenizer's
    chat template, then the assistant's turn opened; plain ``"\\n\\n{prompt}\\n\\n"`` without a template."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    except Exception as error:
        raise ValueError(
            f"kvzip could not load the tokenizer {tokenizer_source!r} to write its reconstruction prompt "
            f"({type(error).__name__}: {error}); pass kvzip:tokenizer=<hub id or folder>, or prompt=none to "
            "repeat the context without an instruction"
        ) from error
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
    else:
        text = f"\n\n{prompt}\n\n"
    return tuple(tokenizer(text, add_special_tokens=False).input_ids)


def prompt_ids(prompt: str | None, tokenizer: str | None, model, device) -> torch.Tensor:
    """``[1, P]`` ids of the reconstruction prompt (:func:`reconstruction_prompt_ids`); ``[1, 0]`` for
    ``prompt=None``. ``tokenizer``: Hub id or folder; ``None``: the model's own ``name_or_path``."""
    if prompt is None:
        return torch.zeros(1, 0, dtype=torch.long, device=device)
    source = tokenizer or getattr(model, "name_or_path", "")
    if not source:
        raise ValueError(
            "kvzip needs a tokenizer to write its reconstruction prompt, and the model names none "
            "(model.name_or_path is empty): pass kvzip:tokenizer=<hub id or folder>, or prompt=none"
        )
    return torch.tensor([reconstruction_prompt_ids(source, prompt)], device=device)


def reconstruct(model, cache, scoring_layers: list, ids, real_seen, prompt, chunk_size: int) -> None:
    """Feed ``prompt`` then each ``chunk_size`` real tokens of the held context ``ids`` ``[B, N]``
    (left-padded; ``real_seen`` ``[B]`` real tokens per row) through ``model`` over ``cache``, each pass
    seeing the context, the prompt and its own chunk. Each of ``scoring_layers`` gets ``reconstructing`` set
    and ``reconstruction_valid`` ``[B, N + pass]`` (real columns of the context and of the pass)."""
    batch, length = ids.shape
    padding = (length - real_seen.to(ids.device)).clamp(min=0)
    context_valid = torch.arange(length, device=ids.device)[None, :] >= padding[:, None]
    prompt_valid = torch.ones(batch, prompt.shape[-1], dtype=torch.bool, device=ids.device)
    others = {i: layer for i, layer in enumerate(cache.layers) if not any(layer is s for s in scoring_layers)}
    for layer in scoring_layers:
        layer.reconstructing = True
    try:
        # Chunks count each row's real tokens, so that a padded row is scored as it would be alone.
        longest = int(real_seen.max())
        for start in range(0, longest, chunk_size):
            width = min(chunk_size, longest - start)
            columns = padding[:, None] + start + torch.arange(width, device=ids.device)
            valid = torch.cat([prompt_valid, columns < length], -1)
            fed = torch.cat([prompt.expand(batch, -1), ids.gather(1, columns.clamp(max=length - 1))], -1)
            # A row's columns past its context go first, as padding, so that each pass is left-padded too.
            order = torch.sort(valid.int(), dim=-1, stable=True).indices
            fed, valid = fed.gather(1, order), valid.gather(1, order)
            positions = real_seen.to(ids.device)[:, None] + valid.long().cumsum(-1) - 1
            mask = torch.cat([context_valid, valid], -1)
            for index, layer in others.items():
                cache.layers[index] = copy.deepcopy(layer)
            for layer in scoring_layers:
                layer.reconstruction_valid = mask
            model(
                input_ids=fed,
                attention_mask=mask.long(),
                position_ids=positions.clamp(min=0),
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
    finally:
        for layer in scoring_layers:
            layer.reconstructing, layer.reconstruction_valid = False, None
        for index, layer in others.items():
            cache.layers[index] = layer
        cache.forward_state.observe(context_valid.long() if bool((padding > 0).any()) else None)
