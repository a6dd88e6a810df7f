"""Compress once, ask many: the answers equal separate generations from a cache that compressed the context
first, the copy per question holds what the cache holds, and the pipeline gives the same answers."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

from hf_kvcache import ask, build_cache, cache_nbytes, prefill, register_pipeline
from hf_kvcache.ask import copy_cache
from tests.conftest import FILLER

QUESTIONS = [" Where does the farmer walk?", " What does the baker sell?", " What shines over the water?"]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(
        tiny_model_dir
    )


def separately(model, tokenizer, context, question, spec):
    """The reference: a fresh cache compresses the context alone, then generate() answers one question."""
    cache = build_cache(spec, model)
    context_ids = tokenizer(context, return_tensors="pt").input_ids
    prefill(model, context_ids, cache, chunk_size=32, leave_last=False)
    if hasattr(cache, "compress_context"):  # compressed before the question exists, as ask does
        cache.compress_context()
    question_ids = tokenizer(question, return_tensors="pt", add_special_tokens=False).input_ids
    ids = torch.cat([context_ids, question_ids], dim=1)
    out = model.generate(
        input_ids=ids, past_key_values=cache, max_new_tokens=6, do_sample=False, pad_token_id=0
    )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


@pytest.mark.parametrize(
    "spec",
    [
        "full",
        "snapkv:budget=24,window_size=4",
        "snapkv:budget=24,window_size=4,head_budgets=adaptive",
        "knorm:budget=0.25,recent=4,head_budgets=adaptive",
        "expected-attention:budget=0.25,recent=4,head_budgets=adaptive,layer_budgets=adaptive",
        "tova:budget=0.25",
        "tova:budget=0.25,head_budgets=adaptive",
        "heavy-hitter:heavy_budget=0.125,recent_budget=8,head_budgets=adaptive",
        "kvzip:budget=0.25,chunk_size=16",
        "sliding-window:window_length=32+quantized:nbits=4,group_size=8,residual_length=8",
    ],
)
def test_answers_equal_separate_generations_through_a_context_compressed_first(tiny, spec):
    model, tokenizer = tiny
    context = FILLER * 2
    answers = ask(model, tokenizer, context, QUESTIONS, cache=spec, max_new_tokens=6, chunk_size=32)
    assert answers == [separately(model, tokenizer, context, q, spec) for q in QUESTIONS]


def test_a_copy_holds_the_same_bytes_and_shares_nothing(tiny):
    model, tokenizer = tiny
    cache = build_cache("heavy-hitter:heavy_budget=8,recent_budget=8", model)
    prefill(model, tokenizer(FILLER, return_tensors="pt").input_ids, cache, chunk_size=16)
    copied = copy_cache(cache)
    assert cache_nbytes(copied) == cache_nbytes(cache)
    mine = {t.untyped_storage().data_ptr() for layer in cache.layers for t in layer.held_tensors()}
    theirs = {t.untyped_storage().data_ptr() for layer in copied.layers for t in layer.held_tensors()}
    assert mine.isdisjoint(theirs)
    assert copied.layers[0].state is not cache.layers[0].state  # its own padding state, shared by its layers
    assert copied.layers[0].state is copied.layers[1].state


def test_the_pipeline_gives_the_same_answers(tiny):
    model, tokenizer = tiny
    task = register_pipeline()
    qa = pipeline(task, model=model, tokenizer=tokenizer, cache="tova:budget=16")
    got = qa(context=FILLER, questions=QUESTIONS[:2], max_new_tokens=5)
    assert got == ask(model, tokenizer, FILLER, QUESTIONS[:2], cache="tova:budget=16", max_new_tokens=5)


def test_bad_questions_and_used_caches_are_named(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="ask needs at least one question"):
        ask(model, tokenizer, FILLER, [])
    with pytest.raises(ValueError, match="question '' has no tokens"):
        ask(model, tokenizer, FILLER, [""])
    used = build_cache("tova:budget=16", model)
    prefill(model, tokenizer(FILLER, return_tensors="pt").input_ids, used)
    with pytest.raises(ValueError, match="ask needs a fresh cache; this one already holds"):
        ask(model, tokenizer, FILLER, QUESTIONS[0], cache=used)
