"""What a cache layer holds, declared once per tensor: beam search, eviction, growth and bytes read it.

A layer class declares every tensor it keeps between forward calls as a class attribute::

    class MyLayer(HeldTensors, CacheLayerMixin):
        key_buffer = SlotTensor("keys of the held entries")
        real_seen = RowTensor("real tokens seen so far, per row [B]")

Every declared tensor has the batch as its first dimension, so beam search and batch expansion move it with
its row. A *slot* tensor also has the layer's entry slots as its third dimension (``[B, H, slots, ...]``): it
follows every eviction and every growth of the slots. :class:`HeldPart` declares an object that holds
declared tensors of its own (the packed store of a quantized layer). ``nbytes`` counts exactly the declared
tensors, and a test checks that no layer holds a tensor it did not declare.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

ROW, SLOT, PART = "row", "slot", "part"


class Declared:
    """A declared attribute of a layer: its kind (``row``, ``slot`` or ``part``) and what it holds.

    It reads and writes the instance's own ``__dict__``, so a declared attribute is as cheap as a plain one.
    """

    def __init__(self, kind: str, doc: str, dtype: torch.dtype | None = None, fill: float | None = None):
        self.kind, self.__doc__, self.dtype, self.fill = kind, doc, dtype, fill
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        return obj.__dict__.get(self.name)

    def __set__(self, obj: Any, value: Any) -> None:
        obj.__dict__[self.name] = value


def RowTensor(doc: str) -> Any:  # noqa: N802  (reads as a declaration, like dataclasses.field)
    """A tensor whose first dimension is the batch: a counter per row ``[B]``, sinks ``[B, H, S, D]``."""
    return Declared(ROW, doc)


def SlotTensor(doc: str, dtype: torch.dtype | None = None, fill: float | None = None) -> Any:  # noqa: N802
    """A per-slot tensor ``[B, H, slots, ...]``; a new entry's slot gets ``fill`` (in ``dtype``), unless the
    layer writes it itself (keys, values, token positions)."""
    return Declared(SLOT, doc, dtype, fill)


def HeldPart(doc: str) -> Any:  # noqa: N802
    """An object that holds declared tensors of its own (a :class:`HeldTensors`)."""
    return Declared(PART, doc)


def held_view(index: int, doc: str) -> property:
    """``keys`` (``index`` 0) or ``values`` (1) of a layer whose ``held()`` computes them from what it holds:
    read-only, and ``None`` before the first update (``CacheLayerMixin.__init__`` assigns ``None`` to
    both)."""

    def read(layer: Any) -> torch.Tensor | None:
        return layer.held()[index] if layer.is_initialized else None

    def write(layer: Any, value: None) -> None:
        if value is not None:
            raise AttributeError(
                f"{type(layer).__name__}.keys and .values are read-only views of what it holds"
            )

    return property(read, write, doc=doc)


def check_batch(layer: Any, held: torch.Tensor, new: torch.Tensor) -> None:
    """``ValueError`` naming both batch sizes when a forward brings another batch than the one ``layer`` holds
    (``held`` and ``new`` have the batch first)."""
    if held.shape[0] != new.shape[0]:
        raise ValueError(
            f"this cache holds a batch of {held.shape[0]} rows, but the model was called with "
            f"{new.shape[0]}: a cache serves the batch it was filled with ({type(layer).__name__}; beam "
            "search and batch expansion reorder it themselves). Build a fresh cache for another batch."
        )


_DECLARED: dict[tuple[type, str], tuple[Declared, ...]] = {}


class HeldTensors:
    """Row selection and byte counting for an object that declares what it holds (see the module)."""

    @classmethod
    def declared(cls, kind: str) -> tuple[Declared, ...]:
        """The declarations of ``kind`` of this class and its bases, base classes first."""
        key = (cls, kind)
        if key not in _DECLARED:
            found: dict[str, Declared] = {}
            for klass in reversed(cls.__mro__):
                for name, attribute in vars(klass).items():
                    if isinstance(attribute, Declared) and attribute.kind == kind:
                        found[name] = attribute
            _DECLARED[key] = tuple(found.values())
        return _DECLARED[key]

    def clear_held(self) -> None:
        """Let go of every declared tensor and part."""
        for kind in (ROW, SLOT, PART):
            for declared in self.declared(kind):
                setattr(self, declared.name, None)

    def held_tensors(self) -> Iterator[torch.Tensor]:
        """Every tensor this object holds now: its declared rows and slots, and those of its parts."""
        for kind in (ROW, SLOT):
            for declared in self.declared(kind):
                tensor = getattr(self, declared.name)
                if tensor is not None:
                    yield tensor
        for declared in self.declared(PART):
            part = getattr(self, declared.name)
            if part is not None:
                yield from part.held_tensors()

    @property
    def nbytes(self) -> int:
        """Bytes of the storages behind the tensors held (see :func:`hf_kvcache.base.tensors_nbytes`)."""
        from hf_kvcache.base import tensors_nbytes

        return tensors_nbytes(self.held_tensors())

    def select_rows(self, select: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace every held tensor ``t`` by ``select(t)``, which picks or repeats rows of the batch."""
        for kind in (ROW, SLOT):
            for declared in self.declared(kind):
                tensor = getattr(self, declared.name)
                if tensor is not None:
                    setattr(self, declared.name, select(tensor))
        for declared in self.declared(PART):
            part = getattr(self, declared.name)
            if part is not None:
                part.select_rows(select)

    # The three ways transformers reorders or expands a batch (beam search, contrastive search, assistants).
    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.select_rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.select_rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.select_rows(lambda t: t[indices.to(t.device) if isinstance(indices, torch.Tensor) else indices])
