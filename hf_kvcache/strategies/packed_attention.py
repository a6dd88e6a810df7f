"""Attention that reads a quantized layer's own storage: no dequantized copy of the packed history.

Paper: KIVI, "A Tuning-Free Asymmetric 2bit Quantization for KV Cache", https://arxiv.org/abs/2402.02750

A quantized layer holds sinks, bit-packed tokens and a full-precision residual (:mod:`.packed_store`). One
decode step attends over all three with one softmax:

* keys are quantized per channel over groups of tokens, so a group's scale and zero fold into the query:
  ``q . k_t = sum_c (q_c s_gc) code_tc + sum_c q_c z_gc``;
* values are quantized per token over groups of channels, so their scales fold into the attention weights:
  ``sum_t p_t v_tc = sum_t (p_t s_t,c/G) code_tc + sum_t p_t z_t,c/G``;
* a rotated store (``rotation=hadamard``) is read with the query rotated the same way, and the packed part
  of the output rotated back; sinks and residual are attended as they are;
* keys stored before their rotary embedding (``keys=pre_rope``) have a rotation per token, which folds into
  no query: the kernel dequantizes one key group at a time into a tile, undoes the Hadamard rotation with a
  fast Walsh-Hadamard transform, turns each token to its position and dots it with the queries that share
  its key head.

The logits of the three parts are concatenated, capped, masked and given the model's attention sinks like the
model's own attention does, and normalized by one softmax, so the result equals "dequantize, then attend"
up to float rounding. Two backends compute the packed part: ``compiled`` (the native kernel of
:mod:`hf_kvcache.kernels`, which unpacks one key group at a time into a tile that stays in cache) and
``torch`` (the same sums as batched matrix products over the unpacked codes).
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import torch

from hf_kvcache.kernels import KernelUnavailable, load_packed_kernels
from hf_kvcache.kernels.triton_packed import require_triton, triton_rope_scores, triton_sums, unsupported_rope
from hf_kvcache.strategies.packing import torch_packed_scores, torch_packed_values, unpacked_group_slices
from hf_kvcache.strategies.rotation import hadamard_signs, rotated_tensors

ATTENTION_BACKENDS = ("auto", "compiled", "triton", "torch", "dense")
# Longer query chunks (prefill) attend over a dequantized copy: there one matrix product per chunk is cheaper
# than the per-group work of the packed path.
MAX_STORED_QUERIES = 16
_warned: set[str] = set()
TRITON_ROPE = SimpleNamespace(rope_scores=triton_rope_scores)  # read like the native kernels


def compiled_kernels(backend: str, device: torch.device):
    """The native kernels when ``backend`` asks for them (``auto`` or ``compiled``) on this device.

    Under ``torch.compile`` the answer is ``None``: dynamo cannot trace a foreign call, and the torch
    computation it traces instead is fused by Inductor into generated code of its own."""
    if backend in ("torch", "triton") or torch.compiler.is_compiling():
        return None
    if device.type != "cpu":
        if backend == "compiled":
            raise ValueError(
                f"attention='compiled' runs the native CPU kernel; this layer is on {device}. "
                "Use attention='auto' or 'torch' there"
            )
        return None
    try:
        return load_packed_kernels()
    except KernelUnavailable as error:
        if backend == "compiled":
            raise
        if "compiled" not in _warned:
            _warned.add("compiled")
            warnings.warn(
                f"hf-kvcache's packed-attention kernel is unavailable ({error}); attending with torch "
                "instead. Set attention='compiled' to make this an error.",
                stacklevel=2,
            )
        return None


def space_arguments(packed, queries: torch.Tensor) -> dict:
    """How the native kernels read a store whose space differs from the model's (see
    :meth:`~hf_kvcache.kernels.PackedKernels.decode`): the rotated query for keys rotated after RoPE, the
    frequencies and the Hadamard signs for keys before RoPE, the signs for rotated values."""
    rotate_keys, rotate_values = rotated_tensors(packed.rotation_kind)  # keys are rotated only with values
    signs = hadamard_signs(queries.shape[-1], queries.device) if rotate_values else None
    arguments = {"value_signs": signs}
    if packed.key_rope is not None:
        rope = packed.key_rope
        arguments["inv_freq"] = getattr(rope.rotary_module, rope.frequencies)
        arguments["key_signs"] = signs if rotate_keys else None
    elif rotate_keys:
        arguments["packed_query"] = queries @ packed.rotation.to(queries.dtype)
    return arguments


def pre_rope_scores(packed, queries: torch.Tensor, kernels) -> torch.Tensor:
    """``q . k`` ``[B, H, M, n]`` over a store whose keys were quantized before their rotary embedding: each
    token has its own rotation, which folds into no query, so a kernel (``kernels.rope_scores``: the native
    one, or :func:`triton_rope_scores` as ``TRITON_ROPE``) turns each dequantized key group to its positions
    in a tile; without one (``kernels`` ``None``) the keys are dequantized and turned a bounded slice of
    groups at a time."""
    size, nbits = packed.group_size, packed.key_codec.nbits
    if kernels is None:
        parts = []
        for first, end, keys in unpacked_group_slices(packed.key_codes, size, nbits):
            scale, zero = packed.group_scale[:, :, first:end], packed.group_zero[:, :, first:end]
            keys = keys * scale.float().unsqueeze(3) + zero.float().unsqueeze(3)  # [B, H, g, G, D]
            keys = packed.keys_from_stored(keys.flatten(2, 3), start=first * size)
            parts.append(queries @ keys.float().transpose(-1, -2))
        return torch.cat(parts, dim=-1)
    space = space_arguments(packed, queries)
    return kernels.rope_scores(
        packed.key_codes,
        queries,
        packed.group_scale,
        packed.group_zero,
        size,
        nbits,
        space["inv_freq"],
        packed.first_position,
        space["key_signs"],
    )


def _packed_part(packed, queries: torch.Tensor, backend: str):
    """The packed tokens' logits (unscaled) ``[B, H, M, n]`` and a function of their weights giving their
    share of the output."""
    kernels = compiled_kernels(backend, queries.device)
    rotate_keys, rotate_values = rotated_tensors(packed.rotation_kind)
    # The sums run in float32; a float64 model's store keeps its rotation in float64.
    rotation = packed.rotation.to(queries.dtype) if packed.rotation is not None else None
    size = packed.group_size
    if kernels is not None:
        scores, values = kernels.functions
    else:  # the Triton sums on a GPU, else torch's
        sums = triton_sums(backend, size, queries.device)
        scores, values = sums or (torch_packed_scores, torch_packed_values)
    if packed.key_rope is not None:
        # Asked for by name only: the RoPE kernel has run in Triton's interpreter, not yet compiled on a GPU.
        # Partial rotary embeddings and other head sizes are turned by torch.
        # (the frequencies are looked up only when the kernel was asked for)
        readable = backend == "triton" and not unsupported_rope(
            queries.shape[-1], space_arguments(packed, queries)["inv_freq"]
        )
        if kernels is None and readable:
            kernels = TRITON_ROPE
        logits = pre_rope_scores(packed, queries, kernels)
    else:
        folded = queries @ rotation if rotate_keys else queries
        logits = scores(
            packed.key_codes, folded, packed.group_scale, packed.group_zero, size, packed.key_codec.nbits
        )

    def output(weights: torch.Tensor) -> torch.Tensor:
        out = values(
            packed.value_codes, weights, packed.value_scale, packed.value_zero, size, packed.value_codec.nbits
        )
        return out @ rotation.T if rotate_values else out

    return logits, output


def _fused_kernels(layer, queries: torch.Tensor, length: int, attention_mask, softcap, sinks, backend: str):
    """The native kernels when one call can do the whole step: the common case of one unmasked query per
    head (decoding without padding), no soft-capping or sink logits, float32 storage. Other steps compose the
    kernels' packed part with torch."""
    if (
        attention_mask is not None
        or softcap is not None
        or sinks is not None
        or length != 1
        or layer.key_buffer.dtype != torch.float32
        or not layer.packed_length
    ):
        return None
    return compiled_kernels(backend, queries.device)


def _dense_output(values: torch.Tensor):
    """A part held in the model's dtype: its share of the output is a plain product."""
    values = values.float()
    return lambda weights: weights @ values


def _masked(logits: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Apply a boolean (keep) or additive mask ``[B, 1 or H, q, >= total]``; ``None`` with several queries
    means causal, the queries being the last ones."""
    queries, total = logits.shape[-2:]
    if attention_mask is None:
        if queries == 1:
            return logits
        rows = torch.arange(queries, device=logits.device)[:, None] + total - queries
        return logits.masked_fill(torch.arange(total, device=logits.device) > rows, float("-inf"))
    if attention_mask.shape[-1] < total:
        raise ValueError(
            f"attention mask covers {attention_mask.shape[-1]} keys, but the layer holds {total}; "
            "the mask and the cache disagree on the sequence"
        )
    mask = attention_mask[..., :total]
    if mask.dtype == torch.bool:
        # A finite floor, as the models' eager masks use: a padding query that sees nothing gets a uniform row
        # rather than NaN, which would reach the cache through the next layer's keys and values.
        return logits.masked_fill(~mask, torch.finfo(logits.dtype).min)
    return logits + mask.float()


def attention_weights(
    logits: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weights ``[B, H_q, q, total]`` (float32) from unscaled logits ``q . k``, as the models' eager attention
    computes them: scaled, soft-capped, masked, normalized with each head's sink logit taking its share."""
    batch, _, length, _ = logits.shape
    logits = logits * scaling
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    logits = _masked(logits, attention_mask)
    if sinks is None:
        return torch.softmax(logits, dim=-1)
    # sinks [H_q], or [B, H_q] where the batch entries are different heads (a ragged store's pairs)
    sink = sinks.float().reshape(-1, logits.shape[1], 1, 1).expand(batch, -1, length, 1)
    return torch.softmax(torch.cat([logits, sink], dim=-1), dim=-1)[..., :-1]


def dense_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, attention_mask, scaling: float, **math
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``query`` ``[B, H_q, q, D]`` over ``keys``/``values`` ``[B, H_kv, N, D]`` held in the
    model's dtype, returning the weights with the output (``[B, q, H_q, D]``, ``[B, H_q, q, N]``), which
    score-based caches read instead of computing them a second time."""
    batch, query_heads, length, head_dim = query.shape
    kv_heads = keys.shape[1]
    queries = query.float().reshape(batch, kv_heads, query_heads // kv_heads * length, head_dim)
    unmasked = length == 1 and attention_mask is None and not any(v is not None for v in math.values())
    kernels = compiled_kernels("auto", query.device) if unmasked and _slot_rows(keys, values) else None
    if kernels is not None:  # one native call: logits, softmax and output
        out, weights = kernels.dense_decode(queries, keys, values, scaling)
        weights = weights.view(batch, query_heads, length, -1)
    else:
        logits = (queries @ keys.float().transpose(-1, -2)).view(batch, query_heads, length, -1)
        weights = attention_weights(logits, attention_mask, scaling, **math)
        out = weights.reshape(batch, kv_heads, -1, weights.shape[-1]) @ values.float()
    out = out.view(batch, query_heads, length, head_dim).transpose(1, 2).to(query.dtype)
    return out, weights


def _slot_rows(keys: torch.Tensor, values: torch.Tensor) -> bool:
    """Whether float32 ``keys`` and ``values`` ``[B, H, N, D]`` are the first ``N`` rows of contiguous
    ``[B, H, slots, D]`` buffers of one shape, which the native kernel reads in place."""
    batch, heads, _, head_dim = keys.shape
    layout = (heads * keys.stride(1), keys.stride(1), head_dim, 1)
    return all(t.dtype == torch.float32 and t.stride() == layout for t in (keys, values))


def attend_quantized(
    layer,
    query: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``query`` ``[B, H_q, q, D]`` over a :class:`~.packed_store.QuantizedTokens` layer.

    Returns ``(output [B, q, H_q, D], weights [B, H_q, q, total])`` like transformers' attention functions.
    ``softcap``: logits become ``softcap * tanh(logits / softcap)``; ``sinks`` ``[H_q]``: logits of a virtual
    entry that takes its share of the softmax (gpt-oss).
    """
    batch, query_heads, length, head_dim = query.shape
    kv_heads = layer.key_buffer.shape[1]
    # Query heads that share a key head are consecutive; they read that head's storage together.
    queries = query.float().reshape(batch, kv_heads, query_heads // kv_heads * length, head_dim)
    fused = _fused_kernels(layer, queries, length, attention_mask, softcap, sinks, backend)
    if fused is not None:
        out, weights = fused.decode(
            queries,
            (layer.sink_keys, layer.sink_values),
            layer.packed,
            (layer.key_buffer, layer.value_buffer),
            scaling,
            **space_arguments(layer.packed, queries),
        )
        out = out.view(batch, query_heads, length, head_dim).transpose(1, 2).to(query.dtype)
        return out, weights.view(batch, query_heads, length, -1).to(query.dtype)
    parts = [(layer.sink_keys, layer.sink_values), None, (layer.key_buffer, layer.value_buffer)]
    if not layer.packed_length:
        parts.pop(1)
    logits, outputs = [], []
    for part in parts:
        if part is None:
            part_logits, output = _packed_part(layer.packed, queries, backend)
        else:
            keys, values = part
            part_logits = queries @ keys.float().transpose(-1, -2)
            output = _dense_output(values)
        logits.append(part_logits)
        outputs.append(output)
    sizes = [part.shape[-1] for part in logits]
    logits = torch.cat(logits, dim=-1).view(batch, query_heads, length, -1)
    weights = attention_weights(logits, attention_mask, scaling, softcap, sinks)
    grouped = weights.reshape(batch, kv_heads, -1, weights.shape[-1])
    out, start = None, 0
    for output, size in zip(outputs, sizes, strict=True):
        share = output(grouped[..., start : start + size].contiguous())
        out = share if out is None else out + share
        start += size
    out = out.view(batch, query_heads, length, head_dim).transpose(1, 2).to(query.dtype)
    return out, weights.to(query.dtype)


class StoredAttention:
    """Mixin for a quantized cache layer: serve short queries from its storage (:mod:`hf_kvcache.attention`).

    The host layer defines ``reads_storage`` (whether it can be read this way at all), ``append_tokens(keys,
    values)`` and ``quantization`` (its :class:`~.quantized.QuantizedOptions`).
    """

    @staticmethod
    def require_attention_backend(model: torch.nn.Module, options) -> None:
        """Fail when the cache is built, not mid-generation, if ``options.attention`` cannot serve ``model``:
        ``'compiled'`` off the CPU or where no kernel builds, ``'triton'`` off CUDA, without Triton, or with a
        group size its tiles cannot take."""
        devices = sorted({parameter.device.type for parameter in model.parameters()})
        if options.attention == "triton":
            for device in devices:
                require_triton(torch.device(device), options.group_size)
        elif options.attention == "compiled":
            if devices != ["cpu"]:
                raise ValueError(
                    f"attention='compiled' runs the native CPU kernel; the model is on {devices}. "
                    "Use attention='auto' or 'torch' there"
                )
            load_packed_kernels()

    def store_for_attention(self, key_states: torch.Tensor, value_states: torch.Tensor) -> bool | None:
        """Store the new tokens and return ``True`` if the coming attention call reads the storage; ``None``
        (a long query, nothing packed yet): nothing stored, the call goes through the layer's ``update``."""
        if not self.reads_storage or key_states.shape[-2] > MAX_STORED_QUERIES or not self.packed_length:
            return None
        self.append_tokens(key_states, value_states)
        return True

    def attend_stored(self, query: torch.Tensor, attention_mask, scaling: float, **math):
        """The attention call the entry point hands over; ``math``: ``softcap`` and ``sinks``, as for
        :func:`attend_quantized`. The new tokens attend in full precision; then the oldest residual tokens
        are packed, as the layer's ``update`` does after the model's attention."""
        result = attend_quantized(
            self, query, attention_mask, scaling, backend=self.quantization.attention, **math
        )
        self.settle()
        return result
