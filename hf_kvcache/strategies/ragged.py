"""Entries held in different numbers per KV head: one flat store per layer, a count per row and head.

A strategy that spends a layer's budget unevenly across its heads (more entries where a head attends widely,
fewer where it looks at a few tokens) cannot hold them as ``[B, H, N, D]`` without padding every head to the
largest count. :class:`RaggedEntries` holds them back to back instead: the entries of row ``b`` and head
``h`` are ``counts[b, h]`` consecutive rows of ``keys`` and ``values`` ``[total, D]``, heads in order within a
row, rows in order, each head's entries in age order. ``nbytes`` then shows what is really held.

Attention over such a store goes through hf-kvcache's attention entry point (:mod:`hf_kvcache.attention`):
:meth:`RaggedEntries.attend` pads each head's entries to the longest head's count for the products, a bounded
number of heads at a time, and masks the padding; ``sdpa`` and ``eager`` alone could not read the store.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch

from hf_kvcache.held import HeldPart, HeldTensors, RowTensor
from hf_kvcache.strategies.packed_attention import attention_weights
from hf_kvcache.strategies.packing import TorchCodec, pack_codes, scale_dtype, unpack_codes
from hf_kvcache.strategies.ranges import clipping_of
from hf_kvcache.strategies.rotation import rotation_matrix


def check_ragged_quantization(quantization) -> None:
    """For a strategy whose ``+quantized`` half packs a :class:`RaggedEntries` store: ``None`` or
    :class:`~.quantized.QuantizedOptions` that it can hold (each entry alone: no key groups over tokens, no
    sinks or residual, keys as the model rotated them)."""
    from hf_kvcache.strategies.quantized import QuantizedOptions

    if quantization is None:
        return
    if not isinstance(quantization, QuantizedOptions):
        raise ValueError(f"quantization must be None or a QuantizedOptions, got {quantization!r}")
    default = QuantizedOptions()
    unsupported = {
        name: getattr(quantization, name)
        for name in ("residual_length", "num_sink_tokens", "backend", "keys", "calibrated_bits", "outliers")
        if getattr(quantization, name) != getattr(default, name)
    } | {
        name: getattr(quantization, name)
        for name in ("outliers_keys", "outliers_values")
        if getattr(quantization, name)
    }
    if quantization.clipping == "calibrated":  # the one clipping that needs a calibration of layers
        unsupported["clipping"] = quantization.clipping
    if unsupported:
        raise ValueError(
            f"{', '.join(f'{k}={v!r}' for k, v in unsupported.items())}: the packed store of a compressed "
            "context holds each kept entry alone (quantized per entry over groups of group_size channels, "
            "torch backend); it takes nbits, nbits_keys, nbits_values, group_size, rotation, scales and "
            "clipping other than 'calibrated'"
        )


class RaggedEntries(HeldTensors):
    """Keys and values of every row and KV head back to back, with their counts (see the module).

    With ``quantization`` (a :class:`~.quantized.QuantizedOptions`) each entry is held bit-packed instead,
    keys and values alike per entry over groups of ``group_size`` channels (an entry leaves or stays alone,
    so no scale spans entries), after the options' rotation: ``key_codes``/``value_codes`` ``[total, D * b /
    8]`` and a scale and zero point per group ``[total, D / G]`` in the model's dtype (or float8, ``scales``).
    """

    keys = RowTensor("entries of every row and KV head, one after another [total, D] (unquantized)")
    values = RowTensor("values in the order of keys [total, D] (unquantized)")
    key_codes = RowTensor("packed key codes [total, D * b / 8] (quantized)")
    key_scale = RowTensor("key scale per entry and channel group [total, D / G]")
    key_zero = RowTensor("key zero point per entry and channel group [total, D / G]")
    value_codes = RowTensor("packed value codes [total, D * b / 8]")
    value_scale = RowTensor("value scale per entry and channel group [total, D / G]")
    value_zero = RowTensor("value zero point per entry and channel group [total, D / G]")
    counts = RowTensor("entries held per row and KV head [B, H], int64")

    def __init__(self, quantization=None):
        self.quantization = quantization
        self.clear_held()

    @property
    def filled(self) -> bool:
        return self.counts is not None

    def fill(self, keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor) -> None:
        """Hold the entries of ``keys``/``values`` ``[B, H, N, D]`` where ``keep`` ``[B, H, N]`` is True."""
        # Boolean indexing walks b, then h, then n: each head's entries stay together, in age order.
        self.counts = keep.sum(-1)
        if self.quantization is None:
            self.keys, self.values = keys[keep], values[keep]
            return
        options, rotation = self.quantization, self._rotation(keys)
        for name, x, nbits in (("key", keys, options.key_nbits), ("value", values, options.value_nbits)):
            x = x[keep] if rotation is None else x[keep].to(rotation.dtype) @ rotation
            groups = x.reshape(x.shape[0], -1, options.group_size)  # [total, D / G, G]
            codes, scale, zero = TorchCodec(nbits, clipping_of(options.clipping, f"{name}s")).quantize(
                groups, 2, scale_dtype(options.scales, keys.dtype)
            )
            setattr(self, f"{name}_codes", pack_codes(codes.flatten(1), nbits))
            setattr(self, f"{name}_scale", scale.squeeze(2))
            setattr(self, f"{name}_zero", zero.squeeze(2))

    def _rotation(self, like: torch.Tensor) -> torch.Tensor | None:
        dtype = torch.promote_types(like.dtype, torch.float32)
        return rotation_matrix(self.quantization.rotation, like.shape[-1], dtype, like.device)

    def entries(self, start: int = 0, stop: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[n, D]`` of entries ``start:stop``, in float32 (dequantized when packed)."""
        keys, values = self.stored_entries(start, stop)
        rotation = None if self.quantization is None else self._rotation(keys)
        if rotation is None:
            return keys, values
        return keys @ rotation.T, values @ rotation.T  # orthogonal: its inverse is its transpose

    def stored_entries(self, start: int = 0, stop: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Like :meth:`entries`, in the space they are stored in (a rotated store's rotation not undone)."""
        if self.quantization is None:
            return self.keys[start:stop].float(), self.values[start:stop].float()
        options, out = self.quantization, []
        for name, nbits in (("key", options.key_nbits), ("value", options.value_nbits)):
            codes = unpack_codes(getattr(self, f"{name}_codes")[start:stop], nbits).float()
            # Explicit sizes: a head may keep no entry at all under a shared budget.
            groups = codes.view(codes.shape[0], codes.shape[1] // options.group_size, options.group_size)
            scale, zero = (getattr(self, f"{name}_{part}")[start:stop].float() for part in ("scale", "zero"))
            out.append((groups * scale.unsqueeze(-1) + zero.unsqueeze(-1)).flatten(1))
        return out[0], out[1]

    def segments(self) -> list[tuple[int, int]]:
        """``(start, stop)`` rows of each (row, head) in ``keys``, row-major (one read back to the host)."""
        stops = self.counts.flatten().cumsum(0).tolist()
        return list(zip([0, *stops[:-1]], stops, strict=True))

    def select_rows(self, select: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if not self.filled:
            return
        batch, heads = self.counts.shape
        rows = select(torch.arange(batch, device=self.counts.device)).tolist()
        spans = self.segments()
        index = [
            torch.arange(*spans[row * heads + head], device=self.counts.device)
            for row in rows
            for head in range(heads)
        ]
        device = self.counts.device
        index = torch.cat(index) if index else torch.zeros(0, dtype=torch.long, device=device)
        for declared in self.declared("row"):
            tensor = getattr(self, declared.name)
            if tensor is not None and declared.name != "counts":
                setattr(self, declared.name, tensor.index_select(0, index.to(tensor.device)))
        self.counts = self.counts[torch.tensor(rows, device=device, dtype=torch.long)]

    def attend(
        self,
        query: torch.Tensor,
        tail_keys: torch.Tensor,
        tail_values: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float,
        softcap: float | None = None,
        sinks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention of ``query`` ``[B, H_q, q, D]`` over each head's entries here (all visible) followed by
        ``tail_keys``/``tail_values`` ``[B, H, t, D]``, the entries that came after (masked by the model's
        ``attention_mask`` over ``t`` columns, causal when ``None``). Returns ``[B, q, H_q, D]``."""
        batch, query_heads, length, head_dim = query.shape
        heads, tail = self.counts.shape[1], tail_keys.shape[-2]
        group = query_heads // heads
        # One (row, KV head) pair per batch entry of the products below; a head's query heads side by side.
        queries = query.float().reshape(batch * heads, group * length, head_dim)
        tail_keys, tail_values = (
            t.float().reshape(batch * heads, tail, head_dim) for t in (tail_keys, tail_values)
        )
        tail_mask = _tail_mask(attention_mask, length, tail, query.device)  # [B or 1, 1, q, t]
        rotation = None if self.quantization is None else self._rotation(queries)
        out = torch.empty_like(queries)
        count_per_pair = self.counts.flatten()
        counts = count_per_pair.tolist()
        offsets = [0, *itertools.accumulate(counts)]
        for first, end in _passes(counts, head_dim):
            pairs = torch.arange(first, end, device=query.device)
            keys, values = self.stored_entries(offsets[first], offsets[end])
            # Each pair's entries padded to the longest pair's count, the padding masked out.
            width = max(counts[first:end])
            held = torch.arange(width, device=query.device) < count_per_pair[first:end, None]  # [P, W]
            padded_keys = keys.new_zeros(end - first, width, head_dim).index_put_((held,), keys)
            padded_values = values.new_zeros(end - first, width, head_dim).index_put_((held,), values)
            # A rotated store (x R) is read with the query rotated alike and the output rotated back.
            stored_queries = queries[first:end] if rotation is None else queries[first:end] @ rotation
            logits = torch.cat(
                [stored_queries @ padded_keys.transpose(1, 2), queries[first:end] @ tail_keys[first:end].mT],
                -1,
            ).view(end - first, group, length, width + tail)
            rows_mask = tail_mask[pairs // heads] if tail_mask.shape[0] > 1 else tail_mask
            held_mask = held[:, None, None, :].expand(-1, -1, length, -1)
            if rows_mask.dtype != torch.bool:  # additive: 0 where visible
                held_mask = torch.zeros(
                    held_mask.shape, dtype=rows_mask.dtype, device=query.device
                ).masked_fill(~held_mask, torch.finfo(rows_mask.dtype).min)
            mask = torch.cat([held_mask, rows_mask.expand(end - first, -1, -1, -1)], -1)
            own_sinks = None if sinks is None else sinks.view(heads, group)[pairs % heads]
            weights = attention_weights(logits, mask, scaling, softcap, own_sinks).flatten(1, 2)
            stored_out = weights[..., :width] @ padded_values
            stored_out = stored_out if rotation is None else stored_out @ rotation.T
            out[first:end] = stored_out + weights[..., width:] @ tail_values[first:end]
        return out.view(batch, query_heads, length, head_dim).transpose(1, 2).to(query.dtype)


# At most this many padded elements per pass of RaggedEntries.attend (64 MiB of float32 keys, as many values),
# so that a step's transient memory stays bounded however unevenly the heads split their budget.
PADDED_ELEMENTS = 1 << 24


def _passes(counts: list[int], head_dim: int) -> list[tuple[int, int]]:
    """Consecutive ranges of (row, head) pairs whose entries, padded to the range's largest count, fit in
    :data:`PADDED_ELEMENTS` (a pair that alone does not is a range of its own)."""
    passes, first, widest = [], 0, 0
    for pair, count in enumerate(counts):
        if pair > first and (pair - first + 1) * max(widest, count) * head_dim > PADDED_ELEMENTS:
            passes.append((first, pair))
            first, widest = pair, 0
        widest = max(widest, count)
    return [*passes, (first, len(counts))] if counts else []


def _tail_mask(attention_mask: torch.Tensor | None, length: int, tail: int, device) -> torch.Tensor:
    """The model's mask over the tail's ``tail`` columns ``[B, 1, q, t]`` (boolean: visible, or additive), or,
    without one, the causal mask of ``length`` queries that are the tail's last ``[1, 1, q, t]``."""
    if attention_mask is not None:
        return attention_mask[:, :1, :, :tail]
    last_visible = torch.arange(length, device=device)[:, None] + tail - length
    return (torch.arange(tail, device=device) <= last_visible)[None, None]


def require_entry_point(cache, strategy: str) -> None:
    """For a cache whose ``head_budgets=adaptive`` holds a ragged store: an error when hf-kvcache's attention
    entry point, the only attention that reads it, cannot serve the cache's model."""
    if cache.options.head_budgets == "adaptive" and cache.storage_attention_off is not None:
        raise ValueError(
            f"{strategy}:head_budgets=adaptive holds a different number of entries per KV head, which only "
            f"hf-kvcache's attention entry point reads, and it cannot serve this model: "
            f"{cache.storage_attention_off}; use {strategy}:head_budgets=uniform"
        )


class RaggedContext:
    """For an evicting layer that compresses its context once with a different number of entries per KV
    head: the kept entries go to :attr:`ragged`, and tokens that come after to the layer's slots (the
    *tail*, equal for every head); attention reads both through hf-kvcache's entry point
    (:mod:`hf_kvcache.attention`)."""

    ragged = HeldPart("the compressed context, a different number of entries per KV head")

    def hold_ragged(self, keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor) -> None:
        """Hold the entries of ``keys``/``values`` ``[B, H, N, D]`` (the whole context, in age order) where
        ``keep`` ``[B, H, N]`` is True, and empty the tail."""
        self.ragged.fill(keys, values, keep)
        self.key_buffer, self.value_buffer = keys[:, :, :0].clone(), values[:, :, :0].clone()
        self.slot_positions = self.pending_victim = None
        self.stored, self.holds_padding = 0, False
        self.cached_real = torch.zeros_like(self.cached_real)

    @property
    def holds_ragged(self) -> bool:
        return self.ragged is not None and self.ragged.filled

    def held(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.holds_ragged:
            raise ValueError(
                f"this {type(self).__name__} holds a different number of entries per KV head "
                "(head_budgets=adaptive): there is no [B, H, N, D] view of them; read layer.ragged (keys, "
                "values, counts) and the tail (layer.key_buffer[:, :, :layer.stored])"
            )
        return super().held()

    def store_for_attention(self, key_states: torch.Tensor, value_states: torch.Tensor) -> bool | None:
        """Once the context is held ragged: append the new tokens to the tail and let :meth:`attend_stored`
        serve this forward; before, ``None`` (the layer's own path)."""
        if not self.holds_ragged:
            return None
        self.update(key_states, value_states)
        return True

    def attend_stored(self, query: torch.Tensor, attention_mask, scaling: float, **math):
        tail = self.key_buffer[:, :, : self.stored], self.value_buffer[:, :, : self.stored]
        return self.ragged.attend(query, *tail, attention_mask, scaling, **math), None


def highest_entries(scores: list[torch.Tensor], quota: torch.Tensor) -> list[torch.Tensor]:
    """Which entries to keep ``[B, H, N]`` per tensor of ``scores`` (``[B, H, N]`` each, any ``N``), when
    row ``b`` keeps ``quota[b]`` entries in all, those of highest score wherever they are; of entries tied at
    the threshold, the first in the order of ``scores``, heads, entries. The selection reads one score per
    entry (no sort of them all): a threshold per row, then a comparison."""
    device = scores[0].device
    flat = torch.cat([s.to(device).flatten(1) for s in scores], dim=1)  # [B, all entries]
    quota = quota.to(device)
    # The quota-th highest score of each row; kthvalue counts from the lowest.
    threshold = torch.stack(
        [
            row.kthvalue(row.numel() - k + 1).values if k else row.new_tensor(float("inf"))
            for row, k in zip(flat, quota.tolist(), strict=True)
        ]
    )[:, None]
    above, tied = flat > threshold, flat == threshold
    room = quota[:, None] - above.sum(dim=1, keepdim=True)
    keep = above | (tied & (tied.cumsum(dim=1) <= room))
    sizes = [s[0].numel() for s in scores]
    return [part.view(s.shape) for part, s in zip(keep.split(sizes, dim=1), scores, strict=True)]
