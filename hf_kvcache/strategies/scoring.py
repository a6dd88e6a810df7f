"""Attention-score strategies (H2O, TOVA, SnapKV): the attention the held entries receive from new queries.

A scoring layer gets this forward's rotated queries from the model hooks (so SDPA works), computes their
attention probabilities over the entries it holds plus the new ones, masked exactly as the model masks them
(left padding, causality, GQA groups), and hands the *attention mass* each entry received to the strategy's
:meth:`ScoringLayer.score`, whose result is the layer's eviction priority. A strategy then declares only which
queries count and how it scores; what it protects (sinks, recent entries) is the eviction contract's.

Decoding steps that score take another route when the model runs hf-kvcache's attention entry point
(:mod:`hf_kvcache.attention`): the entry point attends over the layer's slots and hands back the weights it
computed, so no query is captured and no second pass over the keys runs (:meth:`ScoringLayer.attend_stored`).

Memory: probabilities are computed in blocks of queries, so the extra memory is O(block x held entries), never
O(queries x keys), whatever the prompt length.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from hf_kvcache.attention import newest_columns
from hf_kvcache.layout import AttentionLayout
from hf_kvcache.model_hooks import AttentionMath, install_query_capture
from hf_kvcache.strategies.eviction import EvictingLayer, EvictionCache
from hf_kvcache.strategies.packed_attention import dense_attention

# Upper bound on the float32 elements of one block of attention logits (4 MiB): small enough to stay in cache,
# which makes the softmax and sums over it faster than over larger blocks, and keeps the extra memory small.
SCORE_BLOCK_ELEMENTS = 2**20


def attention_mass(
    queries: torch.Tensor,
    keys: torch.Tensor,
    query_valid: torch.Tensor | None,
    key_valid: torch.Tensor | None,
    first_query_position: int,
    math: AttentionMath,
    peak: bool = False,
) -> torch.Tensor:
    """Attention probability each key receives, summed over the queries and over the query heads of its group
    (or, with ``peak``, the largest any of them gives it).

    Args:
        queries: ``[B, H_q, q, D]`` rotated queries; query ``i`` sits at entry position ``first_query_position
            + i`` and sees the entries up to and including its own position.
        keys: ``[B, H_kv, K, D]``, ``H_q`` a multiple of ``H_kv`` (grouped-query attention).
        query_valid: ``[B, q]``, False for padding queries, which attend to nothing real and must not vote;
            ``None``: all real.
        key_valid: ``[B, K]``, False for padding entries; ``None``: all real.
        first_query_position: entry index of the first query.
        math: the module's scaling, logit soft-capping and sinks, applied as its eager attention does.
        peak: the maximum over queries and query heads instead of the sum. Default False.

    Returns:
        ``[B, H_kv, K]`` float32.
    """
    batch, kv_heads, total, head_dim = keys.shape
    length = queries.shape[-2]
    groups = queries.shape[1] // kv_heads
    # Scaling the queries instead of the logits costs q x D multiplications instead of q x K.
    grouped = (
        queries.float().reshape(batch, kv_heads, groups, length, head_dim) * math.scaling
    )  # [B, Hkv, G, q, D]
    keys = keys.float()
    sinks = None if math.sinks is None else math.sinks.float().view(1, kv_heads, groups, 1, 1)
    if length == 1 and key_valid is None and first_query_position == total - 1:
        # A decoding step with nothing masked: the one query sees every entry.
        logits = _capped(torch.einsum("bhgqd,bhkd->bhgqk", grouped, keys), math.softcap)
        probs = _softmax(logits, sinks)
        mass = probs.amax(dim=(2, 3)) if peak else probs.sum(dim=(2, 3))
        return mass if query_valid is None else mass * query_valid
    mass = keys.new_zeros(batch, kv_heads, total)
    block = max(1, SCORE_BLOCK_ELEMENTS // (batch * kv_heads * groups * total))
    for start in range(0, length, block):
        stop = min(start + block, length)
        # Causality: no query of this block sees past its last one's position, so the later keys are skipped
        # (half of the work of a prompt), and only the block's own diagonal needs a mask.
        first, last = first_query_position + start, first_query_position + stop - 1
        visible_keys = min(last + 1, total)
        logits = torch.einsum("bhgqd,bhkd->bhgqk", grouped[:, :, :, start:stop], keys[:, :, :visible_keys])
        logits = _capped(logits, math.softcap)
        if first + 1 < visible_keys:
            diagonal = torch.arange(first + 1, visible_keys, device=keys.device)
            position = torch.arange(first, last + 1, device=keys.device)
            hidden = diagonal[None, :] > position[:, None]  # [q_block, keys after the first query]
            logits[..., first + 1 :].masked_fill_(hidden, float("-inf"))
        if key_valid is not None:
            padding = ~key_valid[:, None, None, None, :visible_keys]  # [B, 1, 1, 1, K]
            logits.masked_fill_(padding, float("-inf"))
        probs = _softmax(logits, sinks)
        if key_valid is not None:  # a padding query may see no real key at all: its row is NaN
            probs.nan_to_num_(0.0)
        if query_valid is not None:
            probs.mul_(query_valid[:, None, None, start:stop, None])
        if peak:
            mass[..., :visible_keys] = torch.maximum(mass[..., :visible_keys], probs.amax(dim=(2, 3)))
        else:
            mass[..., :visible_keys] += probs.sum(dim=(2, 3))
    return mass


def _capped(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return logits if softcap is None else logits.div_(softcap).tanh_().mul_(softcap)


def _softmax(logits: torch.Tensor, sinks: torch.Tensor | None) -> torch.Tensor:
    """Softmax over the last dimension, with each head's sink logit taking its share of the denominator."""
    if sinks is None:
        return torch.softmax(logits, dim=-1)
    top = torch.maximum(logits.amax(dim=-1, keepdim=True), sinks)
    weights = (logits - top).exp_()
    return weights.div_(weights.sum(dim=-1, keepdim=True) + (sinks - top).exp())


class ScoringLayer(EvictingLayer):
    """An evicting layer whose priority is a score computed from the attention the held entries receive.

    A strategy implements :meth:`score` (by default the attention mass itself) and may set ``scored_queries``
    (the newest queries whose attention counts; ``None``: all) and ``accumulates`` (score every forward, not
    only when evicting). What it protects (``sinks``, ``recent``) is given to the constructor, as for every
    :class:`~hf_kvcache.strategies.eviction.EvictingLayer`.
    """

    scored_queries: ClassVar[int | None] = None
    accumulates: ClassVar[bool] = False

    def reset(self) -> None:
        super().reset()
        self.step_scores = self.queries = self.math = self.attended = None

    def wants_queries(self, new: int) -> bool:
        return self.accumulates or self.stored + new > self.capacity(new)

    # --- scores from the attention function (hf_kvcache.attention) ------------------------------------------
    reads_storage: ClassVar[bool] = True

    def serves_attention(self, new: int) -> bool:
        """Whether this update's attention runs in :meth:`attend_stored`, which scores the entries from the
        weights it computes anyway: decoding steps that score, in place."""
        return self.reads_storage and self.will_decode_in_place(new) and self.wants_queries(new)

    def store_for_attention(self, key_states: torch.Tensor, value_states: torch.Tensor) -> bool | None:
        """Write the new token in place and keep the victim's choice for :meth:`attend_stored`; ``None``
        (nothing done) where :meth:`serves_attention` says no."""
        if not self.serves_attention(key_states.shape[-2]):
            return None
        self.scores_from_attention = True
        try:
            self.attended = self.update(key_states, value_states)
        finally:
            self.scores_from_attention = False
        return True

    def attend_stored(self, query: torch.Tensor, attention_mask, scaling: float, **math):
        """Attend over this step's entries, score them from the same weights and choose the victim."""
        (keys, values), self.attended = self.attended, None
        attention_mask = newest_columns(attention_mask, keys.shape[-2])
        out, weights = dense_attention(query, keys, values, attention_mask, scaling, **math)
        # The attention each entry received, summed over the query heads of its KV head.
        mass = weights.reshape(keys.shape[0], keys.shape[1], -1, keys.shape[2]).sum(2)
        scores = self.score(mass, 1)
        if self.victim_choice is not None:
            self.step_scores = scores
            self.choose_victim()
        return out, weights.to(query.dtype)

    def score(self, mass: torch.Tensor, new: int) -> torch.Tensor:
        """Scores ``[B, H_kv, K]`` of the entries attention saw this step, from the attention ``mass`` ``[B,
        H_kv, K]`` they received (in the same order; the last ``new`` are this step's tokens on the general
        path). By default the mass itself: the attention the scored queries paid each entry, summed over the
        query heads of its KV head (the same order as their average)."""
        return mass

    def priority(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        scores, self.step_scores = self.step_scores, None
        return scores

    def take_queries(self, required: bool) -> tuple[torch.Tensor | None, AttentionMath | None]:
        """This forward's captured queries and attention math, forgotten here (the math holds a model
        parameter, sinks, which no cache keeps past a step); ``required``: an error if none came."""
        queries, math, self.queries, self.math = self.queries, self.math, None, None
        if required and queries is None:
            raise RuntimeError(
                f"the {type(self).__name__} got no queries for this layer: call the model it was built for "
                "(its attention hooks feed the scores), not a copy or another model"
            )
        return queries, math

    def real_entries(self, stored: int, new_valid: torch.Tensor) -> torch.Tensor:
        """``[B, stored + new]``: which of the ``stored`` held entries and the new ones are real. Padding
        sits first among the held entries; new entries are real where ``new_valid`` ``[B, new]`` says so."""
        entry = torch.arange(stored, device=self.device)
        return torch.cat([entry[None, :] >= (stored - self.cached_real)[:, None], new_valid], dim=-1)

    def observe_attention(
        self, keys: torch.Tensor, new_valid: torch.Tensor | None, real_in_full: torch.Tensor, evicting: bool
    ) -> None:
        queries, math = self.take_queries(required=evicting or self.accumulates)
        if not (evicting or self.accumulates):
            return
        total = keys.shape[-2]
        new = 1 if new_valid is None else new_valid.shape[-1]
        count = new if self.scored_queries is None else min(new, self.scored_queries)
        if new_valid is None:  # a decoding step that holds no padding: nothing to mask
            key_valid = query_valid = None
        else:
            key_valid = self.real_entries(total - new, new_valid)
            query_valid = new_valid[:, new - count :]
        mass = attention_mass(
            queries[..., new - count :, :], keys, query_valid, key_valid, total - count, math
        )
        scores = self.score(mass, new)
        self.step_scores = scores if evicting else None


class ScoringCache(EvictionCache):
    """A cache of :class:`ScoringLayer` s: hooks on the model's attention modules hand over their queries."""

    def build_layers(self, model, layout: AttentionLayout) -> list[ScoringLayer]:
        implementation = getattr(model.config, "_attn_implementation", None)
        if implementation == "flex_attention" and model.device.type == "cpu":
            # Inductor's CPU code generation fails on flex attention over these caches' changing key counts.
            raise ValueError(
                f"{type(self).__name__} cannot serve a model running attn_implementation='flex_attention' on "
                "CPU (its compiled kernel fails there); load the model with attn_implementation='sdpa' or "
                "'eager', or run it on a GPU"
            )
        layers = super().build_layers(model, layout)
        install_query_capture(model, layout.num_layers)
        return layers

    def wants_queries(self, layer_idx: int, query_length: int) -> bool:
        layer = self.layers[layer_idx]
        if not isinstance(layer, ScoringLayer):
            return False
        # A step the attention function serves needs no queries captured: it hands over its weights.
        if self.attending_module is not None and layer.serves_attention(query_length):
            return False
        return layer.wants_queries(query_length)

    def observe_queries(self, layer_idx: int, queries: torch.Tensor, math: AttentionMath) -> None:
        layer = self.layers[layer_idx]
        layer.queries, layer.math = queries, math
