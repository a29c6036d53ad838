/* CPU GEMV y = x @ W for group-wise int4 weights, reading only the weight rows of kept inputs (|x| > threshold).
 *
 * Built and loaded by cpu_int4_gemv.py, which documents the layout and the measurements. In short:
 *   panels [P, K, 128] uint8: panel p holds outputs p*256 .. p*256+255 of every input k as two 64-byte halves of
 *          16 dwords; nibble n of dword l in half h is the code of output p*256 + h*128 + n*16 + l.
 *   sz     [P, G, 2, 256] fp32 or bf16: per panel and K-group, the 256 scales then the 256 zeros
 *          (weight = scale * code + zero).
 * One pass over a panel per call: for each group, every activation row sums x_k * code_k over its kept inputs
 * (the group's rows stay in L1 for the next activation row), then adds scale * sum + zero * sum(x_k).
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

/* x [m, K] fp32; thr NULL (keep x != 0) or thr[k * thr_stride]; y [m, n_out] fp32.
 * Returns the number of kept inputs over all rows, or -1 if out of memory. */
int64_t ec_int4_gemv(const float* x, int64_t m, int64_t K, const float* thr, int64_t thr_stride,
                     const uint8_t* panels, const void* sz, int sz_bf16, int64_t P, int64_t group, float* y,
                     int64_t n_out, int threads) {
    const int64_t G = K / group;
    int32_t* idx = malloc(sizeof(int32_t) * (m * K + m * (G + 1)));
    float* w = malloc(sizeof(float) * (m * K + m * G));
    if (!idx || !w) {
        free(idx);
        free(w);
        return -1;
    }
    int32_t* start = idx + m * K; /* start[r * (G + 1) + g]: row r's first kept input of group g */
    float* xsum = w + m * K;
    int64_t kept = 0;
    for (int64_t r = 0; r < m; r++) {
        const float* xr = x + r * K;
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
                }
            }
            xsum[r * G + g] = s;
        }
        start[r * (G + 1) + G] = c;
        kept += c;
    }
    const int64_t sz_panel = G * 2 * OUTS * (sz_bf16 ? 2 : 4);
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && P > 1)
    for (int64_t p = 0; p < P; p++) {
        const uint8_t* panel = panels + p * K * ROW_BYTES;
        const char* szp = (const char*)sz + p * sz_panel;
        const int64_t width = n_out - p * OUTS < OUTS ? n_out - p * OUTS : OUTS;
        float acc[OUTS];
        for (int64_t r = 0; r < m; r++)
            for (int64_t j = 0; j < width; j++) y[r * n_out + p * OUTS + j] = 0.f;
        for (int64_t g = 0; g < G; g++) {
            for (int64_t r = 0; r < m; r++) {
                const int32_t* st = start + r * (G + 1);
                if (st[g] == st[g + 1]) continue;
                group_sum(panel, idx + r * K, w + r * K, st[g], st[g + 1], st[G], acc);
                const float xs = xsum[r * G + g];
                float* yr = y + r * n_out + p * OUTS;
                if (sz_bf16) {
                    const uint16_t* s = (const uint16_t*)szp + g * 2 * OUTS;
                    for (int64_t j = 0; j < width; j++) yr[j] += bf16_to_float(s[j]) * acc[j] + bf16_to_float(s[OUTS + j]) * xs;
                } else {
                    const float* s = (const float*)szp + g * 2 * OUTS;
                    for (int64_t j = 0; j < width; j++) yr[j] += s[j] * acc[j] + s[OUTS + j] * xs;
                }
            }
        }
    }
    free(idx);
    free(w);
    return kept;
}
