// Attention over bit-packed KIVI codes without a dequantized copy of the history (hf_kvcache.kernels).
//
// Layout (hf_kvcache/strategies/packing.py, "grouped"): per (batch, head) row, key group g holds G tokens as
// G * NB / 8 * D bytes; unpacking that run planar-wise gives the codes of token t, channel c at t * D + c.
// Keys are quantized per channel over the group (scale/zero [BH, groups, D]); values per token over groups of
// G channels (scale/zero [BH, n, D / G]). Everything else is float32.
//
// Scores: q . k = sum_c (q_c s_gc) code_tc + sum_c q_c z_gc, so each group's scales fold into the query once.
// Output: sum_t p_t (code_tc s_t,c/G + z_t,c/G): the codes are unpacked one group at a time into a tile that
// stays in L1 and never exists for the whole history.
#include <stdint.h>
#include <string.h>
#include <math.h>
#include <omp.h>

namespace {

constexpr int32_t EMPTY = 2147483647;  // packed_slots.EMPTY_SLOT

template <int NB>
inline void unpack_run(const uint8_t* __restrict bytes, int64_t count, float* __restrict out) {
    if constexpr (NB == 8) {
        for (int64_t i = 0; i < count; i++) out[i] = bytes[i];
    } else if constexpr (NB == 3) {  // a 2-bit plane of count / 4 bytes, then a 1-bit plane of count / 8
        const int64_t low = count / 4, high = count / 8;
        for (int s = 0; s < 4; s++)
            for (int64_t i = 0; i < low; i++) out[s * low + i] = (bytes[i] >> (2 * s)) & 3;
        const uint8_t* top = bytes + low;
        for (int s = 0; s < 8; s++)
            for (int64_t i = 0; i < high; i++) out[s * high + i] += (float)(((top[i] >> s) & 1) << 2);
    } else {
        constexpr int per_byte = 8 / NB, mask = (1 << NB) - 1;
        const int64_t run = count / per_byte;
        for (int s = 0; s < per_byte; s++) {
            float* o = out + s * run;
            for (int64_t i = 0; i < run; i++) o[i] = (bytes[i] >> (s * NB)) & mask;
        }
    }
}

// Calls body(bh, g, tile, scale, zero) for key group g of row bh, for every group of every row, spread over
// the team: tile [G, D] holds the group's codes unpacked, scale and zero its per-channel [D] key scale/zero.
template <int NB, typename Body>
inline void for_each_key_group(const uint8_t* codes, const float* ks, const float* kz, int64_t BH, int64_t groups,
                               int64_t G, int64_t D, Body body) {
    const int64_t group_bytes = G * NB / 8 * D;
#pragma omp for collapse(2) schedule(static)
    for (int64_t bh = 0; bh < BH; bh++)
        for (int64_t g = 0; g < groups; g++) {
            float tile[G * D];
            unpack_run<NB>(codes + (bh * groups + g) * group_bytes, G * D, tile);
            body(bh, g, tile, ks + (bh * groups + g) * D, kz + (bh * groups + g) * D);
        }
}

// DC > 0: the head size known at compile time (the common sizes); DC == 0: read from D.
// out[bh, m, col0 + t] = scaling * q . k_t, rows of ld floats.
template <int NB, int DC>
void scores(const uint8_t* codes, const float* q, const float* ks, const float* kz, float* out, int64_t BH,
            int64_t groups, int64_t G, int64_t Druntime, int64_t M, int64_t ld = -1, int64_t col0 = 0,
            float scaling = 1.f) {
    const int64_t D = DC > 0 ? DC : Druntime;
    if (ld < 0) ld = groups * G;
    for_each_key_group<NB>(codes, ks, kz, BH, groups, G, D, [&](int64_t bh, int64_t g, const float* tile,
                                                              const float* scale, const float* zero) {
        float folded[M * D], offset[M];
        for (int64_t m = 0; m < M; m++) {
            const float* qm = q + (bh * M + m) * D;
            float acc = 0.f;
#pragma omp simd reduction(+ : acc)
            for (int64_t c = 0; c < D; c++) {
                folded[m * D + c] = qm[c] * scale[c];
                acc += qm[c] * zero[c];
            }
            offset[m] = acc;
        }
        for (int64_t t = 0; t < G; t++) {
            const float* k = tile + t * D;
            for (int64_t m = 0; m < M; m++) {
                const float* qm = folded + m * D;
                float acc = 0.f;
#pragma omp simd reduction(+ : acc)
                for (int64_t c = 0; c < D; c++) acc += qm[c] * k[c];
                out[(bh * M + m) * ld + col0 + g * G + t] = (acc + offset[m]) * scaling;
            }
        }
    });
}

// The unnormalized Walsh-Hadamard transform of each block of `block` channels, the inverse of the stored
// space's randomized Hadamard rotation up to the signs (which carry 1 / sqrt(block) and are applied by the
// caller), on G tokens at once: channel c of token u at x[c * stride + u], butterflies between channel rows.
inline void hadamard_rows(float* x, int64_t D, int64_t G, int64_t stride, int64_t block) {
    for (int64_t begin = 0; begin < D; begin += block)
        for (int64_t h = 1; h < block; h *= 2)
            for (int64_t i = begin; i < begin + block; i += 2 * h)
                for (int64_t j = i; j < i + h; j++) {
                    float* a = x + j * stride;
                    float* b = x + (j + h) * stride;
#pragma omp simd
                    for (int64_t u = 0; u < G; u++) {
                        const float p = a[u], r = b[u];
                        a[u] = p + r;
                        b[u] = p - r;
                    }
                }
}

// How the packed tokens' space differs from the model's (hf_kvcache/strategies/rotation.py): keys stored
// before their rotary embedding (inv_freq [half] non-null: token t of the store sits at position first + t),
// keys and/or values after a randomized Hadamard rotation (signs [D], divided by sqrt(block), non-null).
// angles: cos then sin of each key group's start angle (first + g * G) * f_i, [groups, half] each, then of
// each offset u * f_i within a group, [half, G] each (see angle_tables).
struct Space {
    const float* inv_freq = nullptr;
    int64_t half = 0, first = 0, block = 1;
    const float* key_signs = nullptr;
    const float* value_signs = nullptr;
    const float* angles = nullptr;
};

// Scores over keys stored before their rotary embedding (keys=pre_rope), perhaps after a Hadamard rotation:
// each token has its own rotation, so no per-group fold into the query exists. A group's tile is dequantized
// into channel rows (rows[c * G + u]), so that every later step runs along the tokens: the Hadamard rotation
// undone, each channel pair (i, i + half) turned by its angle at every token (a group's start angle and the
// token's offset joined by the angle-sum identities), and the M queries of the key head dotted with the keys,
// which they share. out[bh, m, col0 + g * G + u] = scaling * q . k, rows of ld floats.
template <int NB, int DC>
void rope_scores(const uint8_t* codes, const float* q, const float* ks, const float* kz, float* out, int64_t BH,
                 int64_t groups, int64_t G, int64_t Druntime, int64_t M, const Space& space, int64_t ld = -1,
                 int64_t col0 = 0, float scaling = 1.f) {
    const int64_t D = DC > 0 ? DC : Druntime, half = space.half;
    const float* signs = space.key_signs;
    const float* offsets = space.angles + 2 * groups * half;  // cos [half, G], then sin
    if (ld < 0) ld = groups * G;
    for_each_key_group<NB>(codes, ks, kz, BH, groups, G, D, [&](int64_t bh, int64_t g, const float* tile,
                                                              const float* scale, const float* zero) {
        float rows[D * G], acc[G];
        if (G % 8 == 0 && D % 8 == 0) {  // in blocks of 8 x 8, which both stay in a few cache lines
            for (int64_t u0 = 0; u0 < G; u0 += 8)
                for (int64_t c0 = 0; c0 < D; c0 += 8)
                    for (int64_t c = c0; c < c0 + 8; c++) {
                        const float sc = scale[c], zc = zero[c];
#pragma omp simd
                        for (int64_t u = u0; u < u0 + 8; u++) rows[c * G + u] = tile[u * D + c] * sc + zc;
                    }
        } else {
            for (int64_t u = 0; u < G; u++)
                for (int64_t c = 0; c < D; c++) rows[c * G + u] = tile[u * D + c] * scale[c] + zero[c];
        }
        if (signs != nullptr) {
            hadamard_rows(rows, D, G, G, space.block);
            for (int64_t c = 0; c < D; c++) {
                const float s = signs[c];
#pragma omp simd
                for (int64_t u = 0; u < G; u++) rows[c * G + u] *= s;
            }
        }
        for (int64_t i = 0; i < half; i++) {
            float* a = rows + i * G;
            float* b = rows + (i + half) * G;
            const float sc = space.angles[g * half + i], ss = space.angles[(groups + g) * half + i];
            const float* oc = offsets + i * G;
            const float* os = offsets + (half + i) * G;
#pragma omp simd
            for (int64_t u = 0; u < G; u++) {
                const float cu = sc * oc[u] - ss * os[u], su = ss * oc[u] + sc * os[u];
                const float x = a[u], y = b[u];
                a[u] = x * cu - y * su;
                b[u] = y * cu + x * su;
            }
        }
        for (int64_t m = 0; m < M; m++) {
            const float* qm = q + (bh * M + m) * D;
            for (int64_t u = 0; u < G; u++) acc[u] = 0.f;
            for (int64_t c = 0; c < D; c++) {
                const float w = qm[c];
                const float* r = rows + c * G;
#pragma omp simd
                for (int64_t u = 0; u < G; u++) acc[u] += w * r[u];
            }
            float* o = out + (bh * M + m) * ld + col0 + g * G;
            for (int64_t u = 0; u < G; u++) o[u] = acc[u] * scaling;
        }
    });
}

// The angle tables of a Space with keys before RoPE (see Space), for `groups` key groups of G tokens, or
// null. Group starts step by G * f_i: a rotation applied in double, exact to far below float rounding over
// any length a cache holds, where a cos and a sin per group and channel pair would cost more than the keys.
inline float* angle_tables(Space& space, int64_t groups, int64_t G) {
    if (space.inv_freq == nullptr) return nullptr;
    const int64_t half = space.half;
    float* tables = new float[2 * (groups + G) * half + 1];
    float* offsets = tables + 2 * groups * half;
    for (int64_t i = 0; i < half; i++) {
        const double f = (double)space.inv_freq[i];
        double c = cos((double)space.first * f), s = sin((double)space.first * f);
        const double step_c = cos((double)G * f), step_s = sin((double)G * f);
        for (int64_t g = 0; g < groups; g++) {
            tables[g * half + i] = (float)c;
            tables[(groups + g) * half + i] = (float)s;
            const double next_c = c * step_c - s * step_s;
            s = s * step_c + c * step_s;
            c = next_c;
        }
        for (int64_t u = 0; u < G; u++) {
            offsets[i * G + u] = (float)cos((double)u * f);
            offsets[(half + i) * G + u] = (float)sin((double)u * f);
        }
    }
    space.angles = tables;
    return tables;
}

// One packed value row (codes of D channels, unpacked into `v`) with its per-channel-group scale and zero
// (D / G of each): o_m += weight_m * value for each of the M queries (weights at p[m * ld]).
// DC: the head size known at compile time, or 0 (then Druntime).
template <int DC>
inline void add_value_row(const float* v, const float* scale, const float* zero, int64_t Druntime, int64_t G,
                          int64_t M, const float* p, int64_t ld, float* o) {
    const int64_t D = DC > 0 ? DC : Druntime;
    float row[D];
    for (int64_t cg = 0; cg < D / G; cg++) {
        const float s = scale[cg], z = zero[cg];
#pragma omp simd
        for (int64_t j = 0; j < G; j++) row[cg * G + j] = v[cg * G + j] * s + z;
    }
    for (int64_t m = 0; m < M; m++) {
        const float weight = p[m * ld];
        float* om = o + m * D;
#pragma omp simd
        for (int64_t c = 0; c < D; c++) om[c] += weight * row[c];
    }
}

// out += the sum over the team's threads of their partial outputs (width floats each).
inline void add_partials(const float* partial, int64_t width, float* out) {
    const int team = omp_get_num_threads();
#pragma omp for schedule(static)
    for (int64_t i = 0; i < width; i++) {
        float acc = out[i];
        for (int th = 0; th < team; th++) acc += partial[th * width + i];
        out[i] = acc;
    }
}

// partial[thread] += weights (rows of ld floats, packed tokens from column col0) @ V; then out += the sum of
// the partials (out must hold zeros, or what earlier parts added).
template <int NB, int DC>
void values(const uint8_t* codes, const float* p, const float* vs, const float* vz, float* out, int64_t BH,
            int64_t groups, int64_t G, int64_t Druntime, int64_t M, float* partial, int64_t ld = -1,
            int64_t col0 = 0) {
    const int64_t D = DC > 0 ? DC : Druntime;
    const int64_t group_bytes = G * NB / 8 * D, n = groups * G, channel_groups = D / G, width = BH * M * D;
    if (ld < 0) ld = n;
    // Each thread sums its share of the tokens into its own output; the shares are added at the end.
    float* mine = partial + (int64_t)omp_get_thread_num() * width;
    memset(mine, 0, sizeof(float) * width);
#pragma omp for collapse(2) schedule(static)
    for (int64_t bh = 0; bh < BH; bh++)
        for (int64_t g = 0; g < groups; g++) {
            float tile[G * D];
            unpack_run<NB>(codes + (bh * groups + g) * group_bytes, G * D, tile);
            for (int64_t t = 0; t < G; t++) {
                const int64_t token = (bh * n + g * G + t) * channel_groups;
                add_value_row<DC>(tile + t * D, vs + token, vz + token, D, G, M,
                              p + bh * M * ld + col0 + g * G + t, ld, mine + bh * M * D);
            }
        }
    add_partials(partial, width, out);
}

// A part held in float32: keys/values of head bh start at bh * stride, one row of D per token. Logits go
// into columns col0.. of rows of ld floats; the second function adds its share of the output.
void exact_scores(const float* q, const float* k, int64_t stride, float* out, int64_t BH, int64_t N, int64_t D,
                  int64_t M, int64_t ld, int64_t col0, float scaling) {
#pragma omp for collapse(2) schedule(static)
    for (int64_t bh = 0; bh < BH; bh++)
        for (int64_t m = 0; m < M; m++) {
            const float* qm = q + (bh * M + m) * D;
            for (int64_t t = 0; t < N; t++) {
                const float* key = k + bh * stride + t * D;
                float acc = 0.f;
#pragma omp simd reduction(+ : acc)
                for (int64_t c = 0; c < D; c++) acc += qm[c] * key[c];
                out[(bh * M + m) * ld + col0 + t] = acc * scaling;
            }
        }
}

void exact_values(const float* p, const float* v, int64_t stride, float* out, int64_t BH, int64_t N, int64_t D,
                  int64_t M, int64_t ld, int64_t col0) {
#pragma omp for collapse(2) schedule(static)
    for (int64_t bh = 0; bh < BH; bh++)
        for (int64_t m = 0; m < M; m++) {
            float* o = out + (bh * M + m) * D;
            const float* w = p + (bh * M + m) * ld + col0;
            for (int64_t t = 0; t < N; t++) {
                const float* value = v + bh * stride + t * D;
#pragma omp simd
                for (int64_t c = 0; c < D; c++) o[c] += w[t] * value[c];
            }
        }
}

void softmax_rows(float* x, int64_t rows, int64_t width) {
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        float* row = x + r * width;
        float top = row[0];
        for (int64_t i = 1; i < width; i++) top = row[i] > top ? row[i] : top;
        float sum = 0.f;
        for (int64_t i = 0; i < width; i++) {
            row[i] = expf(row[i] - top);
            sum += row[i];
        }
        const float inverse = 1.f / sum;
        for (int64_t i = 0; i < width; i++) row[i] *= inverse;
    }
}

// One decoding step over sinks (S), packed tokens (n) and residual (R), in that order, unmasked: weights
// [BH, M, S + n + R] (softmax of the scaled logits; also scratch) and out [BH, M, D] (zeros on entry).
// q_packed: the queries for the packed keys (rotated like them when they are stored rotated after RoPE);
// `space` says how else the packed tokens are stored.
template <int KB, int VB, int DC>
void decode(const float* q, const float* q_packed, const float* sink_k, const float* sink_v, int64_t S,
            const uint8_t* key_codes, const float* ks, const float* kz, const uint8_t* value_codes, const float* vs,
            const float* vz, int64_t n, const float* res_k, const float* res_v, int64_t R, float* weights,
            float* out, float* partial, int64_t BH, int64_t G, int64_t D, int64_t M, float scaling,
            const Space& space, int threads) {
    const int64_t total = S + n + R;
    // One parallel region for the whole step: waking the threads once, not once per phase.
#pragma omp parallel num_threads(threads)
    {
        exact_scores(q, sink_k, S * D, weights, BH, S, D, M, total, 0, scaling);
        if (space.inv_freq != nullptr)
            rope_scores<KB, DC>(key_codes, q, ks, kz, weights, BH, n / G, G, D, M, space, total, S, scaling);
        else
            scores<KB, DC>(key_codes, q_packed, ks, kz, weights, BH, n / G, G, D, M, total, S, scaling);
        exact_scores(q, res_k, R * D, weights, BH, R, D, M, total, S + n, scaling);
        softmax_rows(weights, BH * M, total);
        values<VB, DC>(value_codes, weights, vs, vz, out, BH, n / G, G, D, M, partial, total, S);
        if (space.value_signs != nullptr) {  // the packed share of the output, rotated back
#pragma omp for schedule(static)
            for (int64_t r = 0; r < BH * M; r++) {
                float* row = out + r * D;
                hadamard_rows(row, D, 1, 1, space.block);
                for (int64_t c = 0; c < D; c++) row[c] *= space.value_signs[c];
            }
        }
        exact_values(weights, sink_v, S * D, out, BH, S, D, M, total, 0);
        exact_values(weights, res_v, R * D, out, BH, R, D, M, total, S + n);
    }
}

template <int KB, int VB>
int dispatch_decode(const float* q, const float* qp, const float* sink_k, const float* sink_v, int64_t S,
                    const uint8_t* kc, const float* ks, const float* kz, const uint8_t* vc, const float* vs,
                    const float* vz, int64_t n, const float* rk, const float* rv, int64_t R, float* w, float* out,
                    float* part, int64_t BH, int64_t G, int64_t D, int64_t M, float scaling, const Space& space,
                    int threads) {
    if (D == 64) decode<KB, VB, 64>(q, qp, sink_k, sink_v, S, kc, ks, kz, vc, vs, vz, n, rk, rv, R, w, out, part, BH, G, D, M, scaling, space, threads);
    else if (D == 128) decode<KB, VB, 128>(q, qp, sink_k, sink_v, S, kc, ks, kz, vc, vs, vz, n, rk, rv, R, w, out, part, BH, G, D, M, scaling, space, threads);
    else decode<KB, VB, 0>(q, qp, sink_k, sink_v, S, kc, ks, kz, vc, vs, vz, n, rk, rv, R, w, out, part, BH, G, D, M, scaling, space, threads);
    return 0;
}

template <int KB>
int dispatch_value_bits(int value_bits, const float* q, const float* qp, const float* sk, const float* sv, int64_t S,
                        const uint8_t* kc, const float* ks, const float* kz, const uint8_t* vc, const float* vs,
                        const float* vz, int64_t n, const float* rk, const float* rv, int64_t R, float* w,
                        float* out, float* part, int64_t BH, int64_t G, int64_t D, int64_t M, float scaling,
                        const Space& space, int threads) {
    switch (value_bits) {
        case 2: return dispatch_decode<KB, 2>(q, qp, sk, sv, S, kc, ks, kz, vc, vs, vz, n, rk, rv, R, w, out, part, BH, G, D, M, scaling, space, threads);
        case 3: return dispatch_decode<KB, 3>(q, qp, sk, sv, S, kc, ks, kz, vc, vs, vz, n, rk, rv, R, w, out, part, BH, G, D, M, scaling, space, threads);
        case 4: return dispatch_decode<KB, 4>(q, qp, sk, sv, S, kc, ks, kz, vc, vs, vz, n, rk, rv, R, w, out, part, BH, G, D, M, scaling, space, threads);
        case 8: return dispatch_decode<KB, 8>(q, qp, sk, sv, S, kc, ks, kz, vc, vs, vz, n, rk, rv, R, w, out, part, BH, G, D, M, scaling, space, threads);
        default: return -1;
    }
}

// Scores of keys stored after RoPE (space.inv_freq null), else before it (see rope_scores).
template <int NB>
int dispatch_scores(const uint8_t* c, const float* q, const float* ks, const float* kz, float* o, int64_t BH,
                    int64_t groups, int64_t G, int64_t D, int64_t M, Space space, int threads) {
    float* tables = angle_tables(space, groups, G);
#pragma omp parallel num_threads(threads)
    {
        if (space.inv_freq != nullptr) {
            if (D == 64) rope_scores<NB, 64>(c, q, ks, kz, o, BH, groups, G, D, M, space);
            else if (D == 128) rope_scores<NB, 128>(c, q, ks, kz, o, BH, groups, G, D, M, space);
            else rope_scores<NB, 0>(c, q, ks, kz, o, BH, groups, G, D, M, space);
        } else if (D == 64) scores<NB, 64>(c, q, ks, kz, o, BH, groups, G, D, M);
        else if (D == 128) scores<NB, 128>(c, q, ks, kz, o, BH, groups, G, D, M);
        else scores<NB, 0>(c, q, ks, kz, o, BH, groups, G, D, M);
    }
    delete[] tables;
    return 0;
}

template <int NB>
int dispatch_values(const uint8_t* c, const float* p, const float* vs, const float* vz, float* o, int64_t BH,
                    int64_t groups, int64_t G, int64_t D, int64_t M, float* partial, int threads) {
    memset(o, 0, sizeof(float) * BH * M * D);
#pragma omp parallel num_threads(threads)
    {
        if (D == 64) values<NB, 64>(c, p, vs, vz, o, BH, groups, G, D, M, partial);
        else if (D == 128) values<NB, 128>(c, p, vs, vz, o, BH, groups, G, D, M, partial);
        else values<NB, 0>(c, p, vs, vz, o, BH, groups, G, D, M, partial);
    }
    return 0;
}

// One decoding step over sinks (S), P packed *slots* and residual (R), unmasked, for the compositions of
// eviction with packed storage (hf_kvcache/strategies/packed_slots.py). A slot holds one token packed along
// its channels (D * NB / 8 bytes, planar), the index of its key group (int16 or int32), whose per-channel
// key scale/zero is row `group` of a table of `rows` rows, and a value scale/zero per group of G channels.
// A slot whose stamp is EMPTY (INT32_MAX) holds no token (it was evicted): it gets weight 0. Weights [BH, M, S + P
// + R] in slot order, out [BH, M, D] (zeros on entry).
template <int NB, int DC, typename Index>
void slots_decode(const float* q, const float* sink_k, const float* sink_v, int64_t S, const uint8_t* kc,
                  const Index* group, const float* ks, const float* kz, int64_t rows, const uint8_t* vc,
                  const float* vs, const float* vz, const int32_t* stamps, int64_t P, const float* rk,
                  const float* rv, int64_t R, float* w, float* out, float* partial, int64_t BH, int64_t G,
                  int64_t Druntime, int64_t M, float scaling, int threads) {
    const int64_t D = DC > 0 ? DC : Druntime;
    const int64_t total = S + P + R, token_bytes = D * NB / 8, channel_groups = D / G, width = BH * M * D;
#pragma omp parallel num_threads(threads)
    {
        exact_scores(q, sink_k, S * D, w, BH, S, D, M, total, 0, scaling);
#pragma omp for collapse(2) schedule(static)
        for (int64_t bh = 0; bh < BH; bh++)
            for (int64_t t = 0; t < P; t++) {
                const int64_t slot = bh * P + t;
                if (stamps[slot] == EMPTY) {
                    for (int64_t m = 0; m < M; m++) w[(bh * M + m) * total + S + t] = -INFINITY;
                    continue;
                }
                float key[D];
                unpack_run<NB>(kc + slot * token_bytes, D, key);
                const float* scale = ks + (bh * rows + group[slot]) * D;
                const float* zero = kz + (bh * rows + group[slot]) * D;
#pragma omp simd
                for (int64_t c = 0; c < D; c++) key[c] = key[c] * scale[c] + zero[c];
                for (int64_t m = 0; m < M; m++) {
                    const float* qm = q + (bh * M + m) * D;
                    float acc = 0.f;
#pragma omp simd reduction(+ : acc)
                    for (int64_t c = 0; c < D; c++) acc += qm[c] * key[c];
                    w[(bh * M + m) * total + S + t] = acc * scaling;
                }
            }
        exact_scores(q, rk, R * D, w, BH, R, D, M, total, S + P, scaling);
        softmax_rows(w, BH * M, total);
        float* mine = partial + (int64_t)omp_get_thread_num() * width;
        memset(mine, 0, sizeof(float) * width);
#pragma omp for collapse(2) schedule(static)
        for (int64_t bh = 0; bh < BH; bh++)
            for (int64_t t = 0; t < P; t++) {
                const int64_t slot = bh * P + t;
                if (stamps[slot] == EMPTY) continue;
                float value[D];
                unpack_run<NB>(vc + slot * token_bytes, D, value);
                add_value_row<DC>(value, vs + slot * channel_groups, vz + slot * channel_groups, D, G, M,
                              w + bh * M * total + S + t, total, mine + bh * M * D);
            }
        add_partials(partial, width, out);
        exact_values(w, sink_v, S * D, out, BH, S, D, M, total, 0);
        exact_values(w, rv, R * D, out, BH, R, D, M, total, S + P);
    }
}

template <int NB, typename Index>
int dispatch_slots(const float* q, const float* sk, const float* sv, int64_t S, const uint8_t* kc, const void* grp,
                   const float* ks, const float* kz, int64_t rows, const uint8_t* vc, const float* vs,
                   const float* vz, const int32_t* st, int64_t P, const float* rk, const float* rv, int64_t R,
                   float* w, float* out, float* part, int64_t BH, int64_t G, int64_t D, int64_t M, float scaling,
                   int threads) {
    const Index* g = static_cast<const Index*>(grp);
    if (D == 64) slots_decode<NB, 64, Index>(q, sk, sv, S, kc, g, ks, kz, rows, vc, vs, vz, st, P, rk, rv, R, w, out, part, BH, G, D, M, scaling, threads);
    else if (D == 128) slots_decode<NB, 128, Index>(q, sk, sv, S, kc, g, ks, kz, rows, vc, vs, vz, st, P, rk, rv, R, w, out, part, BH, G, D, M, scaling, threads);
    else slots_decode<NB, 0, Index>(q, sk, sv, S, kc, g, ks, kz, rows, vc, vs, vz, st, P, rk, rv, R, w, out, part, BH, G, D, M, scaling, threads);
    return 0;
}

template <typename Index>
int dispatch_slots_bits(int nbits, const float* q, const float* sk, const float* sv, int64_t S, const uint8_t* kc,
                        const void* grp, const float* ks, const float* kz, int64_t rows, const uint8_t* vc,
                        const float* vs, const float* vz, const int32_t* st, int64_t P, const float* rk,
                        const float* rv, int64_t R, float* w, float* out, float* part, int64_t BH, int64_t G,
                        int64_t D, int64_t M, float scaling, int threads) {
    switch (nbits) {
        case 2: return dispatch_slots<2, Index>(q, sk, sv, S, kc, grp, ks, kz, rows, vc, vs, vz, st, P, rk, rv, R, w, out, part, BH, G, D, M, scaling, threads);
        case 3: return dispatch_slots<3, Index>(q, sk, sv, S, kc, grp, ks, kz, rows, vc, vs, vz, st, P, rk, rv, R, w, out, part, BH, G, D, M, scaling, threads);
        case 4: return dispatch_slots<4, Index>(q, sk, sv, S, kc, grp, ks, kz, rows, vc, vs, vz, st, P, rk, rv, R, w, out, part, BH, G, D, M, scaling, threads);
        case 8: return dispatch_slots<8, Index>(q, sk, sv, S, kc, grp, ks, kz, rows, vc, vs, vz, st, P, rk, rv, R, w, out, part, BH, G, D, M, scaling, threads);
        default: return -1;
    }
}

}  // namespace

extern "C" {

// Returns 0, or -1 for a width this file does not know. Keys stored before RoPE (see rope_scores): inv_freq
// [half] (rotary channels 2 * half <= D; null: keys after RoPE), first: the position of the store's first
// token; signs [D] (already divided by sqrt(block)) or null without a Hadamard rotation of the keys.
int hfkv_packed_scores(const uint8_t* codes, const float* q, const float* ks, const float* kz, float* out,
                       int64_t BH, int64_t groups, int64_t G, int64_t D, int64_t M, int nbits,
                       const float* inv_freq, int64_t half, int64_t first, const float* signs, int64_t block,
                       int threads) {
    Space space;
    space.inv_freq = inv_freq, space.half = half, space.first = first, space.key_signs = signs;
    space.block = block;
    switch (nbits) {
        case 2: return dispatch_scores<2>(codes, q, ks, kz, out, BH, groups, G, D, M, space, threads);
        case 3: return dispatch_scores<3>(codes, q, ks, kz, out, BH, groups, G, D, M, space, threads);
        case 4: return dispatch_scores<4>(codes, q, ks, kz, out, BH, groups, G, D, M, space, threads);
        case 8: return dispatch_scores<8>(codes, q, ks, kz, out, BH, groups, G, D, M, space, threads);
        default: return -1;
    }
}

int hfkv_packed_values(const uint8_t* codes, const float* p, const float* vs, const float* vz, float* out,
                       int64_t BH, int64_t groups, int64_t G, int64_t D, int64_t M, int nbits, float* partial,
                       int threads) {
    switch (nbits) {
        case 2: return dispatch_values<2>(codes, p, vs, vz, out, BH, groups, G, D, M, partial, threads);
        case 3: return dispatch_values<3>(codes, p, vs, vz, out, BH, groups, G, D, M, partial, threads);
        case 4: return dispatch_values<4>(codes, p, vs, vz, out, BH, groups, G, D, M, partial, threads);
        case 8: return dispatch_values<8>(codes, p, vs, vz, out, BH, groups, G, D, M, partial, threads);
        default: return -1;
    }
}

// One decoding step over float32 keys/values of N tokens (head bh at bh * stride, rows of D): weights
// [BH, M, N] and out [BH, M, D] (zeros on entry), as the score-based caches need both.
int hfkv_dense_decode(const float* q, const float* k, const float* v, int64_t stride, int64_t N, float* w,
                      float* out, int64_t BH, int64_t D, int64_t M, float scaling, int threads) {
#pragma omp parallel num_threads(threads)
    {
        exact_scores(q, k, stride, w, BH, N, D, M, N, 0, scaling);
        softmax_rows(w, BH * M, N);
        exact_values(w, v, stride, out, BH, N, D, M, N, 0);
    }
    return 0;
}

// One fused step (see decode) for keys and values of any widths this file knows (otherwise -1). q_packed:
// the queries for the packed keys; inv_freq (null: keys stored after RoPE), half, first: keys stored before
// RoPE; key_signs/value_signs (null: not rotated) and block: a Hadamard rotation of the stored space.
int hfkv_decode(const float* q, const float* q_packed, const float* sink_k, const float* sink_v, int64_t S,
                const uint8_t* kc, const float* ks, const float* kz, const uint8_t* vc, const float* vs,
                const float* vz, int64_t n, const float* rk, const float* rv, int64_t R, float* w, float* out,
                float* part, int64_t BH, int64_t G, int64_t D, int64_t M, int key_bits, int value_bits,
                float scaling, const float* inv_freq, int64_t half, int64_t first, const float* key_signs,
                const float* value_signs, int64_t block, int threads) {
    Space space;
    space.inv_freq = inv_freq, space.half = half, space.first = first, space.block = block;
    space.key_signs = key_signs, space.value_signs = value_signs;
    float* tables = angle_tables(space, n / G, G);
    int status = -1;
    switch (key_bits) {
        case 2: status = dispatch_value_bits<2>(value_bits, q, q_packed, sink_k, sink_v, S, kc, ks, kz, vc, vs, vz, n, rk, rv, R, w, out, part, BH, G, D, M, scaling, space, threads); break;
        case 3: status = dispatch_value_bits<3>(value_bits, q, q_packed, sink_k, sink_v, S, kc, ks, kz, vc, vs, vz, n, rk, rv, R, w, out, part, BH, G, D, M, scaling, space, threads); break;
        case 4: status = dispatch_value_bits<4>(value_bits, q, q_packed, sink_k, sink_v, S, kc, ks, kz, vc, vs, vz, n, rk, rv, R, w, out, part, BH, G, D, M, scaling, space, threads); break;
        case 8: status = dispatch_value_bits<8>(value_bits, q, q_packed, sink_k, sink_v, S, kc, ks, kz, vc, vs, vz, n, rk, rv, R, w, out, part, BH, G, D, M, scaling, space, threads); break;
    }
    delete[] tables;
    return status;
}

// Slots of eviction+quantized compositions (see slots_decode). index_bytes: 2 (int16) or 4 (int32) key-group
// indices. Returns -1 for widths this file does not know or keys and values of different widths.
int hfkv_slots_decode(const float* q, const float* sk, const float* sv, int64_t S, const uint8_t* kc,
                      const void* grp, const float* ks, const float* kz, int64_t rows, const uint8_t* vc,
                      const float* vs, const float* vz, const int32_t* st, int64_t P, const float* rk,
                      const float* rv, int64_t R, float* w, float* out, float* part, int64_t BH, int64_t G,
                      int64_t D, int64_t M, int key_bits, int value_bits, int index_bytes, float scaling,
                      int threads) {
    if (key_bits != value_bits) return -1;
    if (index_bytes == 2)
        return dispatch_slots_bits<int16_t>(key_bits, q, sk, sv, S, kc, grp, ks, kz, rows, vc, vs, vz, st, P, rk, rv, R, w, out, part, BH, G, D, M, scaling, threads);
    if (index_bytes == 4)
        return dispatch_slots_bits<int32_t>(key_bits, q, sk, sv, S, kc, grp, ks, kz, rows, vc, vs, vz, st, P, rk, rv, R, w, out, part, BH, G, D, M, scaling, threads);
    return -1;
}
}
