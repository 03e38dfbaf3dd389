/* m2r2's native decode kernels: one row of a few consecutive tokens (a decode step, a short prefill, a
 * speculative verification) through a whole pre-norm decoder block, and the few-row matrix product every
 * other decode-sized linear layer (the LM head) runs.
 *
 * Why: a one-token step of the embedded model is ~540 MB of weight reads (memory bound) plus ~15 small
 * tensor ops per layer (norms, RoPE, cache writes, attention, residuals). Through PyTorch each small op
 * costs a dispatch of several microseconds, 8 ms per token in all, and the products stream the weights
 * at ~25 GB/s. Here a block is one call: the small ops run in place on a few KB of floats, and each
 * product streams its weight once, every thread over a contiguous slab of rows.
 *
 * Layouts (those of m2r2.engine.model): a linear weight is stored transposed, (in, out) row-major, in float32 or
 * (the fp16 copies) IEEE half; the KV cache of a layer is (kv_heads, max_len, head_dim) for batch 1; RoPE
 * rows are cos and the sign-folded sin. Built at run time by m2r2.engine.native with the host compiler (-O3
 * -march=native -fopenmp); OpenMP resolves to the libgomp PyTorch already loaded, so both share one
 * thread team.
 *
 * Activations and sums are float32 throughout, like the PyTorch path; only the order of summation
 * differs.
 */
#include <math.h>
#include <omp.h>
#include <stddef.h>
#include <string.h>

/* q . k over n floats, as 8 interleaved partial sums (vectorised by the compiler) combined pairwise */
static inline float dot(const float *restrict q, const float *restrict k, int n) {
    float a[8] = {0};
    int i = 0;
    for (; i + 8 <= n; i += 8)
        for (int u = 0; u < 8; u++)
            a[u] += q[i + u] * k[i + u];
    float s = ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]));
    for (; i < n; i++)
        s += q[i] * k[i];
    return s;
}

/* acc[0:n) += sum_{r<rows} x[r] * W[r, 0:n), W rows ``stride`` elements apart, for each weight type: float32,
 * and fp16 (converted to float32 on load; accumulation stays float32). Plain loops over restrict pointers:
 * the compiler vectorises the inner one for the target (AVX2 + FMA on x86, NEON on ARM); half weights get
 * F16C intrinsics on x86, which GCC does not generate from the plain loop. */
#ifdef __FLT16_MAX__  /* the compiler has a half type: conversions become F16C / NEON instructions */
typedef _Float16 half;
#define H2F(v) ((float)(v))
#else  /* a portable conversion of the IEEE half bit pattern (checked equal on all 65,536 patterns) */
typedef unsigned short half;
static inline float half_bits_to_float(unsigned short h) {
    const unsigned sign = (unsigned)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    float f;
    if (exp == 0)
        f = ldexpf((float)man, -24);  /* zero or subnormal */
    else if (exp == 31)
        f = man ? NAN : INFINITY;
    else
        f = ldexpf((float)(man | 0x400), (int)exp - 25);
    unsigned bits;
    memcpy(&bits, &f, sizeof bits);
    bits |= sign;
    memcpy(&f, &bits, sizeof f);
    return f;
}
#define H2F(v) half_bits_to_float(v)
#endif
#define F2F(v) (v)

#define AXPY_ROWS(NAME, T, CONV)                                                                        \
    static void NAME(float *restrict acc, const float *restrict x, const T *restrict W, int rows, int n,   \
                     int stride) {                                                                          \
        int r = 0;                                                                                          \
        for (; r + 4 <= rows; r += 4) {                                                                     \
            const T *restrict w0 = W + (size_t)r * stride, *restrict w1 = w0 + stride,                      \
                    *restrict w2 = w1 + stride, *restrict w3 = w2 + stride;                                 \
            const float x0 = x[r], x1 = x[r + 1], x2 = x[r + 2], x3 = x[r + 3];                             \
            for (int j = 0; j < n; j++)                                                                     \
                acc[j] += x0 * CONV(w0[j]) + x1 * CONV(w1[j]) + x2 * CONV(w2[j]) + x3 * CONV(w3[j]);         \
        }                                                                                                   \
        for (; r < rows; r++) {                                                                             \
            const T *restrict w = W + (size_t)r * stride;                                                   \
            const float xr = x[r];                                                                          \
            for (int j = 0; j < n; j++)                                                                     \
                acc[j] += xr * CONV(w[j]);                                                                  \
        }                                                                                                   \
    }
AXPY_ROWS(axpy_rows_f32, float, F2F)
#if defined(__F16C__) && defined(__FMA__)
/* GCC does not vectorise half -> float conversions in the loop above: the same loop with F16C intrinsics */
#include <immintrin.h>
AXPY_ROWS(axpy_rows_f16_tail, half, H2F)
static void axpy_rows_f16(float *restrict acc, const float *restrict x, const half *restrict W, int rows, int n,
                          int stride) {
    const int n8 = n & ~7;
    int r = 0;
    for (; r + 4 <= rows; r += 4) {
        const half *w0 = W + (size_t)r * stride, *w1 = w0 + stride, *w2 = w1 + stride, *w3 = w2 + stride;
        const __m256 x0 = _mm256_set1_ps(x[r]), x1 = _mm256_set1_ps(x[r + 1]), x2 = _mm256_set1_ps(x[r + 2]),
                     x3 = _mm256_set1_ps(x[r + 3]);
        for (int j = 0; j < n8; j += 8) {
#define H8(w) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((w) + j)))
            __m256 a = _mm256_fmadd_ps(x0, H8(w0), _mm256_loadu_ps(acc + j));
            a = _mm256_fmadd_ps(x1, H8(w1), a);
            a = _mm256_fmadd_ps(x2, H8(w2), a);
            a = _mm256_fmadd_ps(x3, H8(w3), a);
#undef H8
            _mm256_storeu_ps(acc + j, a);
        }
        if (n8 < n)  /* the last n % 8 columns of these rows */
            for (int q = 0; q < 4; q++)
                for (int j = n8; j < n; j++)
                    acc[j] += x[r + q] * H2F(W[(size_t)(r + q) * stride + j]);
    }
    if (r < rows)
        axpy_rows_f16_tail(acc, x + r, W + (size_t)r * stride, rows - r, n, stride);
}
#else
AXPY_ROWS(axpy_rows_f16, half, H2F)
#endif

enum { KIND_F32 = 0, KIND_F16 = 1 };  /* weight storage, as m2r2.engine.native passes it */

/* Four rows of x at once over float32 W: acc_q[0:n) += sum_r x_q[r] W[r, 0:n) for q < 4 (acc_q = acc + q*as,
 * x_q = x + q*xs). Each group of 4 W rows is loaded once for the four rows; per row, the terms are summed
 * in the same order as axpy_rows_f32, so a row's result does not depend on its neighbours. */
static void axpy_rows4_f32(float *acc, int as, const float *x, int xs, const float *restrict W, int rows, int n,
                           int stride) {
    float *restrict a0 = acc, *restrict a1 = acc + as, *restrict a2 = acc + 2L * as, *restrict a3 = acc + 3L * as;
    int r = 0;
    for (; r + 4 <= rows; r += 4) {
        const float *restrict w0 = W + (size_t)r * stride, *restrict w1 = w0 + stride, *restrict w2 = w1 + stride,
                    *restrict w3 = w2 + stride;
        const float *x0 = x + r, *x1 = x0 + xs, *x2 = x1 + xs, *x3 = x2 + xs;
        const float p0 = x0[0], p1 = x0[1], p2 = x0[2], p3 = x0[3], q0 = x1[0], q1 = x1[1], q2 = x1[2], q3 = x1[3];
        const float s0 = x2[0], s1 = x2[1], s2 = x2[2], s3 = x2[3], t0 = x3[0], t1 = x3[1], t2 = x3[2], t3 = x3[3];
        for (int j = 0; j < n; j++) {
            const float v0 = w0[j], v1 = w1[j], v2 = w2[j], v3 = w3[j];
            a0[j] += p0 * v0 + p1 * v1 + p2 * v2 + p3 * v3;
            a1[j] += q0 * v0 + q1 * v1 + q2 * v2 + q3 * v3;
            a2[j] += s0 * v0 + s1 * v1 + s2 * v2 + s3 * v3;
            a3[j] += t0 * v0 + t1 * v1 + t2 * v2 + t3 * v3;
        }
    }
    for (int q = 0; q < 4 && r < rows; q++)  /* the slab's last rows % 4 rows, row by row as axpy_rows_f32 */
        axpy_rows_f32(acc + (size_t)q * as, x + (size_t)q * xs + r, W + (size_t)r * stride, rows - r, n, stride);
}

static void axpy_rows(int kind, float *acc, const float *x, const void *W, size_t offset, int rows, int n,
                      int stride) {
    if (kind == KIND_F16)
        axpy_rows_f16(acc, x, (const half *)W + offset, rows, n, stride);
    else
        axpy_rows_f32(acc, x, (const float *)W + offset, rows, n, stride);
}

#define COL_TILE 1024  /* several rows: a 32-row x 1024-column tile of W (128 KB in float32) stays in L2 */
#define ROW_BLOCK 32   /* while every row's x passes over it; a multiple of 4 keeps the row grouping of T=1 */

#include "qblocks.h"  /* the GGUF block formats (KIND_Q4_1 ...) */

/* y[T, out) = x[T, in) @ W (in, out) + b. Inside a parallel region (every thread calls it): thread t sums
 * the rows of its contiguous slab of W into its own partials (part + t*T*out), then after a barrier each
 * thread adds up the partials over its share of the columns. part holds nthreads*T*out floats. One row
 * streams the slab once; several rows walk it tile by tile so that W is read from memory once for all of
 * them. Each output sums its terms in the same order either way, so a row's result does not depend on T.
 * GGUF blocks (W: out rows of blocks, qblocks.h): each thread computes its share of the output rows directly. */

static void gemv_team(const float *x, int T, const void *W, int kind, const float *b, float *y, float *part,
                      int in, int out) {
    const int nt = omp_get_num_threads(), tid = omp_get_thread_num();
    if (qkind(kind)) {  /* GGUF blocks: each thread its output rows, written directly */
        qrows_share(kind, x, T, W, b, y, in, out, tid, nt);
#pragma omp barrier
        return;
    }
    const int r0 = (int)((long)in * tid / nt), r1 = (int)((long)in * (tid + 1) / nt);
    float *acc = part + (size_t)tid * T * out;
    memset(acc, 0, sizeof(float) * T * out);
    if (T == 1)
        axpy_rows(kind, acc, x + r0, W, (size_t)r0 * out, r1 - r0, out, out);
    else
        for (int c0 = 0; c0 < out; c0 += COL_TILE) {
            const int cw = out - c0 < COL_TILE ? out - c0 : COL_TILE;
            for (int rb = r0; rb < r1; rb += ROW_BLOCK) {
                const int rows = r1 - rb < ROW_BLOCK ? r1 - rb : ROW_BLOCK;
                int t = 0;
                if (kind == KIND_F32)
                    for (; t + 4 <= T; t += 4)
                        axpy_rows4_f32(acc + (size_t)t * out + c0, out, x + (size_t)t * in + rb, in,
                                       (const float *)W + (size_t)rb * out + c0, rows, cw, out);
                for (; t < T; t++)
                    axpy_rows(kind, acc + (size_t)t * out + c0, x + (size_t)t * in + rb, W, (size_t)rb * out + c0,
                              rows, cw, out);
            }
        }
#pragma omp barrier
    const int c0 = (int)((long)out * tid / nt), c1 = (int)((long)out * (tid + 1) / nt);
    for (int t = 0; t < T; t++)
        for (int j = c0; j < c1; j++) {
            float s = part[(size_t)t * out + j];
            for (int p = 1; p < nt; p++)
                s += part[((size_t)p * T + t) * out + j];
            y[(size_t)t * out + j] = b ? s + b[j] : s;
        }
#pragma omp barrier
}

void m2r2_gemv(const float *x, int T, const void *W, int kind, const float *b, float *y, float *part, int in,
               int out, int threads) {
#pragma omp parallel num_threads(threads)
    gemv_team(x, T, W, kind, b, y, part, in, out);
}

/* mean(x^2) + eps over n values, summed in double: closer to PyTorch's tree reduction than a float running sum */
static float mean_square(const float *x, float eps, int n) {
    double ss = 0.0;
    for (int i = 0; i < n; i++)
        ss += (double)x[i] * x[i];
    return (float)(ss / n) + eps;
}

/* RMSNorm like torch.rms_norm: x * rsqrt(mean(x^2) + eps) * w, given ms = mean_square(x, eps, n). Serial; n: the
 * hidden size. */
static void rms_norm_ms(const float *x, float ms, const float *w, float *y, int n) {
    const float r = 1.0f / sqrtf(ms);
    for (int i = 0; i < n; i++)
        y[i] = (x[i] * r) * w[i];
}

static void rms_norm(const float *x, const float *w, float eps, float *y, int n) {
    rms_norm_ms(x, mean_square(x, eps, n), w, y, n);
}

typedef struct {
    int hidden, heads, kv_heads, head_dim, inter;  /* sizes */
    float eps, scale;  /* RMSNorm epsilon, attention scale */
    int kind_qkv, kind_o, kind_gate_up, kind_down;  /* storage of the four weights below: KIND_* */
} m2r2_dims;

typedef struct {
    const float *in_norm, *post_norm;  /* (hidden) */
    const void *qkv; const float *qkv_b;          /* (hidden, (heads + 2 kv_heads) head_dim), bias or NULL */
    const void *o; const float *o_b;              /* (heads head_dim, hidden) */
    const void *gate_up; const float *gate_up_b;  /* (hidden, 2 inter): gate columns then up columns */
    const void *down; const float *down_b;        /* (inter, hidden) */
} m2r2_weights;

/* Scratch floats m2r2_block needs for T rows, a cache of max_len slots and the given thread count. */
long m2r2_block_scratch(const m2r2_dims *d, int T, int max_len, int threads) {
    const long nqkv = (long)(d->heads + 2 * d->kv_heads) * d->head_dim;
    long widest = 2L * d->inter;
    if (nqkv > widest) widest = nqkv;
    return T * (d->hidden + nqkv + (long)d->heads * d->head_dim + 2L * d->inter + (long)threads * widest)
           + (long)threads * max_len;
}

/* T token rows through one block, in place on x (T, hidden): x += Attn(norm(x)); x += MLP(norm(x)).
 * Row t belongs to batch row row_b[t] of the KV cache (batch, kv_heads, max_len, head_dim) and sits at
 * position row_pos[t]: its rotated K and V go to that slot and it attends to slots 0..row_pos[t] of its
 * batch row (the causal rule of m2r2.engine.cache; slots below a row's position are always written). So T
 * consecutive tokens of one sequence (a verification) and one token of each of T sequences (a batched
 * decode step, ragged or not) are the same call. cos and sin are the rows' RoPE rows (T, head_dim; sin
 * sign-folded so that rot(v) = v*cos + roll(v, hd/2)*sin). Every row's K/V is written before any row
 * attends, so rows of one sequence see each other's new slots whatever their order. A draft tree (tree_anc not
 * NULL): row t still sees every slot below tree_base[t], but of the slots tree_base[t] .. row_pos[t] only those
 * whose bit (slot - tree_base[t]) is set in tree_anc[t] (its ancestors and itself; at most 64 tree slots); its
 * RoPE rows are those of its depth in the tree, not of its slot. */
/* T rows of [gate | up] (2I floats each) -> silu(gate) * up, packed as T rows of I floats at the start of gu (what a
 * down projection reads). Inside a parallel region (every thread calls it); ends at a barrier. */
static void swiglu_team(float *gu, int T, int I) {
#pragma omp for schedule(static)
    for (int t = 0; t < T; t++) {
        float *g = gu + (size_t)t * 2 * I;
        for (int i = 0; i < I; i++)
            g[i] = g[i] / (1.0f + expf(-g[i])) * g[I + i];  /* silu(gate) * up, into the gate half */
    }
    /* the rows are 2I apart: pack them (row t moves down to t * I; earlier rows are already in place) */
#pragma omp single
    for (int t = 1; t < T; t++)
        memmove(gu + (size_t)t * I, gu + (size_t)t * 2 * I, sizeof(float) * I);
}

/* The body of m2r2_block, run by every thread of an enclosing parallel region (ends at a barrier) */
static void block_team(const m2r2_dims *d, const m2r2_weights *w, float *x, int T, const int *row_b,
                       const int *row_pos, const int *tree_base, const unsigned long long *tree_anc,
                       const float *cos, const float *sin, float *kcache, float *vcache,
                       int max_len, float *scratch, int threads) {
    const int D = d->hidden, H = d->heads, KV = d->kv_heads, hd = d->head_dim, I = d->inter;
    const int nq = H * hd, nkv = KV * hd, nqkv = nq + 2 * nkv, half_hd = hd / 2, group = H / KV;
    long widest = 2L * I > nqkv ? 2L * I : nqkv;
    float *h = scratch, *qkv = h + (size_t)T * D, *att = qkv + (size_t)T * nqkv, *gu = att + (size_t)T * nq;
    float *part = gu + (size_t)T * 2 * I, *scores = part + (size_t)threads * T * widest;

    {
#pragma omp for schedule(static)
        for (int t = 0; t < T; t++)
            rms_norm(x + (size_t)t * D, w->in_norm, d->eps, h + (size_t)t * D, D);
        gemv_team(h, T, w->qkv, d->kind_qkv, w->qkv_b, qkv, part, D, nqkv);
#pragma omp for schedule(static)
        for (int t = 0; t < T; t++) {
            /* RoPE on the q and k heads, then K and V into the cache */
            float *row = qkv + (size_t)t * nqkv;
            const float *c = cos + (size_t)t * hd, *sn = sin + (size_t)t * hd;
            for (int head = 0; head < H + KV; head++) {
                float *v = row + (size_t)head * hd, tmp[hd];
                for (int i = 0; i < hd; i++)
                    tmp[i] = v[i] * c[i] + v[(i + half_hd) % hd] * sn[i];
                memcpy(v, tmp, sizeof tmp);
            }
            for (int g = 0; g < KV; g++) {
                const size_t slot = (((size_t)row_b[t] * KV + g) * max_len + row_pos[t]) * hd;
                memcpy(kcache + slot, row + nq + (size_t)g * hd, sizeof(float) * hd);
                memcpy(vcache + slot, row + nq + nkv + (size_t)g * hd, sizeof(float) * hd);
            }
        }
        /* attention, one (query head, row) per iteration: softmax(q K^T * scale) V over slots 0..row_pos[t] */
        float *s = scores + (size_t)omp_get_thread_num() * max_len;
#pragma omp for schedule(static)
        for (int ht = 0; ht < H * T; ht++) {
            const int head = ht % H, t = ht / H, S = row_pos[t] + 1;
            const float *q = qkv + (size_t)t * nqkv + (size_t)head * hd;
            const size_t base = ((size_t)row_b[t] * KV + head / group) * max_len * hd;
            const float *K = kcache + base, *V = vcache + base;
            float *o = att + (size_t)t * nq + (size_t)head * hd;
            float m = -INFINITY;
            /* a draft tree: slots from tree_base[t] on are visible only where the row's ancestor bits say */
            const int tb = tree_anc ? tree_base[t] : S;
            const unsigned long long anc = tree_anc ? tree_anc[t] : 0;
            for (int j = 0; j < S; j++) {
                if (j >= tb && !((anc >> (j - tb)) & 1ULL)) {
                    s[j] = -INFINITY;
                    continue;
                }
                s[j] = dot(q, K + (size_t)j * hd, hd) * d->scale;
                if (s[j] > m)
                    m = s[j];
            }
            float sum = 0.0f;
            for (int j = 0; j < S; j++) {
                s[j] = expf(s[j] - m);
                sum += s[j];
            }
            const float inv = 1.0f / sum;
            memset(o, 0, sizeof(float) * hd);
            for (int j = 0; j < S; j++) {
                const float p = s[j] * inv, *v = V + (size_t)j * hd;
                for (int i = 0; i < hd; i++)
                    o[i] += p * v[i];
            }
        }
        gemv_team(att, T, w->o, d->kind_o, w->o_b, h, part, nq, D);  /* h = attention output projected */
#pragma omp for schedule(static)
        for (int t = 0; t < T; t++) {
            float *xt = x + (size_t)t * D, *ht = h + (size_t)t * D;
            for (int i = 0; i < D; i++)
                xt[i] += ht[i];
            rms_norm(xt, w->post_norm, d->eps, ht, D);
        }
        if (I == 0)  /* the attention half only (an MoE block: its FFN runs m2r2_experts) */
            return;
        gemv_team(h, T, w->gate_up, d->kind_gate_up, w->gate_up_b, gu, part, D, 2 * I);
        swiglu_team(gu, T, I);
        gemv_team(gu, T, w->down, d->kind_down, w->down_b, h, part, I, D);
#pragma omp for schedule(static)
        for (int t = 0; t < T; t++)
            for (int i = 0; i < D; i++)
                x[(size_t)t * D + i] += h[(size_t)t * D + i];
    }
}

void m2r2_block(const m2r2_dims *d, const m2r2_weights *w, float *x, int T, const int *row_b, const int *row_pos,
                const int *tree_base, const unsigned long long *tree_anc, const float *cos, const float *sin,
                float *kcache, float *vcache, int max_len, float *scratch, int threads) {
#pragma omp parallel num_threads(threads)
    block_team(d, w, x, T, row_b, row_pos, tree_base, tree_anc, cos, sin, kcache, vcache, max_len, scratch, threads);
}

/* n blocks one after another (a full-depth step), in one parallel region: block l with d[l], w[l] and its
 * cache tensors kc[l], vc[l]; the threads go from one block to the next without leaving the region. Each block
 * computes exactly what m2r2_block computes. scratch: m2r2_block_scratch of the widest block. */
void m2r2_blocks(int n, const m2r2_dims *const *d, const m2r2_weights *const *w, float *x, int T, const int *row_b,
                 const int *row_pos, const int *tree_base, const unsigned long long *tree_anc, const float *cos,
                 const float *sin, float *const *kc, float *const *vc, int max_len, float *scratch, int threads) {
#pragma omp parallel num_threads(threads)
    for (int l = 0; l < n; l++)
        block_team(d[l], w[l], x, T, row_b, row_pos, tree_base, tree_anc, cos, sin, kc[l], vc[l], max_len, scratch,
                   threads);
}


/* The M2R2 fast stream's first n layers in one parallel region (a draft step): per layer l, f <- B_l(f) + A_l(f) with
 * B_l exactly m2r2_block's block and the accelerator adapter A_l(f) = U silu(D rms_norm(f; norm_l)) (times rms(f)
 * when rms_scaled), D: ad_down[l] float32 (hidden, rank) and U: ad_up[l] (rank, hidden), both (in, out) row-major,
 * norm_l: ad_norm[l] (hidden), eps: the adapters' RMSNorm epsilon. The adapter reads the layer's input, kept aside
 * while the block runs. scratch: m2r2_block_scratch of the widest block plus m2r2_fast_scratch. */
long m2r2_fast_scratch(int T, int hidden, int rank, int threads) {
    const long widest = hidden > rank ? hidden : rank;
    return (long)T * (3L * hidden + rank + 1) + (long)threads * T * widest;
}

void m2r2_fast_blocks(int n, const m2r2_dims *const *d, const m2r2_weights *const *w, const float *const *ad_norm,
                      const float *const *ad_down, const float *const *ad_up, int rank, float eps, int rms_scaled,
                      float *x, int T, const int *row_b, const int *row_pos, const float *cos, const float *sin,
                      float *const *kc, float *const *vc, int max_len, float *scratch, long block_scratch,
                      int threads) {
    const int D = d[0]->hidden;
    float *xin = scratch + block_scratch, *h = xin + (size_t)T * D, *y = h + (size_t)T * D, *z = y + (size_t)T * D;
    float *rms = z + (size_t)T * rank, *part = rms + T;
#pragma omp parallel num_threads(threads)
    for (int l = 0; l < n; l++) {
#pragma omp single
        memcpy(xin, x, sizeof(float) * T * D);
        block_team(d[l], w[l], x, T, row_b, row_pos, NULL, NULL, cos, sin, kc[l], vc[l], max_len, scratch, threads);
#pragma omp for schedule(static)
        for (int t = 0; t < T; t++) {
            const float *f = xin + (size_t)t * D;
            const float ms = mean_square(f, eps, D);
            rms_norm_ms(f, ms, ad_norm[l], h + (size_t)t * D, D);
            rms[t] = rms_scaled ? sqrtf(ms) : 1.0f;
        }
        gemv_team(h, T, ad_down[l], KIND_F32, NULL, z, part, D, rank);
#pragma omp for schedule(static)
        for (int i = 0; i < T * rank; i++)
            z[i] = z[i] / (1.0f + expf(-z[i]));
        gemv_team(z, T, ad_up[l], KIND_F32, NULL, y, part, rank, D);
#pragma omp for schedule(static)
        for (int t = 0; t < T; t++)
            for (int i = 0; i < D; i++)
                x[(size_t)t * D + i] += y[(size_t)t * D + i] * rms[t];
    }
}

/* Scratch floats m2r2_experts needs for T rows (hidden size D, n neurons per expert). */
long m2r2_experts_scratch(int T, int D, int n, int threads) {
    const long widest = 2L * n > D ? 2L * n : D;
    return (long)T * D + (long)T * 2 * n + (long)T * D + (long)threads * T * widest + T;
}

/* y (T, D) = a (T, n; rows astride apart) @ W for W (n, D) stored as GGUF block rows of one kind (each of the n rows:
 * D/32 units), on thread tid of nt: its share of the D columns, every row of W dequantised unit by unit (exactly,
 * as deq_unit) and multiply-added into each y row in order of W's rows (an expert's down projection: n = 96 short
 * rows would make a dot-product kernel spend its time reducing; here y stays in L1 and each weight is one
 * multiply-add, w = dequantised weight, y = fma(w, a, y)). */
static void q_axpy_team(int kind, const unsigned char *W, const float *a, int astride, int T, int n, int D,
                        float *y, int tid, int nt) {
    const int nu = D / 32, u0 = (int)((long)nu * tid / nt), u1 = (int)((long)nu * (tid + 1) / nt);
    const size_t row_bytes = (size_t)nu * q_block_bytes(kind);
    for (int t = 0; t < T; t++)
        memset(y + (size_t)t * D + (size_t)u0 * 32, 0, sizeof(float) * 32 * (u1 - u0));
#if defined(__AVX512F__) && !defined(M2R2_PORTABLE)
    if (kind == KIND_Q8_0 || kind == KIND_Q4_1) {
        const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        for (int i = 0; i < n; i++) {
            const unsigned char *row = W + (size_t)i * row_bytes;
            for (int u = u0; u < u1; u++) {
                __m512 w0, w1;
                if (kind == KIND_Q8_0) {  /* (float)q * d */
                    const unsigned char *b = row + (size_t)u * 34;
                    const __m512 d = _mm512_set1_ps(f16_at(b));
                    w0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(b + 2)))), d);
                    w1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(b + 18)))), d);
                } else {  /* d * q + m: the 16 values as a table, looked up by nibble */
                    const unsigned char *b = row + (size_t)u * 20;
                    const __m128 dm = f16x2(b);
                    const __m512 table = _mm512_add_ps(_mm512_mul_ps(_mm512_broadcastss_ps(dm), iota),
                                                       _mm512_broadcastss_ps(_mm_movehdup_ps(dm)));
                    const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(b + 4)));
                    w0 = _mm512_permutexvar_ps(q, table);
                    w1 = _mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), table);
                }
                for (int t = 0; t < T; t++) {
                    const __m512 at = _mm512_set1_ps(a[(size_t)t * astride + i]);
                    float *yt = y + (size_t)t * D + (size_t)u * 32;
                    _mm512_storeu_ps(yt, _mm512_fmadd_ps(w0, at, _mm512_loadu_ps(yt)));
                    _mm512_storeu_ps(yt + 16, _mm512_fmadd_ps(w1, at, _mm512_loadu_ps(yt + 16)));
                }
            }
        }
        return;
    }
#endif
    float w[32];
    for (int i = 0; i < n; i++) {
        const unsigned char *row = W + (size_t)i * row_bytes;
        for (int u = u0; u < u1; u++) {
            deq_unit(kind, row, u, w);
            for (int t = 0; t < T; t++) {
                const float at = a[(size_t)t * astride + i];
                float *restrict yt = y + (size_t)t * D + (size_t)u * 32;
                for (int j = 0; j < 32; j++)
                    yt[j] = QFMA(w[j], at, yt[j]);
            }
        }
    }
}

/* An MoE layer's routed experts on T normalised rows h (T, D), summed into out (T, D): for each of the nsel experts
 * in the order given (ascending ids), the rows that selected it (sel[t * nsel + e] != 0) run
 * y = down_e(silu(gate_e h) * up_e h) and out[t] += y, or += wts[t * nsel + e] * y with weights (softmax routing).
 * An expert's weights: gu[e] = gate and up (2n outputs: the gate's n, then the up's n) and down[e] (n -> D); kind
 * KIND_F32: both float32 (in, out) row-major; a block kind (Q8_0, Q4_1): gu as blocks (2n rows of D/32 units) and
 * down as block rows of its (n, D) float layout (each neuron's D outputs: q_axpy_team). The same arithmetic as the
 * PyTorch path (m2r2.moe.layers.MoEFFN), up to the order of summation inside each product; a row's result does
 * not depend on which other rows share the call. */
void m2r2_experts(int nsel, const void *const *gu, const void *const *down, int kind, const float *h, int T,
                  const unsigned char *sel, const float *wts, float *out, float *resid, int D, int n, float *scratch,
                  int threads) {
    float *xs = scratch, *g = xs + (size_t)T * D, *y = g + (size_t)T * 2 * n, *part = y + (size_t)T * D;
    const long widest = 2L * n > D ? 2L * n : D;
    int *rows = (int *)(part + (size_t)threads * T * widest);  /* T ints fit in T floats */
    for (int e = 0; e < nsel; e++) {
        int m = 0;
        for (int t = 0; t < T; t++)
            if (sel[(size_t)t * nsel + e])
                rows[m++] = t;
        if (m == 0)
            continue;
#pragma omp parallel num_threads(threads)
        {
#pragma omp for schedule(static)
            for (int r = 0; r < m; r++)
                memcpy(xs + (size_t)r * D, h + (size_t)rows[r] * D, sizeof(float) * D);
            gemv_team(xs, m, gu[e], kind, NULL, g, part, D, 2 * n);
            swiglu_team(g, m, n);
            if (qkind(kind)) {
                q_axpy_team(kind, (const unsigned char *)down[e], g, n, m, n, D, y, omp_get_thread_num(),
                            omp_get_num_threads());
#pragma omp barrier
            } else
                gemv_team(g, m, down[e], kind, NULL, y, part, n, D);
#pragma omp for schedule(static)
            for (int r = 0; r < m; r++) {
                float *o = out + (size_t)rows[r] * D;
                const float *yr = y + (size_t)r * D;
                if (wts) {
                    const float wt = wts[(size_t)rows[r] * nsel + e];
                    for (int i = 0; i < D; i++)
                        o[i] += wt * yr[i];
                } else
                    for (int i = 0; i < D; i++)
                        o[i] += yr[i];
            }
        }
    }
    if (resid)  /* the block's residual: x += the experts' sum */
        for (size_t i = 0; i < (size_t)T * D; i++)
            resid[i] += out[i];
}

/* An MoE block's first half for T rows, in place on x: x += Attn(norm(x)) (m2r2_block with d->inter == 0), then
 * the FFN's input h = post_norm(x) (T, D) and its router's logits (T, E) = h @ router + router_b, router float32
 * (D, E) row-major: everything before the experts, whose choice (top-k of the logits) is the caller's. */
void m2r2_moe_attention(const m2r2_dims *d, const m2r2_weights *w, float *x, int T, const int *row_b,
                        const int *row_pos, const int *tree_base, const unsigned long long *tree_anc,
                        const float *cos, const float *sin, float *kcache, float *vcache,
                        int max_len, const float *router, const float *router_b, int E, float *h_out,
                        float *logits, float *scratch, int threads) {
    const int D = d->hidden, nqkv = (d->heads + 2 * d->kv_heads) * d->head_dim;
    float *part = scratch + (size_t)T * (D + nqkv + (size_t)d->heads * d->head_dim);  /* block_team's part */
#pragma omp parallel num_threads(threads)
    {
        block_team(d, w, x, T, row_b, row_pos, tree_base, tree_anc, cos, sin, kcache, vcache, max_len, scratch,
                   threads);
#pragma omp barrier
        gemv_team(scratch, T, router, KIND_F32, router_b, logits, part, D, E);
#pragma omp single
        memcpy(h_out, scratch, sizeof(float) * T * D);
    }
}

/* y (T, out) = x (T, in) @ W^T + b for W GGUF blocks of one kind, or segments (qblocks.h), on `threads` threads */
void m2r2_qgemv(const float *x, int T, const void *W, int kind, const float *b, float *y, int in, int out,
                int threads) {
#pragma omp parallel num_threads(threads)
    qrows_share(kind, x, T, W, b, y, in, out, omp_get_thread_num(), omp_get_num_threads());
}

/* The machine's float32 multiply-add rate (multiply-adds per second over `threads` threads), for the compute
 * floor of the products: 16 independent accumulators of 16 lanes per thread, `iters` rounds, fmaf (vectorised
 * to the widest FMA the target has). */
double m2r2_fma_rate(long iters, int threads) {
    double start = omp_get_wtime(), sink = 0.0;
#pragma omp parallel num_threads(threads) reduction(+ : sink)
    {
        float acc[16][16], a[16], b[16];
        for (int j = 0; j < 16; j++) {
            a[j] = 0.999f + 1e-5f * (float)j;
            b[j] = 1e-4f * (float)(omp_get_thread_num() + 1);
            for (int i = 0; i < 16; i++)
                acc[i][j] = (float)i;
        }
        for (long n = 0; n < iters; n++)
            for (int i = 0; i < 16; i++)
                for (int j = 0; j < 16; j++)
                    acc[i][j] = QFMA(acc[i][j], a[j], b[j]);
        for (int i = 0; i < 16; i++)
            for (int j = 0; j < 16; j++)
                sink += acc[i][j];
    }
    const double secs = omp_get_wtime() - start;
    return sink == 12345.678 ? 0.0 : (double)iters * 256.0 * threads / secs;  /* (keeps the loop alive) */
}

/* W (rows x in, GGUF blocks of kind `kind`, one format) dequantised to float32 out (rows, in), exactly
 * (m2r2.engine.blocks), on `threads` threads: the weight of a compute-bound product (a long prefill) handed to
 * a GEMM. */
void m2r2_qdequant(const unsigned char *W, int kind, int rows, int in, float *out, int threads) {
    const int nu = in / 32;
    const size_t row_bytes = (size_t)(in / q_block_weights(kind)) * q_block_bytes(kind);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int o = 0; o < rows; o++) {
        const unsigned char *row = W + (size_t)o * row_bytes;
        float *dst = out + (size_t)o * in;
        switch (kind) {
#define DQ(K) case K: for (int u = 0; u < nu; u++) deq_unit(K, row, u, dst + (size_t)u * 32); break;
        DQ(KIND_Q4_0) DQ(KIND_Q4_1) DQ(KIND_Q5_0) DQ(KIND_Q5_1) DQ(KIND_Q8_0) DQ(KIND_Q4_K) DQ(KIND_Q6_K)
#undef DQ
        }
    }
}
