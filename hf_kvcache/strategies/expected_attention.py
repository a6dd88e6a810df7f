"""Expected attention: keep the entries that the queries still to come are expected to attend to.

Paper: "Expected Attention: KV Cache Compression by Estimating Attention from Future Queries Distribution"
(Devoto et al., 2025), https://arxiv.org/abs/2510.00636
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

from hf_kvcache.budget import LAYER_SCHEDULES, Budget, check_budget, check_layer_budgets
from hf_kvcache.held import RowTensor
from hf_kvcache.layout import AttentionLayout
from hf_kvcache.model_hooks import KeyRotator, attention_modules, find_rotary_module, rotate_half_rope
from hf_kvcache.registry import WHEN_SET, check_int, register_strategy
from hf_kvcache.strategies.adaptive_context import (
    CompressedContext,
    CompressedContextCache,
    check_head_budgets,
)
from hf_kvcache.strategies.quantized import QuantizedOptions
from hf_kvcache.strategies.quantized_storage import (
    QuantizedStorage,
    check_composed_quantization,
    check_recent_covers_residual,
)
from hf_kvcache.strategies.ragged import require_entry_point
from hf_kvcache.strategies.rotation import layer_rotators
from hf_kvcache.strategies.scoring import ScoringCache, ScoringLayer


@dataclass(frozen=True)
class ExpectedAttentionOptions:
    """Options of :class:`ExpectedAttentionKVCache`; see there."""

    budget: Budget = 256
    num_sink_tokens: int = 4
    recent: int | None = None
    horizon: int = 512
    epsilon: float = 0.02
    quantization: QuantizedOptions | None = field(default=None, metadata={"composes": "quantized"})
    layer_budgets: str = field(default="uniform", metadata=WHEN_SET)
    head_budgets: str = field(default="uniform", metadata=WHEN_SET)

    def __post_init__(self):
        check_composed_quantization(self.quantization)
        check_head_budgets(self, "expected-attention")
        protected = SimpleNamespace(
            budget=self.budget, num_sink_tokens=self.num_sink_tokens, recent=self.protected_recent
        )
        check_budget(protected, sinks="num_sink_tokens", recent="recent")
        check_layer_budgets(self, (*LAYER_SCHEDULES, "adaptive"))
        check_recent_covers_residual(self.protected_recent, self.quantization)
        check_int("horizon", self.horizon, 1, " (future positions the query statistics are averaged over)")
        if not isinstance(self.epsilon, (int, float)) or isinstance(self.epsilon, bool) or self.epsilon < 0:
            raise ValueError(f"epsilon must be a number >= 0, got {self.epsilon!r}")

    @property
    def protected_recent(self) -> int:
        """``recent``, or where it is ``None`` 16 alone and, under quantization, the tokens the
        full-precision residual can hold (it is never evicted)."""
        if self.recent is not None:
            return self.recent
        quantization = self.quantization
        return 16 if quantization is None else quantization.residual_length + quantization.group_size - 1


class ExpectedAttentionLayer(ScoringLayer):
    """Scores entries by the attention that future queries are expected to give them.

    The layer keeps the mean of every real query seen so far and the second moment of those of each KV head,
    each query moved by RoPE to the current position (``mean_query``, ``query_moment``): moving every
    statistic along when tokens arrive keeps that exact, since rotations are linear. Queries that will come
    ``1 .. horizon`` positions later have, on average, the mean query rotated by the mean rotation ``A`` of
    those offsets, and covariance about ``A C A^T`` (``C`` the covariance of the moved queries). For a
    Gaussian query ``q``, ``E[exp(s q.k)] = exp(s mu.k + s^2 k^T S k / 2)``: that is each query head's
    expected logit, softmaxed over the entries, averaged over the query heads of a KV head, and weighted by
    the value norm, ``(p + epsilon) * |v|``, since an entry's effect on the output scales with its value.
    """

    accumulates = True
    # Decoding steps capture the queries (statistics), so they never take the attention function's weights.
    reads_storage = False

    mean_query = RowTensor("mean of the real queries seen, moved to the current position [B, H_q, D]")
    query_moment = RowTensor("second moment of the moved queries of each KV head [B, H_kv, D, D]")
    queries_seen = RowTensor("real queries the statistics hold per row [B], float32")

    def __init__(self, options: ExpectedAttentionOptions, state):
        self.horizon, self.epsilon = options.horizon, options.epsilon
        self.rotator: KeyRotator | None = None  # set by the cache; None: the layer applies no RoPE
        self.scaling = 1.0
        super().__init__(options.budget, state, options.num_sink_tokens, options.protected_recent)

    def observe_attention(
        self, keys: torch.Tensor, new_valid: torch.Tensor | None, real_in_full: torch.Tensor, evicting: bool
    ) -> None:
        queries, math = self.take_queries(required=True)
        self.scaling = math.scaling
        batch, query_heads, new, head_dim = queries.shape
        kv_heads = keys.shape[1]
        queries = queries.float()
        if self.mean_query is None:
            self.mean_query = queries.new_zeros(batch, query_heads, head_dim)
            self.query_moment = queries.new_zeros(batch, kv_heads, head_dim, head_dim)
            self.queries_seen = queries.new_zeros(batch)
        mean_sum = self._moved(self.mean_query[:, :, None], new)[:, :, 0] * self.queries_seen[:, None, None]
        moment = self._moved(self._moved(self.query_moment, new).transpose(-1, -2), new)
        moment_sum = moment * self.queries_seen[:, None, None, None]
        if self.rotator is not None:  # query i of this forward sits new - 1 - i positions back
            behind = torch.arange(new - 1, -1, -1, device=queries.device)
            queries = self.rotator.at_positions(queries, behind)
        if new_valid is not None:
            queries = queries * new_valid[:, None, :, None]
        count = self.queries_seen + (new if new_valid is None else new_valid.sum(-1))
        grouped = queries.reshape(batch, kv_heads, -1, head_dim)  # the query heads of a KV head, then tokens
        moment_sum = moment_sum + grouped.transpose(-1, -2) @ grouped / (query_heads // kv_heads)
        divisor = count.clamp(min=1)
        self.mean_query = (mean_sum + queries.sum(2)) / divisor[:, None, None]
        self.query_moment = moment_sum / divisor[:, None, None, None]
        self.queries_seen = count

    def _moved(self, vectors: torch.Tensor, positions: int) -> torch.Tensor:
        """``vectors`` ``[B, H, n, D]`` rotated ``positions`` further (each row's last dimension)."""
        if self.rotator is None or positions == 0:
            return vectors
        offsets = torch.full((vectors.shape[0],), positions, device=vectors.device)
        return self.rotator.shift(vectors, offsets)

    def priority(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        batch, kv_heads, total, head_dim = keys.shape
        keys = keys.float()
        mean = self.mean_query  # [B, H_q, D]
        groups = mean.shape[1] // kv_heads
        grouped_mean = mean.reshape(batch, kv_heads, groups, head_dim)
        covariance = self.query_moment - (grouped_mean.transpose(-1, -2) @ grouped_mean) / groups
        future_keys = keys  # A^T k: the quadratic form k^T A C A^T k reads the keys moved back
        if self.rotator is not None:
            cos, sin = self.rotator.mean_rotation(self.horizon, keys.device)
            grouped_mean = rotate_half_rope(grouped_mean, cos, sin)
            future_keys = rotate_half_rope(keys, cos, -sin)
        spread = ((future_keys @ covariance) * future_keys).sum(-1)  # [B, H_kv, N]
        logits = self.scaling * torch.einsum("bhgd,bhnd->bhgn", grouped_mean, keys)
        logits = logits + (self.scaling**2 / 2) * spread[:, :, None]
        expected = torch.softmax(logits, dim=-1).mean(2)
        return (expected + self.epsilon) * values.float().norm(dim=-1)


class AdaptiveExpectedAttentionLayer(CompressedContext, ExpectedAttentionLayer):
    """An expected-attention layer under ``head_budgets=adaptive``: the statistics of the prompt's queries
    rank its entries once, at its end (:mod:`.adaptive_context`); the tail needs no statistics."""


class QuantizedExpectedAttentionLayer(QuantizedStorage, ExpectedAttentionLayer):
    """An expected-attention layer that holds its entries in quantized storage (``expected-attention+
    quantized``); it scores them by their dequantized keys and values."""


@register_strategy(
    "expected-attention", "expected attention: keep what future queries are expected to attend to"
)
class ExpectedAttentionKVCache(CompressedContextCache, ScoringCache):
    """Expected-attention eviction (Devoto et al., https://arxiv.org/abs/2510.00636), in prefill and decode.

    No attention probabilities are needed, only the queries (captured by hooks, so SDPA works): the statistics
    of every query seen so far, moved by RoPE to the positions of the next ``horizon`` queries, predict how
    much attention each entry will get (:class:`ExpectedAttentionLayer`). The first ``num_sink_tokens`` real
    tokens of each row and the ``recent`` newest are always kept; of the rest, each KV head keeps the entries
    of highest expected attention, up to ``budget`` in all, at the prompt and at every decoding step. Each row
    of a batch chooses its own entries; padding queries add nothing to the statistics.

    Memory: besides the entries, each layer keeps per row a mean query per query head and a ``D x D`` second
    moment per KV head (``head_dim**2`` floats per KV head, as much as ``head_dim / 2`` tokens of keys and
    values). Where a model soft-caps logits or has attention sinks, the prediction ignores them.

    Args:
        model: the model the cache serves.
        budget: entries kept per layer and KV head, in tokens or as a fraction of the tokens seen.
            Default 256.
        num_sink_tokens: first tokens of each row always kept. Default 4.
        recent: newest tokens always kept; ``None``: 16, or under ``quantization`` the tokens its
            full-precision residual can hold (``residual_length + group_size - 1``). Default None.
        horizon: future positions the query statistics are averaged over. Default 512.
        epsilon: added to each expected probability before weighting by the value norm, so that an entry
            with a large value is not dropped for a small predicted weight. Default 0.02.
        quantization: a :class:`~hf_kvcache.strategies.quantized.QuantizedOptions` to hold the kept tokens
            bit-packed (spec ``expected-attention:...+quantized:...``); ``recent`` must cover its residual
            (``residual_length + group_size - 1`` tokens). ``None``: everything in full precision.
            Default ``None``.
        layer_budgets: ``'uniform'`` (``budget`` in every layer) or ``'pyramid'``: more in early layers,
            less in late ones, at the same total (PyramidKV, :func:`hf_kvcache.budget.pyramid_budgets`);
            under adaptive heads also ``'adaptive'``: one budget for every layer's heads together. Default
            ``'uniform'``.
        head_budgets: ``'uniform'`` (``budget`` per KV head, evicting at every step) or ``'adaptive'``
            (AdaKV, https://arxiv.org/abs/2407.11550): the prompt is held whole until it ends (the first
            one-token forward, or :meth:`compress_context`), then each layer keeps ``budget`` times its KV
            heads entries wherever the expected attention is highest, held ragged so that ``nbytes`` shows
            the saving, and later tokens are appended (:mod:`hf_kvcache.strategies.adaptive_context`; sdpa or
            eager models, no ``quantization``). Default ``'uniform'``.

    Example:
        >>> cache = ExpectedAttentionKVCache(model, budget=0.25)
        >>> model.generate(**inputs, past_key_values=cache, max_new_tokens=64)
    """

    options_class = ExpectedAttentionOptions

    def __init__(self, model, *option_args, **option_kwargs):
        super().__init__(model, *option_args, **option_kwargs)
        require_entry_point(self, "expected-attention")

    def make_layer(self, layout) -> ExpectedAttentionLayer:
        options, quantization = self.options, self.options.quantization
        if quantization is None:  # adaptive heads never compose with quantization (checked by the options)
            adaptive = options.head_budgets == "adaptive"
            return (AdaptiveExpectedAttentionLayer if adaptive else ExpectedAttentionLayer)(
                options, self.forward_state
            )
        quantization.check_head_dim(layout.head_dim)
        # Sinks past the quantizer's are held packed; they are never evicted either way.
        sinks = min(quantization.num_sink_tokens, options.num_sink_tokens)
        return QuantizedExpectedAttentionLayer(
            options, self.forward_state, quantization=quantization, num_sink_tokens=sinks
        )

    def build_layers(self, model, layout: AttentionLayout) -> list[ScoringLayer]:
        layers = super().build_layers(model, layout)
        rotators = rotators_of(model, layout)
        for layer, rotator in zip(layers, rotators, strict=True):
            if isinstance(layer, ExpectedAttentionLayer):
                layer.rotator = rotator
        return layers


def rotators_of(model, layout: AttentionLayout) -> list[KeyRotator | None]:
    """Each layer's RoPE (``None`` where the layer applies none), which moves query statistics along."""
    try:
        rotary = find_rotary_module(model)
    except ValueError:
        raise ValueError(
            f"expected-attention moves query statistics with the model's rotary embedding; "
            f"{type(model).__name__} has several, which it does not support"
        ) from None
    if rotary is None:
        return [None] * layout.num_layers
    return layer_rotators(rotary, attention_modules(model), layout.layer_types)
