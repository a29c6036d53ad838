/* CPU GEMV y = x @ W for 1-8 activation rows and an input-major float weight W [K, N] (fp32, bf16 or fp16), reading
 * only the rows of inputs some activation row keeps (|x| > threshold). Built and loaded by codegen/native.py for
 * cpu_bag_gemv.py; cpu_float_gemv.py documents the measurements.
 *
 * The kept inputs are the union over the activation rows; a row that does not keep an input multiplies it by 0, so
 * each weight row is read once for all the activation rows. Each thread owns a column slab of the output, its
 * accumulators (rows x slab, at most ACC floats) in L1. Kept weight rows go in blocks of 4: their segments of the
 * slab are converted to fp32 once and every activation row takes 4 FMAs per accumulator load and store. A segment is
 * one contiguous run (4 KB at most), its first lines prefetched AHEAD rows ahead: a new weight row is a new page,
 * where the hardware stream prefetcher starts cold.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define EC_AVX512 1
#include <immintrin.h>
#endif
#ifdef __SSE__
#include <xmmintrin.h>
#define PREFETCH(p) _mm_prefetch((const char*)(p), _MM_HINT_T0)
#else
#define PREFETCH(p) ((void)(p))
#endif

#ifndef CHUNK
#define CHUNK 1024  /* outputs a slab at most */
#endif
#ifndef ACC
#define ACC 8192    /* accumulators a slab at most (rows x outputs): 32 KB of the 48 KB L1 */
#endif
#ifndef AHEAD
#define AHEAD 8     /* kept weight rows prefetched ahead */
#endif
#ifndef LINES
#define LINES 16    /* cache lines of a segment prefetched */
#endif
#define MAX_ROWS 8
#define BLOCK 4     /* kept weight rows per step */

enum { W_F32 = 0, W_BF16 = 1, W_F16 = 2 };

static inline float half_to_float(uint16_t h, int wtype) {
    if (wtype == W_BF16) {
        uint32_t u = (uint32_t)h << 16;
        float f;
        memcpy(&f, &u, 4);
        return f;
    }
    /* IEEE half: sign, 5-bit exponent, 10-bit mantissa (subnormals, inf and NaN kept) */
    const uint32_t s = (uint32_t)(h >> 15) << 31, e = (h >> 10) & 31, m = h & 1023;
    uint32_t u;
    if (e == 31) u = s | 0x7F800000u | (m << 13);
    else if (e) u = s | ((e + 112) << 23) | (m << 13);
    else if (!m) u = s;
    else {
        float f = ldexpf((float)m, -24);
        memcpy(&u, &f, 4);
        u |= s;
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline float weight_at(const void* w, int wtype, int64_t i) {
    return wtype == W_F32 ? ((const float*)w)[i] : half_to_float(((const uint16_t*)w)[i], wtype);
}

#ifdef EC_AVX512
static inline __attribute__((always_inline)) __m512 load16(const void* p, int wtype, __mmask16 m) {
    if (wtype == W_F32) return _mm512_maskz_loadu_ps(m, p);
    const __m256i h = _mm256_maskz_loadu_epi16(m, p);
    if (wtype == W_F16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* acc[r * width + j] += sum_b a[b * M + r] * row_b[j], j < n; M and wtype constant after inlining. */
static inline __attribute__((always_inline)) void block(int M, int wtype, const char* const* rows, const float* a,
                                                        float* acc, int64_t n, int64_t width) {
    __m512 c[BLOCK * MAX_ROWS];
    for (int i = 0; i < BLOCK * M; i++) c[i] = _mm512_set1_ps(a[i]);
    const int64_t es = wtype == W_F32 ? 4 : 2;
    for (int64_t j = 0; j < n; j += 16) {
        const __mmask16 m = n - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - j)) - 1);
        const __m512 w0 = load16(rows[0] + j * es, wtype, m), w1 = load16(rows[1] + j * es, wtype, m);
        const __m512 w2 = load16(rows[2] + j * es, wtype, m), w3 = load16(rows[3] + j * es, wtype, m);
        for (int r = 0; r < M; r++) {
            float* o = acc + r * width + j;
            __m512 s = _mm512_fmadd_ps(c[r], w0, _mm512_load_ps(o));
            s = _mm512_fmadd_ps(c[M + r], w1, s);
            s = _mm512_fmadd_ps(c[2 * M + r], w2, s);
            _mm512_store_ps(o, _mm512_fmadd_ps(c[3 * M + r], w3, s));
        }
    }
}

#define CASE(M, T) case (M) * 3 + (T): block(M, T, rows, a, acc, n, width); break;
#define CASES(M) CASE(M, W_F32) CASE(M, W_BF16) CASE(M, W_F16)
static void block_any(int M, int wtype, const char* const* rows, const float* a, float* acc, int64_t n,
                      int64_t width) {
    switch (M * 3 + wtype) {
        CASES(1) CASES(2) CASES(3) CASES(4) CASES(5) CASES(6) CASES(7) CASES(8)
    }
}
#else
static void block_any(int M, int wtype, const char* const* rows, const float* a, float* acc, int64_t n,
                      int64_t width) {
    const int64_t es = wtype == W_F32 ? 4 : 2;
    for (int b = 0; b < BLOCK; b++)
        for (int64_t j = 0; j < n; j++) {
            const float wv = weight_at(rows[b] + j * es, wtype, 0);
            for (int r = 0; r < M; r++) acc[r * width + j] += a[b * M + r] * wv;
        }
}
#endif

/* x [M, K] fp32 (M <= 8); thr NULL (keep x != 0) or thr[k * thr_stride]; w [K, N] of wtype (0 fp32, 1 bf16,
 * 2 fp16); y [M, N] fp32. Returns the number of inputs kept by some row; when that is more than max_kept nothing
 * is computed (the caller runs the dense product). -1: out of memory, -2: M out of range. */
int64_t ec_float_gemv(const float* x, int64_t M, int64_t K, const float* thr, int64_t thr_stride, const void* w,
                      int wtype, int64_t N, float* y, int threads, int64_t max_kept) {
    if (M < 1 || M > MAX_ROWS) return -2;
    int32_t* idx = malloc(sizeof(int32_t) * K);
    float* v = malloc(sizeof(float) * (K + BLOCK) * M);
    if (!idx || !v) {
        free(idx);
        free(v);
        return -1;
    }
    int64_t kept = 0;
    for (int64_t k = 0; k < K; k++) {
        int any = 0;
        for (int64_t r = 0; r < M; r++) {
            const float xk = x[r * K + k];
            /* no threshold: drop exact zeros only (a NaN stays, as in the dense product) */
            const int keep = thr ? fabsf(xk) > thr[k * thr_stride] : !(xk == 0.f);
            v[kept * M + r] = keep ? xk : 0.f;
            any |= keep;
        }
        if (any) idx[kept++] = (int32_t)k;
    }
    if (kept <= max_kept) {
        /* a padded block's missing rows: coefficient 0 on the block's first row */
        memset(v + kept * M, 0, sizeof(float) * BLOCK * M);
        const int64_t es = wtype == W_F32 ? 4 : 2;
        int64_t most = ACC / M < CHUNK ? ACC / M : CHUNK;
        most = most / 16 * 16;
        /* slabs: a multiple of the threads, each at most `most` wide, 16-aligned */
        int64_t slabs = threads * ((N + most * threads - 1) / (most * threads));
        const int64_t width = ((N + slabs - 1) / slabs + 15) / 16 * 16;
        slabs = (N + width - 1) / width;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && slabs > 1)
        for (int64_t s = 0; s < slabs; s++) {
            const int64_t n0 = s * width, n = N - n0 < width ? N - n0 : width;
            float acc[ACC] __attribute__((aligned(64)));
            memset(acc, 0, sizeof(float) * M * width);
            const char* base = (const char*)w + n0 * es;
            const int64_t lines = (n * es + 63) / 64 < LINES ? (n * es + 63) / 64 : LINES;
            for (int64_t i = 0; i < kept; i += BLOCK) {
                for (int64_t p = i + AHEAD; p < i + AHEAD + BLOCK && p < kept; p++) {
                    const char* q = base + (int64_t)idx[p] * N * es;
                    for (int64_t l = 0; l < lines; l++) PREFETCH(q + 64 * l);
                }
                const char* rows[BLOCK];
                for (int b = 0; b < BLOCK; b++) rows[b] = base + (int64_t)idx[i + b < kept ? i + b : i] * N * es;
                block_any((int)M, wtype, rows, v + i * M, acc, n, width);
            }
            for (int64_t r = 0; r < M; r++) memcpy(y + r * N + n0, acc + r * width, sizeof(float) * n);
        }
    }
    free(idx);
    free(v);
    return kept;
}
