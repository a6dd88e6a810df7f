"""The Triton source of :mod:`hf_kvcache.kernels.triton_packed`'s kernels (see there for the layout).

Importing this module imports Triton and decorates the kernels, so it is imported only when a kernel is first
needed: Triton decides then whether ``TRITON_INTERPRET`` runs them in its interpreter.
"""

import triton
import triton.language as tl


@triton.jit
def unpacked_group(base, row_stride, channels, channel_ok, G: tl.constexpr, NBITS: tl.constexpr):
    """The codes of one token group as float32 ``[G, BLOCK_D]``."""
    tokens = tl.arange(0, G)
    if NBITS == 3:
        low_rows: tl.constexpr = G // 4
        high_rows: tl.constexpr = G // 8
        pointers = base + (tokens % low_rows)[:, None] * row_stride + channels[None, :]
        low = tl.load(pointers, mask=channel_ok[None, :], other=0).to(tl.int32)
        low = (low >> ((tokens // low_rows) * 2)[:, None]) & 3
        pointers = base + (low_rows + tokens % high_rows)[:, None] * row_stride + channels[None, :]
        high = tl.load(pointers, mask=channel_ok[None, :], other=0).to(tl.int32)
        high = (high >> (tokens // high_rows)[:, None]) & 1
        codes = low | (high << 2)
    else:
        rows: tl.constexpr = G * NBITS // 8
        pointers = base + (tokens % rows)[:, None] * row_stride + channels[None, :]
        codes = tl.load(pointers, mask=channel_ok[None, :], other=0).to(tl.int32)
        codes = (codes >> ((tokens // rows) * NBITS)[:, None]) & ((1 << NBITS) - 1)
    return codes.to(tl.float32)


@triton.jit
def row_and_channels(row, heads, head_dim, BLOCK_D: tl.constexpr):
    """A program's batch row and KV head, and its channel indices with their mask."""
    # int64 offsets: a long history in a wide batch passes 2**31 elements
    b, h = (row // heads).to(tl.int64), (row % heads).to(tl.int64)
    channels = tl.arange(0, BLOCK_D)
    return b, h, channels, channels < head_dim


@triton.jit
def scores_kernel(codes, query, scale, zero, out, heads, queries, head_dim,
                  code_b, code_h, code_r, query_b, query_h, query_m, scale_b, scale_h, scale_g,
                  zero_b, zero_h, zero_g, out_b, out_h, out_m,
                  G: tl.constexpr, NBITS: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
    row, group = tl.program_id(0), tl.program_id(1)
    b, h, channels, channel_ok = row_and_channels(row, heads, head_dim, BLOCK_D)
    base = codes + b * code_b + h * code_h + group * (G * NBITS // 8) * code_r
    keys = unpacked_group(base, code_r, channels, channel_ok, G, NBITS)  # [G, D]
    group_scale = tl.load(scale + b * scale_b + h * scale_h + group * scale_g + channels, mask=channel_ok)
    group_zero = tl.load(zero + b * zero_b + h * zero_h + group * zero_g + channels, mask=channel_ok)
    group_scale, group_zero = group_scale.to(tl.float32), group_zero.to(tl.float32)
    tokens = group * G + tl.arange(0, G)
    for first in range(0, queries, BLOCK_M):
        rows_m = first + tl.arange(0, BLOCK_M)
        row_ok = rows_m < queries
        q_pointers = query + b * query_b + h * query_h + rows_m[:, None] * query_m + channels[None, :]
        q = tl.load(q_pointers, mask=row_ok[:, None] & channel_ok[None, :], other=0.0)
        # q . (code * scale + zero) = (q * scale) . code + q . zero, per channel of the group
        logits = tl.dot(q * group_scale[None, :], tl.trans(keys), input_precision="ieee")
        logits += tl.sum(q * group_zero[None, :], axis=1)[:, None]
        o_pointers = out + b * out_b + h * out_h + rows_m[:, None] * out_m + tokens[None, :]
        tl.store(o_pointers, logits, mask=row_ok[:, None])


@triton.jit
def values_kernel(codes, weights, scale, zero, out, heads, queries, head_dim, groups, groups_per_split,
                  code_b, code_h, code_r, weight_b, weight_h, weight_m, scale_b, scale_h, scale_n,
                  zero_b, zero_h, zero_n, out_s, out_b, out_h, out_m,
                  G: tl.constexpr, NBITS: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
    row, split = tl.program_id(0), tl.program_id(1)
    b, h, channels, channel_ok = row_and_channels(row, heads, head_dim, BLOCK_D)
    channel_group = channels // G  # values have a scale per token and group of G channels
    first_group = split * groups_per_split
    end_group = tl.minimum(first_group + groups_per_split, groups)
    for first in range(0, queries, BLOCK_M):
        rows_m = first + tl.arange(0, BLOCK_M)
        row_ok = rows_m < queries
        total = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        for group in range(first_group, end_group):
            base = codes + b * code_b + h * code_h + group * (G * NBITS // 8) * code_r
            values = unpacked_group(base, code_r, channels, channel_ok, G, NBITS)  # [G, D]
            tokens = group * G + tl.arange(0, G)
            at = tokens[:, None] * scale_n + channel_group[None, :]
            token_scale = tl.load(scale + b * scale_b + h * scale_h + at, mask=channel_ok[None, :])
            at = tokens[:, None] * zero_n + channel_group[None, :]
            token_zero = tl.load(zero + b * zero_b + h * zero_h + at, mask=channel_ok[None, :])
            values = values * token_scale.to(tl.float32) + token_zero.to(tl.float32)
            w_pointers = weights + b * weight_b + h * weight_h + rows_m[:, None] * weight_m + tokens[None, :]
            w = tl.load(w_pointers, mask=row_ok[:, None], other=0.0)
            total += tl.dot(w, values, input_precision="ieee")
        o_pointers = out + split * out_s + b * out_b + h * out_h + rows_m[:, None] * out_m + channels[None, :]
        tl.store(o_pointers, total, mask=row_ok[:, None] & channel_ok[None, :])


@triton.jit
def walsh_hadamard(x, G: tl.constexpr, D: tl.constexpr, LOG2_D: tl.constexpr):
    """The unnormalized Walsh-Hadamard transform of each row of ``x`` ``[G, D]`` (``D`` a power of two): one
    butterfly ``(a + b, a - b)`` per bit of the channel index."""
    for stage in tl.static_range(LOG2_D):
        stride: tl.constexpr = 1 << stage
        # channel = (j * 2 + bit) * stride + l: bring the bit last, where split and join work
        pairs = tl.permute(tl.reshape(x, (G, D // (2 * stride), 2, stride)), (0, 1, 3, 2))
        a, b = tl.split(pairs)
        x = tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 1, 3, 2)), (G, D))
    return x


@triton.jit
def rope_scores_kernel(codes, query, scale, zero, out, inv_freq, signs, first_position, heads, queries,
                       code_b, code_h, code_r, query_b, query_h, query_m, scale_b, scale_h, scale_g,
                       zero_b, zero_h, zero_g, out_b, out_h, out_m,
                       G: tl.constexpr, NBITS: tl.constexpr, D: tl.constexpr, LOG2_D: tl.constexpr,
                       ROTATED: tl.constexpr, BLOCK_M: tl.constexpr):  # fmt: skip
    row, group = tl.program_id(0), tl.program_id(1)
    b, h, channels, channel_ok = row_and_channels(row, heads, D, D)
    base = codes + b * code_b + h * code_h + group * (G * NBITS // 8) * code_r
    keys = unpacked_group(base, code_r, channels, channel_ok, G, NBITS)  # [G, D], as stored
    group_scale = tl.load(scale + b * scale_b + h * scale_h + group * scale_g + channels).to(tl.float32)
    group_zero = tl.load(zero + b * zero_b + h * zero_h + group * zero_g + channels).to(tl.float32)
    keys = keys * group_scale[None, :] + group_zero[None, :]
    if ROTATED:  # x @ R.T for R = diag(s) @ H: the transform, then each channel's factor s / sqrt(D)
        keys = walsh_hadamard(keys, G, D, LOG2_D) * tl.load(signs + channels)[None, :]
    # rotate-half RoPE: channel c pairs with c + D / 2, both turned by position * inv_freq[c]
    first_half, second_half = tl.split(tl.permute(tl.reshape(keys, (G, 2, D // 2)), (0, 2, 1)))
    tokens = group * G + tl.arange(0, G)
    half = tl.arange(0, D // 2)
    angles = (first_position + tokens).to(tl.float32)[:, None] * tl.load(inv_freq + half)[None, :]
    cos, sin = tl.cos(angles), tl.sin(angles)
    turned_first = first_half * cos - second_half * sin
    turned_second = second_half * cos + first_half * sin
    for first in range(0, queries, BLOCK_M):
        rows_m = first + tl.arange(0, BLOCK_M)
        row_ok = rows_m < queries
        q_rows = query + b * query_b + h * query_h + rows_m[:, None] * query_m
        q_first = tl.load(q_rows + half[None, :], mask=row_ok[:, None], other=0.0)
        q_second = tl.load(q_rows + D // 2 + half[None, :], mask=row_ok[:, None], other=0.0)
        if D // 2 >= 16:  # tl.dot's smallest inner size
            logits = tl.dot(q_first, tl.trans(turned_first), input_precision="ieee")
            logits += tl.dot(q_second, tl.trans(turned_second), input_precision="ieee")
        else:
            products = q_first[:, None, :] * turned_first[None, :, :]
            logits = tl.sum(products + q_second[:, None, :] * turned_second[None, :, :], axis=2)
        o_pointers = out + b * out_b + h * out_h + rows_m[:, None] * out_m + tokens[None, :]
        tl.store(o_pointers, logits, mask=row_ok[:, None])
