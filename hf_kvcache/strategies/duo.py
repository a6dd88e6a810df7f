"""DuoAttention: retrieval heads keep every token, streaming heads keep attention sinks and a recent window.

Paper: "DuoAttention: Efficient Long-Context LLM Inference with Retrieval and Streaming Heads" (Xiao et al.,
2024), https://arxiv.org/abs/2410.10819
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import CacheLayerMixin, DynamicSlidingWindowLayer

from hf_kvcache.base import KVCache
from hf_kvcache.held import HeldPart, HeldTensors, RowTensor, check_batch
from hf_kvcache.layout import FULL_ATTENTION, LOCAL_ATTENTION, AttentionLayout, require_layer_types
from hf_kvcache.model_hooks import ForwardState, install_forward_observer
from hf_kvcache.registry import WHEN_SET, check_int, register_strategy
from hf_kvcache.strategies.packed_attention import dense_attention
from hf_kvcache.strategies.quantized import QuantizedLayer, QuantizedOptions
from hf_kvcache.strategies.quantized_storage import check_composed_quantization


@dataclass(frozen=True)
class DuoOptions:
    """Options of :class:`DuoKVCache`; see there."""

    retrieval: float = 0.5
    num_sink_tokens: int = 4
    window: int = 256
    calibration: str | None = field(default=None, metadata=WHEN_SET)
    quantization: QuantizedOptions | None = field(default=None, metadata={"composes": "quantized"})

    def __post_init__(self):
        check_composed_quantization(self.quantization)
        number = isinstance(self.retrieval, (int, float)) and not isinstance(self.retrieval, bool)
        if not number or not 0 <= self.retrieval <= 1:
            raise ValueError(
                f"retrieval must be a fraction in [0, 1] of the KV heads, got {self.retrieval!r}"
            )
        check_int("num_sink_tokens", self.num_sink_tokens, 0)
        check_int("window", self.window, 1, " (recent tokens a streaming head sees, itself included)")


# Logits one block of prompt queries may hold at once (query rows x heads x entries): a long prompt sent in
# one forward is attended block by block, so no [q, prompt] tensor is ever built.
BLOCK_LOGITS = 1 << 24


def visible_at(attention_mask, batch: int, rows: slice, query_columns: torch.Tensor, columns: torch.Tensor):
    """The model's mask ``[B, 1, q, total]`` (``None``: causal) as booleans ``[B, 1, rows, columns]``: which
    of ``columns`` the queries ``rows`` (at ``query_columns``) see."""
    if attention_mask is None:
        return (columns[None, :] <= query_columns[:, None]).expand(batch, 1, -1, -1)
    mask = attention_mask[..., rows, :] if attention_mask.shape[-2] > 1 else attention_mask
    mask = mask[..., columns]
    if mask.dtype != torch.bool:  # additive: 0 where visible, a large negative number where not
        mask = mask > torch.finfo(mask.dtype).min / 2
    return mask.expand(batch, 1, len(query_columns), len(columns))


def attend_block(query, keys, values, visible, scaling: float, **math) -> torch.Tensor:
    """Attention ``[B, q, H_q, D]`` of ``query`` ``[B, H_q, q, D]`` over ``keys``/``values``
    ``[B, H_kv, m, D]`` where ``visible`` ``[B, 1, q, m]``: torch's fused attention (no weights held) unless
    the model soft-caps or adds sink logits, which only the eager computation applies."""
    if any(v is not None for v in math.values()):
        return dense_attention(query, keys, values, visible, scaling, **math)[0]
    # A query that sees nothing (a padding row) attends everywhere, as transformers' masks arrange, not NaN.
    visible = visible | ~visible.any(dim=-1, keepdim=True)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, keys, values, attn_mask=visible, scale=scaling, enable_gqa=True
    )
    return out.transpose(1, 2)


class DuoLayer(HeldTensors, CacheLayerMixin):
    """One full-attention layer: its retrieval KV heads hold every token, its streaming heads the first
    ``num_sink_tokens`` real tokens of each row and the newest ``window - 1``.

    A streaming head's entries are the first ``sink_columns`` columns (the largest left padding of the
    batch plus the sinks, so that each row's own first real tokens are among them) and the newest columns;
    attention masks each row's extra sink columns and, per query, every column more than ``window - 1``
    before it, so a long prompt chunk attends as token-by-token decoding would. Attention runs through
    hf-kvcache's entry point (:mod:`hf_kvcache.attention`), which hands the layer the model's mask.
    """

    is_compileable = False
    is_sliding = False
    reads_storage = True

    retrieval_keys = RowTensor("keys of the retrieval heads, every token [B, H_r, seen, D] (unquantized)")
    retrieval_values = RowTensor("their values [B, H_r, seen, D] (unquantized)")
    retrieval_packed = HeldPart("every token of the retrieval heads, bit-packed (+quantized)")
    stream_keys = RowTensor("keys of the streaming heads: sink columns, then the newest [B, H_s, m, D]")
    stream_values = RowTensor("their values [B, H_s, m, D]")
    pads = RowTensor("left padding of each row [B], int64")

    def __init__(self, retrieval_heads: list[int], kv_heads: int, options: DuoOptions, state: ForwardState):
        super().__init__()
        self.retrieval = sorted(retrieval_heads)
        self.streaming = [h for h in range(kv_heads) if h not in set(retrieval_heads)]
        self.options, self.state = options, state
        self.reset()

    def reset(self) -> None:
        self.clear_held()
        self.seen = self.sink_columns = 0
        self.pending = self.pending_retrieval = None
        self.is_initialized = False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        batch, head_dim = key_states.shape[0], key_states.shape[-1]
        self.retrieval_keys = key_states.new_empty(batch, len(self.retrieval), 0, head_dim)
        self.retrieval_values = self.retrieval_keys.clone()
        self.stream_keys = key_states.new_empty(batch, len(self.streaming), 0, head_dim)
        self.stream_values = self.stream_keys.clone()
        quantization = self.options.quantization
        if quantization is not None and self.retrieval:
            store = QuantizedLayer(quantization)
            # Initialized now (empty, shaped for the retrieval heads), so a saved cache can be loaded into it.
            store.lazy_initialization(self.retrieval_keys, self.retrieval_values)
            self.retrieval_packed, self.retrieval_keys, self.retrieval_values = store, None, None
        self.pads = self.state.padding(key_states.shape[0], key_states.shape[2], self.device).clone()
        self.sink_columns = int(self.pads.max()) + self.options.num_sink_tokens
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        raise RuntimeError(
            "duo's streaming heads hold only sinks and a window, which the model's own attention cannot "
            "read: the model must attend through hf-kvcache's entry point (installed when the cache is "
            "built; do not change the model's attention implementation afterwards)"
        )

    def store_for_attention(self, key_states: torch.Tensor, value_states: torch.Tensor) -> bool:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        check_batch(self, self.pads, key_states)
        self.pending = key_states.shape[2]
        parts = (("stream", self.streaming),)
        if self.retrieval_packed is None:
            parts += (("retrieval", self.retrieval),)
        else:  # every retrieval token so far, dequantized for this forward (the newest in full precision)
            self.pending_retrieval = self.retrieval_packed.update(
                key_states[:, self.retrieval], value_states[:, self.retrieval]
            )
        for name, new in (("keys", key_states), ("values", value_states)):
            for part, heads in parts:
                held = getattr(self, f"{part}_{name}")
                setattr(self, f"{part}_{name}", torch.cat([held, new[:, heads]], dim=2))
        return True

    def attend_stored(self, query: torch.Tensor, attention_mask, scaling: float, **math):
        batch, query_heads, queries, head_dim = query.shape
        group = query_heads // (len(self.retrieval) + len(self.streaming))
        total = self.seen + queries
        out = query.new_empty(batch, queries, query_heads, head_dim)
        sinks = math.get("sinks")
        retrieval = self.pending_retrieval or (self.retrieval_keys, self.retrieval_values)
        self.pending_retrieval = None
        for heads, keys, values in (
            (self.retrieval, *retrieval),
            (self.streaming, self.stream_keys, self.stream_values),
        ):
            if not heads:
                continue
            own = torch.tensor([h * group + j for h in heads for j in range(group)], device=query.device)
            options = {**math, "sinks": None if sinks is None else sinks[own]}
            if queries == 1 and heads is self.retrieval:  # decoding: the model's mask as is (native kernel)
                part, _ = dense_attention(query[:, own], keys, values, attention_mask, scaling, **options)
                out[:, :, own] = part
                continue
            block = max(1, BLOCK_LOGITS // (batch * len(own) * min(keys.shape[2], total)))
            for start in range(0, queries, block):
                rows = slice(start, min(queries, start + block))
                query_columns = torch.arange(total - queries + rows.start, total - queries + rows.stop)
                query_columns = query_columns.to(self.device)
                part = self._block_entries(heads, keys, values, attention_mask, batch, rows, query_columns)
                out[:, rows, own] = attend_block(query[:, own, rows], *part, scaling, **options)
        self._trim()
        return out, None

    def _block_entries(self, heads, keys, values, attention_mask, batch, rows, query_columns):
        """The keys and values a block of queries (``rows``, at ``query_columns``) reads, and what it sees of
        them: every column up to its last query for retrieval heads; for streaming heads, each row's first
        sinks and the ``window`` columns ending at each query (itself included)."""
        last = int(query_columns[-1]) + 1
        if heads is self.retrieval:
            columns = torch.arange(last, device=self.device)
            visible = visible_at(attention_mask, batch, rows, query_columns, columns)
            return keys[:, :, :last], values[:, :, :last], visible
        held, total = keys.shape[2], self.seen + self.pending
        sinks = min(self.sink_columns, held)
        oldest = total - (held - sinks)  # column of the first entry after the sinks
        first = min(last, max(oldest, int(query_columns[0]) - self.options.window + 1))
        index = torch.cat(
            [
                torch.arange(sinks, device=self.device),
                torch.arange(first, last, device=self.device) - oldest + sinks,
            ]
        )
        columns = torch.cat([index[:sinks], index[sinks:] - sinks + oldest])
        visible = visible_at(attention_mask, batch, rows, query_columns, columns)
        recent = columns[None, :] > query_columns[:, None] - self.options.window  # [q, m]
        sink = (columns >= self.pads[:, None]) & (columns < self.pads[:, None] + self.options.num_sink_tokens)
        return keys[:, :, index], values[:, :, index], visible & (recent[None, None] | sink[:, None, None, :])

    def _trim(self) -> None:
        """After a forward: keep the sink columns and the newest ``window - 1`` of the streaming heads."""
        self.seen += self.pending
        keep = self.sink_columns + self.options.window - 1
        if self.stream_keys.shape[2] > keep:
            for name in ("stream_keys", "stream_values"):
                held = getattr(self, name)
                recent = held[:, :, held.shape[2] - (self.options.window - 1) :]
                setattr(self, name, torch.cat([held[:, :, : self.sink_columns], recent], dim=2))

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def crop(self, max_length: int) -> None:
        raise ValueError(
            "duo cannot crop: its streaming heads let go of old tokens, so rolling back is not exact"
        )


@register_strategy("duo", "DuoAttention: retrieval heads keep everything, streaming heads sinks + a window")
class DuoKVCache(KVCache):
    """DuoAttention (Xiao et al., https://arxiv.org/abs/2410.10819): a fraction of the KV heads, the
    *retrieval heads*, keep every token; the others, *streaming heads*, keep the first ``num_sink_tokens``
    tokens and the newest ``window`` (each query sees those; a prompt attends the same way, query by query).
    Which heads retrieve comes from a calibration of the model (:mod:`hf_kvcache.head_calibration`, made by
    ``hf-kvcache calibrate --strategy duo``): the heads whose restriction to sinks and a window most hurts
    finding a passkey. Heads of one layer then hold different numbers of tokens, each in its own tensor, so
    ``nbytes`` shows the saving; attention reads them through hf-kvcache's entry point (sdpa or eager
    models).

    Args:
        model: the model the cache serves.
        retrieval: fraction of the full-attention layers' KV heads that keep everything, the highest-scoring
            in the calibration, across all layers; 0 and 1 need no calibration. Default 0.5.
        num_sink_tokens: first real tokens of each row a streaming head keeps. Default 4.
        window: newest tokens a streaming head's queries see, themselves included. Default 256.
        calibration: the calibration file to read; ``None``: the one ``hf-kvcache calibrate --strategy duo``
            wrote for this model. Default None.
        quantization: a :class:`~hf_kvcache.strategies.quantized.QuantizedOptions` to hold the retrieval
            heads' tokens as the ``quantized`` strategy holds a layer's (spec ``duo:...+quantized:...``:
            sinks, bit-packed history, full-precision residual), dequantized for each forward; streaming
            heads stay in full precision. ``None``: everything in full precision. Default None.

    Example:
        >>> cache = DuoKVCache(model, retrieval=0.25, window=256)
        >>> model.generate(**inputs, past_key_values=cache, max_new_tokens=64)
    """

    options_class = DuoOptions

    def build_layers(self, model, layout: AttentionLayout) -> list[CacheLayerMixin]:
        from hf_kvcache.head_calibration import retrieval_heads

        require_layer_types(layout, (FULL_ATTENTION, *LOCAL_ATTENTION), type(self).__name__)
        install_forward_observer(model)
        self.forward_state = ForwardState()
        chosen = retrieval_heads(model, layout, self.options)
        layers: list[CacheLayerMixin] = []
        for index in range(layout.num_layers):
            window = layout.window(index)
            if window is None:
                heads = chosen[index]
                layers.append(DuoLayer(heads, layout.num_key_value_heads, self.options, self.forward_state))
            else:
                layers.append(DynamicSlidingWindowLayer(sliding_window=window))
        return layers

    def observe_forward(self, attention_mask: torch.Tensor | None, query_length: int) -> None:
        """Called by the model hook before each forward with the 2D mask of that call."""
        self.forward_state.observe(attention_mask)

    def check_entry_point(self) -> None:
        if self.storage_attention_off is not None:
            raise ValueError(
                "duo's heads hold different numbers of tokens, which only hf-kvcache's attention entry point "
                f"reads, and it cannot serve this model: {self.storage_attention_off}"
            )

    def __init__(self, model, *option_args, **option_kwargs):
        super().__init__(model, *option_args, **option_kwargs)
        self.check_entry_point()

    def reset(self) -> None:
        super().reset()
        self.forward_state.observe(None)
