/* CPU GEMV y = x @ W for group-wise int4 weights, reading only the weight rows of kept inputs (|x| > threshold).
 *
 * Built and loaded by cpu_int4_gemv.py, which documents the layout and the measurements. In short:
 *   panels [P, K, 128] uint8: panel p holds outputs p*256 .. p*256+255 of every input k as two 64-byte halves of
 *          16 dwords; nibble n of dword l in half h is the code of output p*256 + h*128 + n*16 + l.
 *   sz     [P, G, 2, 256] fp32 or bf16: per panel and K-group, the 256 scales then the 256 zeros
 *          (weight = scale * code + zero).
 * One pass over a panel per call: for each group, every activation row sums x_k * code_k over its kept inputs
 * (the group's rows stay in L1 for the next activation row), then adds scale * sum + zero * sum(x_k). A block of 4
 * rows that keep nearly the same inputs (dense rows, prefill) sums over their union instead, converting each code
 * once for the 4 (block_sum).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define OUTS 256      /* outputs per panel */
#define ROW_BYTES 128 /* one input's codes in one panel */
#define AHEAD 16      /* kept rows prefetched ahead: random kept rows defeat the hardware prefetcher */

static inline float bf16_to_float(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* acc[0..255] = sum_i w[i] * codes of row idx[i], i in [begin, end). */
static void group_sum(const uint8_t* panel, const int32_t* idx, const float* w, int32_t begin, int32_t end,
                      int32_t prefetch_end, float* acc_out) {
#ifdef __AVX512F__
    /* A code q moved to bits 19..22 under the exponent of 1.0f reads as the float 1 + q/16: one shift and one
       ternary-logic op per 16 codes instead of shift, and, int-to-float. acc then sums x_k (1 + q/16). */
    const __m512i mask = _mm512_set1_epi32(0xF << 19), one = _mm512_set1_epi32(0x3F800000);
    __m512 acc[16];
    __m512 xsum = _mm512_setzero_ps();
    for (int j = 0; j < 16; j++) acc[j] = _mm512_setzero_ps();
    for (int32_t i = begin; i < end; i++) {
        if (i + AHEAD < prefetch_end) {
            const char* a = (const char*)panel + (int64_t)idx[i + AHEAD] * ROW_BYTES;
            _mm_prefetch(a, _MM_HINT_T0);
            _mm_prefetch(a + 64, _MM_HINT_T0);
        }
        const uint8_t* r = panel + (int64_t)idx[i] * ROW_BYTES;
        const __m512 xv = _mm512_set1_ps(w[i]);
        xsum = _mm512_add_ps(xsum, xv);
        for (int h = 0; h < 2; h++) {
            const __m512i d = _mm512_loadu_si512((const void*)(r + 64 * h));
#define NIBBLE(n, t) \
    acc[8 * h + n] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_ternarylogic_epi32(t, mask, one, 0xEA)), xv, acc[8 * h + n]);
            NIBBLE(0, _mm512_slli_epi32(d, 19)) NIBBLE(1, _mm512_slli_epi32(d, 15))
            NIBBLE(2, _mm512_slli_epi32(d, 11)) NIBBLE(3, _mm512_slli_epi32(d, 7))
            NIBBLE(4, _mm512_slli_epi32(d, 3)) NIBBLE(5, _mm512_srli_epi32(d, 1))
            NIBBLE(6, _mm512_srli_epi32(d, 5)) NIBBLE(7, _mm512_srli_epi32(d, 9))
#undef NIBBLE
        }
    }
    const __m512 sixteen = _mm512_set1_ps(16.f);
    for (int j = 0; j < 16; j++) _mm512_storeu_ps(acc_out + 16 * j, _mm512_mul_ps(_mm512_sub_ps(acc[j], xsum), sixteen));
#else
    (void)prefetch_end;
    for (int j = 0; j < OUTS; j++) acc_out[j] = 0.f;
    for (int32_t i = begin; i < end; i++) {
        const uint32_t* r = (const uint32_t*)(panel + (int64_t)idx[i] * ROW_BYTES);
        const float v = w[i];
        for (int h = 0; h < 2; h++)
            for (int n = 0; n < 8; n++)
                for (int l = 0; l < 16; l++)
                    acc_out[h * 128 + n * 16 + l] += v * (float)((r[16 * h + l] >> (4 * n)) & 15u);
    }
#endif
}

#define BLOCK 4 /* activation rows converted together (AVX-512 build, 2+ rows) */
#ifdef __AVX512F__
#define QUAD0(X) X(0, _mm512_slli_epi32(d, 19)) X(1, _mm512_slli_epi32(d, 15)) X(2, _mm512_slli_epi32(d, 11)) X(3, _mm512_slli_epi32(d, 7))
#define QUAD1(X) X(0, _mm512_slli_epi32(d, 3)) X(1, _mm512_srli_epi32(d, 1)) X(2, _mm512_srli_epi32(d, 5)) X(3, _mm512_srli_epi32(d, 9))

/* R activation rows at once over the union of their kept inputs (w[BLOCK * i + r]: row r's x, 0 where it keeps
   nothing): each code is converted once for R rows, in four passes of 64 outputs (16 accumulators for R = 4).
   acc_out[r * 256 + j] = sum_i w (1 + q/16), as group_sum before its correction; xs_out[r] = sum_i w. */
static inline __attribute__((always_inline)) void block_sum(const int R, const uint8_t* panel, const int32_t* idx,
                                                            const float* w, int32_t begin, int32_t end,
                                                            int32_t prefetch_end, float* acc_out, float* xs_out) {
    const __m512i mask = _mm512_set1_epi32(0xF << 19), one = _mm512_set1_epi32(0x3F800000);
    /* each row's sum of w, added in the order acc adds it, so that acc - xs cancels exactly what it should */
    for (int r = 0; r < R; r++) {
        float t = 0.f;
        for (int32_t i = begin; i < end; i++) t += w[BLOCK * i + r];
        xs_out[r] = t;
    }
    for (int q = 0; q < 4; q++) {
        const int h = q >> 1;
        __m512 acc[BLOCK][4];
#pragma GCC unroll 4
        for (int r = 0; r < R; r++)
            for (int v = 0; v < 4; v++) acc[r][v] = _mm512_setzero_ps();
#define STEP(v, t)                                                                                   \
    {                                                                                                \
        const __m512 f = _mm512_castsi512_ps(_mm512_ternarylogic_epi32(t, mask, one, 0xEA));         \
        _Pragma("GCC unroll 4") for (int r = 0; r < R; r++)                                          \
            acc[r][v] = _mm512_fmadd_ps(f, _mm512_set1_ps(w[BLOCK * i + r]), acc[r][v]);             \
    }
#define PASS(QUAD)                                                                                   \
    for (int32_t i = begin; i < end; i++) {                                                          \
        if (q == 0 && i + AHEAD < prefetch_end) {                                                    \
            const char* a = (const char*)panel + (int64_t)idx[i + AHEAD] * ROW_BYTES;                \
            _mm_prefetch(a, _MM_HINT_T0);                                                            \
            _mm_prefetch(a + 64, _MM_HINT_T0);                                                       \
        }                                                                                            \
        const __m512i d = _mm512_loadu_si512((const void*)(panel + (int64_t)idx[i] * ROW_BYTES + 64 * h)); \
        QUAD(STEP)                                                                                   \
    }
        if (q & 1) {
            PASS(QUAD1)
        } else {
            PASS(QUAD0)
        }
#undef PASS
#undef STEP
#pragma GCC unroll 4
        for (int r = 0; r < R; r++)
            for (int v = 0; v < 4; v++) _mm512_storeu_ps(acc_out + r * OUTS + h * 128 + ((q & 1) * 4 + v) * 16, acc[r][v]);
    }
}
#endif

/* y[j] += scale_j * acc_j + zero_j * xs for one group's scales and zeros (acc as group_sum returns it). */
static void epilogue(float* yr, const float* acc, float xs, const char* szg, int bf16, int64_t n) {
    for (int64_t j = 0; j < n; j++) {
        const float sc = bf16 ? bf16_to_float(((const uint16_t*)szg)[j]) : ((const float*)szg)[j];
        const float ze = bf16 ? bf16_to_float(((const uint16_t*)szg)[OUTS + j]) : ((const float*)szg)[OUTS + j];
        yr[j] += sc * acc[j] + ze * xs;
    }
}

/* x [m, K] fp32; thr NULL (keep x != 0) or thr[k * thr_stride]; y [m, n_out] fp32.
 * Returns the number of kept inputs over all rows, or -1 if out of memory. */
int64_t ec_int4_gemv(const float* x, int64_t m, int64_t K, const float* thr, int64_t thr_stride,
                     const uint8_t* panels, const void* sz, int sz_bf16, int64_t P, int64_t group, float* y,
                     int64_t n_out, int threads) {
    const int64_t G = K / group;
#ifdef __AVX512F__
    const int64_t blocks = m / BLOCK; /* full blocks of BLOCK rows; each runs block_sum if its rows keep alike */
#else
    const int64_t blocks = 0;
#endif
    int32_t* idx = malloc(sizeof(int32_t) * ((m + blocks) * K + (m + blocks) * (G + 1)) + blocks);
    float* w = malloc(sizeof(float) * (m * K + blocks * K * BLOCK + m * G));
    if (!idx || !w) {
        free(idx);
        free(w);
        return -1;
    }
    int32_t* start = idx + m * K; /* start[r * (G + 1) + g]: row r's first kept input of group g */
    float* xsum = w + m * K;      /* xsum[r * G + g]: row r's kept x summed over group g */
    int32_t* bidx = start + m * (G + 1); /* per block: the union of its rows' kept inputs, */
    int32_t* bstart = bidx + blocks * K; /* its group starts, */
    float* bw = xsum + m * G;            /* and BLOCK x values an entry (0 where a row does not keep it) */
    char* blocked = (char*)(bstart + blocks * (G + 1));
    const int64_t words = (K + 63) / 64;
    uint64_t* seen = calloc(blocks * words + 1, sizeof(uint64_t)); /* per block: the inputs any of its rows keeps */
    if (!seen) {
        free(idx);
        free(w);
        return -1;
    }
    int64_t kept = 0;
    for (int64_t r = 0; r < m; r++) {
        const float* xr = x + r * K;
        uint64_t* mask = r / BLOCK < blocks ? seen + r / BLOCK * words : NULL;
        int32_t c = 0;
        for (int64_t g = 0; g < G; g++) {
            start[r * (G + 1) + g] = c;
            float s = 0.f;
            for (int64_t k = g * group; k < (g + 1) * group; k++) {
                const float v = xr[k];
                /* no threshold: drop exact zeros only (a NaN stays, as in the dense product) */
                const int keep = thr ? fabsf(v) > thr[k * thr_stride] : !(v == 0.f);
                if (keep) {
                    idx[r * K + c] = (int32_t)k;
                    w[r * K + c] = v;
                    s += v;
                    c++;
                    if (mask) mask[k / 64] |= 1ull << (k % 64);
                }
            }
            xsum[r * G + g] = s;
        }
        start[r * (G + 1) + G] = c;
        kept += c;
    }
    /* A block converts each code of the union once for its rows but multiplies the zeros of rows that dropped the
       input: it pays where the rows keep nearly the same inputs (dense inputs, prefill), not at 40-50 % sparsity
       (Llama-3.2-1B shapes: 4 dense rows 1.98 vs 2.26 ms one row at a time, 4 rows at 50 % 1.90 vs 1.51). */
    for (int64_t b = 0; b < blocks; b++) {
        int64_t sum = 0, both = 0;
        for (int64_t r = 0; r < BLOCK; r++) sum += start[(b * BLOCK + r) * (G + 1) + G];
        for (int64_t i = 0; i < words; i++) both += __builtin_popcountll(seen[b * words + i]);
        blocked[b] = 5 * both < 2 * sum; /* union < 0.4 x the kept inputs of the BLOCK rows */
        if (!blocked[b]) continue;
        int32_t c = 0;
        for (int64_t g = 0; g < G; g++) {
            bstart[b * (G + 1) + g] = c;
            for (int64_t k = g * group; k < (g + 1) * group; k++) {
                int any = 0;
                for (int64_t r = 0; r < BLOCK; r++) {
                    const float v = x[(b * BLOCK + r) * K + k];
                    const int keep = thr ? fabsf(v) > thr[k * thr_stride] : !(v == 0.f);
                    bw[(b * K + c) * BLOCK + r] = keep ? v : 0.f;
                    any |= keep;
                }
                if (any) bidx[b * K + c++] = (int32_t)k;
            }
        }
        bstart[b * (G + 1) + G] = c;
    }
    free(seen);
    const int64_t sz_panel = G * 2 * OUTS * (sz_bf16 ? 2 : 4), sz_group = 2 * OUTS * (sz_bf16 ? 2 : 4);
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && P > 1)
    for (int64_t p = 0; p < P; p++) {
        const uint8_t* panel = panels + p * K * ROW_BYTES;
        const char* szp = (const char*)sz + p * sz_panel;
        const int64_t width = n_out - p * OUTS < OUTS ? n_out - p * OUTS : OUTS;
        float acc[BLOCK * OUTS], xs[BLOCK];
        (void)xs;
        for (int64_t r = 0; r < m; r++)
            for (int64_t j = 0; j < width; j++) y[r * n_out + p * OUTS + j] = 0.f;
        for (int64_t g = 0; g < G; g++) {
            const char* szg = szp + g * sz_group;
            for (int64_t r = 0; r < m; r++) {
#ifdef __AVX512F__
                if (r / BLOCK < blocks && blocked[r / BLOCK]) {
                    if (r % BLOCK) continue; /* the block's first row runs all of it */
                    const int64_t b = r / BLOCK;
                    const int32_t* st = bstart + b * (G + 1);
                    if (st[g] == st[g + 1]) continue;
                    block_sum(BLOCK, panel, bidx + b * K, bw + b * K * BLOCK, st[g], st[g + 1], st[G], acc, xs);
                    for (int64_t i = 0; i < BLOCK; i++) {
                        /* acc sums x (1 + q/16) in fp32: its own sum of x (xs) cancels the 1s */
                        float* a = acc + i * OUTS;
                        for (int64_t j = 0; j < width; j++) a[j] = 16.f * (a[j] - xs[i]);
                        epilogue(y + (r + i) * n_out + p * OUTS, a, xsum[(r + i) * G + g], szg, sz_bf16, width);
                    }
                    continue;
                }
#endif
                const int32_t* st = start + r * (G + 1);
                if (st[g] == st[g + 1]) continue;
                group_sum(panel, idx + r * K, w + r * K, st[g], st[g + 1], st[G], acc);
                epilogue(y + r * n_out + p * OUTS, acc, xsum[r * G + g], szg, sz_bf16, width);
            }
        }
    }
    free(idx);
    free(w);
    return kept;
}
