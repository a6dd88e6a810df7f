"""What a cache needs to know about the model it serves: layer count, KV heads, head size, layer kinds.

Shape convention used throughout hf-kvcache: every key and value tensor is ``[B, H, S, D]``
(batch, key/value heads, sequence, head dimension), as in ``transformers``' own caches.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PretrainedConfig, PreTrainedModel

# Layer kinds whose keys and values form one growing sequence that a compression strategy may manage.
FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"
CHUNKED_ATTENTION = "chunked_attention"
# Kinds whose attention only reaches back a fixed number of tokens, so DynamicCache keeps only that many.
LOCAL_ATTENTION = (SLIDING_ATTENTION, CHUNKED_ATTENTION)


@dataclass(frozen=True)
class AttentionLayout:
    """The attention geometry of a decoder model, read from its config."""

    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    layer_types: tuple[str, ...]
    windows: tuple[int | None, ...] = ()

    def window(self, layer: int) -> int | None:
        """How many tokens layer ``layer``'s attention reaches back (including the query's own), or ``None``.

        Sliding layers reach back ``sliding_window`` tokens and chunked ones at most ``attention_chunk_size``;
        ``DynamicCache`` keeps one token fewer than that between forward calls.
        """
        return self.windows[layer] if self.windows else None

    def describe(self) -> str:
        kinds = sorted(set(self.layer_types))
        return (
            f"{self.num_layers} layers of kinds {kinds}, {self.num_key_value_heads} KV heads of size "
            f"{self.head_dim}, windows {sorted({w for w in self.windows if w is not None}) or 'none'}"
        )

    @property
    def num_key_value_groups(self) -> int:
        """Query heads sharing one KV head (1 without GQA)."""
        return self.num_attention_heads // self.num_key_value_heads


def text_config(model_or_config: PreTrainedModel | PretrainedConfig) -> PretrainedConfig:
    """The decoder's config, also for multimodal models that nest it."""
    config = getattr(model_or_config, "config", model_or_config)
    if not isinstance(config, PretrainedConfig):
        raise TypeError(
            f"expected a transformers model or config, got {type(model_or_config).__name__}; "
            "pass the model you will call generate() on"
        )
    return config.get_text_config(decoder=True)


def attention_layout(model_or_config: PreTrainedModel | PretrainedConfig) -> AttentionLayout:
    """Read the attention geometry of ``model_or_config``."""
    config = text_config(model_or_config)
    num_layers = config.num_hidden_layers
    num_heads = config.num_attention_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:
        has_window = getattr(config, "sliding_window", None) is not None and getattr(
            config, "use_sliding_window", True
        )
        layer_types = [SLIDING_ATTENTION if has_window else FULL_ATTENTION] * num_layers
    layer_types = tuple(layer_types[:num_layers])
    windows = tuple(_window(config, kind) for kind in layer_types)
    return AttentionLayout(num_layers, num_heads, num_kv_heads, head_dim, layer_types, windows)


def _window(config: PretrainedConfig, kind: str) -> int | None:
    if kind not in LOCAL_ATTENTION:
        return None
    field = "sliding_window" if kind == SLIDING_ATTENTION else "attention_chunk_size"
    window = getattr(config, field, None)
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"the model's layers of kind {kind!r} need config.{field} >= 1, got {window!r}")
    return window


def require_layer_types(layout: AttentionLayout, allowed: tuple[str, ...], strategy: str) -> None:
    """Raise a ``ValueError`` naming the first layer whose kind ``strategy`` cannot manage."""
    for index, kind in enumerate(layout.layer_types):
        if kind not in allowed:
            raise ValueError(
                f"{strategy} cache cannot manage layer {index} of kind {kind!r}: it supports models whose "
                f"layers are all of kinds {list(allowed)} (got layer kinds {sorted(set(layout.layer_types))})"
            )


def require_positions_in_keys(model: PreTrainedModel, strategy: str) -> None:
    """``ValueError`` for a model whose attention adds a position bias (ALiBi) instead of rotating keys.

    ALiBi biases each key by its distance to the query, computed from the mask's columns, which after an
    eviction no longer are the kept tokens' positions: the result would be silently wrong.
    """
    config = text_config(model)
    if getattr(config, "alibi", False) or getattr(config, "model_type", None) in ("bloom", "mpt"):
        raise ValueError(
            f"{strategy} cannot serve {type(model).__name__}: its ALiBi attention biases keys by position, "
            "which evicting tokens breaks; use 'quantized' (any options) or 'full'"
        )
