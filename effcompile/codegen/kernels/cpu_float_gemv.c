/* CPU GEMV y = x @ W for one activation row and an fp32 input-major weight W [K, N], reading only the rows of kept
 * inputs (|x| > threshold). Built and loaded by codegen/native.py for cpu_bag_gemv.py, which documents the
 * measurements. Each thread owns a column slab of at most CHUNK outputs, accumulated in L1 over the kept rows; each
 * kept row's segment of the slab is one contiguous run (4 KB at most), its first lines prefetched AHEAD rows ahead
 * (a new row is a new page, where the hardware stream prefetcher starts cold).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __SSE__
#include <xmmintrin.h>
#define PREFETCH(p) _mm_prefetch((const char*)(p), _MM_HINT_T0)
#else
#define PREFETCH(p) ((void)(p))
#endif

#define CHUNK 1024  /* outputs a slab at most: 4 KB of accumulators */
#define AHEAD 4     /* kept rows prefetched ahead */
#define LINES 16    /* cache lines of a row's segment prefetched */

/* x [K] fp32; thr NULL (keep x != 0) or thr[k * thr_stride]; y [N] fp32. Returns the number of kept inputs; when
 * that is more than max_kept nothing is computed (the caller runs the dense product). -1: out of memory. */
int64_t ec_float_gemv(const float* x, int64_t K, const float* thr, int64_t thr_stride, const float* w, int64_t N,
                      float* y, int threads, int64_t max_kept) {
    int32_t* idx = malloc(sizeof(int32_t) * K);
    float* v = malloc(sizeof(float) * K);
    if (!idx || !v) {
        free(idx);
        free(v);
        return -1;
    }
    int64_t kept = 0;
    for (int64_t k = 0; k < K; k++) {
        const float xk = x[k];
        /* no threshold: drop exact zeros only (a NaN stays, as in the dense product) */
        if (thr ? fabsf(xk) > thr[k * thr_stride] : !(xk == 0.f)) {
            idx[kept] = (int32_t)k;
            v[kept++] = xk;
        }
    }
    if (kept <= max_kept) {
        /* slabs: a multiple of the threads, each at most CHUNK wide, 16-aligned */
        int64_t slabs = threads * ((N + (int64_t)CHUNK * threads - 1) / ((int64_t)CHUNK * threads));
        const int64_t width = ((N + slabs - 1) / slabs + 15) / 16 * 16;
        slabs = (N + width - 1) / width;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && slabs > 1)
        for (int64_t s = 0; s < slabs; s++) {
            const int64_t n0 = s * width, n = N - n0 < width ? N - n0 : width;
            float acc[CHUNK] __attribute__((aligned(64)));
            memset(acc, 0, sizeof(float) * n);
            for (int64_t i = 0; i < kept; i++) {
                if (i + AHEAD < kept) {
                    const float* a = w + (int64_t)idx[i + AHEAD] * N + n0;
                    for (int64_t l = 0; l < LINES && l * 16 < n; l++) PREFETCH(a + 16 * l);
                }
                const float* restrict row = w + (int64_t)idx[i] * N + n0;
                const float xk = v[i];
                for (int64_t j = 0; j < n; j++) acc[j] += xk * row[j];
            }
            memcpy(y + n0, acc, sizeof(float) * n);
        }
    }
    free(idx);
    free(v);
    return kept;
}
