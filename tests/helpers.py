"""Helpers and tables shared by several test modules, and the generic checks every strategy must pass.

LOSSLESS holds, per strategy, a spec that keeps every token of the short runs of the tests: it must reproduce
DynamicCache's output token for token. LOSSY holds specs that really compress: they must run in every mode,
and an eviction strategy must choose the same entries on its decoding path as on its general path.
"""

from __future__ import annotations

import dataclasses
import inspect
import re

import torch
from transformers import DynamicCache

from hf_kvcache import build_cache, cache_nbytes
from hf_kvcache.registry import get_strategy
from hf_kvcache.strategies.eviction import EvictingLayer
from tests.conftest import left_padded_ids, make_tiny_model, random_ids

LOSSLESS = {
    "full": "full",
    "duo": "duo:retrieval=0.0,window=64",
    # Every head retrieving, the residual holding every token: nothing is packed.
    "duo+quantized": "duo:retrieval=1.0+quantized:nbits=2,group_size=8,residual_length=64",
    "quantized": "quantized:nbits=2,group_size=8,residual_length=64",
    "sliding-window": "sliding-window:window_length=64,num_sink_tokens=4",
    "heavy-hitter": "heavy-hitter:heavy_budget=32,recent_budget=32",
    "knorm": "knorm:budget=64,num_sink_tokens=4,recent=8",
    "tova": "tova:budget=64",
    "expected-attention": "expected-attention:budget=64,num_sink_tokens=4,recent=8",
    "snapkv": "snapkv:budget=64,window_size=8",
    "kvzip": "kvzip:budget=64,chunk_size=8,prompt=none",
    # A context within the budget is kept as it came: nothing is evicted, nothing packed.
    "kvzip+quantized": "kvzip:budget=64,chunk_size=8,prompt=none+quantized:nbits=4,group_size=8",
    "sliding-window+quantized": (
        "sliding-window:window_length=64+quantized:nbits=2,group_size=8,residual_length=64"
    ),
    "heavy-hitter+quantized": (
        "heavy-hitter:heavy_budget=8,recent_budget=64+quantized:group_size=8,residual_length=64"
    ),
    "knorm+quantized": "knorm:budget=80,recent=72+quantized:nbits=2,group_size=8,residual_length=64",
    "expected-attention+quantized": (
        "expected-attention:budget=80,recent=72+quantized:nbits=2,group_size=8,residual_length=64"
    ),
}
LOSSY = {
    "full": "full",
    "duo": "duo:retrieval=0.0,window=8,num_sink_tokens=2",
    "duo+quantized": "duo:retrieval=1.0+quantized:nbits=2,group_size=8,residual_length=4",
    "quantized": "quantized:nbits=2,group_size=8,residual_length=8",
    "sliding-window": "sliding-window:window_length=12,num_sink_tokens=4",
    "heavy-hitter": "heavy-hitter:heavy_budget=6,recent_budget=6",
    "knorm": "knorm:budget=12,num_sink_tokens=2,recent=4",
    "tova": "tova:budget=12",
    "expected-attention": "expected-attention:budget=12,num_sink_tokens=2,recent=4",
    "snapkv": "snapkv:budget=12,window_size=4,kernel_size=3",
    "kvzip": "kvzip:budget=8,chunk_size=8,prompt=none",
    "kvzip+quantized": "kvzip:budget=8,chunk_size=8,prompt=none+quantized:nbits=4,group_size=8",
    "sliding-window+quantized": (
        "sliding-window:window_length=16+quantized:nbits=2,group_size=8,residual_length=4"
    ),
    "heavy-hitter+quantized": (
        "heavy-hitter:heavy_budget=8,recent_budget=8+quantized:group_size=8,residual_length=4"
    ),
    "knorm+quantized": "knorm:budget=20,recent=11+quantized:nbits=2,group_size=8,residual_length=4",
    "expected-attention+quantized": (
        "expected-attention:budget=20,recent=11+quantized:nbits=2,group_size=8,residual_length=4"
    ),
}
# Options of the quantized store below 4 bits, alone and under eviction (not strategies of their own).
QUANTIZATION_VARIANTS = [
    "quantized:nbits=3,group_size=8,residual_length=8",
    "quantized:nbits=2,nbits_keys=4,group_size=8,residual_length=8",
    "quantized:nbits=3,nbits_values=2,group_size=8,residual_length=8,rotation=hadamard",
    "quantized:nbits=2,group_size=8,residual_length=8,keys=pre_rope,rotation=hadamard-values",
    "sliding-window:window_length=20+quantized:nbits=3,group_size=8,residual_length=4,rotation=hadamard",
    "heavy-hitter:heavy_budget=8,recent_budget=8+quantized:nbits=2,nbits_keys=3,group_size=8,residual_length=4",
    "quantized:nbits=2,nbits_keys=3,group_size=8,residual_length=8,outliers=0.1,outliers_values=0.05,"
    "rotation=hadamard,keys=pre_rope",
    "sliding-window:window_length=20+quantized:nbits=2,group_size=8,residual_length=4,outliers=0.1",
    "kvzip:budget=0.5,prompt=none+quantized:nbits=4,nbits_values=2,group_size=8,rotation=hadamard",
    # Scales and zero points in float8: the grouped store with pre-RoPE keys, the slots, the ragged store.
    "quantized:nbits=3,nbits_values=2,group_size=8,residual_length=8,rotation=hadamard,keys=pre_rope,scales=float8",
    "heavy-hitter:heavy_budget=8,recent_budget=8+quantized:nbits=2,group_size=8,residual_length=4,scales=float8",
    "kvzip:budget=0.5,prompt=none+quantized:nbits=4,group_size=8,rotation=hadamard,scales=float8",
    # Ranges of least squared error: the grouped store with pre-RoPE keys and float8 scales, the slots
    # (values only).
    "quantized:nbits=2,nbits_keys=3,group_size=8,residual_length=8,rotation=hadamard,keys=pre_rope,"
    "scales=float8,clipping=mse",
    "sliding-window:window_length=20+quantized:nbits=2,group_size=8,residual_length=4,clipping=mse-values",
]

# --- what the harness tests run: tiny model, filler text, few tokens -----------------------------------
HARNESS_STRATEGIES = [
    "full",
    "quantized:nbits=2,group_size=8,residual_length=16",
    "sliding-window:window_length=32,num_sink_tokens=4",
    "heavy-hitter:heavy_budget=16,recent_budget=16",
]


def command_line(
    command: str, model_dir, text_file, out, options: dict, strategies: list[str], extra
) -> list:
    """``hf-kvcache COMMAND`` on the tiny model and filler text, on CPU, with ``options`` (flag: value or
    values) and ``strategies``, then ``extra`` arguments."""
    argv = [command, "--model", model_dir, "--text-file", text_file, "--out", str(out), "--device", "cpu"]
    for flag, value in options.items():
        argv += [flag, *(value if isinstance(value, list) else [value])]
    return [*argv, "--strategies", *strategies, *extra]


def compare_args(model_dir, text_file, out, *extra):
    options = {
        "--max-tokens": "128",
        "--decode-tokens": "3",
        "--passkey-lengths": "96",
        "--passkey-depths": ["0.2", "0.8"],
    }
    return command_line("compare", model_dir, text_file, out, options, HARNESS_STRATEGIES, extra)


SCALE_STRATEGIES = [
    "full",
    "sliding-window:window_length=32+quantized:nbits=4,group_size=8,residual_length=8",
]


def scale_args(model_dir, text_file, out, *extra):
    options = {"--lengths": ["64", "128", "256"], "--decode-tokens": "2", "--prefill-chunk-size": "32"}
    return command_line("scale", model_dir, text_file, out, options, SCALE_STRATEGIES, extra)


PROMPT, NEW = 24, 12
MODES = {
    "greedy": dict(do_sample=False),
    "beam": dict(do_sample=False, num_beams=3),
    "sample": dict(do_sample=True, top_k=20),
}


def left_padded_batch():
    """Three rows of ``PROMPT`` tokens, left-padded by 0, 5 and 11."""
    return left_padded_ids(PROMPT, pads=(0, 5, 11), seed=5)


def generate(model, cache, mode: str, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``NEW`` tokens from ``model.generate`` in ``mode`` (seeded), through ``cache``."""
    torch.manual_seed(0)
    options = dict(max_new_tokens=NEW, min_new_tokens=NEW, pad_token_id=0, **MODES[mode])
    return model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, **options)


def decode(model, spec, ids, mask=None, mode: str = "greedy", new: int = 24):
    """Generate ``new`` tokens through ``spec`` (a spec string or a built cache) in ``mode`` (seeded), with
    their logits: tokens, logits, cache."""
    cache = build_cache(spec, model) if isinstance(spec, str) else spec
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            past_key_values=cache,
            max_new_tokens=new,
            min_new_tokens=new,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
            **MODES[mode],
        )
    return out.sequences, torch.stack(out.logits), cache


def record_calls(monkeypatch, owner: type, name: str) -> list:
    """Patch method ``name`` of ``owner`` to append its instance to the returned list on every call."""
    calls = []
    original = getattr(owner, name)

    def recording(self, *args, **kwargs):
        calls.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(owner, name, recording)
    return calls


def stream(model, ids: torch.Tensor, cache, chunk: int) -> torch.Tensor:
    """Feed ``ids`` through ``cache`` ``chunk`` tokens at a time; every position's logits."""
    with torch.no_grad():
        pieces = [
            model(ids[:, s : s + chunk], past_key_values=cache).logits for s in range(0, ids.shape[1], chunk)
        ]
    return torch.cat(pieces, 1)


def eager_weights(arch: str, ids: torch.Tensor, layer: int) -> torch.Tensor:
    """Attention weights ``[B, H_q, T, T]`` of one cache-free eager forward of the tiny ``arch`` model."""
    eager = make_tiny_model(arch, attn="eager")
    with torch.no_grad():
        return eager(ids, output_attentions=True).attentions[layer]


def bookkeeping_bytes(cache) -> int:
    """What eviction layers hold beyond the tokens: two int64 counters per row (real tokens seen and held);
    for H2O, a float32 accumulated score per held entry; for expected attention, float32 query statistics
    (a mean query per query head, a ``D x D`` moment per KV head, a count per row); for kvzip, the int64 ids
    of the prompt until it is compressed (one tensor, shared by the layers) and its int64 count per row and
    head; for duo, its int64 left padding per row."""
    total, ids = 0, {}
    for layer in cache.layers:
        if getattr(layer, "pads", None) is not None:
            total += layer.pads.nbytes
        if getattr(layer, "context_ids", None) is not None:
            ids[layer.context_ids.data_ptr()] = layer.context_ids.nbytes
        if getattr(getattr(layer, "ragged", None), "counts", None) is not None:
            total += layer.ragged.counts.nbytes
        if isinstance(layer, EvictingLayer):
            total += 8 * (layer.real_seen.numel() + layer.cached_real.numel())
            if getattr(layer, "accumulated", None) is not None:
                total += 4 * layer.scores.numel()
            if getattr(layer, "query_moment", None) is not None:
                batch, heads, dim, _ = layer.query_moment.shape
                query_heads = layer.mean_query.shape[1]
                total += 4 * batch * (query_heads * dim + heads * dim * dim + 1)
    return total + sum(ids.values())


# --- the generic checks every strategy passes (the CONTRIBUTING walk-through runs them on its own example) --
def check_generates_like_dynamic_cache(model, spec: str, mode: str) -> None:
    """A left-padded batch generates exactly what ``DynamicCache`` generates, in ``mode``."""
    ids, mask = left_padded_batch()
    expected = generate(model, DynamicCache(config=model.config), mode, ids, mask)
    assert torch.equal(generate(model, build_cache(spec, model), mode, ids, mask), expected), (spec, mode)


def check_generates_in_every_mode(model, spec: str) -> None:
    """A compressing spec generates the right shape, prompt untouched, in every mode."""
    ids, mask = left_padded_batch()
    for mode in MODES:
        out = generate(model, build_cache(spec, model), mode, ids, mask)
        assert out.shape == (3, PROMPT + NEW) and torch.equal(out[:, :PROMPT], ids), (spec, mode)


def check_never_more_bytes_than_dynamic_cache(model, spec: str) -> None:
    """After every step of a prompt and 24 decoding steps, the cache holds no more bytes than ``DynamicCache``
    (beyond :func:`bookkeeping_bytes`)."""
    ids = random_ids(40, batch=2, seed=1)
    ours, reference = build_cache(spec, model), DynamicCache(config=model.config)
    with torch.no_grad():
        for t, stop in enumerate([16, *range(17, ids.shape[1] + 1)]):
            start = 0 if t == 0 else stop - 1
            for cache in (ours, reference):
                model(ids[:, start:stop], past_key_values=cache)
            held = cache_nbytes(ours) - bookkeeping_bytes(ours)
            assert held <= cache_nbytes(reference), f"{spec}: after {stop} tokens"


def check_decoding_path_agrees_with_general_path(
    model, spec: str, length: int = 40, prompt: int = 20
) -> bool:
    """Prefill ``prompt`` tokens (general path), then decode the rest one by one: once with decoding steps on
    the in-place path, once with every step forced onto the general path. The logits and the entries held must
    agree. Returns whether the decoding path evicted (a pending victim was left by a decoding step)."""
    ids = random_ids(length, batch=2, seed=7)
    runs, evicted_in_place = [], False
    for in_place in (True, False):
        cache = build_cache(spec, model)
        layers = [layer for layer in cache.layers if isinstance(layer, EvictingLayer)]
        for layer in layers:
            layer.decodes_in_place = layer.decodes_in_place and in_place
        logits = [stream(model, ids[:, :prompt], cache, prompt)]
        for t in range(prompt, length):
            logits.append(stream(model, ids[:, t : t + 1], cache, 1))
            evicted_in_place |= any(layer.pending_victim is not None for layer in layers)
        runs.append((torch.cat(logits, 1), [held_entries(layer) for layer in layers]))
    (logits, held), (general_logits, general_held) = runs
    torch.testing.assert_close(logits, general_logits, rtol=1e-4, atol=1e-5)
    # The same entries, in age order; past layer 0 a key is computed from attention over slots in another
    # order, so it may differ in its last bits.
    for (keys, values), (general_keys, general_values) in zip(held, general_held, strict=True):
        torch.testing.assert_close(keys, general_keys, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(values, general_values, rtol=1e-4, atol=1e-5)
    return evicted_in_place


def held_entries(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values a layer holds: ``keys`` and ``values``, or for a ragged store (different counts per
    head) its flat entries followed by the tail's, flattened the same way (duo: its two groups of heads)."""
    if getattr(layer, "stream_keys", None) is not None:  # duo: retrieval heads, then streaming heads
        packed = layer.retrieval_packed  # duo+quantized: the retrieval heads' store, dequantized
        return tuple(
            torch.cat(
                [
                    (getattr(layer, f"retrieval_{n}") if packed is None else getattr(packed, n)).flatten(
                        0, 2
                    ),
                    getattr(layer, f"stream_{n}").flatten(0, 2),
                ]
            )
            for n in ("keys", "values")
        )
    ragged = getattr(layer, "ragged", None)
    if ragged is None or not ragged.filled:
        return layer.keys, layer.values
    tail = [t[:, :, : layer.stored].flatten(0, 2) for t in (layer.key_buffer, layer.value_buffer)]
    keys, values = (x.to(tail[0].dtype) for x in ragged.entries())  # dequantized when packed
    return torch.cat([keys, tail[0]]), torch.cat([values, tail[1]])


def check_options_are_declared_once_and_documented(name: str) -> None:
    """The cache class of strategy ``name`` takes exactly its options (keywords, positions or a ready options
    object), and its docstring links the paper and documents every option with its default."""
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
    defaults = {f.name: f.default for f in fields}
    for cache in (
        cache_class(model, **defaults),
        cache_class(model, *defaults.values()),
        cache_class(model, strategy.options_class()),
    ):
        assert cache.options == strategy.options_class()
