"""Per-slot bookkeeping of eviction layers: writing a new entry into a slot, growing the slots, reading them
in age order, and the masked priorities from which victims and survivors are picked. Every function reads the
layer's declared slot tensors (:mod:`hf_kvcache.held`), so a strategy's own per-slot state follows without
code of its own.

Shapes: slot tensors are ``[B, H, slots, ...]``; a slot index is an ``int`` (the same slot in every row and
head) or a ``[B, H]`` tensor.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from hf_kvcache.base import gather_entries
from hf_kvcache.held import HeldTensors


def write_slot(
    layer: HeldTensors,
    slot: int | torch.Tensor,
    key_states: torch.Tensor,
    value_states: torch.Tensor,
    column: int,
) -> None:
    """Put one new entry (``key_states``/``value_states`` ``[B, H, 1, D]``, token column ``column``) into
    ``slot`` of every declared slot tensor: its key, value and column, and each other tensor's ``fill``."""
    for declared in layer.declared("slot"):
        tensor = getattr(layer, declared.name)
        if tensor is None:
            continue
        if declared.name == "key_buffer":
            value = key_states[:, :, 0]
        elif declared.name == "value_buffer":
            value = value_states[:, :, 0]
        elif declared.name == "slot_positions":
            value = column
        else:
            value = declared.fill
        _write(tensor, slot, value)


def _write(tensor: torch.Tensor, slot: int | torch.Tensor, value: torch.Tensor | float) -> None:
    if isinstance(slot, int):
        # A view and a copy rather than item assignment, which torch.compile specializes on the slot number
        # (a recompilation per decoding step while the slots grow).
        if isinstance(value, torch.Tensor):
            tensor.select(2, slot).copy_(value)
        else:
            tensor.select(2, slot).fill_(value)
        return
    trailing = tensor.shape[3:]
    index = slot.view(*slot.shape, 1, *([1] * len(trailing))).expand(*slot.shape, 1, *trailing)
    if not isinstance(value, torch.Tensor):
        value = torch.full((), value, dtype=tensor.dtype, device=tensor.device)
    source = value.view(*slot.shape, 1, *trailing) if value.dim() else value.expand(*slot.shape, 1, *trailing)
    tensor.scatter_(2, index, source.to(tensor.dtype))


def start_slot_state(layer: HeldTensors, batch: int, heads: int) -> None:
    """Give each per-slot state tensor (those declared with a ``fill``) its empty ``[B, H, 0]`` start."""
    for declared in layer.declared("slot"):
        if declared.fill is not None:
            empty = torch.empty(batch, heads, 0, dtype=declared.dtype, device=layer.device)
            setattr(layer, declared.name, empty)


def grow_slots(layer: HeldTensors, size: int) -> None:
    """Give every declared slot tensor ``size`` slots, keeping what the existing ones hold."""
    for declared in layer.declared("slot"):
        tensor = getattr(layer, declared.name)
        if tensor is None:
            continue
        grown = tensor.new_empty(*tensor.shape[:2], size, *tensor.shape[3:])
        grown[:, :, : tensor.shape[2]] = tensor
        setattr(layer, declared.name, grown)


def fill_new_slots(layer: HeldTensors, stored: int, new: int) -> None:
    """On the general path: each per-slot state tensor (those declared with a ``fill``) becomes its ``stored``
    held entries followed by ``new`` entries of its fill value, lined up with the keys attention sees."""
    for declared in layer.declared("slot"):
        tensor = getattr(layer, declared.name)
        if declared.fill is None or tensor is None:
            continue
        # Pad the slot dimension ([B, H, slots, *rest]) at its end, in one operation.
        widths = [0, 0] * (tensor.dim() - 3) + [0, new]
        setattr(layer, declared.name, F.pad(tensor[:, :, :stored], widths, value=declared.fill))


def exclude(priority: torch.Tensor, candidate: torch.Tensor, from_top_k: bool = False) -> torch.Tensor:
    """``priority`` with the entries that are not candidates moved out of reach: to the top, so that an argmin
    (the victim) never picks them, or with ``from_top_k`` to the bottom, so that a top-k never does."""
    if priority.dtype.is_floating_point:
        extreme = float("-inf") if from_top_k else float("inf")
    else:
        info = torch.iinfo(priority.dtype)
        extreme = info.min if from_top_k else info.max
    return priority.masked_fill(~candidate, extreme)


def age_order(layer: Any) -> torch.Tensor:
    """Slot index of each entry an eviction layer holds, in age order: ``[B, H, stored]``. The slot a decoding
    step evicted (``pending_victim``) is left out."""
    if layer.slot_positions is None:
        return torch.arange(layer.stored, device=layer.device).expand(*layer.key_buffer.shape[:2], -1)
    used = layer.stored + (layer.pending_victim is not None)
    positions = layer.slot_positions[..., :used]
    if layer.pending_victim is not None:  # the evicted entry sorts last and is left out
        dead = torch.zeros_like(positions, dtype=torch.bool)
        dead.scatter_(2, layer.pending_victim.unsqueeze(-1), True)
        positions = positions.masked_fill(dead, torch.iinfo(positions.dtype).max)
    return positions.argsort(dim=-1, stable=True)[..., : layer.stored]


def implicit_positions(layer: Any, size: int) -> torch.Tensor:
    """Token columns ``[B, H, size]`` of an eviction layer's slots while they are still in plain age order
    (nothing evicted yet): slot ``i`` holds column ``seen - stored + i``."""
    batch, heads = layer.key_buffer.shape[:2]
    first = layer.seen - layer.stored
    columns = torch.arange(first, first + size, device=layer.device)
    return columns.to(torch.int32).expand(batch, heads, size).contiguous()


def growth_size(layer: Any, total: int) -> int:
    """Slots for an eviction layer that keeps growing (nothing to evict): about 1/8 more than ``total``, but
    never more bytes, positions and per-slot state included, than ``DynamicCache`` holds for the tokens seen
    by then."""
    token_bytes = _slot_nbytes(layer.key_buffer) + _slot_nbytes(layer.value_buffer)
    held = [getattr(layer, d.name) for d in layer.declared("slot")]
    slot_bytes = sum(_slot_nbytes(tensor) for tensor in held if tensor is not None)
    affordable = (layer.seen + 1) * token_bytes // slot_bytes
    return max(total, min(affordable, total + total // 8))


def _slot_nbytes(tensor: torch.Tensor) -> int:
    """Bytes of one slot of one row and head of ``tensor`` ``[B, H, slots, ...]``, even with no slot yet."""
    return math.prod(tensor.shape[3:]) * tensor.element_size()


def victim(priority: torch.Tensor, candidate: torch.Tensor | None, positions: torch.Tensor) -> torch.Tensor:
    """The slot ``[B, H]`` to evict: the candidate (``None``: every slot) of lowest priority, the oldest of
    those tied."""
    masked = priority if candidate is None else exclude(priority, candidate)
    if priority is positions:  # age: no two entries tie
        return masked.argmin(dim=-1)
    tied = masked == masked.amin(dim=-1, keepdim=True)
    return exclude(positions, tied if candidate is None else tied & candidate).argmin(dim=-1)


def highest(priority: torch.Tensor, candidate: torch.Tensor, count: int) -> torch.Tensor:
    """Indices ``[B, H, count]`` of the ``count`` candidates of highest priority among entries in age order,
    the newest of those tied (so that what is dropped is what :func:`victim` would evict)."""
    # A stable ascending sort puts the older of tied entries first, so the last `count` keep the newer.
    ascending = exclude(priority, candidate, from_top_k=True).sort(dim=-1, stable=True).indices
    return ascending[..., ascending.shape[-1] - count :]


def sort_slots_by_age(layer: Any) -> None:
    """Put an eviction layer's held entries back in age order in every slot tensor, for the general path.

    The slot a decoding step evicted is dropped."""
    if layer.slot_positions is None:
        return
    order = age_order(layer)
    in_order = bool((order == torch.arange(layer.stored, device=layer.device)).all())
    if layer.pending_victim is not None or not in_order:
        for declared in layer.declared("slot"):
            tensor = getattr(layer, declared.name)
            if tensor is not None:
                setattr(layer, declared.name, gather_entries(tensor, order))
    layer.pending_victim = None


def keep_slot_state(layer: HeldTensors, indices: torch.Tensor) -> None:
    """Keep entries ``indices`` ``[B, H, kept]`` of each per-slot state tensor (declared with a ``fill``)."""
    for declared in layer.declared("slot"):
        tensor = getattr(layer, declared.name)
        if declared.fill is not None and tensor is not None:
            setattr(layer, declared.name, tensor.gather(2, indices))


def survivors(
    priority: torch.Tensor, total: int, kept: int, real_in_full: torch.Tensor, sinks: int, recent: int
) -> torch.Tensor:
    """Indices ``[B, H, kept]`` (ascending) of the entries to keep among ``total`` in age order: each row's
    first ``sinks`` real entries, the newest ``recent``, and the others of highest ``priority``. Rows with
    fewer than ``kept`` real entries keep the newest ``kept``: all their real ones behind padding."""
    batch, heads = priority.shape[:2]
    device = priority.device
    entry = torch.arange(total, device=device)
    first_real = (total - real_in_full)[:, None, None]  # padding sits before the real entries
    protected_sinks = (first_real + torch.arange(sinks, device=device)).expand(batch, heads, -1)
    newest = entry[total - recent :].expand(batch, heads, -1)
    candidate = (entry >= first_real + sinks) & (entry < total - recent)
    chosen = highest(priority, candidate, kept - sinks - recent)
    indices = torch.cat([protected_sinks, chosen, newest], dim=-1).sort(dim=-1).values
    fallback = entry[total - kept :].expand(batch, heads, kept)
    return torch.where((real_in_full >= kept)[:, None, None], indices, fallback)
