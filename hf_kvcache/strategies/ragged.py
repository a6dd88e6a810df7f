"""Entries held in different numbers per KV head: one flat store per layer, a count per row and head.

A strategy that spends a layer's budget unevenly across its heads (more entries where a head attends widely,
fewer where it looks at a few tokens) cannot hold them as ``[B, H, N, D]`` without padding every head to the
largest count. :class:`RaggedEntries` holds them back to back instead: the entries of row ``b`` and head
``h`` are ``counts[b, h]`` consecutive rows of ``keys`` and ``values`` ``[total, D]``, heads in order within a
row, rows in order, each head's entries in age order. ``nbytes`` then shows what is really held.

Attention over such a store goes through hf-kvcache's attention entry point (:mod:`hf_kvcache.attention`),
one KV head at a time (:meth:`RaggedEntries.attend`); ``sdpa`` and ``eager`` alone could not read it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from hf_kvcache.held import HeldTensors, RowTensor
from hf_kvcache.strategies.packed_attention import attention_weights


class RaggedEntries(HeldTensors):
    """Keys and values of every row and KV head back to back, with their counts (see the module)."""

    keys = RowTensor("entries of every row and KV head, one after another [total, D]")
    values = RowTensor("values in the order of keys [total, D]")
    counts = RowTensor("entries held per row and KV head [B, H], int64")

    def __init__(self):
        self.clear_held()

    @property
    def filled(self) -> bool:
        return self.counts is not None

    def fill(self, keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor) -> None:
        """Hold the entries of ``keys``/``values`` ``[B, H, N, D]`` where ``keep`` ``[B, H, N]`` is True."""
        # Boolean indexing walks b, then h, then n: each head's entries stay together, in age order.
        self.keys, self.values, self.counts = keys[keep], values[keep], keep.sum(-1)

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
            torch.arange(*spans[row * heads + head], device=self.keys.device)
            for row in rows
            for head in range(heads)
        ]
        index = torch.cat(index) if index else torch.zeros(0, dtype=torch.long, device=self.keys.device)
        self.keys, self.values = self.keys.index_select(0, index), self.values.index_select(0, index)
        self.counts = self.counts[torch.tensor(rows, device=self.counts.device, dtype=torch.long)]

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
        heads = self.counts.shape[1]
        group = query_heads // heads
        out = torch.empty(batch, query_heads, length, head_dim, dtype=torch.float32, device=query.device)
        spans = self.segments()
        for row in range(batch):
            for head in range(heads):
                start, stop = spans[row * heads + head]
                heads_of = slice(head * group, (head + 1) * group)
                queries = query[row, heads_of].float()  # [G, q, D]
                # Logits of the store and of the tail side by side: no copy of the store's entries per step.
                store_keys, store_values = self.keys[start:stop].float(), self.values[start:stop].float()
                tail = tail_keys[row, head].float()
                logits = torch.cat([queries @ store_keys.T, queries @ tail.T], dim=-1)[
                    None
                ]  # [1, G, q, n + t]
                mask = None
                if attention_mask is not None:
                    tail_mask = attention_mask[row : row + 1, :1, :, : tail_keys.shape[-2]]
                    visible = torch.ones_like(tail_mask[..., :1]).expand(-1, -1, -1, stop - start)
                    if tail_mask.dtype != torch.bool:
                        visible = torch.zeros_like(visible)
                    mask = torch.cat([visible, tail_mask], dim=-1)
                own_sinks = None if sinks is None else sinks[heads_of]
                weights = attention_weights(logits, mask, scaling, softcap, own_sinks)[0]
                held = stop - start
                out[row, heads_of] = (
                    weights[..., :held] @ store_values + weights[..., held:] @ tail_values[row, head].float()
                )
        return out.transpose(1, 2).to(query.dtype)


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
