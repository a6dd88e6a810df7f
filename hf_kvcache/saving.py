"""Saved caches: ``save_cache(cache, path)`` (or ``cache.save(path)``) and ``load_cache(path, model)``.

A saved cache is one safetensors file holding exactly the tensors the cache holds, as it holds them (packed
codes stay packed, preallocated slots stay preallocated), named ``layers.<i>.<name>``
(``layers.<i>.<part>.<name>`` for a part such as the packed store). Its metadata holds the strategy spec, the
model geometry the cache was built for, each layer's counters, the package version, the file format version
and a SHA-256 of the tensor bytes. Loading checks all of that before it builds anything, so a file for another
geometry, a truncated or corrupted file or one of an incompatible format gets an error naming the mismatch,
and the model and every other cache are left as they were.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from transformers import Cache, DynamicCache, PreTrainedModel

from hf_kvcache.base import KVCache
from hf_kvcache.held import HeldTensors
from hf_kvcache.layout import attention_layout

FORMAT = "hf-kvcache-cache"
FORMAT_VERSION = 1
PLAIN = (bool, int, float, str, type(None))


def _geometry_of_model(model: PreTrainedModel) -> dict:
    layout = attention_layout(model)
    return {
        "layers": layout.num_layers,
        "key_value_heads": layout.num_key_value_heads,
        "head_dim": layout.head_dim,
        "layer_types": list(layout.layer_types),
        "windows": list(layout.windows),
    }


def _layer_tensors(layer: Any) -> dict[str, torch.Tensor | None]:
    """The tensors a layer holds by name: its declarations (and its parts', as ``part.name``) for ours, every
    tensor attribute for transformers' own layers."""
    if not isinstance(layer, HeldTensors):
        return {name: value for name, value in vars(layer).items() if isinstance(value, torch.Tensor)}
    found = {d.name: getattr(layer, d.name) for kind in ("row", "slot") for d in layer.declared(kind)}
    for declared in layer.declared("part"):
        part = getattr(layer, declared.name)
        if part is not None:
            found |= {f"{declared.name}.{name}": t for name, t in _layer_tensors(part).items()}
    return found


def _plain_state(obj: Any) -> dict:
    """The counters and flags of a layer (and of its parts): every attribute of a plain JSON type."""
    state = {name: value for name, value in vars(obj).items() if isinstance(value, PLAIN)}
    if isinstance(obj, HeldTensors):
        for declared in obj.declared("part"):
            part = getattr(obj, declared.name)
            if part is not None:
                state[declared.name] = _plain_state(part)
    return state


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_cache(cache: Cache, path: str | Path, model: PreTrainedModel | None = None) -> Path:
    """Write ``cache`` to the safetensors file ``path``; see the module docstring. Returns the path.

    Args:
        cache: one of this package's caches, or a ``DynamicCache`` (the ``full`` strategy).
        path: the file to write.
        model: the model the cache serves; needed only for a ``DynamicCache``, which does not know its model's
            geometry. Default ``None``.
    """
    from safetensors.torch import save_file

    import hf_kvcache
    from hf_kvcache.registry import spec_of

    if isinstance(cache, KVCache):
        layout = cache.layout
        geometry = {
            "layers": layout.num_layers,
            "key_value_heads": layout.num_key_value_heads,
            "head_dim": layout.head_dim,
            "layer_types": list(layout.layer_types),
            "windows": list(layout.windows),
        }
    elif isinstance(cache, DynamicCache):
        if model is None:
            raise ValueError(
                "saving a DynamicCache needs the model it serves: save_cache(cache, path, model)"
            )
        geometry = _geometry_of_model(model)
    else:
        raise TypeError(
            f"save_cache takes this package's caches or a DynamicCache, got {type(cache).__name__}"
        )
    tensors, layers = {}, []
    for index, layer in enumerate(cache.layers):
        present = {name: t for name, t in _layer_tensors(layer).items() if t is not None}
        for name, tensor in present.items():
            tensors[f"layers.{index}.{name}"] = tensor.detach().to("cpu").contiguous().clone()
        dtype = getattr(layer, "dtype", None)
        layers.append(
            {
                "class": type(layer).__name__,
                "state": _plain_state(layer),
                "tensors": sorted(present),
                "dtype": None if dtype is None else str(dtype).replace("torch.", ""),
            }
        )
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "hf_kvcache_version": hf_kvcache.__version__,
        "spec": spec_of(cache),
        "geometry": json.dumps(geometry),
        "layers": json.dumps(layers),
        "checksum": _checksum(tensors),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path


def _read(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise FileNotFoundError(f"no saved cache at {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except SafetensorError as error:
        raise ValueError(
            f"{path} is not a readable safetensors file (truncated or corrupted?): {error}"
        ) from None
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is not a saved hf-kvcache cache (format {metadata.get('format')!r})")
    if metadata.get("format_version") != str(FORMAT_VERSION):
        raise ValueError(
            f"{path} was written by hf-kvcache {metadata.get('hf_kvcache_version')} in cache format "
            f"{metadata.get('format_version')}; this hf-kvcache reads format {FORMAT_VERSION} only"
        )
    if _checksum(tensors) != metadata.get("checksum"):
        raise ValueError(f"{path} is corrupted: its tensors do not match the checksum written with them")
    return metadata, tensors


def _layer_device(model: PreTrainedModel, index: int) -> torch.device:
    """Where layer ``index``'s keys live: the device of that layer's attention module (sharded models)."""
    from hf_kvcache.model_hooks import attention_modules

    modules = attention_modules(model)
    if index < len(modules):
        parameter = next(modules[index].parameters(), None)
        if parameter is not None:
            return parameter.device
    return model.device


def load_cache(path: str | Path, model: PreTrainedModel) -> Cache:
    """Read a cache that :func:`save_cache` wrote, for ``model``, which must have the geometry it was saved
    with; generation continues from it token for token as it would have from the saved cache.

    Args:
        path: the file :func:`save_cache` wrote.
        model: the model to serve (the same model, or one of the same attention geometry).
    """
    from hf_kvcache.registry import build_cache

    path = Path(path)
    metadata, tensors = _read(path)
    saved, expected = json.loads(metadata["geometry"]), _geometry_of_model(model)
    if saved != expected:
        raise ValueError(
            f"{path} holds a cache for a model with geometry {saved}, but {type(model).__name__} has "
            f"{expected}; load it into the model it was saved from"
        )
    layers = json.loads(metadata["layers"])
    cache = build_cache(metadata["spec"], model)
    classes = [type(layer).__name__ for layer in cache.layers]
    if classes != [layer["class"] for layer in layers]:
        raise ValueError(f"{path} holds layers {[x['class'] for x in layers]}, but its spec builds {classes}")
    for index, (layer, saved_layer) in enumerate(zip(cache.layers, layers, strict=True)):
        if saved_layer["dtype"] is None:
            continue  # the layer never saw a token
        own = {
            name[len(f"layers.{index}.") :]: t
            for name, t in tensors.items()
            if name.startswith(f"layers.{index}.")
        }
        _restore_layer(layer, saved_layer, own, _layer_device(model, index))
    return cache


def _restore_layer(layer: Any, saved: dict, tensors: dict[str, torch.Tensor], device: torch.device) -> None:
    dtype = getattr(torch, saved["dtype"])
    like = next(t for name, t in tensors.items() if t.dim() == 4 and t.is_floating_point())
    empty = torch.empty(like.shape[0], like.shape[1], 0, like.shape[3], dtype=dtype, device=device)
    layer.lazy_initialization(empty, empty.clone())  # builds the layer's parts, sets its dtype and device
    _set_state(layer, saved["state"])
    for name in (
        [d.name for kind in ("row", "slot") for d in layer.declared(kind)]
        if isinstance(layer, HeldTensors)
        else []
    ):
        setattr(layer, name, None)
    for name, tensor in tensors.items():
        *parts, attribute = name.split(".")  # a part's tensors are ``part.name``, a part of a part's too
        owner = layer
        for part in parts:
            owner = getattr(owner, part)
        setattr(owner, attribute, tensor.to(device))


def _set_state(obj: Any, state: dict) -> None:
    for name, value in state.items():
        if isinstance(value, dict):
            _set_state(getattr(obj, name), value)
        else:
            setattr(obj, name, value)
