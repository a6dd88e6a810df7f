"""Shared base classes: the cache container every strategy builds on, byte accounting, entry gathering.

Tensor shape convention: see :mod:`hf_kvcache.layout` (``[B, H, S, D]``).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import torch
from transformers import Cache, PreTrainedModel
from transformers.cache_utils import CacheLayerMixin

from hf_kvcache.attention import STORAGE_ATTRIBUTE, install_storage_attention
from hf_kvcache.held import HeldTensors
from hf_kvcache.layout import AttentionLayout, attention_layout


def held_tensors(obj: object) -> Iterator[torch.Tensor]:
    """Every tensor an object holds in its attributes, also inside lists, tuples and dicts."""
    stack = list(vars(obj).values())
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            yield item
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())


def tensors_nbytes(tensors: Iterator[torch.Tensor]) -> int:
    """Bytes of the storages behind ``tensors``; a storage shared by several views counts once.

    Storages rather than views are counted because a slice keeps its whole parent buffer alive.
    """
    seen: dict[tuple[torch.device, int], int] = {}
    pending = list(tensors)
    while pending:
        tensor = pending.pop()
        if type(tensor) is not torch.Tensor and hasattr(tensor, "__tensor_flatten__"):
            # Wrapper subclasses (quanto's packed tensors) own no storage; their inner tensors do.
            names, _ = tensor.__tensor_flatten__()
            pending.extend(getattr(tensor, name) for name in names)
            continue
        storage = tensor.untyped_storage()
        seen[(tensor.device, storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


def gather_entries(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``tensor[b, h, index[b, h, k], ...]`` as ``[B, H, K, ...]`` for ``tensor`` ``[B, H, N, ...]``.

    One row copy per entry through ``index_select`` on a flat view: on CPU several times faster than
    ``gather`` with an index expanded over the trailing dimensions.
    """
    batch, heads, length = tensor.shape[:3]
    offsets = torch.arange(batch * heads, device=index.device).view(batch, heads, 1) * length
    rows = tensor.reshape(batch * heads * length, *tensor.shape[3:]).index_select(
        0, (index + offsets).flatten()
    )
    return rows.view(batch, heads, index.shape[-1], *tensor.shape[3:])


def cache_nbytes(cache: Cache) -> int:
    """Bytes held by any ``transformers`` cache: ours report ``nbytes``, others are walked layer by layer."""
    if not isinstance(cache, Cache):
        raise TypeError(f"cache_nbytes expects a transformers Cache, got {type(cache).__name__}")
    return tensors_nbytes(t for layer in cache.layers for t in layer_tensors(layer))


def layer_tensors(layer: object) -> Iterator[torch.Tensor]:
    """The tensors a cache layer holds: what ours declare (:mod:`hf_kvcache.held`), or every tensor attribute
    of a layer that is not ours (transformers' own)."""
    return layer.held_tensors() if isinstance(layer, HeldTensors) else held_tensors(layer)


class KVCache(Cache):
    """A ``transformers.Cache`` of hf-kvcache layers, built from a frozen options dataclass.

    A strategy subclasses this (or :class:`~hf_kvcache.strategies.eviction.EvictionCache`), names its frozen
    ``options_class`` and implements :meth:`build_layers`. The options dataclass is the one place that
    declares option names, defaults and checks: ``Cache(model, nbits=2)`` builds it from the options
    (keywords, or positional in field order), and ``Cache(model, options)`` takes a ready one (the registry
    does that). ``cache.options`` holds it; ``cache.config`` is left to mean what it means in
    ``transformers``.
    """

    options_class: ClassVar[type]
    # The attention module about to update this cache, announced by hf_kvcache.attention's pre-hook.
    attending_module: torch.nn.Module | None = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "options_class" in cls.__dict__:
            # help() and IDEs show the real options, with their defaults, read from the one declaration.
            parameters = [inspect.Parameter("model", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
            parameters += [
                inspect.Parameter(f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=f.default)
                for f in dataclasses.fields(cls.options_class)
                if f.init
            ]
            cls.__signature__ = inspect.Signature(parameters)

    def __init__(self, model: PreTrainedModel, *option_args: Any, **option_kwargs: Any):
        if len(option_args) == 1 and not option_kwargs and isinstance(option_args[0], self.options_class):
            self.options = option_args[0]
        else:
            self.options = self.options_class(*option_args, **option_kwargs)
        config = getattr(model, "config", None)
        if getattr(config, "is_encoder_decoder", False):
            raise ValueError(
                f"{type(self).__name__} serves decoder-only models; {type(model).__name__} is an "
                "encoder-decoder whose cross-attention needs transformers' EncoderDecoderCache"
            )
        self.layout = attention_layout(model)
        super().__init__(layers=self.build_layers(model, self.layout))
        # Why decode steps do not attend over the layers' own storage (None: they do, or none has any).
        self.storage_attention_off = None
        if self.needs_attention_entry_point():
            self.storage_attention_off = install_storage_attention(model, len(self.layers))
        if self.uneven_layers and self.storage_attention_off is not None:
            raise ValueError(
                "layer_budgets=pyramid holds a different number of entries per layer, which hf-kvcache's "
                f"attention entry point masks, and it cannot serve this model: {self.storage_attention_off}; "
                "use layer_budgets=uniform"
            )

    def needs_attention_entry_point(self) -> bool:
        """Whether the model should attend through hf-kvcache's entry point (:mod:`hf_kvcache.attention`):
        some layer reads its own storage, or layers of one kind hold different numbers of entries
        (``layer_budgets=pyramid``), which needs the mask cut to each."""
        return self.uneven_layers or any(getattr(layer, "reads_storage", False) for layer in self.layers)

    @property
    def uneven_layers(self) -> bool:
        return getattr(self.options, "layer_budgets", None) == "pyramid"

    @property
    def is_compileable(self) -> bool:
        # False for every strategy, though eviction caches decode in one graph under torch.compile: generate
        # reads this flag as "build 4D masks up front and compile with CUDA graphs", which hides the 2D
        # padding mask that eviction reads. Compile the forward instead (README, torch.compile section).
        return False

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # A layer that serves the announced module's attention from its storage stores the new tokens and
        # hands itself to the module (hf_kvcache.attention); any other call takes the usual path.
        module, self.attending_module = self.attending_module, None
        # A module announced but never updating (a layer that reuses another's cache) must not be served.
        if module is not None and getattr(module, "layer_idx", None) == layer_idx < len(self.layers):
            layer = self.layers[layer_idx]
            store = getattr(layer, "store_for_attention", None)
            stored = None if store is None else store(key_states, value_states)
            if stored:
                module.__dict__[STORAGE_ATTRIBUTE] = layer
                return key_states, value_states
            if stored is not None:  # stored, but nothing to read there yet: the model attends as usual
                return layer.held()
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def check_model(self, model: PreTrainedModel) -> None:
        """Raise a ``ValueError`` unless ``model`` has the attention geometry this cache was built for."""
        layout = attention_layout(model)
        if layout != self.layout:
            raise ValueError(
                f"this {type(self).__name__} was built for a model with {self.layout.describe()}, but "
                f"{type(model).__name__} has {layout.describe()}; build the cache for the model you call"
            )

    def build_layers(self, model: PreTrainedModel, layout: AttentionLayout) -> list[CacheLayerMixin]:
        """One layer object per model layer, for ``model`` whose geometry is ``layout``."""
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors this cache holds right now (packed data, scales, full-precision parts)."""
        return cache_nbytes(self)

    def save(self, path) -> Path:
        """Write this cache to the safetensors file ``path`` (see :mod:`hf_kvcache.saving`); returns the path.
        ``hf_kvcache.load_cache(path, model)`` reads it back."""
        from hf_kvcache.saving import save_cache

        return save_cache(self, path)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options}, layers={len(self.layers)}, nbytes={self.nbytes})"
