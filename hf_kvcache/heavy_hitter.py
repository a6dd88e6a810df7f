"""Heavy-hitter eviction (H2O): keep the recent tokens and those that have drawn the most attention.

Paper: "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models",
https://arxiv.org/abs/2306.14048
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from hf_kvcache.attention_capture import install_query_capture
from hf_kvcache.eviction import EvictingLayer, EvictionCache, ForwardState
from hf_kvcache.layout import FULL_ATTENTION, attention_layout, require_layer_types
from hf_kvcache.registry import register_strategy


@dataclass(frozen=True)
class HeavyHitterConfig:
    """Options of :class:`HeavyHitterKVCache`; see there."""

    heavy_budget: int = 128
    recent_budget: int = 128

    def __post_init__(self):
        for name in ("heavy_budget", "recent_budget"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if self.heavy_budget + self.recent_budget < 1:
            raise ValueError("heavy_budget + recent_budget must be at least 1, got 0")


class HeavyHitterLayer(EvictingLayer):
    """Keeps, per KV head, the ``recent_budget`` newest tokens plus the ``heavy_budget`` older real tokens with the
    largest accumulated attention. ``scores`` ``[B, H, K]`` (float32) is the attention each held entry has
    received, summed over all queries so far and over the query heads sharing its KV head."""

    def __init__(self, config: HeavyHitterConfig, state: ForwardState, num_key_value_groups: int):
        self.heavy_budget, self.recent_budget = config.heavy_budget, config.recent_budget
        self.groups = num_key_value_groups
        self.queries = None
        super().__init__(config.heavy_budget + config.recent_budget, state)

    def reset(self) -> None:
        super().reset()
        self.scores = None
        self.queries = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.scores = torch.zeros(*key_states.shape[:2], 0, dtype=torch.float32, device=self.device)

    def observe_attention(
        self, keys: torch.Tensor, new_valid: torch.Tensor, real_in_full: torch.Tensor
    ) -> None:
        if self.queries is None:
            raise RuntimeError(
                "the heavy-hitter cache got no queries for this layer: call the model it was built for "
                "(its attention hooks feed the scores), not a copy or another model"
            )
        queries, self.queries = self.queries, None
        batch, kv_heads, total, head_dim = keys.shape
        new = queries.shape[-2]
        stored = total - new
        grouped = queries.float().reshape(batch, kv_heads, self.groups, new, head_dim)  # [B, Hkv, G, q, D]
        logits = torch.einsum("bhgqd,bhkd->bhgqk", grouped, keys.float()) * head_dim**-0.5
        # Visible: real stored entries (padding sits first), and new entries that are real and not in the future.
        entry = torch.arange(total, device=self.device)
        stored_real = entry[None, :stored] >= (stored - self.cached_real)[:, None]  # [B, stored]
        causal = entry[None, stored:] <= entry[stored:, None]  # [q, new]
        new_ok = causal[None] & new_valid[:, None, :]  # [B, q, new]
        visible = torch.cat([stored_real[:, None, :].expand(-1, new, -1), new_ok], dim=-1)  # [B, q, total]
        logits = logits.masked_fill(~visible[:, None, None], float("-inf"))
        probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
        # Padding queries attend to nothing real and must not vote.
        probs = probs * new_valid[:, None, None, :, None]
        received = probs.sum(dim=(2, 3))  # [B, Hkv, total]
        self.scores = torch.cat([self.scores, self.scores.new_zeros(batch, kv_heads, new)], dim=-1) + received

    def choose(self, total: int, kept: int, real_in_full: torch.Tensor) -> torch.Tensor:
        batch, heads = real_in_full.shape[0], self.scores.shape[1]
        recent = torch.arange(total - self.recent_budget, total, device=self.device).expand(batch, heads, -1)
        if self.heavy_budget == 0:
            return recent
        entry = torch.arange(total, device=self.device)
        first_real = (total - real_in_full)[:, None, None]
        candidate = (entry >= first_real) & (entry < total - self.recent_budget)
        heavy = self.scores.masked_fill(~candidate, float("-inf")).topk(self.heavy_budget, dim=-1).indices
        return torch.cat([heavy, recent], dim=-1).sort(dim=-1).values

    def gather_extra(self, indices: torch.Tensor) -> None:
        self.scores = self.scores.gather(2, indices)

    def select_extra_rows(self, select) -> None:
        self.scores = select(self.scores)


class HeavyHitterKVCache(EvictionCache):
    """Heavy-hitter eviction cache (H2O, https://arxiv.org/abs/2306.14048), under SDPA or eager attention.

    For each KV head it keeps the ``recent_budget`` newest tokens plus the ``heavy_budget`` older tokens with the
    largest accumulated attention: the probability each token has received, summed over every query so far and
    over the query heads that share the KV head (GQA). Eviction happens at prefill and at every decoding step,
    so memory stays bounded. Each row of a batch chooses its own tokens; left padding is never kept as a heavy
    hitter. Scores come from queries recomputed in hooks on this model's attention modules, so SDPA works and
    nothing changes for other caches.

    Args:
        model: the model the cache serves (Llama-style attention: Llama, Mistral, Qwen2/3, Phi3, ...).
        heavy_budget: older tokens kept by accumulated attention. Default 128.
        recent_budget: newest tokens always kept. Default 128.

    Example:
        >>> cache = HeavyHitterKVCache(model, heavy_budget=128, recent_budget=128)
        >>> model.generate(**inputs, past_key_values=cache, max_new_tokens=256)
    """

    def __init__(self, model: PreTrainedModel, heavy_budget: int = 128, recent_budget: int = 128):
        config = HeavyHitterConfig(heavy_budget, recent_budget)
        layout = attention_layout(model)
        require_layer_types(layout, (FULL_ATTENTION,), "heavy-hitter")
        install_query_capture(model, layout.num_layers)
        state = ForwardState()
        layers = [
            HeavyHitterLayer(config, state, layout.num_key_value_groups) for _ in range(layout.num_layers)
        ]
        super().__init__(model, layers, config, state)

    def observe_queries(self, layer_idx: int, queries: torch.Tensor) -> None:
        """Called by the attention hook of layer ``layer_idx`` with its new queries ``[B, H_q, q, D]``."""
        self.layers[layer_idx].queries = queries


def build_heavy_hitter_cache(model: PreTrainedModel, config: HeavyHitterConfig) -> HeavyHitterKVCache:
    return HeavyHitterKVCache(model, config.heavy_budget, config.recent_budget)


register_strategy(
    "heavy-hitter",
    HeavyHitterConfig,
    build_heavy_hitter_cache,
    "H2O: recent tokens plus those with the most accumulated attention, per KV head",
)
