"""generate() in every mode, for every strategy (the tables of tests/helpers.py), across the tiny
architectures; and every eviction strategy's decoding path choosing what its general path chooses."""

import pytest

from hf_kvcache import build_cache, list_strategies
from hf_kvcache.registry import compositions
from hf_kvcache.strategies.eviction import EvictingLayer
from tests.conftest import make_tiny_model
from tests.helpers import (
    LOSSLESS,
    LOSSY,
    MODES,
    check_decoding_path_agrees_with_general_path,
    check_generates_in_every_mode,
    check_generates_like_dynamic_cache,
)


def test_every_registered_strategy_is_in_the_tables():
    assert sorted(LOSSLESS) == sorted(list_strategies() + compositions()) == sorted(LOSSY)


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("strategy", sorted(LOSSLESS))
def test_lossless_configuration_generates_like_dynamic_cache(tiny_model, strategy, mode):
    check_generates_like_dynamic_cache(tiny_model, LOSSLESS[strategy], mode)


@pytest.mark.parametrize("strategy", sorted(LOSSY))
def test_compressing_configuration_generates_in_every_mode(strategy):
    check_generates_in_every_mode(make_tiny_model("llama-gqa"), LOSSY[strategy])


@pytest.mark.parametrize("strategy", sorted(LOSSY))
@pytest.mark.parametrize("arch", ["llama", "llama-gqa"])
def test_decoding_path_evicts_what_the_general_path_evicts(strategy, arch):
    model = make_tiny_model(arch)
    layers = build_cache(LOSSY[strategy], model).layers
    if not isinstance(layers[0], EvictingLayer):
        pytest.skip(f"{strategy} evicts nothing")
    evicted_in_place = check_decoding_path_agrees_with_general_path(model, LOSSY[strategy])
    # Layers whose decoding steps keep the budget evict there (SnapKV compresses prompts only; quantized
    # storage decodes on the general path).
    assert evicted_in_place == (layers[0].decodes_in_place and layers[0].capacity(1) == layers[0].budget)
