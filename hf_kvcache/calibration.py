"""Per-layer code widths for the quantized cache, from a calibration pass over text.

Layers differ in how much the model suffers from their coarse keys or values (the bisection in the README:
keys, and some layers, are where the bits must go). ``hf-kvcache calibrate`` runs the model over corpus text,
and for every layer and every width in :data:`WIDTHS` quantizes that layer's keys (or values) with the cache's
own store and measures the KL divergence this adds to the next-token predictions of the last tokens
(:func:`calibrate_quantization`): the text's own continuation, or (``probe='recall'``) spans of the context
repeated, whose predictions depend on finding them again, as a needle's retrieval does; or
(``probe='text+recall'``) the sum of both costs, so the widths serve running text and retrieval at once.
``quantized:calibrated_bits=B`` then gives each layer's keys and values the widths that minimize the summed
divergence at a mean of ``B`` bits per code.

File format (JSON, one per model and quantization setting, under ``$HF_KVCACHE_HOME/calibration/``)::

    {"format": "hf-kvcache quantization calibration", "version": 1,
     "model": "<name or path>", "geometry": {"num_layers": L, "num_key_value_heads": H, "head_dim": D},
     "options": {"group_size": 64, "residual_length": 0, "num_sink_tokens": 4, "rotation": "hadamard",
                 "keys": "pre_rope", "backend": "torch"},
     "tokens": 2048, "probe_tokens": 256, "probe": "text",
     "kl_divergence": {"keys": {"2": [L floats], "3": [...], "4": [...], "8": [...]}, "values": {...}}}

``options`` also holds ``outliers``, ``outliers_keys``, ``outliers_values`` and ``clipping`` when the setting
sets them. Under ``clipping='calibrated'`` the costs are measured twice: ``kl_divergence`` without clipping
and ``kl_divergence_mse`` (same shape) with ``clipping='mse'``; each layer then takes, at its width,
whichever costs less for its keys and for its values. Files without ``probe`` were probed with ``text``;
files without ``"8"`` were made before 8-bit codes were measured, and their widths stay within 2-4. Under
``scales='float8'`` a layer given 8-bit keys or values keeps its scales in the model's dtype.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import re
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel

from hf_kvcache.layout import AttentionLayout, attention_layout
from hf_kvcache.width_allocation import (
    CLIPPED,
    WIDTHS,
    allocate_clipping,
    allocate_widths,
    layer_scales,
    measured_widths,
)

FORMAT, VERSION = "hf-kvcache quantization calibration", 1
PROBES = ("text", "recall", "text+recall")
RECALL_SPANS = 4  # pieces the recall probe copies, from evenly spaced depths of the context
# The options a calibration depends on (the widths are what it chooses).
CALIBRATED_OPTIONS = ("group_size", "residual_length", "num_sink_tokens", "rotation", "keys", "backend")
OUTLIER_OPTIONS = ("outliers", "outliers_keys", "outliers_values")


def model_name(model: PreTrainedModel) -> str:
    return str(getattr(model.config, "name_or_path", "") or type(model).__name__)


def geometry(layout: AttentionLayout) -> dict:
    return {
        "num_layers": layout.num_layers,
        "num_key_value_heads": layout.num_key_value_heads,
        "head_dim": layout.head_dim,
    }


def calibrated_options(options: Any) -> dict:
    # Outlier fractions and clipping join the setting only when set, so that files made before them keep
    # their names.
    found = {name: getattr(options, name) for name in CALIBRATED_OPTIONS}
    found |= {name: getattr(options, name) for name in OUTLIER_OPTIONS if getattr(options, name)}
    return found | ({"clipping": options.clipping} if options.clipping != "none" else {})


def default_calibration_path(model: PreTrainedModel, options: Any) -> Path:
    """Where ``hf-kvcache calibrate`` writes, and ``calibrated_bits`` reads, the file for ``model``."""
    from hf_kvcache.evaluation.model import cache_home

    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", model_name(model).strip("/"))[-80:]
    setting = hashlib.sha1(json.dumps(calibrated_options(options), sort_keys=True).encode()).hexdigest()[:10]
    return cache_home() / "calibration" / f"{slug}-{setting}.json"


def cache_holding(model: PreTrainedModel, prefix: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    """A ``DynamicCache`` holding each layer's ``(keys, values)`` of ``prefix``, to run tokens over."""
    cache = DynamicCache(config=model.config)
    for index, (keys, values) in enumerate(prefix):
        cache.update(keys, values, index)
    return cache


def check_calibrated_bits(options: Any) -> None:
    """For :class:`~hf_kvcache.strategies.quantized.QuantizedOptions`: its ``calibrated_bits`` and
    ``calibration``."""
    if options.calibrated_bits is None:
        if options.calibration is not None and options.clipping != "calibrated":
            raise ValueError(
                f"calibration={options.calibration!r} is read only with calibrated_bits=... or "
                "clipping='calibrated'"
            )
        return
    low, high = min(WIDTHS), max(WIDTHS)
    if isinstance(options.calibrated_bits, bool) or not low <= options.calibrated_bits <= high:
        raise ValueError(
            f"calibrated_bits must be a number in [{low}, {high}], got {options.calibrated_bits!r}"
        )
    from hf_kvcache.strategies.packing import codes_per_packing_unit

    unit = max(codes_per_packing_unit(width) for width in WIDTHS)
    if options.group_size % unit:
        raise ValueError(
            f"calibrated_bits needs a group_size that is a multiple of {unit} (a layer may get 3-bit "
            f"codes, which fill bytes {unit} at a time), got group_size={options.group_size}"
        )
    for name in ("nbits_keys", "nbits_values"):
        if getattr(options, name) is not None:
            raise ValueError(
                f"{name}={getattr(options, name)} and calibrated_bits={options.calibrated_bits} both set "
                "code widths; give one of them"
            )


def recall_probe(input_ids: torch.Tensor, probe_tokens: int) -> torch.Tensor:
    """``input_ids`` (``[1, T]``) with its last ``probe_tokens`` tokens replaced by :data:`RECALL_SPANS`
    spans of the rest, copied from evenly spaced depths: predicting a copied span's tokens is easy for a model
    that finds where it came from and hard for one that does not, so the probe measures retrieval."""
    context = input_ids[:, :-probe_tokens]
    if probe_tokens < RECALL_SPANS or context.shape[1] < probe_tokens:
        raise ValueError(
            f"probe='recall' copies {RECALL_SPANS} spans of the context into the probe: it needs "
            f"probe_tokens >= {RECALL_SPANS} and a context at least as long, got probe_tokens={probe_tokens} "
            f"of {input_ids.shape[1]} tokens"
        )
    lengths = [probe_tokens // RECALL_SPANS + (i < probe_tokens % RECALL_SPANS) for i in range(RECALL_SPANS)]
    starts = [int((i + 0.5) / RECALL_SPANS * (context.shape[1] - n)) for i, n in enumerate(lengths)]
    return torch.cat([context, *(context[:, a : a + n] for a, n in zip(starts, lengths, strict=True))], 1)


@torch.no_grad()
def calibrate_quantization(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    options: Any,
    probe_tokens: int = 256,
    probe: str = "text",
) -> dict:
    """Measure what quantizing each layer's keys, or its values, at each width of :data:`WIDTHS` costs the
    model's next-token distribution.

    The context (all but the last ``probe_tokens`` tokens) goes in once. Then, one layer and one of keys or
    values at a time, that part of the context is quantized with the cache's own store (sinks and residual
    as in ``options``) and the last ``probe_tokens`` tokens are run over it; the cost is the mean KL
    divergence of their next-token distributions from the exact run's. Keys and values are measured on the
    same scale, so the widths go where the model's output needs them (a layer-by-layer attention error would
    count value noise that later layers average away as if it were a key that points elsewhere).

    Args:
        model: the model to calibrate.
        input_ids: ``[1, T]`` corpus tokens (``T`` > ``probe_tokens``).
        options: a :class:`~hf_kvcache.strategies.quantized.QuantizedOptions`; its group size, residual,
            sinks, rotation and key mode are the setting calibrated.
        probe_tokens: the last tokens whose predictions are compared. Default 256.
        probe: ``'text'``, the corpus' own last tokens; ``'recall'``, spans of the context copied in their
            place (:func:`recall_probe`), which weighs what the model needs to find earlier tokens again;
            or ``'text+recall'``, both calibrations' costs summed (twice the forwards). Default ``'text'``.

    Returns:
        The calibration record (see the module docstring for the format).
    """
    from hf_kvcache.strategies.quantized import QuantizedLayer
    from hf_kvcache.strategies.rotation import key_ropes

    total = input_ids.shape[1]
    if total <= probe_tokens:
        raise ValueError(f"calibration needs more than probe_tokens={probe_tokens} tokens, got {total}")
    if probe not in PROBES:
        raise ValueError(f"probe must be one of {list(PROBES)}, got {probe!r}")
    if probe == "text+recall":
        # The recall costs run several times the text's (more of the probe depends on one layer's keys), so
        # their sum gives retrieval layers their widths and keeps what the text needs where recall is cheap.
        text, recall = (
            calibrate_quantization(model, input_ids, options, probe_tokens, p) for p in PROBES[:2]
        )
        return {**text, **summed_costs(text, recall), "probe": probe}
    if probe == "recall":
        input_ids = recall_probe(input_ids, probe_tokens)
    context, probe_ids = input_ids[:, :-probe_tokens], input_ids[:, -probe_tokens:]
    layout = attention_layout(model)
    exact_cache = DynamicCache(config=model.config)
    model(context, past_key_values=exact_cache)
    prefix = [(layer.keys, layer.values) for layer in exact_cache.layers]
    exact = model(probe_ids, past_key_values=cache_holding(model, prefix)).logits.float().log_softmax(-1)
    ropes = key_ropes(model, layout) if options.keys == "pre_rope" else [None] * layout.num_layers
    # Under clipping='calibrated' every width is measured without and with clipping, for the layer to choose.
    clippings = {"kl_divergence": options.clipping}
    if options.clipping == "calibrated":
        clippings = {"kl_divergence": "none", CLIPPED: "mse"}
    costs: dict[str, dict[str, dict[str, list[float]]]] = {
        entry: {"keys": {}, "values": {}} for entry in clippings
    }
    for index, (keys, values) in enumerate(prefix):
        for (entry, clipping), width in itertools.product(clippings.items(), WIDTHS):
            setting = dataclasses.replace(
                options,
                nbits_keys=width,
                nbits_values=width,
                calibrated_bits=None,
                clipping=clipping,
                scales=layer_scales(options.scales, width, width),
            )
            store = QuantizedLayer(setting, layout.window(index), ropes[index])
            store.update(keys, values)
            held = store.keys.shape[2]  # a local layer's store may let go of what is behind its window
            for kind, replaced in (
                ("keys", (store.keys, values[:, :, -held:])),
                ("values", (keys[:, :, -held:], store.values)),
            ):
                layers = [*prefix[:index], replaced, *prefix[index + 1 :]]
                logits = model(probe_ids, past_key_values=cache_holding(model, layers)).logits.float()
                divergence = (exact.exp() * (exact - logits.log_softmax(-1))).sum(-1).mean().item()
                costs[entry][kind].setdefault(str(width), []).append(divergence)
    return {
        "format": FORMAT,
        "version": VERSION,
        "model": model_name(model),
        "geometry": geometry(layout),
        "options": calibrated_options(options),
        "tokens": total,
        "probe_tokens": probe_tokens,
        "probe": probe,
        **costs,
    }


def summed_costs(first: dict, second: dict) -> dict:
    """The cost entries (``kl_divergence`` and, if measured, ``kl_divergence_mse``) of two calibrations of the
    same setting, added layer by layer."""
    return {
        entry: {
            kind: {
                width: [a + b for a, b in zip(layers, second[entry][kind][width], strict=True)]
                for width, layers in widths.items()
            }
            for kind, widths in kinds.items()
        }
        for entry, kinds in first.items()
        if entry.startswith("kl_divergence")
    }


def read_record(path: str | Path, format: str, version: int, missing: str) -> dict:
    """A calibration file's record, checked to be a ``format`` record of ``version``; ``missing``: the error
    when there is no such file (it should say which command makes one)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(missing)
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not a calibration file: {error}") from None
    if not isinstance(record, dict) or record.get("format") != format or record.get("version") != version:
        raise ValueError(f"{path} is not a version-{version} {format}")
    return record


def load_calibration(path: Path, model: PreTrainedModel, options: Any) -> dict:
    """Read a calibration file and check that it describes ``model``'s geometry and this setting."""
    missing = (
        f"no quantization calibration for {model_name(model)} at {path}; make one with: hf-kvcache "
        f"calibrate --model {model_name(model)} --strategy '{_setting_spec(options)}'"
    )
    record = read_record(path, FORMAT, VERSION, missing)
    expected = geometry(attention_layout(model))
    if record["geometry"] != expected:
        raise ValueError(
            f"the calibration {path} was made for {record['model']} with geometry {record['geometry']}; "
            f"{model_name(model)} has geometry {expected}"
        )
    if record["options"] != calibrated_options(options):
        raise ValueError(
            f"the calibration {path} was made for quantization options {record['options']}, not "
            f"{calibrated_options(options)}; calibrate this setting"
        )
    return record


def _setting_spec(options: Any) -> str:
    return "quantized:" + ",".join(f"{k}={v}" for k, v in calibrated_options(options).items())


def calibrated_layer_options(model: PreTrainedModel, options: Any) -> list[Any]:
    """Each layer's options under ``calibrated_bits`` or ``clipping='calibrated'``: the widths the
    calibration allocates to it (else the options' own), and the clipping it chooses there."""
    path = options.calibration or default_calibration_path(model, options)
    record = load_calibration(path, model, options)
    layers = record["geometry"]["num_layers"]
    widths = [(options.key_nbits, options.value_nbits)] * layers
    measured = measured_widths(record)
    if options.calibrated_bits is not None:
        if options.calibrated_bits > measured[-1]:
            raise ValueError(
                f"calibrated_bits={options.calibrated_bits} is above the widest codes the calibration {path} "
                f"measured ({measured[-1]} bits); calibrate again to measure {list(WIDTHS)}"
            )
        widths = allocate_widths(record, options.calibrated_bits)
    else:  # clipping='calibrated' at fixed widths: the record must hold their costs
        for name, width in (("nbits_keys", options.key_nbits), ("nbits_values", options.value_nbits)):
            if width not in measured:
                raise ValueError(
                    f"{name}={width} with clipping='calibrated': the calibration {path} measured widths "
                    f"{list(measured)}; give one of them or calibrate again to measure {list(WIDTHS)}"
                )
    clippings = [options.clipping] * layers
    if options.clipping == "calibrated":
        clippings = allocate_clipping(record, widths)
    return [
        dataclasses.replace(
            options,
            nbits_keys=keys,
            nbits_values=values,
            calibrated_bits=None,
            calibration=None,
            clipping=clipping,
            scales=layer_scales(options.scales, keys, values),
        )
        for (keys, values), clipping in zip(widths, clippings, strict=True)
    ]
