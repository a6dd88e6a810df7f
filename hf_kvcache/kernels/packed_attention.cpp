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
#include <omp.h>

namespace {

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

// DC > 0: the head size known at compile time (the common sizes); DC == 0: read from D.
template <int NB, int DC>
void scores(const uint8_t* codes, const float* q, const float* ks, const float* kz, float* out, int64_t BH,
            int64_t groups, int64_t G, int64_t Druntime, int64_t M, int threads) {
    const int64_t D = DC > 0 ? DC : Druntime;
    const int64_t group_bytes = G * NB / 8 * D, n = groups * G;
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads)
    for (int64_t bh = 0; bh < BH; bh++)
        for (int64_t g = 0; g < groups; g++) {
            float tile[G * D], folded[M * D], offset[M];
            unpack_run<NB>(codes + (bh * groups + g) * group_bytes, G * D, tile);
            const float* scale = ks + (bh * groups + g) * D;
            const float* zero = kz + (bh * groups + g) * D;
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
                    out[(bh * M + m) * n + g * G + t] = acc + offset[m];
                }
            }
        }
}

template <int NB, int DC>
void values(const uint8_t* codes, const float* p, const float* vs, const float* vz, float* out, int64_t BH,
            int64_t groups, int64_t G, int64_t Druntime, int64_t M, float* partial, int threads) {
    const int64_t D = DC > 0 ? DC : Druntime;
    const int64_t group_bytes = G * NB / 8 * D, n = groups * G, channel_groups = D / G, width = BH * M * D;
    memset(partial, 0, sizeof(float) * threads * width);
#pragma omp parallel num_threads(threads)
    {
        // Each thread sums its share of the tokens into its own output; the shares are added at the end.
        float* mine = partial + (int64_t)omp_get_thread_num() * width;
#pragma omp for collapse(2) schedule(static)
        for (int64_t bh = 0; bh < BH; bh++)
            for (int64_t g = 0; g < groups; g++) {
                float tile[G * D], row[D];
                unpack_run<NB>(codes + (bh * groups + g) * group_bytes, G * D, tile);
                for (int64_t t = 0; t < G; t++) {
                    const int64_t token = g * G + t;
                    const float* v = tile + t * D;
                    const float* scale = vs + (bh * n + token) * channel_groups;
                    const float* zero = vz + (bh * n + token) * channel_groups;
                    for (int64_t cg = 0; cg < channel_groups; cg++) {
                        const float s = scale[cg], z = zero[cg];
#pragma omp simd
                        for (int64_t j = 0; j < G; j++) row[cg * G + j] = v[cg * G + j] * s + z;
                    }
                    for (int64_t m = 0; m < M; m++) {
                        float* o = mine + (bh * M + m) * D;
                        const float weight = p[(bh * M + m) * n + token];
#pragma omp simd
                        for (int64_t c = 0; c < D; c++) o[c] += weight * row[c];
                    }
                }
            }
    }
    for (int64_t i = 0; i < width; i++) {
        float acc = 0.f;
        for (int th = 0; th < threads; th++) acc += partial[th * width + i];
        out[i] = acc;
    }
}

template <int NB>
int dispatch_scores(const uint8_t* c, const float* q, const float* ks, const float* kz, float* o, int64_t BH,
                    int64_t groups, int64_t G, int64_t D, int64_t M, int threads) {
    if (D == 64) scores<NB, 64>(c, q, ks, kz, o, BH, groups, G, D, M, threads);
    else if (D == 128) scores<NB, 128>(c, q, ks, kz, o, BH, groups, G, D, M, threads);
    else scores<NB, 0>(c, q, ks, kz, o, BH, groups, G, D, M, threads);
    return 0;
}

template <int NB>
int dispatch_values(const uint8_t* c, const float* p, const float* vs, const float* vz, float* o, int64_t BH,
                    int64_t groups, int64_t G, int64_t D, int64_t M, float* partial, int threads) {
    if (D == 64) values<NB, 64>(c, p, vs, vz, o, BH, groups, G, D, M, partial, threads);
    else if (D == 128) values<NB, 128>(c, p, vs, vz, o, BH, groups, G, D, M, partial, threads);
    else values<NB, 0>(c, p, vs, vz, o, BH, groups, G, D, M, partial, threads);
    return 0;
}

}  // namespace

extern "C" {

// Returns 0, or -1 for a width this file does not know.
int hfkv_packed_scores(const uint8_t* codes, const float* q, const float* ks, const float* kz, float* out,
                       int64_t BH, int64_t groups, int64_t G, int64_t D, int64_t M, int nbits, int threads) {
    switch (nbits) {
        case 2: return dispatch_scores<2>(codes, q, ks, kz, out, BH, groups, G, D, M, threads);
        case 3: return dispatch_scores<3>(codes, q, ks, kz, out, BH, groups, G, D, M, threads);
        case 4: return dispatch_scores<4>(codes, q, ks, kz, out, BH, groups, G, D, M, threads);
        case 8: return dispatch_scores<8>(codes, q, ks, kz, out, BH, groups, G, D, M, threads);
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
}
