/* CPU GEMV y = x @ W for 1-8 activation rows and an input-major weight W [K, N] (fp32, bf16, fp16 or int8 codes),
 * reading only the rows of inputs some activation row keeps (|x| > threshold). Built and loaded by codegen/native.py
 * for cpu_bag_gemv.py; cpu_float_gemv.py documents the measurements.
 *
 * The kept inputs are the union over the activation rows; a row that does not keep an input multiplies it by 0, so
 * each weight row is read once for all the activation rows. Each thread owns column slabs of the output. Two loops,
 * as measured fastest:
 *   one row, fp32 weights (one_row_fp32): the slab's accumulators (at most ONE_SLAB) in L1; kept weight rows in
 *     blocks of 4, streamed along the slab, the first LINES lines of each prefetched AHEAD rows ahead (a new weight
 *     row is a new page, where the hardware stream prefetcher starts cold);
 *   otherwise (chunk): kept weight rows in chunks of ROWS whose slab segments stay in L2, and register tiles of
 *     rows x up to 8 vectors of outputs that pass over the chunk, converting each weight once for all the rows;
 *     the next chunk's lines are prefetched meanwhile.
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

#define ONE_SLAB 1024 /* one fp32 row: outputs a slab at most, 4 KB of accumulators */
#define AHEAD 8       /* one fp32 row: kept weight rows prefetched ahead */
#define LINES 16      /* one fp32 row: cache lines of a segment prefetched */
#define SLAB 2048     /* chunked: outputs a slab at most */
#define ACC 16384     /* chunked: accumulators a slab at most (rows x outputs), 64 KB in L2 */
#define ROWS 16       /* chunked: kept weight rows a chunk */
#define MAX_ROWS 8

enum { W_F32 = 0, W_BF16 = 1, W_F16 = 2, W_U8 = 3 }; /* W_U8: int8 codes stored + 128 (cpu_bag_gemv's int8 rows) */

static inline int64_t elem_size(int wtype) { return wtype == W_F32 ? 4 : wtype == W_U8 ? 1 : 2; }

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
    if (wtype == W_U8) return (float)((int)((const uint8_t*)w)[i] - 128);
    return wtype == W_F32 ? ((const float*)w)[i] : half_to_float(((const uint16_t*)w)[i], wtype);
}

#ifdef EC_AVX512
static inline __attribute__((always_inline)) __m512 load16(const void* p, int wtype, __mmask16 m) {
    if (wtype == W_F32) return _mm512_maskz_loadu_ps(m, p);
    if (wtype == W_U8) /* byte ^ 0x80 is the signed code */
        return _mm512_cvtepi32_ps(_mm512_maskz_cvtepi8_epi32(m, _mm_xor_si128(_mm_maskz_loadu_epi8(m, p),
                                                                               _mm_set1_epi8((char)0x80))));
    const __m256i h = _mm256_maskz_loadu_epi16(m, p);
    if (wtype == W_F16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

static inline __mmask16 tail_mask(int64_t left) {
    return left >= 16 ? (__mmask16)0xFFFF : left <= 0 ? 0 : (__mmask16)((1u << left) - 1);
}

/* acc[j] = sum_i v[i] * row idx[i] [j], j < n, fp32 rows: 4 rows a step, so one accumulator load and store serve
 * 4 FMAs. */
static void one_row_fp32(const float* base, int64_t stride, const int32_t* idx, const float* v, int64_t kept,
                         float* acc, int64_t n) {
    const int64_t lines = (n * 4 + 63) / 64 < LINES ? (n * 4 + 63) / 64 : LINES;
    memset(acc, 0, sizeof(float) * n);
    for (int64_t i = 0; i < kept; i += 4) {
        for (int64_t p = i + AHEAD; p < i + AHEAD + 4 && p < kept; p++)
            for (int64_t l = 0; l < lines; l++) PREFETCH(base + idx[p] * stride + 16 * l);
        const float* r[4];
        __m512 c[4];
        for (int b = 0; b < 4; b++) { /* past the last kept row: the first row again, times 0 */
            r[b] = base + idx[i + b < kept ? i + b : i] * stride;
            c[b] = _mm512_set1_ps(i + b < kept ? v[i + b] : 0.f);
        }
        for (int64_t j = 0; j < n; j += 16) {
            const __mmask16 m = tail_mask(n - j);
            __m512 s = _mm512_fmadd_ps(c[0], _mm512_maskz_loadu_ps(m, r[0] + j), _mm512_load_ps(acc + j));
            s = _mm512_fmadd_ps(c[1], _mm512_maskz_loadu_ps(m, r[1] + j), s);
            s = _mm512_fmadd_ps(c[2], _mm512_maskz_loadu_ps(m, r[2] + j), s);
            _mm512_store_ps(acc + j, _mm512_fmadd_ps(c[3], _mm512_maskz_loadu_ps(m, r[3] + j), s));
        }
    }
}

/* acc[r * width + j] += sum_{i in [i0, i1)} v[i * M + r] * row idx[i] [j], j < n, in tiles of M rows x T vectors
 * held in registers over the chunk's rows (the chunk's segments stay in L2 between tiles); meanwhile the lines of
 * the next chunk's rows (next, nnext of them) are prefetched, a tile's share each. M, wtype constant after inlining. */
static inline __attribute__((always_inline)) void chunk(int M, int wtype, const char* base, int64_t stride,
                                                        const int32_t* idx, const float* v, int64_t i0, int64_t i1,
                                                        const int32_t* next, int64_t nnext, float* acc, int64_t n,
                                                        int64_t width) {
    const int T = M <= 2 ? 8 : M <= 4 ? 4 : 2; /* accumulators M x T <= 16 zmm */
    const int64_t es = elem_size(wtype), tw = 16 * T, tiles = (n + tw - 1) / tw;
    const int64_t lines = (n * es + 63) / 64, share = (lines + tiles - 1) / tiles;
    for (int64_t t = 0; t < tiles; t++) {
        const int64_t j = t * tw;
        __m512 a[16], w[8];
        __mmask16 mk[8];
        for (int u = 0; u < T; u++) mk[u] = tail_mask(n - j - 16 * u);
        for (int r = 0; r < M; r++)
            for (int u = 0; u < T; u++) a[r * T + u] = _mm512_load_ps(acc + r * width + j + 16 * u);
        const int64_t l0 = t * share, l1 = l0 + share < lines ? l0 + share : lines;
        for (int64_t i = i0; i < i1; i++) {
            if (i - i0 < nnext)
                for (int64_t l = l0; l < l1; l++) PREFETCH(base + next[i - i0] * stride + 64 * l);
            const char* row = base + idx[i] * stride + j * es;
            for (int u = 0; u < T; u++) w[u] = load16(row + 16 * u * es, wtype, mk[u]);
            for (int r = 0; r < M; r++) {
                const __m512 b = _mm512_set1_ps(v[i * M + r]);
                for (int u = 0; u < T; u++) a[r * T + u] = _mm512_fmadd_ps(b, w[u], a[r * T + u]);
            }
        }
        for (int r = 0; r < M; r++)
            for (int u = 0; u < T; u++) _mm512_store_ps(acc + r * width + j + 16 * u, a[r * T + u]);
    }
}

#define CASE(M, W) case (M) * 4 + (W): chunk(M, W, base, stride, idx, v, i0, i1, next, nnext, acc, n, width); break;
#define CASES(M) CASE(M, W_F32) CASE(M, W_BF16) CASE(M, W_F16) CASE(M, W_U8)
static void chunk_any(int M, int wtype, const char* base, int64_t stride, const int32_t* idx, const float* v,
                      int64_t i0, int64_t i1, const int32_t* next, int64_t nnext, float* acc, int64_t n,
                      int64_t width) {
    switch (M * 4 + wtype) {
        CASES(1) CASES(2) CASES(3) CASES(4) CASES(5) CASES(6) CASES(7) CASES(8)
    }
}
#else
static void one_row_fp32(const float* base, int64_t stride, const int32_t* idx, const float* v, int64_t kept,
                         float* acc, int64_t n) {
    memset(acc, 0, sizeof(float) * n);
    for (int64_t i = 0; i < kept; i++) {
        const float* row = base + idx[i] * stride;
        for (int64_t j = 0; j < n; j++) acc[j] += v[i] * row[j];
    }
}

static void chunk_any(int M, int wtype, const char* base, int64_t stride, const int32_t* idx, const float* v,
                      int64_t i0, int64_t i1, const int32_t* next, int64_t nnext, float* acc, int64_t n,
                      int64_t width) {
    (void)next;
    (void)nnext;
    for (int64_t i = i0; i < i1; i++) {
        const char* row = base + idx[i] * stride;
        for (int64_t j = 0; j < n; j++) {
            const float wv = weight_at(row, wtype, j);
            for (int r = 0; r < M; r++) acc[r * width + j] += v[i * M + r] * wv;
        }
    }
}
#endif

/* x [M, K] fp32 (M <= 8); thr NULL (keep x != 0) or thr[k * thr_stride]; w [K, stride] of wtype (0 fp32, 1 bf16,
 * 2 fp16, 3 int8 codes + 128), its first N columns used; y [M, N] fp32 (int8: in code units, the caller scales).
 * Returns the number of inputs kept by some row; when that is more than max_kept nothing is computed (the caller
 * runs the dense product). -1: out of memory, -2: M, -3: wtype or stride out of range. */
int64_t ec_float_gemv(const float* x, int64_t M, int64_t K, const float* thr, int64_t thr_stride, const void* w,
                      int wtype, int64_t N, int64_t stride, float* y, int threads, int64_t max_kept) {
    if (M < 1 || M > MAX_ROWS) return -2;
    if (wtype < W_F32 || wtype > W_U8 || stride < N) return -3;
    int32_t* idx = malloc(sizeof(int32_t) * K);
    float* v = malloc(sizeof(float) * K * M);
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
        const int one = M == 1 && wtype == W_F32;
        const int64_t es = elem_size(wtype), align = one ? 16 : 128; /* 128: whole register tiles */
        const int64_t most = one ? ONE_SLAB : (ACC / M < SLAB ? ACC / M : SLAB) / align * align;
        /* slabs: a multiple of the threads, each at most `most` wide, aligned */
        int64_t slabs = threads * ((N + most * threads - 1) / (most * threads));
        const int64_t width = ((N + slabs - 1) / slabs + align - 1) / align * align;
        slabs = (N + width - 1) / width;
        float* accs = aligned_alloc(64, sizeof(float) * slabs * M * width);
        if (!accs) {
            free(idx);
            free(v);
            return -1;
        }
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && slabs > 1)
        for (int64_t s = 0; s < slabs; s++) {
            const int64_t n0 = s * width, n = N - n0 < width ? N - n0 : width;
            float* acc = accs + s * M * width;
            if (one) {
                one_row_fp32((const float*)w + n0, stride, idx, v, kept, acc, n);
            } else {
                memset(acc, 0, sizeof(float) * M * width);
                const char* base = (const char*)w + n0 * es;
                for (int64_t i = 0; i < kept; i += ROWS) {
                    const int64_t i1 = i + ROWS < kept ? i + ROWS : kept;
                    const int64_t nnext = i1 + ROWS < kept ? ROWS : kept - i1;
                    chunk_any((int)M, wtype, base, stride * es, idx, v, i, i1, idx + i1, nnext, acc, n, width);
                }
            }
            for (int64_t r = 0; r < M; r++) memcpy(y + r * N + n0, acc + r * width, sizeof(float) * n);
        }
        free(accs);
    }
    free(idx);
    free(v);
    return kept;
}
