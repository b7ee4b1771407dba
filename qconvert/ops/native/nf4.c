/* qconvert's compiled CPU kernels for the 4-bit layout (spec/format.md): a dequantizer, and a fused
 * dequantize-and-multiply for a few rows of input that never writes the weight out.
 *
 * Built at first use (and by tools/setup.sh) by qconvert/ops/native/build.py with the system C
 * compiler and no torch headers; called through ctypes by qconvert/ops/native/calls.py, which checks
 * every size, dtype and contiguity before the call. These functions trust their arguments: the
 * buffers are exactly as long as the layout says (packed: (n + 1) / 2 bytes; absmax: ceil(n / bs)
 * entries; nested: ceil(nblocks / nbs) floats; code tables of 16 and 256 floats) and bs is even.
 *
 * Exactness (tests/test_native_kernel.py compares every result bit for bit with the torch reference):
 * every weight value is the float32 product code * scale, rounded to the logical dtype, then converted
 * to the output dtype, each rounding to nearest even as torch's casts round (NaN: torch writes 0xFFFF
 * in bfloat16 and keeps sign and top payload bits in float16). Double-quant scales are
 * nested_quant_map[code] * nested_absmax, rounded, then + offset, rounded: the build passes
 * -ffp-contract=off so no multiply-add is fused. */
#include <stdint.h>
#include <string.h>
#include <time.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

enum { F32 = 0, F16 = 1, BF16 = 2 };

typedef struct {
    const uint8_t *packed;
    const float *qmap;     /* 16 code values */
    const float *absmax;   /* float32 scales, or NULL with double quantization */
    const uint8_t *codes8; /* 8-bit scales (double quantization) */
    const float *nested;   /* their per-nbs-block scales */
    const float *nqm;      /* their 256-entry map */
    float offset;
    int64_t nbs, bs, n;
    float s_lo, s_hi; /* block scales s with |s| in [s_lo, s_hi] (or s == 0) pass scale_safe (qc_gemv sets them) */
} weight_t;

static inline uint32_t bits_of(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float float_of(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* NaN as bfloat16: torch's vectorised float32 -> bfloat16 cast writes 0xFFFF; its float16 -> bfloat16
 * cast (element by element, c10's rule) writes 0x7FC0 */
#define BF16_NAN 0xFFFFu
#define BF16_NAN_FROM_F16 0x7FC0u

static inline uint16_t to_bf16(float f) {
    uint32_t u = bits_of(f);
    if (f != f) return BF16_NAN;
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

static inline uint16_t to_f16(float f) {
    uint32_t u = bits_of(f), sign = (u >> 16) & 0x8000u, a = u & 0x7FFFFFFFu;
    if (a > 0x7F800000u) return (uint16_t)(sign | 0x7E00u | ((a >> 13) & 0x3FFu)); /* NaN, quieted */
    if (a >= 0x477FF000u) return (uint16_t)(sign | 0x7C00u);                       /* rounds past 65504 */
    if (a < 0x38800000u) /* subnormal: 0.5 + |f| has a unit in the last place of 2^-24, the half's */
        return (uint16_t)(sign | (bits_of(float_of(a) + 0.5f) - 0x3F000000u));
    return (uint16_t)(sign | ((a - 0x38000000u + 0xFFFu + ((a >> 13) & 1u)) >> 13));
}

static inline float from_f16(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
    if (e == 0) return float_of(bits_of((float)m * 0x1p-24f) | sign);
    if (e == 31) return float_of(sign | 0x7F800000u | (m << 13));
    return float_of(sign | ((e + 112u) << 23) | (m << 13));
}

/* v rounded to dtype t and widened back to float32 (exact) */
static inline float round_to(int t, float v) {
    if (t == BF16) return float_of((uint32_t)to_bf16(v) << 16);
    if (t == F16) return from_f16(to_f16(v));
    return v;
}

static inline float block_scale(const weight_t *w, int64_t b) {
    if (w->absmax) return w->absmax[b];
    float t = w->nqm[w->codes8[b]] * w->nested[w->nbs == 256 ? b >> 8 : b / w->nbs];
    return t + w->offset;
}

/* The 16 products code * s of the 16 codes in 8 packed bytes (high nibble first), in element order:
 * one in-register table lookup where the CPU has one (AVX-512: vpermps over the 16 codes; AVX2: two
 * 8-entry lookups and a blend on the code's top bit), else a loop. The same float32 products either way. */
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__F16C__))
#define RNE (_MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#endif

/* The fused product streams each weight's codes once from memory: a prefetch this many bytes ahead
 * of the codes being read (one per 64 bytes) keeps the loads from waiting on memory, which the
 * hardware's own prefetching did not (a token's 56 products of a hidden-1024 Llama, 50 MB of codes,
 * measured on the 2-core Zen 4: 6.0 -> 3.9 ms in bfloat16 on two threads). A prefetch never faults:
 * past the end of the codes it reads nothing. */
#define AHEAD 2048
#define PREFETCH(P) _mm_prefetch((const char *)(P) + AHEAD, _MM_HINT_T0)

#if defined(__AVX512F__)
#define VEC512 1
static inline __m512 decode16v(const uint8_t *pb, __m512 table, __m512 sv) {
    __m128i b = _mm_loadl_epi64((const __m128i *)pb);
    __m512i d = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(b, b)); /* b0 b0 b1 b1 ... */
    __m512i shift = _mm512_set_epi32(0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4);
    __m512i idx = _mm512_and_si512(_mm512_srlv_epi32(d, shift), _mm512_set1_epi32(15));
    return _mm512_mul_ps(_mm512_permutexvar_ps(idx, table), sv);
}

/* bfloat16 bits (in 32-bit lanes) of 16 floats, as to_bf16 */
static inline __m512i bf16_bits16(__m512 v, uint32_t nan_bits) {
    __m512i u = _mm512_castps_si512(v), one = _mm512_set1_epi32(1);
    __m512i r = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), _mm512_and_si512(_mm512_srli_epi32(u, 16), one));
    __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    return _mm512_mask_mov_epi32(_mm512_srli_epi32(r, 16), nan, _mm512_set1_epi32((int)nan_bits));
}

static inline __m512 round16(int t, __m512 v) {
    if (t == BF16) return _mm512_castsi512_ps(_mm512_slli_epi32(bf16_bits16(v, BF16_NAN), 16));
    if (t == F16) return _mm512_cvtph_ps(_mm512_cvtps_ph(v, RNE));
    return v;
}

static inline void store16(int out, int logical, void *dst, int64_t i, __m512 v) {
    uint32_t nan = logical == F16 ? BF16_NAN_FROM_F16 : BF16_NAN;
    if (out == F32) _mm512_storeu_ps((float *)dst + i, v);
    else if (out == BF16) _mm256_storeu_si256((__m256i *)((uint16_t *)dst + i), _mm512_cvtepi32_epi16(bf16_bits16(v, nan)));
    else _mm256_storeu_si256((__m256i *)((uint16_t *)dst + i), _mm512_cvtps_ph(v, RNE));
}
#endif

#if !defined(VEC512) && defined(__AVX2__) && defined(__F16C__)
#define VEC256 1
/* the AVX2 twin of decode16v, 8 codes from 4 bytes: two 8-entry lookups, a blend on the code's bit 3 */
static inline __m256 decode8v(const uint8_t *pb, __m256 lo, __m256 hi, __m256 sv) {
    uint32_t word;
    memcpy(&word, pb, 4);
    __m128i b = _mm_cvtsi32_si128((int)word);
    __m256i d = _mm256_cvtepu8_epi32(_mm_unpacklo_epi8(b, b)); /* b0 b0 b1 b1 ... */
    __m256i idx = _mm256_and_si256(_mm256_srlv_epi32(d, _mm256_set_epi32(0, 4, 0, 4, 0, 4, 0, 4)), _mm256_set1_epi32(15));
    __m256 top = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));
    __m256 val = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, idx), _mm256_permutevar8x32_ps(hi, idx), top);
    return _mm256_mul_ps(val, sv);
}

static inline __m256i bf16_bits8(__m256 v, uint32_t nan_bits) {
    __m256i u = _mm256_castps_si256(v);
    __m256i r = _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1)));
    __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    return _mm256_blendv_epi8(_mm256_srli_epi32(r, 16), _mm256_set1_epi32((int)nan_bits), nan);
}

static inline __m256 round8(int t, __m256 v) {
    if (t == BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(bf16_bits8(v, BF16_NAN), 16));
    if (t == F16) return _mm256_cvtph_ps(_mm256_cvtps_ph(v, RNE));
    return v;
}

static inline void store8(int out, int logical, void *dst, int64_t i, __m256 v) {
    if (out == F32) {
        _mm256_storeu_ps((float *)dst + i, v);
    } else if (out == BF16) {
        __m256i r = bf16_bits8(v, logical == F16 ? BF16_NAN_FROM_F16 : BF16_NAN);
        __m128i h = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)); /* 0..0xFFFF: no saturation */
        _mm_storeu_si128((__m128i *)((uint16_t *)dst + i), h);
    } else {
        _mm_storeu_si128((__m128i *)((uint16_t *)dst + i), _mm256_cvtps_ph(v, RNE));
    }
}
#endif

static inline void decode16(const uint8_t *pb, const float *q, float s, float *v) {
#if defined(__AVX512F__)
    _mm512_storeu_ps(v, decode16v(pb, _mm512_loadu_ps(q), _mm512_set1_ps(s)));
#elif defined(__AVX2__)
    __m128i b = _mm_loadl_epi64((const __m128i *)pb);
    __m128i pairs = _mm_unpacklo_epi8(b, b); /* b0 b0 b1 b1 ... */
    __m256i shift = _mm256_set_epi32(0, 4, 0, 4, 0, 4, 0, 4);
    __m256 lo = _mm256_loadu_ps(q), hi = _mm256_loadu_ps(q + 8), sv = _mm256_set1_ps(s);
    for (int h = 0; h < 2; h++) {
        __m256i d = _mm256_cvtepu8_epi32(h ? _mm_srli_si128(pairs, 8) : pairs);
        __m256i idx = _mm256_and_si256(_mm256_srlv_epi32(d, shift), _mm256_set1_epi32(15));
        __m256 top = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)); /* sign bit = the code's bit 3 */
        __m256 val = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, idx), _mm256_permutevar8x32_ps(hi, idx), top);
        _mm256_storeu_ps(v + 8 * h, _mm256_mul_ps(val, sv));
    }
#else
    for (int j = 0; j < 8; j++) {
        v[2 * j] = q[pb[j] >> 4] * s;
        v[2 * j + 1] = q[pb[j] & 15] * s;
    }
#endif
}

/* the weight's value in dtype `out` of a float32 product: rounded to the logical dtype first */
static inline __attribute__((always_inline)) void put(int out, int logical, void *dst, int64_t i, float v) {
    if (logical != F32 && logical != out) v = round_to(logical, v);
    if (out == F32) ((float *)dst)[i] = v;
    else if (out == BF16 && logical == F16) ((uint16_t *)dst)[i] = v != v ? BF16_NAN_FROM_F16 : to_bf16(v);
    else if (out == BF16) ((uint16_t *)dst)[i] = to_bf16(v);
    else ((uint16_t *)dst)[i] = to_f16(v);
}

/* elements [e0, e1) into dst[e0 - base ...]: e0 a multiple of bs */
static inline __attribute__((always_inline)) void
dequant_range(const weight_t *w, int64_t e0, int64_t e1, void *dst, int out, int logical) {
    const uint8_t *p = w->packed;
    const float *q = w->qmap;
    for (int64_t b = e0 / w->bs, start = e0; start < e1; b++, start += w->bs) {
        float s = block_scale(w, b);
        int64_t stop = start + w->bs < e1 ? start + w->bs : e1, e = start;
#ifdef VEC512
        __m512 table = _mm512_loadu_ps(q), sv = _mm512_set1_ps(s);
        for (; e + 16 <= stop; e += 16) {
            __m512 v = decode16v(p + (e >> 1), table, sv);
            if (logical != F32 && logical != out) v = round16(logical, v);
            store16(out, logical, dst, e, v);
        }
#elif defined(VEC256)
        __m256 lo = _mm256_loadu_ps(q), hi = _mm256_loadu_ps(q + 8), sv = _mm256_set1_ps(s);
        for (; e + 8 <= stop; e += 8) {
            __m256 v = decode8v(p + (e >> 1), lo, hi, sv);
            if (logical != F32 && logical != out) v = round8(logical, v);
            store8(out, logical, dst, e, v);
        }
#else
        for (; e + 16 <= stop; e += 16) {
            float v[16];
            decode16(p + (e >> 1), q, s, v);
            for (int j = 0; j < 16; j++) put(out, logical, dst, e + j, v[j]);
        }
#endif
        for (; e + 1 < stop; e += 2) {
            uint8_t byte = p[e >> 1];
            put(out, logical, dst, e, q[byte >> 4] * s);
            put(out, logical, dst, e + 1, q[byte & 15] * s);
        }
        if (e < stop) put(out, logical, dst, e, q[p[e >> 1] >> 4] * s); /* an odd count's last element */
    }
}

#define DQ(O, L) case O * 3 + L: dequant_range(w, e0, e1, dst, O, L); break;

static void dequant_chunk(const weight_t *w, int64_t e0, int64_t e1, void *dst, int out, int logical) {
    switch (out * 3 + logical) {
        DQ(F32, F32) DQ(F32, F16) DQ(F32, BF16)
        DQ(F16, F32) DQ(F16, F16) DQ(F16, BF16)
        DQ(BF16, F32) DQ(BF16, F16) DQ(BF16, BF16)
    }
}

static weight_t weight(const uint8_t *packed, const float *qmap, const float *absmax, const uint8_t *codes8,
                       const float *nested, const float *nqm, float offset, int64_t nbs, int64_t bs, int64_t n) {
    weight_t w = {packed, qmap, absmax, codes8, nested, nqm, offset, nbs, bs, n, 1.0f, 0.0f}; /* nothing scale_safe */
    return w;
}

/* A shared CPU. An OpenMP team ends in a barrier that waits for every thread of the team, so a thread
 * that another process keeps off its CPU stalls the whole call for that process's time slice, far
 * longer than the work (a token's 56 products on the 2-core Zen 4 beside one busy process, 2026-12-07:
 * two threads median 7.9 ms but mean 13.3, one thread 8.0 and 7.9). So each parallel call notes when
 * its threads start and finish; where one started or finished LATE_NS after another, the calls of the
 * next ALONE_NS run on the calling thread alone, then a team is tried again (at most one stall per
 * ALONE_NS while the CPU stays shared). A team's threads each compute whole rows or chunks, so the
 * results are the same bits whatever the team's size. */
#define LATE_NS 1000000LL
#define ALONE_NS 100000000LL
#define MAXTEAM 256
static int64_t alone_until; /* CLOCK_MONOTONIC ns; read and written with relaxed atomics */
static int64_t late_ns = LATE_NS; /* qc_late */
static int last_team;       /* the team size of the last parallel call (qc_last_team) */

static inline int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* the team size for a call that may use `threads` threads */
static inline int team_size(int threads) {
    if (threads > MAXTEAM) threads = MAXTEAM;
    if (threads > 1 && __atomic_load_n(&alone_until, __ATOMIC_RELAXED) > now_ns()) threads = 1;
    return threads;
}

#ifdef _OPENMP
/* after a team of n threads ran, thread i from start[i] to stop[i] (ns) */
static void team_ran(int n, const int64_t *start, const int64_t *stop) {
    int64_t s_lo = start[0], s_hi = start[0], e_lo = stop[0], e_hi = stop[0];
    for (int i = 1; i < n; i++) {
        s_lo = start[i] < s_lo ? start[i] : s_lo;
        s_hi = start[i] > s_hi ? start[i] : s_hi;
        e_lo = stop[i] < e_lo ? stop[i] : e_lo;
        e_hi = stop[i] > e_hi ? stop[i] : e_hi;
    }
    int64_t late = __atomic_load_n(&late_ns, __ATOMIC_RELAXED);
    if (s_hi - s_lo > late || e_hi - e_lo > late) __atomic_store_n(&alone_until, now_ns() + ALONE_NS, __ATOMIC_RELAXED);
    __atomic_store_n(&last_team, n, __ATOMIC_RELAXED);
}

#define TEAM_BEGIN(THREADS) \
    int team_ = team_size(THREADS); \
    int64_t start_[MAXTEAM], stop_[MAXTEAM]; \
    int got_ = 1; \
    _Pragma("omp parallel num_threads(team_) if (team_ > 1)") \
    { \
        int me_ = omp_get_thread_num(); \
        start_[me_] = now_ns();
#define TEAM_END \
        stop_[me_] = now_ns(); \
        if (me_ == 0) got_ = omp_get_num_threads(); \
    } \
    if (got_ > 1) team_ran(got_, start_, stop_); \
    else __atomic_store_n(&last_team, 1, __ATOMIC_RELAXED);
#define TEAM_FOR _Pragma("omp for schedule(static)")
#define TEAM_FOR_DYNAMIC _Pragma("omp for schedule(dynamic, 1)")
#else
#define TEAM_BEGIN(THREADS) (void)(THREADS); {
#define TEAM_END } __atomic_store_n(&last_team, 1, __ATOMIC_RELAXED);
#define TEAM_FOR
#define TEAM_FOR_DYNAMIC
#endif

/* Work alone (team size 1) for the next ns nanoseconds (ns > 0), or from now on with a team again
 * (ns == 0); ns < 0 changes nothing. Returns whether calls now work alone. (For tests, and for a
 * caller that knows its CPUs are shared.) */
int qc_alone(int64_t ns) {
    if (ns > 0) __atomic_store_n(&alone_until, now_ns() + ns, __ATOMIC_RELAXED);
    else if (ns == 0) __atomic_store_n(&alone_until, 0, __ATOMIC_RELAXED);
    return __atomic_load_n(&alone_until, __ATOMIC_RELAXED) > now_ns();
}

/* How late (ns) a thread must be to make calls work alone: ns > 0 sets it (tests that need teams on a
 * busy machine set it high); returns the value before. */
int64_t qc_late(int64_t ns) {
    int64_t was = __atomic_load_n(&late_ns, __ATOMIC_RELAXED);
    if (ns > 0) __atomic_store_n(&late_ns, ns, __ATOMIC_RELAXED);
    return was;
}

/* the number of threads the last qc_dequantize or qc_gemv call ran with */
int qc_last_team(void) { return __atomic_load_n(&last_team, __ATOMIC_RELAXED); }

/* The weight's n values into dst (n elements of dtype out), in chunks of `chunk` elements (a multiple
 * of bs) over up to `threads` OpenMP threads. Returns 0. */
int qc_dequantize(const uint8_t *packed, const float *qmap, const float *absmax, const uint8_t *codes8,
                  const float *nested, const float *nqm, float offset, int64_t nbs, int64_t bs, int64_t n,
                  int logical, int out, void *dst, int64_t chunk, int threads) {
    weight_t w0 = weight(packed, qmap, absmax, codes8, nested, nqm, offset, nbs, bs, n);
    const weight_t *w = &w0;
    int64_t nchunks = (n + chunk - 1) / chunk;
    TEAM_BEGIN(nchunks > 1 ? threads : 1)
    TEAM_FOR_DYNAMIC
    for (int64_t c = 0; c < nchunks; c++) {
        int64_t e0 = c * chunk, e1 = e0 + chunk < n ? e0 + chunk : n;
        dequant_chunk(w, e0, e1, dst, out, logical);
    }
    TEAM_END
    return 0;
}

#define MAXROWS 8
#define LANES 16

static inline float load_as_float(int t, const void *src, int64_t i) {
    if (t == BF16) return float_of((uint32_t)((const uint16_t *)src)[i] << 16);
    if (t == F16) return from_f16(((const uint16_t *)src)[i]);
    return ((const float *)src)[i];
}

/* one output row o of y = x @ W.T for `rows` rows of x (dtype t, K long each): the sums of
 * x[r, k] * W[o, k], each W value as dequantize(W, t) gives it, accumulated in float32 lanes */
static inline __attribute__((always_inline)) void
gemv_row(const weight_t *w, int64_t o, int64_t K, int rows, int t, int logical, const float *xf, float *acc) {
    const uint8_t *p = w->packed;
    const float *q = w->qmap;
    float lane[MAXROWS][LANES];
    memset(lane, 0, sizeof lane);
    int64_t e = o * K, end = e + K, b = e / w->bs;
    for (; e < end; b++) {
        int64_t stop = (b + 1) * w->bs < end ? (b + 1) * w->bs : end;
        float s = block_scale(w, b);
        const float *xr = xf + (e - o * K);
        int64_t k = 0, len = stop - e;
        if (e & 1) { /* a row that starts in the middle of a byte */
            float v = round_to(t, round_to(logical, q[p[e >> 1] & 15] * s));
            for (int r = 0; r < rows; r++) lane[r][0] += xr[r * K] * v;
            k = 1;
        }
#ifdef VEC512
        __m512 table = _mm512_loadu_ps(q), sv = _mm512_set1_ps(s);
        for (; k + LANES <= len; k += LANES) {
            __m512 v = round16(t, round16(logical, decode16v(p + ((e + k) >> 1), table, sv)));
            for (int r = 0; r < rows; r++) {
                __m512 l = _mm512_loadu_ps(lane[r]);
                _mm512_storeu_ps(lane[r], _mm512_fmadd_ps(_mm512_loadu_ps(xr + r * K + k), v, l));
            }
        }
#elif defined(VEC256)
        __m256 lo = _mm256_loadu_ps(q), hi = _mm256_loadu_ps(q + 8), sv = _mm256_set1_ps(s);
        for (; k + LANES <= len; k += LANES) {
            const uint8_t *pb = p + ((e + k) >> 1);
            __m256 v0 = round8(t, round8(logical, decode8v(pb, lo, hi, sv)));
            __m256 v1 = round8(t, round8(logical, decode8v(pb + 4, lo, hi, sv)));
            for (int r = 0; r < rows; r++) {
                const float *xk = xr + r * K + k;
                __m256 l0 = _mm256_add_ps(_mm256_loadu_ps(lane[r]), _mm256_mul_ps(_mm256_loadu_ps(xk), v0));
                __m256 l1 = _mm256_add_ps(_mm256_loadu_ps(lane[r] + 8), _mm256_mul_ps(_mm256_loadu_ps(xk + 8), v1));
                _mm256_storeu_ps(lane[r], l0);
                _mm256_storeu_ps(lane[r] + 8, l1);
            }
        }
#endif
        for (; k + LANES <= len; k += LANES) {
            float v[LANES];
            decode16(p + ((e + k) >> 1), q, s, v);
            for (int j = 0; j < LANES; j++) v[j] = round_to(t, round_to(logical, v[j]));
            for (int r = 0; r < rows; r++)
                for (int j = 0; j < LANES; j++) lane[r][j] += xr[r * K + k + j] * v[j];
        }
        for (; k < len; k++) {
            int64_t i = e + k;
            uint8_t byte = p[i >> 1];
            float v = round_to(t, round_to(logical, q[(i & 1) ? (byte & 15) : (byte >> 4)] * s));
            for (int r = 0; r < rows; r++) lane[r][0] += xr[r * K + k] * v;
        }
        e = stop;
    }
    for (int r = 0; r < rows; r++) {
        float sum = 0.0f;
        for (int j = 0; j < LANES; j++) sum += lane[r][j];
        acc[r] = sum;
    }
}

#define GV(T, L) case T * 3 + L: gemv_row(w, o, K, rows, T, L, xf, acc); break;

#if defined(VEC512) && defined(__AVX512BF16__) && defined(__AVX512BW__)
#define DPBF16 1
/* bfloat16 instructions (vcvtneps2bf16, vdpbf16ps) treat subnormal inputs as zero and flush subnormal
 * results, which torch's casts and float32 multiply-adds do not: they run only on values where
 * neither can happen, every nonzero one between 2^-50 and 2^100 in magnitude (products of two then at
 * least 2^-100, and any sum of them a multiple of 2^-114, so nothing on the way is subnormal; nothing
 * overflows to infinity in a rounding to bfloat16). A block's values q[c] * s are such when its scale
 * s is zero or of magnitude in [s_lo, s_hi] (safe_scales, from the code table). */
#define DP_LO 0x1p-50f
#define DP_HI 0x1p100f

static inline int scale_safe(const weight_t *w, float s) {
    float a = s < 0 ? -s : s;
    return a == 0.0f || (a >= w->s_lo && a <= w->s_hi); /* NaN: neither */
}

/* w->s_lo, w->s_hi for code table q and the logical dtype (a float16 rounding must stay finite): with
 * a margin of 2^-20 for the roundings of the bounds and of q * s; none where q holds a NaN or infinity */
static void safe_scales(weight_t *w, int logical) {
    float qmin = 0.0f, qmax = 0.0f;
    for (int c = 0; c < 16; c++) {
        float a = w->qmap[c] < 0 ? -w->qmap[c] : w->qmap[c];
        if (!(a <= 0x1.fffffep127f)) return; /* NaN or infinity */
        if (a > 0 && (qmin == 0 || a < qmin)) qmin = a;
        if (a > qmax) qmax = a;
    }
    float top = logical == F16 ? 65504.0f : 0x1p99f;
    w->s_lo = qmin > 0 ? 0x1p-49f / qmin * (1.0f + 0x1p-20f) : 0.0f;
    w->s_hi = qmax > 0 ? top / qmax * (1.0f - 0x1p-20f) : 0x1.fffffep127f;
}
#endif

#ifdef VEC512
/* The 16 values a block's codes stand for, as dtype t multiplies with them: code * scale rounded to the
 * logical dtype, then to t (the same function of the code as gemv_row applies per element, done once
 * per block) */
static inline __m512 table_of(float s, int t, int logical, __m512 q) {
    return round16(t, round16(logical, _mm512_mul_ps(q, _mm512_set1_ps(s))));
}

static inline __m512 block_table(const weight_t *w, int64_t b, int t, int logical, __m512 q) {
    return table_of(block_scale(w, b), t, logical, q);
}

/* The per-block work of the fused products (a block's scale, its table of 16 values; on the dot-product
 * path also its check) is most of their time where done block by block (a block of 64 codes is a few
 * vector instructions), so gemv_pair32 and the dot-product path do it for up to GROUP blocks at a time
 * before their products: the dot-product path one vector check of their scales, and its
 * tables made two at a time (vcvtne2ps2bf16, about half the cost of two vcvtneps2bf16 on the Zen 4),
 * stored to a small array the product loop reads (a table past the last block is made from a finite
 * scale, never read). Measured on the 2-core Zen 4, 2026-12-07, against tables made block by block: one
 * row of x, one thread, weight in cache, 1024x1024 65 -> 47 us, 2816x1024 172 -> 122 us; a token's 56
 * products of a hidden-1024 Llama from memory, two threads, medians of three runs 6.3 -> 4.5, 4.7 -> 3.7,
 * 6.9 -> 5.3 ms (this VM's speed moved between runs); in float32 (gemv_pair32) 7.5 -> 6.0 ms on two
 * threads, 9.7 -> 8.8 on one. */
#define GROUP 16

/* The scales of blocks b .. b + m - 1 (m <= GROUP) into s: block_scale's values, its double-quant case
 * written out for a run within one nested block (the plain loop over block_scale measured 2x slower on
 * the one-row product, 1024x1024 52 -> 106 us: its per-block division and branches stay in the loop) */
static inline void scales_of(const weight_t *w, int64_t b, int m, float *s) {
    if (w->absmax) {
        for (int i = 0; i < m; i++) s[i] = w->absmax[b + i];
    } else if (w->nbs == 256 && (b >> 8) == ((b + m - 1) >> 8)) {
        float nest = w->nested[b >> 8];
        for (int i = 0; i < m; i++) s[i] = w->nqm[w->codes8[b + i]] * nest + w->offset;
    } else {
        for (int i = 0; i < m; i++) s[i] = block_scale(w, b + i);
    }
}

/* gemv_row where K and the block size are multiples of 32 (so every run of 32 elements lies in one row
 * and one block): 16 packed bytes give 32 codes, the high nibbles (even k) and the low ones (odd k)
 * each one lookup in the block's table; xd holds each row of x with every 32 values reordered as their
 * 16 even then 16 odd ones (qc_gemv writes it so). Two accumulators per row, kept in registers (rows is
 * a constant where qc_gemv calls this), summed at the end: another float32 summation order than
 * gemv_row's, within the same tolerance. */
static inline __attribute__((always_inline)) void
gemv_row32(const weight_t *w, int64_t o, int64_t K, const int rows, int t, int logical, const float *xd, float *acc) {
    __m512 even_acc[MAXROWS], odd_acc[MAXROWS];
    for (int r = 0; r < rows; r++) even_acc[r] = odd_acc[r] = _mm512_setzero_ps();
    const __m512 q = _mm512_loadu_ps(w->qmap);
    for (int64_t e = o * K, end = e + K, b = e / w->bs; e < end; b++) { /* one division a row, not a block */
        int64_t stop = (b + 1) * w->bs < end ? (b + 1) * w->bs : end;
        __m512 table = block_table(w, b, t, logical, q);
        for (; e < stop; e += 32) {
            if (!(e & 127)) PREFETCH(w->packed + (e >> 1));
            /* vpermps reads only an index's low 4 bits: the low nibble needs no mask */
            __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(w->packed + (e >> 1))));
            __m512 even = _mm512_permutexvar_ps(_mm512_srli_epi32(d, 4), table);
            __m512 odd = _mm512_permutexvar_ps(d, table);
            const float *xk = xd + (e - o * K);
            for (int r = 0; r < rows; r++) {
                even_acc[r] = _mm512_fmadd_ps(_mm512_loadu_ps(xk + r * K), even, even_acc[r]);
                odd_acc[r] = _mm512_fmadd_ps(_mm512_loadu_ps(xk + r * K + 16), odd, odd_acc[r]);
            }
        }
    }
    for (int r = 0; r < rows; r++) acc[r] = _mm512_reduce_add_ps(_mm512_add_ps(even_acc[r], odd_acc[r]));
}

#define GV32(R, O) case R: gemv_row32(w, O, K, R, t, logical, xf, acc); break;

#ifdef DPBF16
/* Products in bfloat16 dot-product instructions (vdpbf16ps: 32 products of bfloat16 pairs a step,
 * each exact in float32, added into 16 float32 lanes) where x is bfloat16: every weight value then
 * multiplies as a bfloat16 anyway (rounded to the logical dtype, then to bfloat16), so the products
 * are the ones gemv_row32 forms, in another summation order (GEMV_REL). Only on values the
 * instructions take exactly (DP_LO, DP_HI): every value of x (qc_gemv checks each row) and of each
 * block (scale_safe); a row of W with a block that fails goes to gemv_row32. */

/* whether each of the m scales in s passes scale_safe (one vector test) */
static inline int scales_safe(const weight_t *w, int m, const float *s) {
    __mmask16 k = (__mmask16)((1u << m) - 1);
    __m512 a = _mm512_abs_ps(_mm512_maskz_loadu_ps(k, s));
    __mmask16 ok = _mm512_cmp_ps_mask(a, _mm512_setzero_ps(), _CMP_EQ_OQ) /* NaN: neither */
                   | (_mm512_cmp_ps_mask(a, _mm512_set1_ps(w->s_lo), _CMP_GE_OQ) & _mm512_cmp_ps_mask(a, _mm512_set1_ps(w->s_hi), _CMP_LE_OQ));
    return (ok & k) == k;
}

/* two blocks' tables (scales s[0], s[1]) in one vector: block_table's 16 values as dtype t = bfloat16
 * multiplies with them, the first block's in the low 16 words */
static inline __m512i tables2(const float *s, int logical, __m512 q) {
    __m512 v0 = _mm512_mul_ps(q, _mm512_set1_ps(s[0])), v1 = _mm512_mul_ps(q, _mm512_set1_ps(s[1]));
    if (logical == F16) {
        v0 = round16(F16, v0);
        v1 = round16(F16, v1);
    }
    return (__m512i)_mm512_cvtne2ps_pbh(v1, v0);
}

/* The products of 64 codes (32 packed bytes) with x's values for them: the high nibbles (even
 * elements) against xd[0..31], the low ones (odd elements) against xd[32..63]; xd holds each row of x
 * as bfloat16 with every 64 values reordered as their 32 even then 32 odd ones (qc_gemv writes it so).
 * TABLE: a block's table in its low 16 words (DP64's indices are below 16). */
#define DP64(P, TABLE, EVEN, ODD) do { \
        __m512i d_ = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(P))); \
        EVEN = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(d_, 4), TABLE); \
        ODD = (__m512bh)_mm512_permutexvar_epi16(_mm512_and_si512(d_, _mm512_set1_epi16(15)), TABLE); \
    } while (0)

/* gemv_row32 for bfloat16 x, K and the block size multiples of 64, by dot products: 0 where a block's
 * scale fails scale_safe (the caller then runs gemv_row32 for this row of W). Two accumulators per row of
 * x, summed at the end, as gemv_pair_dp sums each of its rows: the same bits either way. */
static inline __attribute__((always_inline)) int
gemv_row_dp(const weight_t *w, int64_t o, int64_t K, const int rows, int logical, const uint16_t *xd, float *acc) {
    __m512 even_acc[MAXROWS], odd_acc[MAXROWS];
    for (int r = 0; r < rows; r++) even_acc[r] = odd_acc[r] = _mm512_setzero_ps();
    const __m512 q = _mm512_loadu_ps(w->qmap);
    const uint8_t *p = w->packed + ((o * K) >> 1);
    int64_t nb = K / w->bs, b0 = o * nb;
    float s[GROUP] = {0}; /* (a table past m is made from a finite scale, never read) */
    __m256i tab[GROUP];
    for (int64_t j0 = 0; j0 < nb; j0 += GROUP) {
        int m = nb - j0 < GROUP ? (int)(nb - j0) : GROUP;
        scales_of(w, b0 + j0, m, s);
        if (!scales_safe(w, m, s)) return 0;
        for (int i = 0; i < m; i += 2) _mm512_storeu_si512(tab + i, tables2(s + i, logical, q));
        for (int i = 0; i < m; i++) {
            __m512i table = _mm512_castsi256_si512(tab[i]);
            for (int64_t k = (j0 + i) * w->bs, stop = k + w->bs; k < stop; k += 64) {
                __m512bh even, odd;
                PREFETCH(p + (k >> 1));
                DP64(p + (k >> 1), table, even, odd);
                for (int r = 0; r < rows; r++) {
                    even_acc[r] = _mm512_dpbf16_ps(even_acc[r], even, (__m512bh)_mm512_loadu_si512(xd + r * K + k));
                    odd_acc[r] = _mm512_dpbf16_ps(odd_acc[r], odd, (__m512bh)_mm512_loadu_si512(xd + r * K + k + 32));
                }
            }
        }
    }
    for (int r = 0; r < rows; r++) acc[r] = _mm512_reduce_add_ps(_mm512_add_ps(even_acc[r], odd_acc[r]));
    return 1;
}

#define GVDP(R) case R: done = gemv_row_dp(w, oo, K, R, logical, xd, acc); break;

/* gemv_row_dp for one row of x on rows o and o + 1 of W (the x loads shared); 0 where a block of
 * either fails scale_safe (the caller then takes each row on its own) */
static inline int gemv_pair_dp(const weight_t *w, int64_t o, int64_t K, int logical, const uint16_t *xd, float *acc) {
    __m512 even0 = _mm512_setzero_ps(), odd0 = even0, even1 = even0, odd1 = even0;
    const __m512 q = _mm512_loadu_ps(w->qmap);
    const uint8_t *p0 = w->packed + ((o * K) >> 1), *p1 = p0 + (K >> 1);
    int64_t nb = K / w->bs, b0 = o * nb;
    float s0[GROUP] = {0}, s1[GROUP] = {0};
    __m256i tab0[GROUP], tab1[GROUP];
    for (int64_t j0 = 0; j0 < nb; j0 += GROUP) {
        int m = nb - j0 < GROUP ? (int)(nb - j0) : GROUP;
        scales_of(w, b0 + j0, m, s0);
        scales_of(w, b0 + nb + j0, m, s1);
        if (!scales_safe(w, m, s0) || !scales_safe(w, m, s1)) return 0;
        for (int i = 0; i < m; i += 2) {
            _mm512_storeu_si512(tab0 + i, tables2(s0 + i, logical, q)); /* i + 1 < GROUP: m is odd only below it */
            _mm512_storeu_si512(tab1 + i, tables2(s1 + i, logical, q));
        }
        for (int i = 0; i < m; i++) {
            __m512i table0 = _mm512_castsi256_si512(tab0[i]), table1 = _mm512_castsi256_si512(tab1[i]);
            for (int64_t k = (j0 + i) * w->bs, stop = k + w->bs; k < stop; k += 64) {
                __m512bh xe = (__m512bh)_mm512_loadu_si512(xd + k), xo = (__m512bh)_mm512_loadu_si512(xd + k + 32), e0, o0, e1, o1;
                PREFETCH(p0 + (k >> 1));
                PREFETCH(p1 + (k >> 1));
                DP64(p0 + (k >> 1), table0, e0, o0);
                DP64(p1 + (k >> 1), table1, e1, o1);
                even0 = _mm512_dpbf16_ps(even0, e0, xe);
                odd0 = _mm512_dpbf16_ps(odd0, o0, xo);
                even1 = _mm512_dpbf16_ps(even1, e1, xe);
                odd1 = _mm512_dpbf16_ps(odd1, o1, xo);
            }
        }
    }
    acc[0] = _mm512_reduce_add_ps(_mm512_add_ps(even0, odd0));
    acc[1] = _mm512_reduce_add_ps(_mm512_add_ps(even1, odd1));
    return 1;
}
#endif

/* gemv_row32 for one row of x on two rows of W at once (o and o + 1; K a multiple of the block size,
 * so their blocks start at the same k): the x loads shared, four independent accumulators, and the
 * per-row costs (a division, the final sums) spread over two rows. Each row's sum is formed exactly as
 * gemv_row32 forms it (the same chains of multiply-adds, the same final additions): the same bits. */
static inline void gemv_pair32(const weight_t *w, int64_t o, int64_t K, int t, int logical, const float *xd, float *acc) {
    __m512 even0 = _mm512_setzero_ps(), odd0 = even0, even1 = even0, odd1 = even0;
    const __m512 q = _mm512_loadu_ps(w->qmap);
    const uint8_t *p0 = w->packed + ((o * K) >> 1), *p1 = p0 + (K >> 1);
    int64_t nb = K / w->bs, b0 = o * nb;
    float s0[GROUP], s1[GROUP];
    __m512 tab0[GROUP], tab1[GROUP];
    for (int64_t j0 = 0; j0 < nb; j0 += GROUP) {
        int m = nb - j0 < GROUP ? (int)(nb - j0) : GROUP;
        scales_of(w, b0 + j0, m, s0);
        scales_of(w, b0 + nb + j0, m, s1);
        for (int i = 0; i < m; i++) {
            tab0[i] = table_of(s0[i], t, logical, q);
            tab1[i] = table_of(s1[i], t, logical, q);
        }
        for (int i = 0; i < m; i++) {
            __m512 table0 = tab0[i], table1 = tab1[i];
            for (int64_t k = (j0 + i) * w->bs, stop = k + w->bs; k < stop; k += 32) {
                __m512 xe = _mm512_loadu_ps(xd + k), xo = _mm512_loadu_ps(xd + k + 16);
                if (!(k & 127)) {
                    PREFETCH(p0 + (k >> 1));
                    PREFETCH(p1 + (k >> 1));
                }
                __m512i d0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p0 + (k >> 1))));
                __m512i d1 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p1 + (k >> 1))));
                even0 = _mm512_fmadd_ps(xe, _mm512_permutexvar_ps(_mm512_srli_epi32(d0, 4), table0), even0);
                odd0 = _mm512_fmadd_ps(xo, _mm512_permutexvar_ps(d0, table0), odd0);
                even1 = _mm512_fmadd_ps(xe, _mm512_permutexvar_ps(_mm512_srli_epi32(d1, 4), table1), even1);
                odd1 = _mm512_fmadd_ps(xo, _mm512_permutexvar_ps(d1, table1), odd1);
            }
        }
    }
    acc[0] = _mm512_reduce_add_ps(_mm512_add_ps(even0, odd0));
    acc[1] = _mm512_reduce_add_ps(_mm512_add_ps(even1, odd1));
}
#endif

/* x's rows as the products read them, before the team starts: xf (float32; with by32 each run of 32
 * values reordered as its 16 even then its 16 odd ones) and, on the dot-product path, xd (bfloat16,
 * each run of 64 as its 32 even then its 32 odd ones). Written with vector loads and permutes for
 * bfloat16 and float32 x (the same bits as the scalar loop, which only moves and widens them): done
 * one element at a time it was a quarter of an 8-row call on a 1024-wide weight (25 of ~100 us). */
#ifdef VEC512
static const uint16_t EVEN64[32] = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30,
                                    32, 34, 36, 38, 40, 42, 44, 46, 48, 50, 52, 54, 56, 58, 60, 62};
static const int32_t EVEN32[16] = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
#endif

static void x_as_float(int t, const void *x, int64_t count, int by32, float *xf) {
    int64_t i = 0;
#ifdef VEC512
    if (by32 && t == BF16) { /* a 32-bit lane holds elements 2l (low half) and 2l + 1 (high half) */
        for (; i < count; i += 32) {
            __m512i v = _mm512_loadu_si512((const uint16_t *)x + i);
            _mm512_storeu_si512(xf + i, _mm512_slli_epi32(v, 16));
            _mm512_storeu_si512(xf + i + 16, _mm512_and_si512(v, _mm512_set1_epi32((int)0xFFFF0000u)));
        }
    } else if (by32 && t == F32) {
        const __m512i even = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)EVEN64)); /* 0, 2, .. 30 */
        const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
        for (; i < count; i += 32) {
            __m512 a = _mm512_loadu_ps((const float *)x + i), b = _mm512_loadu_ps((const float *)x + i + 16);
            _mm512_storeu_ps(xf + i, _mm512_permutex2var_ps(a, even, b));
            _mm512_storeu_ps(xf + i + 16, _mm512_permutex2var_ps(a, odd, b));
        }
    }
#endif
    for (; i < count; i++) {
        int64_t j = i % 32;
        xf[i] = load_as_float(t, x, by32 ? i - j + (j < 16 ? 2 * j : 2 * (j - 16) + 1) : i);
    }
}

#ifdef DPBF16
/* one row of bfloat16 x (K a multiple of 64) into xd's order; whether its every value is zero or of
 * magnitude in [DP_LO, DP_HI] (the bits of a bfloat16 without its sign compare as its magnitude;
 * infinities and NaNs lie above DP_HI's, and DP_LO and DP_HI are bfloat16 values) */
static int x_row_dp(const uint16_t *xr, int64_t K, uint16_t *xd) {
    const __m512i even = _mm512_loadu_si512(EVEN64), odd = _mm512_add_epi16(even, _mm512_set1_epi16(1));
    const __m512i mag = _mm512_set1_epi16(0x7FFF), lo = _mm512_set1_epi16((short)(bits_of(DP_LO) >> 16)),
                  hi = _mm512_set1_epi16((short)(bits_of(DP_HI) >> 16));
    __mmask32 bad = 0;
    for (int64_t k = 0; k < K; k += 64) {
        __m512i a = _mm512_loadu_si512(xr + k), b = _mm512_loadu_si512(xr + k + 32);
        _mm512_storeu_si512(xd + k, _mm512_permutex2var_epi16(a, even, b));
        _mm512_storeu_si512(xd + k + 32, _mm512_permutex2var_epi16(a, odd, b));
        __m512i ma = _mm512_and_si512(a, mag), mb = _mm512_and_si512(b, mag);
        bad |= _mm512_test_epi16_mask(ma, ma) & (_mm512_cmplt_epu16_mask(ma, lo) | _mm512_cmpgt_epu16_mask(ma, hi));
        bad |= _mm512_test_epi16_mask(mb, mb) & (_mm512_cmplt_epu16_mask(mb, lo) | _mm512_cmpgt_epu16_mask(mb, hi));
    }
    return bad == 0;
}
#endif

/* y[r, o] for r < rows from the sums acc[r] (+ bias[o]), in dtype t */
static inline void put_row(int t, const void *bias, void *y, int rows, int64_t O, int64_t o, const float *acc) {
    float bo = bias ? load_as_float(t, bias, o) : 0.0f;
    for (int r = 0; r < rows; r++) {
        float v = acc[r] + bo;
        if (t == F32) ((float *)y)[r * O + o] = v;
        else if (t == BF16) ((uint16_t *)y)[r * O + o] = to_bf16(v);
        else ((uint16_t *)y)[r * O + o] = to_f16(v);
    }
}

/* y[r, o] = sum_k x[r, k] * W[o, k] (+ bias[o]) for r < rows <= MAXROWS; x, bias and y of dtype t; W
 * of O x K elements (O * K == n). scratch: 2 * rows * K floats, for x as float32 (and as bfloat16
 * for the dot-product path). Rows of W split over `threads` OpenMP threads. Returns 0, or -1 for too
 * many rows. */
int qc_gemv(const uint8_t *packed, const float *qmap, const float *absmax, const uint8_t *codes8,
            const float *nested, const float *nqm, float offset, int64_t nbs, int64_t bs, int64_t n, int logical,
            const void *x, int rows, int64_t O, int64_t K, int t, const void *bias, void *y, float *scratch, int threads) {
    if (rows < 1 || rows > MAXROWS) return -1;
    weight_t w0 = weight(packed, qmap, absmax, codes8, nested, nqm, offset, nbs, bs, n);
    const weight_t *w = &w0;
    float *xf = scratch;
    int by32 = 0; /* gemv_row32 applies: x reordered in runs of 32 (its even then its odd elements) */
    int dp = 0;   /* gemv_row_dp applies: bfloat16 x, K and the block size multiples of 64, K of the block size */
#ifdef VEC512
    by32 = K % 32 == 0 && bs % 32 == 0;
#endif
#ifdef DPBF16
    uint16_t *xd = (uint16_t *)(scratch + rows * K);
    dp = t == BF16 && K % 64 == 0 && bs % 64 == 0 && K % bs == 0; /* (its loops take whole blocks a row) */
    if (dp) {
        safe_scales(&w0, logical);
        int ok = 0; /* rows of x whose every value is zero or of magnitude in [DP_LO, DP_HI] */
        for (int r = 0; r < rows; r++) ok += x_row_dp((const uint16_t *)x + r * K, K, xd + r * K);
        if (ok != rows && ok != 0) { /* each row on its own: the same bits as in any batch */
            for (int r = 0; r < rows; r++)
                qc_gemv(packed, qmap, absmax, codes8, nested, nqm, offset, nbs, bs, n, logical, (const uint16_t *)x + r * K, 1,
                        O, K, t, bias, (uint16_t *)y + r * O, scratch, threads);
            return 0;
        }
        dp = ok == rows;
    }
#endif
    x_as_float(t, x, rows * K, by32, xf);
    int64_t step = by32 && rows == 1 && K % bs == 0 ? 2 : 1; /* gemv_pair32: two rows of W a step */
    TEAM_BEGIN(threads)
    TEAM_FOR
    for (int64_t s = 0; s < (O + step - 1) / step; s++) {
        int64_t o = s * step;
        float acc[MAXROWS] = {0};
#ifdef DPBF16
        if (dp) {
            int done = 0;
            if (step == 2 && o + 1 < O && gemv_pair_dp(w, o, K, logical, xd, acc)) {
                put_row(t, bias, y, 1, O, o, acc);
                put_row(t, bias, y, 1, O, o + 1, acc + 1);
                continue;
            }
            for (int64_t oo = o; oo < o + step && oo < O; oo++) { /* a row of W the pair could not take, or a batch */
                switch (rows) { GVDP(1) GVDP(2) GVDP(3) GVDP(4) GVDP(5) GVDP(6) GVDP(7) GVDP(8) }
                if (!done) switch (rows) { GV32(1, oo) GV32(2, oo) GV32(3, oo) GV32(4, oo) GV32(5, oo) GV32(6, oo) GV32(7, oo) GV32(8, oo) }
                put_row(t, bias, y, rows, O, oo, acc);
            }
            continue;
        }
#endif
#ifdef VEC512
        if (step == 2 && o + 1 < O) {
            gemv_pair32(w, o, K, t, logical, xf, acc);
            put_row(t, bias, y, 1, O, o, acc);
            put_row(t, bias, y, 1, O, o + 1, acc + 1);
            continue;
        }
        if (by32) {
            switch (rows) { GV32(1, o) GV32(2, o) GV32(3, o) GV32(4, o) GV32(5, o) GV32(6, o) GV32(7, o) GV32(8, o) }
        } else
#endif
        switch (t * 3 + logical) {
            GV(F32, F32) GV(F32, F16) GV(F32, BF16)
            GV(F16, F32) GV(F16, F16) GV(F16, BF16)
            GV(BF16, F32) GV(BF16, F16) GV(BF16, BF16)
        }
        put_row(t, bias, y, rows, O, o, acc);
    }
    TEAM_END
    return 0;
}

/* Fresh memory for an output: ask the kernel for 2 MiB pages (transparent huge pages) for the whole
 * 2 MiB pages inside [p, p + nbytes), then take their page faults here, one write of a zero byte per
 * page, before the kernels' threads write the output. With 4 KiB pages the faults cost more than
 * decoding: a 4096x4096 bfloat16 output on the 2-core Zen 4 took 11-14 ms to decode into fresh
 * memory, 4.7-6.3 ms with this (2026-12-07); faulting the huge pages from two threads at once was
 * erratic there (4 to 136 ms), so one thread takes them. p must be memory the caller has just
 * allocated and not written. Where the system has huge pages off, or this is not Linux, the advice
 * does nothing or fails, and nothing is written. Returns madvise's result, or -1 where nothing was
 * asked (less than one whole huge page). */
int qc_hugepages(void *p, int64_t nbytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    const uintptr_t page = (uintptr_t)2 << 20;
    uintptr_t lo = ((uintptr_t)p + page - 1) & ~(page - 1), hi = ((uintptr_t)p + (uintptr_t)nbytes) & ~(page - 1);
    if (nbytes <= 0 || hi <= lo) return -1;
    int r = madvise((void *)lo, hi - lo, MADV_HUGEPAGE);
    for (uintptr_t a = lo; r == 0 && a < hi; a += page) *(volatile char *)a = 0;
    return r;
#else
    (void)p;
    (void)nbytes;
    return -1;
#endif
}

/* the ABI version build.py checks after loading (bumped with any signature change) */
int qc_abi(void) { return 4; }

/* the vector width of the build's hot loops in bits (512, 256), or 0 for plain C: calls.py runs the
 * fused kernel only on a vector build (plain C is slower than dequantize + torch's product) */
int qc_simd(void) {
#if defined(VEC512)
    return 512;
#elif defined(VEC256)
    return 256;
#else
    return 0;
#endif
}

/* 1 where the build multiplies bfloat16 inputs with dot-product instructions (gemv_row_dp), else 0 */
int qc_bf16_dot(void) {
#if defined(DPBF16)
    return 1;
#else
    return 0;
#endif
}
