"""Everything hf-kvcache attaches to a model: hooks that tell a cache about each forward, RoPE helpers.

``transformers`` hands a cache layer only the new keys and values. Eviction caches also need the 2D padding
mask of the current forward, and score-based ones the queries of each attention layer. The hooks here are
installed on the model instance a cache is built for (never globally, never at import), and do nothing unless
the ``past_key_values`` of the call implements the matching method of :class:`CacheObserver`, so the model
behaves exactly as before with any other cache.

Shapes: keys, values and queries are ``[B, H, S, D]`` (batch, heads, sequence, head dimension).
"""

from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

_FORWARD_HOOKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_QUERY_HOOKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class CacheObserver(Protocol):
    """What the model hooks call on the ``past_key_values`` of a forward, when it defines these methods."""

    def observe_forward(self, attention_mask: torch.Tensor | None, query_length: int) -> None:
        """Before each model forward: its 2D padding mask ``[B, seen + new]`` (or ``None``) and new length."""

    def observe_input_ids(self, input_ids: torch.Tensor | None) -> None:
        """After ``observe_forward``: the forward's token ids ``[B, new]`` (``None`` for embeddings)."""

    def wants_queries(self, layer_idx: int, query_length: int) -> bool:
        """Before each attention layer: whether the cache needs this forward's queries of that layer."""

    def observe_queries(self, layer_idx: int, queries: torch.Tensor, math: AttentionMath) -> None:
        """The layer's new rotated queries ``[B, H_q, q, D]`` and how it turns logits into weights."""


@dataclass(frozen=True)
class AttentionMath:
    """What an attention module does between ``q . k`` and its weights, read from the module itself.

    Args:
        scaling: factor on ``q . k`` (``module.scaling``: ``D ** -0.5``, Gemma's ``query_pre_attn_scalar **
            -0.5``, Granite's attention multiplier).
        softcap: logits become ``softcap * tanh(logits / softcap)`` (Gemma 2); ``None``: no capping.
        sinks: ``[H_q]`` learned logits of a virtual entry every query attends to, which takes its share of
            the softmax and is then dropped (gpt-oss); ``None``: no sinks.
    """

    scaling: float
    softcap: float | None = None
    sinks: torch.Tensor | None = None

    @classmethod
    def of(cls, module: nn.Module) -> AttentionMath:
        head_dim = getattr(module, "head_dim", None) or module.head_size
        softcap = getattr(module, "attn_logit_softcapping", None)
        sinks = getattr(module, "sinks", None)
        return cls(
            float(getattr(module, "scaling", head_dim**-0.5)),
            float(softcap) if softcap else None,
            sinks.detach() if isinstance(sinks, torch.Tensor) else None,
        )


# --- the forward observer: padding mask of each call -------------------------------------------------------
def _find_argument(module: nn.Module, name: str, args: tuple, kwargs: dict):
    if name in kwargs:
        return kwargs[name]
    try:
        bound = inspect.signature(module.forward).bind_partial(*args, **kwargs)
    except TypeError:
        return None
    return bound.arguments.get(name)


def _observe_model_call(module: nn.Module, args: tuple, kwargs: dict) -> None:
    cache = _find_argument(module, "past_key_values", args, kwargs)
    observe = getattr(cache, "observe_forward", None)
    if observe is None:
        return
    input_ids = _find_argument(module, "input_ids", args, kwargs)
    embeds = _find_argument(module, "inputs_embeds", args, kwargs)
    query_length = (input_ids if input_ids is not None else embeds).shape[1]
    observe(_find_argument(module, "attention_mask", args, kwargs), query_length)
    if hasattr(cache, "observe_input_ids"):
        cache.observe_input_ids(input_ids)


def install_forward_observer(model: nn.Module) -> None:
    """Make ``model`` call ``observe_forward`` on a cache that defines it, before each forward. Idempotent."""
    if model not in _FORWARD_HOOKS:
        _FORWARD_HOOKS[model] = model.register_forward_pre_hook(_observe_model_call, with_kwargs=True)


def left_padding_counts(attention_mask: torch.Tensor | None, batch: int, total: int, device) -> torch.Tensor:
    """Padding tokens at the start of each row of a 2D mask ``[B, total]``; other padding is an error."""
    if attention_mask is None:
        return torch.zeros(batch, dtype=torch.long, device=device)
    if attention_mask.dim() != 2:
        raise ValueError(
            "eviction caches need the usual 2D attention mask [batch, tokens], got shape "
            f"{tuple(attention_mask.shape)}"
        )
    mask = attention_mask.to(device=device, dtype=torch.long)
    if mask.shape != (batch, total):
        raise ValueError(
            f"attention mask of shape {tuple(mask.shape)} does not cover {batch} rows of {total} tokens"
        )
    pads = total - mask.sum(-1)
    starts_real = torch.arange(total, device=device) >= pads[:, None]
    message = (
        "eviction caches support left padding only (each row: zeros, then ones); got a mask with padding "
        "after a real token. Use tokenizer.padding_side = 'left'."
    )
    if torch.compiler.is_compiling():  # a traced graph cannot branch on the mask: it asserts when it runs
        torch._assert_async((mask.bool() == starts_real).all(), message)
    elif not torch.equal(mask.bool(), starts_real):
        raise ValueError(message)
    return pads


class ForwardState:
    """What the current forward call looks like, shared by the layers of one cache."""

    def __init__(self):
        self.observe(None)

    def observe(self, attention_mask: torch.Tensor | None) -> None:
        self.attention_mask = attention_mask
        self._pads: dict[torch.device, torch.Tensor] = {}
        self.max_pad = 0

    def padding(self, batch: int, total: int, device: torch.device) -> torch.Tensor:
        """Left-padding tokens per row ``[B]`` of this forward's mask, checked once per forward and device."""
        if device not in self._pads:
            if self._pads:
                pads = next(iter(self._pads.values())).to(device)
            else:
                pads = left_padding_counts(self.attention_mask, batch, total, device)
                # Under torch.compile the largest padding is not read back (a graph break per layer): it stays
                # 0. Layers compare it with the tokens seen only on steps that hold no padding, where every
                # row's newest token is real, so it cannot exceed them there.
                if batch and not torch.compiler.is_compiling():
                    self.max_pad = int(pads.max())
            self._pads[device] = pads
        return self._pads[device]


# --- query capture: the queries of each attention layer, under any attention implementation ---------------
# The projections that produce queries: separate (most models), fused with keys and values in that order
# (Phi-3), or fused per head as [q | k | v] (GPT-NeoX).
QUERY_PROJECTIONS = ("q_proj", "qkv_proj", "query_key_value")


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The model's self-attention modules in layer order (those with ``layer_idx`` and a query projection)."""
    found = [
        m
        for m in model.modules()
        if isinstance(getattr(m, "layer_idx", None), int) and any(hasattr(m, p) for p in QUERY_PROJECTIONS)
    ]
    return sorted(found, key=lambda m: m.layer_idx)


def _query_projection(module: nn.Module) -> nn.Module:
    return next(getattr(module, name) for name in QUERY_PROJECTIONS if hasattr(module, name))


def rotated_queries(module: nn.Module, projected: torch.Tensor, position_embeddings) -> torch.Tensor:
    """The rotated queries ``[B, H_q, S, D]`` of ``module`` from its query projection's output.

    SDPA never materializes attention probabilities, so score-based caches take the queries the model itself
    projected, apply what the module applies after the projection (q-norm, the RoPE it receives) and score
    them themselves.
    """
    batch, length, _ = projected.shape
    head_dim = getattr(module, "head_dim", None) or module.head_size
    heads = module.config.num_attention_heads
    if hasattr(module, "query_key_value"):  # per head [q | k | v]
        queries = projected.view(batch, length, heads, 3 * head_dim)[..., :head_dim]
    else:
        if hasattr(module, "qkv_proj"):  # queries come first
            projected = projected[..., : heads * head_dim]
        norm = getattr(module, "q_norm", None)
        # Some models normalize all heads' queries together (Olmo 2), others each head (Qwen 3, Gemma 3).
        joint_norm = norm is not None and getattr(norm, "weight", torch.empty(0)).numel() == heads * head_dim
        if joint_norm and heads > 1:
            projected = norm(projected)
        queries = projected.view(batch, length, heads, head_dim)
        if norm is not None and not (joint_norm and heads > 1):
            queries = norm(queries)
    queries = queries.transpose(1, 2)
    if position_embeddings is not None and applies_rope(module):
        cos, sin = position_embeddings
        if cos.shape[-1] * 2 == head_dim and getattr(module.config, "model_type", None) == "gpt_oss":
            # gpt-oss hands over each frequency once and rotates both halves of the head with it.
            cos, sin = torch.cat([cos, cos], dim=-1), torch.cat([sin, sin], dim=-1)
        queries = rotate_half_rope(queries, cos.unsqueeze(1), sin.unsqueeze(1))
    return queries


def applies_rope(module: nn.Module) -> bool:
    """Whether an attention module rotates its queries and keys at all.

    Some models leave positions out of some layers: those with ``use_rope`` false (SmolLM 3, Llama 4) and
    Cohere 2's global layers, which rotate only where they have a sliding window.
    """
    if hasattr(module, "use_rope"):
        return bool(module.use_rope)
    if getattr(module.config, "model_type", None) == "cohere2":
        return getattr(module, "sliding_window", None) is not None
    return True


def _arm_query_capture(module: nn.Module, args: tuple, kwargs: dict) -> None:
    # Before the attention module runs: if this call's cache wants the queries, remember it and the RoPE
    # tables until the query projection (which runs next, inside the module) produces them.
    module._hf_kvcache_capture = None
    cache = kwargs.get("past_key_values", kwargs.get("layer_past"))
    if getattr(cache, "observe_queries", None) is None:
        return
    hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    if cache.wants_queries(module.layer_idx, hidden_states.shape[1]):
        module._hf_kvcache_capture = (cache, kwargs.get("position_embeddings"))


def _make_projection_hook(module: nn.Module):
    def capture(projection: nn.Module, inputs: tuple, projected: torch.Tensor) -> None:
        armed = getattr(module, "_hf_kvcache_capture", None)
        if armed is None:
            return
        module._hf_kvcache_capture = None
        cache, position_embeddings = armed
        with torch.no_grad():
            queries = rotated_queries(module, projected, position_embeddings)
        cache.observe_queries(module.layer_idx, queries, AttentionMath.of(module))

    return capture


def install_query_capture(model: nn.Module, num_layers: int) -> None:
    """Hook every attention module of ``model`` (once per model) so caches can observe the queries.

    A pre-hook on the attention module arms the capture when the call's cache wants the queries; a forward
    hook on its query projection then hands over what the model computed, so no projection runs twice.
    """
    if model in _QUERY_HOOKS:
        return
    modules = attention_modules(model)
    if len(modules) != num_layers:
        raise ValueError(
            f"found {len(modules)} attention modules with a query projection in {type(model).__name__}, "
            f"expected {num_layers}; score-based caches support attention modules with a layer_idx and one "
            f"of {list(QUERY_PROJECTIONS)}"
        )
    handles = []
    for module in modules:
        handles.append(module.register_forward_pre_hook(_arm_query_capture, with_kwargs=True))
        handles.append(_query_projection(module).register_forward_hook(_make_projection_hook(module)))
    _QUERY_HOOKS[model] = handles


# --- RoPE ---------------------------------------------------------------------------------------------------
def rotate_half_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``cos.shape[-1]`` channels of ``x`` in the rotate-half layout of Llama-family models.

    ``cos`` and ``sin`` broadcast against ``x[..., :rotary_dim]``; the channels past ``rotary_dim`` (partial
    rotary, Phi3) pass through.
    """
    rotary_dim = cos.shape[-1]
    rotated, passed = x[..., :rotary_dim], x[..., rotary_dim:]
    first, second = rotated.chunk(2, dim=-1)
    rotated = rotated * cos + torch.cat([-second, first], dim=-1) * sin
    return torch.cat([rotated.to(x.dtype), passed], dim=-1)


def find_rotary_module(model: nn.Module) -> nn.Module | None:
    """The model's rotary-embedding module, or ``None`` without RoPE.

    It holds ``inv_freq``, or one ``<layer type>_inv_freq`` per kind of layer (Gemma 3: local and global
    bases).
    """
    found = [
        m
        for m in model.modules()
        if any(name.endswith("inv_freq") for name, _ in m.named_buffers(recurse=False))
    ]
    if len({id(m) for m in found}) > 1:
        raise ValueError(
            f"model has {len(found)} rotary embeddings ({[type(m).__name__ for m in found]}); re-rotating "
            "keys supports models with a single RoPE. Use positions='original'."
        )
    return found[0] if found else None


class KeyRotator:
    """Moves cached keys ``[B, H, S, D]`` along the RoPE position axis by a per-row offset ``[B]``.

    RoPE rotates each channel pair by ``position * inv_freq``; rotating a key at position ``p`` by ``delta *
    inv_freq`` puts it at ``p + delta``. ``inv_freq`` comes from the model's rotary module, so default, linear
    and llama3 scaling are covered; ``layer_type`` picks that kind of layer's table where the model has one
    per kind.
    """

    def __init__(self, rotary_module: nn.Module, layer_type: str | None = None):
        self.rotary_module = rotary_module
        # Models with a RoPE per kind of layer keep one frequency table per kind.
        per_kind = f"{layer_type}_inv_freq"
        self.frequencies = (
            per_kind if isinstance(getattr(rotary_module, per_kind, None), torch.Tensor) else "inv_freq"
        )
        if not isinstance(getattr(rotary_module, self.frequencies, None), torch.Tensor):
            raise ValueError(
                f"{type(rotary_module).__name__} has no RoPE frequencies for layers of kind {layer_type!r}; "
                "use positions='original'"
            )

    def __deepcopy__(self, memo: dict) -> KeyRotator:
        # A copy of a cache shares the model's rotary module rather than cloning it.
        return self

    def _angles(self, amounts: torch.Tensor, device: torch.device) -> torch.Tensor:
        """``[N, rotary_dim]`` RoPE angles of ``amounts`` ``[N]`` positions, both halves of each pair."""
        inv_freq = getattr(self.rotary_module, self.frequencies).to(device=device, dtype=torch.float32)
        angles = amounts.to(device=device, dtype=torch.float32)[:, None] * inv_freq[None, :]
        return torch.cat([angles, angles], dim=-1)

    def at_positions(
        self, keys: torch.Tensor, positions: torch.Tensor, inverse: bool = False
    ) -> torch.Tensor:
        """Rotate keys ``[B, H, n, D]`` to ``positions`` ``[n]`` (``inverse``: back), alike in every row."""
        angles = self._angles(positions, keys.device)  # [n, rotary_dim]
        sin = -angles.sin() if inverse else angles.sin()
        return rotate_half_rope(keys.float(), angles.cos(), sin).to(keys.dtype)

    def shift(self, keys: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        angles = self._angles(offsets, keys.device)[:, None, None, :]  # [B, 1, 1, rotary_dim]
        return rotate_half_rope(keys.float(), angles.cos(), angles.sin()).to(keys.dtype)

    def mean_rotation(self, count: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos`` and ``sin`` ``[rotary_dim]`` of the average of the rotations by 1, 2, ..., ``count``
        positions: ``rotate_half_rope(x, cos, sin)`` is their mean applied to ``x`` (each channel pair's mean
        rotation is a rotation scaled down, which ``cos`` and ``sin`` carry)."""
        angles = self._angles(torch.arange(1, count + 1), device)
        return angles.cos().mean(0), angles.sin().mean(0)
