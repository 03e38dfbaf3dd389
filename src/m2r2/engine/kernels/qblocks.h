/* GGUF block formats in the native kernels: y[t, o] = sum_i W[o, i] x[t, i] (+ b[o]) with W as the GGUF stores
 * it (`out` rows of in/32 "units" of 32 weights; the K-quants pack 8 units in a 256-weight super-block), x
 * float32 (T, in).
 *
 * Exactness. Each unit is dequantised to 32 floats with exactly the arithmetic of m2r2.engine.blocks (the gguf
 * package's order, each product and sum rounded to float32, no fused multiply-add: this file is compiled with
 * -std=c11, which keeps GCC and Clang from contracting a*b+c), so the weights are the float32 model's bit for
 * bit. Each row t keeps 32 partial sums, partial j accumulating w[j] * x[t, 32u + j] over the units u in order
 * with one fused multiply-add per term (fmaf in plain C), and the 32 partials are added in one fixed tree at
 * the end. So a row's result depends neither on how many rows share the call nor on the vector width: the
 * AVX-512 (16 lanes), AVX2 (8 lanes) and plain C code (NEON, or any compiler-vectorised target) give the same
 * bits on a CPU with FMA (tests/test_gguf_weights.py builds all three and compares).
 *
 * Speed. A one-row step is compute-bound on dequantisation, not on memory: the AVX-512 path builds Q4_0/Q4_1's
 * 16 possible values of a block once (a 16-float table, exact as above) and looks all 32 weights up with two
 * permutes; Q5_0/Q5_1 use a 32-entry table the same way; Q4_K builds a table per sub-block from its super-
 * block's scales (read once), Q6_K converts its six-bit values. Each dequantised unit is used for up to GMAX
 * rows held in registers, so extra rows cost their multiply-adds only (the multi-row curve of the benchmark
 * `m2r2 bench products`). On the AVX2 and plain C paths every format dequantises a unit into 32 floats in L1
 * (deq_unit, compiled per format) and runs the same multiply-add loop over it.
 */
#include <stdint.h>

enum { KIND_Q4_1 = 2, KIND_Q8_0 = 3, KIND_Q4_0 = 4, KIND_Q5_0 = 5, KIND_Q5_1 = 6, KIND_Q4_K = 7, KIND_Q6_K = 8,
       KIND_SEGMENTS = 9 };

/* A fused linear whose parts the GGUF stores in different formats (Q4_K_M: q and k in Q4_K, v in Q6_K), kind
 * KIND_SEGMENTS: W points to an array of segments, consecutive output rows each, ended by one with rows == 0 */
typedef struct {
    const unsigned char *w;
    int kind, rows;
} m2r2_qseg;

static inline int qkind(int kind) { return kind >= KIND_Q4_1 && kind <= KIND_SEGMENTS; }

/* bytes of one unit of 32 weights, and of a super-block (K-quants: 256 weights) */
static inline int q_block_bytes(int kind) {
    switch (kind) {
    case KIND_Q4_0: return 18;
    case KIND_Q4_1: return 20;
    case KIND_Q5_0: return 22;
    case KIND_Q5_1: return 24;
    case KIND_Q8_0: return 34;
    case KIND_Q4_K: return 144;
    case KIND_Q6_K: return 210;
    }
    return 0;
}
static inline int q_block_weights(int kind) { return kind == KIND_Q4_K || kind == KIND_Q6_K ? 256 : 32; }

static inline float f16_at(const unsigned char *p) {
    half h;
    memcpy(&h, p, 2);
    return H2F(h);
}

/* Unit u (32 weights) of a row, dequantised exactly as m2r2.engine.blocks does (the specification) */
static inline __attribute__((always_inline)) void deq_unit(int kind, const unsigned char *restrict row, int u,
                                                           float *restrict w) {
    switch (kind) {
    case KIND_Q4_0: {
        const unsigned char *b = row + (size_t)u * 18, *qs = b + 2;
        const float d = f16_at(b);
        for (int j = 0; j < 16; j++) {
            w[j] = d * (float)((int)(qs[j] & 15) - 8);
            w[j + 16] = d * (float)((int)(qs[j] >> 4) - 8);
        }
        break;
    }
    case KIND_Q4_1: {
        const unsigned char *b = row + (size_t)u * 20, *qs = b + 4;
        const float d = f16_at(b), m = f16_at(b + 2);
        for (int j = 0; j < 16; j++) {
            w[j] = d * (float)(qs[j] & 15) + m;
            w[j + 16] = d * (float)(qs[j] >> 4) + m;
        }
        break;
    }
    case KIND_Q5_0:
    case KIND_Q5_1: {
        const int one = kind == KIND_Q5_1;
        const unsigned char *b = row + (size_t)u * (one ? 24 : 22), *qs = b + (one ? 8 : 6);
        const float d = f16_at(b), m = one ? f16_at(b + 2) : 0.0f;
        uint32_t qh;
        memcpy(&qh, b + (one ? 4 : 2), 4);
        for (int j = 0; j < 16; j++) {
            const int lo = (qs[j] & 15) | (int)((qh >> j) & 1) << 4, hi = (qs[j] >> 4) | (int)((qh >> (j + 16)) & 1) << 4;
            if (one) {
                w[j] = d * (float)lo + m;
                w[j + 16] = d * (float)hi + m;
            } else {
                w[j] = d * (float)(lo - 16);
                w[j + 16] = d * (float)(hi - 16);
            }
        }
        break;
    }
    case KIND_Q8_0: {
        const unsigned char *b = row + (size_t)u * 34;
        const float d = f16_at(b);
        const signed char *q = (const signed char *)(b + 2);
        for (int j = 0; j < 32; j++)
            w[j] = (float)q[j] * d;
        break;
    }
    case KIND_Q4_K: {
        const unsigned char *b = row + (size_t)(u / 8) * 144, *s = b + 4;
        const int k = u % 8;
        const float d = f16_at(b), dmin = f16_at(b + 2);
        int sc, mn;
        if (k < 4) {
            sc = s[k] & 63;
            mn = s[k + 4] & 63;
        } else {
            sc = (s[k + 4] & 15) | (s[k - 4] >> 6) << 4;
            mn = (s[k + 4] >> 4) | (s[k] >> 6) << 4;
        }
        const float scale = d * (float)sc, offset = dmin * (float)mn;
        const unsigned char *qs = b + 16 + 32 * (k / 2);
        const int shift = 4 * (k % 2);
        for (int j = 0; j < 32; j++)
            w[j] = scale * (float)((qs[j] >> shift) & 15) - offset;
        break;
    }
    case KIND_Q6_K: {
        const unsigned char *b = row + (size_t)(u / 8) * 210;
        const int h = (u % 8) / 4, k = u % 4;
        const unsigned char *ql = b + 64 * h + 32 * (k % 2), *qh = b + 128 + 32 * h;
        const signed char *sc = (const signed char *)(b + 192) + 8 * h + 2 * k;
        const float d = f16_at(b + 208), s0 = d * (float)sc[0], s1 = d * (float)sc[1];
        const int shift = 4 * (k / 2);
        for (int j = 0; j < 32; j++) {
            const int q = (((ql[j] >> shift) & 15) | ((qh[j] >> (2 * k)) & 3) << 4) - 32;
            w[j] = (j < 16 ? s0 : s1) * (float)q;
        }
        break;
    }
    }
}

/* for (u < nu) { w = unit u of kind KIND; BODY }, one loop per kind so that each is compiled (and vectorised)
 * for its constant kind */
#define EACH_UNIT(KIND, WB, ...) for (int u = 0; u < nu; u++) { deq_unit(KIND, row, u, WB); __VA_ARGS__ }
#define UNIT_LOOPS(WB, ...)                                                                              \
    switch (kind) {                                                                                      \
    case KIND_Q4_0: EACH_UNIT(KIND_Q4_0, WB, __VA_ARGS__) break;                                         \
    case KIND_Q4_1: EACH_UNIT(KIND_Q4_1, WB, __VA_ARGS__) break;                                         \
    case KIND_Q5_0: EACH_UNIT(KIND_Q5_0, WB, __VA_ARGS__) break;                                         \
    case KIND_Q5_1: EACH_UNIT(KIND_Q5_1, WB, __VA_ARGS__) break;                                         \
    case KIND_Q8_0: EACH_UNIT(KIND_Q8_0, WB, __VA_ARGS__) break;                                         \
    case KIND_Q4_K: EACH_UNIT(KIND_Q4_K, WB, __VA_ARGS__) break;                                         \
    case KIND_Q6_K: EACH_UNIT(KIND_Q6_K, WB, __VA_ARGS__) break;                                         \
    }

#if defined(__FP_FAST_FMAF) || defined(FP_FAST_FMAF) || defined(__ARM_FEATURE_FMA)
#define QFMA(a, b, c) fmaf(a, b, c)
#else
#define QFMA(a, b, c) ((a) * (b) + (c))
#endif

static inline float sum32(const float *s) {  /* the fixed tree: 32 -> 16 -> 8 -> 4 -> 2 -> 1 */
    float a[16];
    for (int j = 0; j < 16; j++)
        a[j] = s[j] + s[j + 16];
    for (int j = 0; j < 8; j++)
        a[j] = a[j] + a[j + 8];
    for (int j = 0; j < 4; j++)
        a[j] = a[j] + a[j + 4];
    return (a[0] + a[2]) + (a[1] + a[3]);
}

#if defined(__AVX512F__) && !defined(M2R2_PORTABLE)
/* ---- AVX-512: 16 lanes, a row's 32 partials in two registers, up to 8 rows per pass ---- */
#include <immintrin.h>
#define GMAX 8

static inline float reduce32(__m512 a0, __m512 a1) {  /* sum32's tree on (a0 = partials 0..15, a1 = 16..31) */
    const __m512 s = _mm512_add_ps(a0, a1);
    const __m256 t = _mm256_add_ps(_mm512_castps512_ps256(s),
                                   _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(s), 1)));
    const __m128 f = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
    return (f[0] + f[2]) + (f[1] + f[3]);
}

/* d (and m) of a block as broadcast registers: the block's first 4 bytes hold f16 d, f16 m */
static inline __m128 f16x2(const unsigned char *b) {
    int v;
    memcpy(&v, b, 4);
    return _mm_cvtph_ps(_mm_cvtsi32_si128(v));
}

/* the two 16-weight halves of unit u, for the formats with a register dequantiser (table lookups) */
#define DEQ_Q4(TABLE_EXPR, QS_OFF, BB)                                                                   \
    {                                                                                                    \
        const unsigned char *b = row + (size_t)u * (BB);                                                 \
        const __m128 dm = f16x2(b);                                                                      \
        const __m512 d = _mm512_broadcastss_ps(dm);                                                      \
        const __m512 table = TABLE_EXPR;                                                                 \
        const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(b + (QS_OFF))));       \
        w0 = _mm512_permutexvar_ps(q, table); /* the permute reads the index's low 4 bits: the low nibble */ \
        w1 = _mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), table);                                      \
    }
#define DEQ_Q5(TLO, THI, QH_OFF, QS_OFF, BB)                                                             \
    {                                                                                                    \
        const unsigned char *b = row + (size_t)u * (BB);                                                 \
        const __m128 dm = f16x2(b);                                                                      \
        const __m512 d = _mm512_broadcastss_ps(dm);                                                      \
        const __m512 tlo = TLO, thi = THI;                                                               \
        uint32_t qh;                                                                                     \
        memcpy(&qh, b + (QH_OFF), 4);                                                                    \
        const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(b + (QS_OFF))));       \
        const __m512i lo = _mm512_and_si512(q, _mm512_set1_epi32(15)), hi = _mm512_srli_epi32(q, 4);    \
        const __m512i sixteen = _mm512_set1_epi32(16);                                                   \
        w0 = _mm512_permutex2var_ps(tlo, _mm512_mask_or_epi32(lo, (__mmask16)qh, lo, sixteen), thi);     \
        w1 = _mm512_permutex2var_ps(tlo, _mm512_mask_or_epi32(hi, (__mmask16)(qh >> 16), hi, sixteen), thi); \
    }

/* G rows (G <= GMAX, a constant after inlining) of one output row: out[g] = row . x[g] */
static inline __attribute__((always_inline)) void qdot_rows(int kind, const unsigned char *restrict row, int nu,
                                                            const float *restrict x, int in, int G, float *out) {
    __m512 a[2 * GMAX];
    for (int g = 0; g < 2 * G; g++)
        a[g] = _mm512_setzero_ps();
    const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512 iota8 = _mm512_sub_ps(iota, _mm512_set1_ps(8.0f)), iota16 = _mm512_add_ps(iota, _mm512_set1_ps(16.0f));
#define ROWS_FMA                                                                                          \
    for (int g = 0; g < G; g++) {                                                                        \
        const float *xg = x + (size_t)g * in + (size_t)u * 32;                                           \
        a[2 * g] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xg), a[2 * g]);                                   \
        a[2 * g + 1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xg + 16), a[2 * g + 1]);                      \
    }
    __m512 w0, w1;
    switch (kind) {
    case KIND_Q4_1:  /* table[i] = (d * i) + m */
        for (int u = 0; u < nu; u++) {
            DEQ_Q4(_mm512_add_ps(_mm512_mul_ps(d, iota), _mm512_broadcastss_ps(_mm_movehdup_ps(dm))), 4, 20)
            ROWS_FMA
        }
        break;
    case KIND_Q4_0:  /* table[i] = d * (i - 8) */
        for (int u = 0; u < nu; u++) {
            DEQ_Q4(_mm512_mul_ps(d, iota8), 2, 18)
            ROWS_FMA
        }
        break;
    case KIND_Q5_1:  /* table[i] = (d * i) + m, i < 32 */
        for (int u = 0; u < nu; u++) {
            DEQ_Q5(_mm512_add_ps(_mm512_mul_ps(d, iota), _mm512_broadcastss_ps(_mm_movehdup_ps(dm))),
                   _mm512_add_ps(_mm512_mul_ps(d, iota16), _mm512_broadcastss_ps(_mm_movehdup_ps(dm))), 4, 8, 24)
            ROWS_FMA
        }
        break;
    case KIND_Q5_0:  /* table[i] = d * (i - 16), i < 32 */
        for (int u = 0; u < nu; u++) {
            DEQ_Q5(_mm512_mul_ps(d, _mm512_sub_ps(iota, _mm512_set1_ps(16.0f))), _mm512_mul_ps(d, iota), 2, 6, 22)
            ROWS_FMA
        }
        break;
    case KIND_Q8_0:  /* q * d */
        for (int u = 0; u < nu; u++) {
            const unsigned char *b = row + (size_t)u * 34;
            const __m512 d = _mm512_set1_ps(f16_at(b));
            w0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(b + 2)))), d);
            w1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(b + 18)))), d);
            ROWS_FMA
        }
        break;
    case KIND_Q4_K:  /* sub-block k of a super-block: table[i] = (d * sc[k]) * i - (dmin * m[k]) */
        for (int sb = 0; sb < nu / 8; sb++) {
            const unsigned char *b = row + (size_t)sb * 144, *s = b + 4;
            float scale[8], offset[8];
            const float d = f16_at(b), dmin = f16_at(b + 2);
            for (int j = 0; j < 4; j++) {
                scale[j] = d * (float)(s[j] & 63);
                offset[j] = dmin * (float)(s[j + 4] & 63);
                scale[j + 4] = d * (float)((s[j + 8] & 15) | (s[j] >> 6) << 4);
                offset[j + 4] = dmin * (float)((s[j + 8] >> 4) | (s[j + 4] >> 6) << 4);
            }
#pragma GCC unroll 8
            for (int k = 0; k < 8; k++) {
            const int u = sb * 8 + k;
            const __m512 table = _mm512_sub_ps(_mm512_mul_ps(_mm512_set1_ps(scale[k]), iota),
                                               _mm512_set1_ps(offset[k]));
            const unsigned char *qs = b + 16 + 32 * (k >> 1);
            __m512i q0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)qs)),
                    q1 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(qs + 16)));
            if (k & 1) {
                q0 = _mm512_srli_epi32(q0, 4);
                q1 = _mm512_srli_epi32(q1, 4);
            }
            w0 = _mm512_permutexvar_ps(q0, table);
            w1 = _mm512_permutexvar_ps(q1, table);
            ROWS_FMA
            }
        }
        break;
    case KIND_Q6_K:  /* (d * scale[j / 16]) * (q - 32), q six bits from ql (low 4) and qh (high 2) */
        for (int u = 0; u < nu; u++) {
            const unsigned char *b = row + (size_t)(u >> 3) * 210;
            const int h = (u >> 2) & 1, k = u & 3;
            const unsigned char *ql = b + 64 * h + 32 * (k & 1), *qh = b + 128 + 32 * h;
            const signed char *sc = (const signed char *)(b + 192) + 8 * h + 2 * k;
            const float d = f16_at(b + 208);
            const __m128i lshift = _mm_cvtsi32_si128(4 * (k >> 1)), hshift = _mm_cvtsi32_si128(2 * k);
            const __m512i m15 = _mm512_set1_epi32(15), m3 = _mm512_set1_epi32(3), m32 = _mm512_set1_epi32(32);
#define Q6(off)                                                                                          \
    _mm512_cvtepi32_ps(_mm512_sub_epi32(                                                                 \
        _mm512_or_si512(                                                                                 \
            _mm512_and_si512(_mm512_srl_epi32(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(ql + (off)))), lshift), m15), \
            _mm512_slli_epi32(_mm512_and_si512(_mm512_srl_epi32(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(qh + (off)))), hshift), m3), 4)), \
        m32))
            w0 = _mm512_mul_ps(_mm512_set1_ps(d * (float)sc[0]), Q6(0));
            w1 = _mm512_mul_ps(_mm512_set1_ps(d * (float)sc[1]), Q6(16));
#undef Q6
            ROWS_FMA
        }
        break;
    }
#undef ROWS_FMA
    for (int g = 0; g < G; g++)
        out[g] = reduce32(a[2 * g], a[2 * g + 1]);
}

#elif defined(__AVX2__) && defined(__FMA__) && !defined(M2R2_PORTABLE)
/* ---- AVX2 + FMA: 8 lanes, a row's 32 partials in four registers, up to 3 rows per pass ---- */
#include <immintrin.h>
#define GMAX 3

static inline float reduce32(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {  /* sum32's tree */
    const __m256 t = _mm256_add_ps(_mm256_add_ps(a0, a2), _mm256_add_ps(a1, a3));
    const __m128 f = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
    return (f[0] + f[2]) + (f[1] + f[3]);
}

static inline __attribute__((always_inline)) void qdot_rows(int kind, const unsigned char *restrict row, int nu,
                                                            const float *restrict x, int in, int G, float *out) {
    __m256 a[4 * GMAX];
    for (int g = 0; g < 4 * G; g++)
        a[g] = _mm256_setzero_ps();
    float wb[32] __attribute__((aligned(32)));
#define ROWS_FMA                                                                                          \
    const __m256 w0 = _mm256_load_ps(wb), w1 = _mm256_load_ps(wb + 8), w2 = _mm256_load_ps(wb + 16),      \
                 w3 = _mm256_load_ps(wb + 24);                                                            \
    for (int g = 0; g < G; g++) {                                                                        \
        const float *xg = x + (size_t)g * in + (size_t)u * 32;                                           \
        a[4 * g] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xg), a[4 * g]);                                   \
        a[4 * g + 1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xg + 8), a[4 * g + 1]);                       \
        a[4 * g + 2] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xg + 16), a[4 * g + 2]);                      \
        a[4 * g + 3] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xg + 24), a[4 * g + 3]);                      \
    }
    UNIT_LOOPS(wb, ROWS_FMA)
#undef ROWS_FMA
    for (int g = 0; g < G; g++)
        out[g] = reduce32(a[4 * g], a[4 * g + 1], a[4 * g + 2], a[4 * g + 3]);
}

#else
/* ---- plain C (NEON and other targets through the compiler's vectoriser): 32 partials per row in memory ---- */
#define GMAX 4

static inline __attribute__((always_inline)) void qdot_rows(int kind, const unsigned char *restrict row, int nu,
                                                            const float *restrict x, int in, int G, float *out) {
    float s[GMAX][32], wb[32];
    for (int g = 0; g < G; g++)
        for (int j = 0; j < 32; j++)
            s[g][j] = 0.0f;
#define ROWS_FMA                                                                                          \
    for (int g = 0; g < G; g++) {                                                                        \
        const float *restrict xg = x + (size_t)g * in + (size_t)u * 32;                                  \
        for (int j = 0; j < 32; j++)                                                                     \
            s[g][j] = QFMA(wb[j], xg[j], s[g][j]);                                                       \
    }
    UNIT_LOOPS(wb, ROWS_FMA)
#undef ROWS_FMA
    for (int g = 0; g < G; g++)
        out[g] = sum32(s[g]);
}
#endif

#define QTILE 32

/* y[t, o] = W[o] . x[t] + b[o] for output rows [o0, o1) of W (y's rows are ystride apart), all T rows: QTILE
 * rows at a time over all output rows, each output row's blocks dequantised once per GMAX rows */
static void qrows(int kind, const float *restrict x, int T, const unsigned char *restrict W, const float *b,
                  float *y, int in, int ystride, int o0, int o1) {
    const int nu = in / 32;
    const size_t row_bytes = (size_t)(in / q_block_weights(kind)) * q_block_bytes(kind);
    float r[GMAX];
    for (int t0 = 0; t0 < T; t0 += QTILE)  /* a prefill: QTILE rows of x stay in L2 while the weights stream */
    for (int o = o0; o < o1; o++) {
        const unsigned char *row = W + (size_t)o * row_bytes;
        const int t1 = T - t0 < QTILE ? T : t0 + QTILE;
        for (int t = t0; t < t1; t += GMAX) {
            const int G = t1 - t < GMAX ? t1 - t : GMAX;
            const float *xt = x + (size_t)t * in;
            switch (G) {  /* one specialisation per group size, so the partial sums stay in registers */
#define CASE(n) case n: qdot_rows(kind, row, nu, xt, in, n, r); break;
            CASE(1) CASE(2) CASE(3)
#if GMAX >= 4
            CASE(4)
#endif
#if GMAX >= 8
            CASE(5) CASE(6) CASE(7) CASE(8)
#endif
#undef CASE
            }
            for (int g = 0; g < G; g++)
                y[(size_t)(t + g) * ystride + o] = b ? r[g] + b[o] : r[g];
        }
    }
}

/* Thread tid of nt's share of a block product: its slice of every segment's output rows */
static void qrows_share(int kind, const float *x, int T, const void *W, const float *b, float *y, int in, int out,
                        int tid, int nt) {
    if (kind != KIND_SEGMENTS) {
        qrows(kind, x, T, (const unsigned char *)W, b, y, in, out, (int)((long)out * tid / nt),
              (int)((long)out * (tid + 1) / nt));
        return;
    }
    int at = 0;
    for (const m2r2_qseg *s = (const m2r2_qseg *)W; s->rows > 0; at += s->rows, s++)
        qrows(s->kind, x, T, s->w, b ? b + at : NULL, y + at, in, out, (int)((long)s->rows * tid / nt),
              (int)((long)s->rows * (tid + 1) / nt));
}
