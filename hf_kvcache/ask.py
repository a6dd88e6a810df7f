"""Compress once, ask many: a context goes through a cache once, then each question is answered from a copy.

Two protocols decide what the compressing cache can know when it chooses what to keep:

* **compress-first** (this module): the context is compressed before any question exists, then each question
  is appended and answered. The cache cannot tell what will be asked, which is how a cache is used for real (a
  document read once, questions later); it is the fair test of a strategy's memory.
* **question-inside**: the question is part of the prompt that is compressed, so a strategy that scores by the
  last queries (SnapKV) sees it. Fair for one-shot question answering, where the question is known up front;
  optimistic for anything else. To measure it, put the question at the end of the prompt and generate through
  a fresh cache (``prefill`` then ``model.generate``).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from transformers import Cache, Pipeline, PreTrainedModel

from hf_kvcache.prefill import prefill
from hf_kvcache.registry import build_cache


def copy_cache(cache: Cache) -> Cache:
    """A copy of ``cache`` that shares no tensor with it: the held tensors are copied (as many bytes as
    ``cache_nbytes(cache)``), what belongs to the model (its rotary module, hooks) is shared."""
    return copy.deepcopy(cache)


@torch.no_grad()
def ask(
    model: PreTrainedModel,
    tokenizer: Any,
    context: str,
    questions: str | list[str],
    cache: str | Cache = "full",
    max_new_tokens: int = 64,
    chunk_size: int = 512,
    **generate_kwargs: Any,
) -> list[str]:
    """Put ``context`` through ``cache`` once, then answer each of ``questions`` from a copy of it.

    Each answer equals what ``model.generate`` gives for the context followed by the question, through a cache
    that compressed the context first (tested), at the cost of one prefill for all questions and one copy of
    the compressed cache per question.

    Args:
        model: a causal LM.
        tokenizer: its tokenizer; the context is tokenized with its special tokens, each question without.
        context: the text to hold.
        questions: one question or several; each is appended to the context as is (add your own separator,
            e.g. ``"\\n\\nQuestion: ...\\nAnswer:"``).
        cache: a spec string (``"snapkv:budget=256"``, any registered strategy or composition) or a fresh
            cache built for ``model``. Default ``"full"``.
        max_new_tokens: tokens generated per answer. Default 64.
        chunk_size: tokens per forward while the context goes in (bounded memory for long contexts).
            Default 512.
        generate_kwargs: more ``model.generate`` options (greedy unless ``do_sample=True``).

    Returns:
        The answers, one per question, without the context and question.

    Example:
        >>> ask(model, tokenizer, long_document, ["\\nWho wrote it?", "\\nWhen?"], cache="tova:budget=512")
    """
    questions = [questions] if isinstance(questions, str) else list(questions)
    if not questions:
        raise ValueError("ask needs at least one question")
    held = build_cache(cache, model) if isinstance(cache, str) else cache
    if held.get_seq_length() != 0:
        raise ValueError(
            f"ask needs a fresh cache; this one already holds {held.get_seq_length()} tokens. Pass a spec "
            "string or build a new cache"
        )
    context_ids = tokenizer(context, return_tensors="pt").input_ids.to(model.device)
    prefill(model, context_ids, held, chunk_size=chunk_size, leave_last=False)
    # A cache that compresses a whole context at once (kvzip) does it now, before any question exists.
    if hasattr(held, "compress_context"):
        held.compress_context()
    options = {"do_sample": False, "max_new_tokens": max_new_tokens, **generate_kwargs}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    options.setdefault("pad_token_id", pad)
    answers = []
    for question in questions:
        question_ids = tokenizer(question, return_tensors="pt", add_special_tokens=False).input_ids
        if question_ids.shape[1] == 0:
            raise ValueError(f"question {question!r} has no tokens; every question must add at least one")
        ids = torch.cat([context_ids, question_ids.to(model.device)], dim=1)
        out = model.generate(input_ids=ids, past_key_values=copy_cache(held), **options)
        answers.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    return answers


class KVCacheQAPipeline(Pipeline):
    """``pipeline("kv-cache-qa", model=..., cache="snapkv:budget=256")``: :func:`ask` as a transformers
    pipeline. Call it with ``context=`` and ``questions=`` (one or several); it returns the answers.
    Register the task once with :func:`register_pipeline`."""

    _pipeline_calls_generate = True

    def __init__(self, *args: Any, cache: str = "full", chunk_size: int = 512, **kwargs: Any):
        self.cache_spec, self.chunk_size = cache, chunk_size
        super().__init__(*args, **kwargs)

    def _sanitize_parameters(self, **kwargs: Any):
        forward = {name: kwargs.pop(name) for name in list(kwargs) if name in ("max_new_tokens", "cache")}
        forward.update(kwargs)
        return {}, forward, {}

    def __call__(self, context: str, questions: str | list[str], **kwargs: Any) -> list[str]:
        return super().__call__({"context": context, "questions": questions}, **kwargs)

    def preprocess(self, inputs: dict) -> dict:
        return inputs

    def _forward(self, inputs: dict, cache: str | None = None, **generate_kwargs: Any) -> list[str]:
        spec = cache or self.cache_spec
        questions = inputs["questions"]
        return ask(
            self.model,
            self.tokenizer,
            inputs["context"],
            questions,
            spec,
            chunk_size=self.chunk_size,
            **generate_kwargs,
        )

    def postprocess(self, answers: list[str]) -> list[str]:
        return answers


def register_pipeline(task: str = "kv-cache-qa") -> str:
    """Make ``transformers.pipeline(task, model=..., cache=...)`` build a :class:`KVCacheQAPipeline` (once per
    process; importing hf-kvcache registers nothing by itself). Returns ``task``."""
    from transformers import AutoModelForCausalLM
    from transformers.pipelines import PIPELINE_REGISTRY

    if task not in PIPELINE_REGISTRY.get_supported_tasks():
        PIPELINE_REGISTRY.register_pipeline(
            task, pipeline_class=KVCacheQAPipeline, pt_model=AutoModelForCausalLM
        )
    return task
