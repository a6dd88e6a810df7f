import dataclasses
import inspect
import re

import pytest
import torch
from transformers import DynamicCache

from hf_kvcache import build_cache, cache_nbytes, canonical_spec, list_strategies, parse_spec
from hf_kvcache.registry import get_strategy, split_spec
from tests.conftest import make_tiny_model, random_ids


def test_full_is_dynamic_cache(llama):
    cache = build_cache("full", llama)
    assert type(cache) is DynamicCache
    assert "full" in list_strategies()


def test_split_spec_parses_options():
    assert split_spec("quantized:nbits=2, group-size=32") == ("quantized", {"nbits": "2", "group_size": "32"})
    assert split_spec("full") == ("full", {})


@pytest.mark.parametrize(
    "spec, message",
    [
        ("ful", "Did you mean 'full'"),
        ("nonsense", "unknown strategy 'nonsense'"),
        ("full:window=3", "unknown option"),
        ("full:window", "options are written 'name=value'"),
        ("", "non-empty string"),
    ],
)
def test_bad_specs_get_clear_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_spec(spec)


def test_duplicate_option_is_rejected():
    with pytest.raises(ValueError, match="given twice"):
        split_spec("x:a=1,a=2")


def test_canonical_spec_of_full():
    assert canonical_spec("full") == "full"


def test_cache_nbytes_of_dynamic_cache_counts_keys_and_values(llama):
    cache = DynamicCache(config=llama.config)
    with torch.no_grad():
        llama(random_ids(20, batch=3), past_key_values=cache, use_cache=True)
    config = llama.config
    head_dim = config.hidden_size // config.num_attention_heads
    # keys + values, per layer: batch x kv_heads x tokens x head_dim floats of 4 bytes
    expected = 2 * config.num_hidden_layers * 3 * config.num_key_value_heads * 20 * head_dim * 4
    assert cache_nbytes(cache) == expected


def test_cache_nbytes_rejects_non_caches():
    with pytest.raises(TypeError, match="expects a transformers Cache"):
        cache_nbytes([torch.zeros(3)])


@pytest.mark.parametrize("name", [n for n in list_strategies() if n != "full"])
def test_options_are_declared_once_and_documented_with_their_defaults(name):
    model = make_tiny_model("llama", head_dim=32)  # the quantizer's default groups of 32 channels fit
    strategy = get_strategy(name)
    cache_class = strategy.build
    fields = [f for f in dataclasses.fields(strategy.options_class) if f.init]
    signature = inspect.signature(cache_class)
    assert list(signature.parameters) == ["model", *(f.name for f in fields)]
    doc = inspect.getdoc(cache_class)
    assert "https://arxiv.org/abs/" in doc
    args = doc.split("Args:\n", 1)[1].split("\n\n", 1)[0]
    documented = {
        entry.split(":")[0].strip(): " ".join(entry.replace("``", "").split())
        for entry in re.split(r"\n(?=    \w+: )", args)
    }
    assert list(documented) == ["model", *(f.name for f in fields)]
    for field in fields:
        assert signature.parameters[field.name].default == field.default
        assert documented[field.name].endswith(f"Default {field.default!r}."), documented[field.name]
    # Keywords, positional options and a ready options object build the same cache.
    defaults = {f.name: f.default for f in fields}
    for cache in (
        cache_class(model, **defaults),
        cache_class(model, *defaults.values()),
        cache_class(model, strategy.options_class()),
    ):
        assert cache.options == strategy.options_class()
