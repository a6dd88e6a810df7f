"""Which KV heads retrieve: the calibration behind ``duo`` (DuoAttention's retrieval and streaming heads).

DuoAttention (https://arxiv.org/abs/2410.10819) finds that only some heads need the whole context; the rest
do as well with the first tokens and a recent window. ``hf-kvcache calibrate --strategy duo`` measures it
per head: over passkey prompts built from the corpus (a 5-digit key at spread depths, then the question),
the model runs with every head keeping everything except one, which keeps only ``num_sink_tokens`` and
``window`` tokens, and the head's score is how much that raises the loss of the key's tokens (mean over the
prompts, in nats). ``duo:retrieval=F`` keeps everything in the fraction ``F`` of heads with the highest
scores.

File format (JSON, one per model, under ``$HF_KVCACHE_HOME/calibration/``)::

    {"format": "hf-kvcache head calibration", "version": 1,
     "model": "<name or path>", "geometry": {"num_layers": L, "num_key_value_heads": H, "head_dim": D},
     "settings": {"prompts": 4, "length": 2048, "window": 256, "num_sink_tokens": 4},
     "scores": [[H floats] or null (a local layer), ... L rows]}
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from hf_kvcache.calibration import geometry, model_name, read_record
from hf_kvcache.layout import AttentionLayout, attention_layout

FORMAT = "hf-kvcache head calibration"
VERSION = 1


def default_head_calibration_path(model: PreTrainedModel) -> Path:
    """Where ``hf-kvcache calibrate --strategy duo`` writes, and ``duo`` reads, the file for ``model``."""
    from hf_kvcache.evaluation.model import cache_home

    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", model_name(model).strip("/"))[-80:]
    return cache_home() / "calibration" / f"heads-{slug}.json"


def _key_loss(model: PreTrainedModel, ids: torch.Tensor, answer: int, cache) -> float:
    """Mean loss of the last ``answer`` tokens of ``ids`` (the key), fed in one forward through ``cache``."""
    logits = model(ids, past_key_values=cache).logits[0, -answer - 1 : -1].float()
    return torch.nn.functional.cross_entropy(logits, ids[0, -answer:]).item()


@torch.no_grad()
def calibrate_heads(
    model: PreTrainedModel,
    tokenizer: Any,
    text: str,
    prompts: int = 4,
    length: int = 2048,
    window: int = 256,
    num_sink_tokens: int = 4,
) -> dict:
    """Score every KV head of the full-attention layers by what streaming it costs passkey retrieval.

    Args:
        model: the model to calibrate (attention through hf-kvcache's entry point: sdpa or eager).
        tokenizer: its tokenizer.
        text: the corpus the prompts are built from.
        prompts: passkey prompts, the needle at depths spread over the filler. Default 4.
        length: tokens per prompt. Default 2048.
        window: recent tokens a streaming head sees. Default 256.
        num_sink_tokens: first tokens a streaming head keeps. Default 4.

    Returns:
        The calibration record (see the module docstring for the format).
    """
    from hf_kvcache.evaluation.passkey import make_passkey_prompt
    from hf_kvcache.strategies.duo import DuoKVCache, DuoLayer

    layout = attention_layout(model)
    heads, trials = layout.num_key_value_heads, []
    for index in range(prompts):
        prompt = make_passkey_prompt(tokenizer, text, length, depth=(index + 0.5) / prompts, seed=index)
        key = tokenizer(" " + prompt.key, add_special_tokens=False).input_ids
        ids = torch.cat([prompt.input_ids, torch.tensor([key])], dim=1).to(model.device)
        trials.append((ids, len(key)))
    settings = dict(retrieval=1.0, window=window, num_sink_tokens=num_sink_tokens)
    base = [_key_loss(model, ids, answer, DuoKVCache(model, **settings)) for ids, answer in trials]
    scores: list[list[float] | None] = []
    for layer in range(layout.num_layers):
        if layout.window(layer) is not None:
            scores.append(None)
            continue
        row = []
        for head in range(heads):
            raised = 0.0
            for (ids, answer), reference in zip(trials, base, strict=True):
                cache = DuoKVCache(model, **settings)
                others = [h for h in range(layout.num_key_value_heads) if h != head]
                cache.layers[layer] = DuoLayer(
                    others, layout.num_key_value_heads, cache.options, cache.forward_state
                )
                raised += _key_loss(model, ids, answer, cache) - reference
            row.append(raised / len(trials))
        scores.append(row)
    return {
        "format": FORMAT,
        "version": VERSION,
        "model": model_name(model),
        "geometry": geometry(layout),
        "settings": {
            "prompts": prompts,
            "length": length,
            "window": window,
            "num_sink_tokens": num_sink_tokens,
        },
        "scores": scores,
    }


def load_head_calibration(path: str | Path, model: PreTrainedModel) -> dict:
    """Read a head calibration and check that it was made for ``model`` (its name and its geometry)."""
    missing = (
        f"no head calibration for {model_name(model)} at {path}; make one with: hf-kvcache calibrate "
        f"--model {model_name(model)} --strategy duo"
    )
    record = read_record(path, FORMAT, VERSION, missing)
    expected = geometry(attention_layout(model))
    if record["model"] != model_name(model) or record["geometry"] != expected:
        raise ValueError(
            f"the head calibration {path} was made for {record['model']} (geometry {record['geometry']}), "
            f"not for {model_name(model)} (geometry {expected}); calibrate this model"
        )
    return record


def retrieval_heads(model: PreTrainedModel, layout: AttentionLayout, options: Any) -> list[list[int] | None]:
    """The retrieval KV heads of each layer (``None`` for local layers) under ``options.retrieval``: the
    highest calibration scores across all full-attention layers (ties: the earlier head)."""
    full = [index for index in range(layout.num_layers) if layout.window(index) is None]
    heads = layout.num_key_value_heads
    count = round(options.retrieval * heads * len(full))
    chosen: list[list[int] | None] = [None] * layout.num_layers
    if count in (0, heads * len(full)):
        for index in full:
            chosen[index] = list(range(heads)) if count else []
        return chosen
    path = options.calibration or default_head_calibration_path(model)
    scores = load_head_calibration(path, model)["scores"]
    ranked = sorted(
        ((index, head) for index in full for head in range(heads)), key=lambda p: -scores[p[0]][p[1]]
    )
    for index in full:
        chosen[index] = []
    for index, head in ranked[:count]:
        chosen[index].append(head)
    return chosen
