import json

import pytest
import torch
from transformers import DynamicCache

from hf_kvcache import build_cache, cache_nbytes, canonical_spec, list_strategies, parse_spec
from hf_kvcache.registry import split_spec
from tests.conftest import make_tiny_model, random_ids
from tests.helpers import check_options_are_declared_once_and_documented


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
def test_options_are_declared_once_and_documented_with_their_defaults(name, monkeypatch, tmp_path):
    if name == "duo":  # its default retrieval=0.5 reads the model's head calibration: give it one
        from hf_kvcache.calibration import geometry
        from hf_kvcache.head_calibration import FORMAT, VERSION, default_head_calibration_path
        from hf_kvcache.layout import attention_layout

        monkeypatch.setenv("HF_KVCACHE_HOME", str(tmp_path))
        model = make_tiny_model("llama", head_dim=32)
        layout = attention_layout(model)
        record = dict(format=FORMAT, version=VERSION, model=type(model).__name__, geometry=geometry(layout))
        record["scores"] = [[float(h) for h in range(layout.num_key_value_heads)]] * layout.num_layers
        path = default_head_calibration_path(model)
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(record))
    check_options_are_declared_once_and_documented(name)
