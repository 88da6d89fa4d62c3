/* quiver's CPU LoRA kernel: one call per LoRA linear for decode-sized steps.
 *
 * Why: a decode step's LoRA work is tiny (16 tokens x rank 8), and as torch ops it is 3 small GEMMs and
 * elementwise ops per layer, each paying dispatch and an OpenMP fork/join that cost more than the math
 * (py-spy: the engine thread sat at OpenMP's barrier for most of add_lora_linear). Here each token
 * multiplies only its own adapter's weights, in one pass, on the calling thread; every token's result is
 * computed the same way whatever else is in the batch.
 *
 * Layout (grouped_ops.FusedLoRA): a_t is (din, num_slots * k) row-major, column s*k + i*rank + r being row
 * r of slice i's A for slot s; b_t is (num_slots * k, total_out) row-major, row s*k + i*rank + r holding
 * slice i's B^T row r in the slice's columns [off_i, off_i + size_i) (zeros elsewhere, never read here).
 * Numerics follow vLLM's stock CPU ops: fp32 shrink, scaled, then added through B into y.
 */
#include <stdint.h>
#include <string.h>

#define QUIVER_MAX_K 2048
#define TOKENS 4 /* tokens of one slot per pass: each weight load serves four tokens */

/* GCC/Clang vector extensions: eight floats in a register on AVX2 (half of one on AVX-512, two on NEON),
 * without tying the source to one instruction set. Unaligned loads and stores go through memcpy. */
typedef float v8 __attribute__((vector_size(32)));

static inline v8 load8(const float *p) { v8 v; memcpy(&v, p, sizeof v); return v; }
static inline void store8(float *p, v8 v) { memcpy(p, &v, sizeof v); }

/* buf[m][j0 + j] = sum_d x_m[d] * a[d * lda + j0 + j] for j < 8 * W: W register columns of eight, for all
 * TOKENS rows at once (4 * W independent accumulators keep the FMA pipes busy; a load of `a` serves four) */
#define SHRINK_BLOCK(W)                                                                                       \
    static void shrink_##W(float buf[TOKENS][QUIVER_MAX_K], const float *const xs[TOKENS], const float *a,   \
                           int64_t lda, int64_t din, int64_t j0)                                              \
    {                                                                                                         \
        v8 acc[TOKENS][W] = {{{0}}};                                                                          \
        for (int64_t d = 0; d < din; d++) {                                                                   \
            v8 ad[W];                                                                                         \
            for (int w = 0; w < W; w++)                                                                       \
                ad[w] = load8(a + d * lda + j0 + 8 * w);                                                      \
            for (int m = 0; m < TOKENS; m++) {                                                                \
                const float xd = xs[m][d];                                                                    \
                for (int w = 0; w < W; w++)                                                                   \
                    acc[m][w] += xd * ad[w];                                                                  \
            }                                                                                                 \
        }                                                                                                     \
        for (int m = 0; m < TOKENS; m++)                                                                      \
            for (int w = 0; w < W; w++)                                                                       \
                store8(buf[m] + j0 + 8 * w, acc[m][w]);                                                       \
    }
SHRINK_BLOCK(1)
SHRINK_BLOCK(2)
SHRINK_BLOCK(3)

/* buf[m][j] = sum_d x_m[d] * a[d * lda + j], j < k, for TOKENS rows x_m (a short pass repeats a row) */
static void shrink(float buf[TOKENS][QUIVER_MAX_K], const float *const xs[TOKENS], const float *a, int64_t lda,
                   int64_t din, int64_t k)
{
    int64_t j0 = 0;
    for (; j0 + 24 <= k; j0 += 24)
        shrink_3(buf, xs, a, lda, din, j0);
    if (j0 + 16 <= k) {
        shrink_2(buf, xs, a, lda, din, j0);
        j0 += 16;
    }
    if (j0 + 8 <= k) {
        shrink_1(buf, xs, a, lda, din, j0);
        j0 += 8;
    }
    for (; j0 < k; j0++) {
        for (int m = 0; m < TOKENS; m++) {
            float acc = 0.0f;
            for (int64_t d = 0; d < din; d++)
                acc += xs[m][d] * a[d * lda + j0];
            buf[m][j0] = acc;
        }
    }
}

/* y_m[o] += sum_r c[m][r] * b[r * ldb + o], o < size, r < rank, for TOKENS rows y_m: each 16 columns of the
 * rows stay in registers across all ranks, so y is read and written once (a short pass: m_used rows) */
static void expand(float *const ys[TOKENS], const float c[TOKENS][QUIVER_MAX_K], const float *b, int64_t ldb,
                   int64_t rank, int64_t size, int m_used)
{
    int64_t o = 0;
    if (m_used == TOKENS) {
        for (; o + 16 <= size; o += 16) {
            v8 acc[TOKENS][2];
            for (int m = 0; m < TOKENS; m++) {
                acc[m][0] = load8(ys[m] + o);
                acc[m][1] = load8(ys[m] + o + 8);
            }
            for (int64_t r = 0; r < rank; r++) {
                const v8 b0 = load8(b + r * ldb + o), b1 = load8(b + r * ldb + o + 8);
                for (int m = 0; m < TOKENS; m++) {
                    acc[m][0] += c[m][r] * b0;
                    acc[m][1] += c[m][r] * b1;
                }
            }
            for (int m = 0; m < TOKENS; m++) {
                store8(ys[m] + o, acc[m][0]);
                store8(ys[m] + o + 8, acc[m][1]);
            }
        }
    }
    for (int m = 0; m < m_used; m++) {
        int64_t p = o;
        if (m_used < TOKENS) {
            /* one row: 32 columns in registers across the ranks (four independent sums) */
            for (; p + 32 <= size; p += 32) {
                v8 acc[4];
                for (int w = 0; w < 4; w++)
                    acc[w] = load8(ys[m] + p + 8 * w);
                for (int64_t r = 0; r < rank; r++)
                    for (int w = 0; w < 4; w++)
                        acc[w] += c[m][r] * load8(b + r * ldb + p + 8 * w);
                for (int w = 0; w < 4; w++)
                    store8(ys[m] + p + 8 * w, acc[w]);
            }
        }
        for (; p < size; p++) {
            float acc = ys[m][p];
            for (int64_t r = 0; r < rank; r++)
                acc += c[m][r] * b[r * ldb + p];
            ys[m][p] = acc;
        }
    }
}

int quiver_lora_f32(float *y, int64_t ldy, const float *x, int64_t ldx, int64_t num_tokens, int64_t din,
                    const float *a_t, const float *b_t, int64_t num_slots, int64_t n_slices, int64_t rank,
                    const int64_t *slice_sizes, int64_t total_out, const int64_t *slots,
                    const uint8_t *in_use, float scale)
{
    const int64_t k = n_slices * rank, lda = num_slots * k;
    if (k <= 0 || k > QUIVER_MAX_K)
        return -1;
    static __thread float buf[TOKENS][QUIVER_MAX_K], coef[TOKENS][QUIVER_MAX_K];
    for (int64_t s = 0; s < num_slots; s++) {
        if (!in_use[s])
            continue;
        const float *a = a_t + s * k;
        const float *b = b_t + s * k * total_out;
        int64_t t = 0;
        for (;;) {
            /* the next TOKENS tokens on slot s, in batch order */
            int64_t rows[TOKENS];
            int m = 0;
            for (; t < num_tokens && m < TOKENS; t++)
                if (slots[t] == s)
                    rows[m++] = t;
            if (m == 0)
                break;
            const float *xs[TOKENS];
            float *ys[TOKENS];
            for (int i = 0; i < TOKENS; i++) {
                xs[i] = x + rows[i < m ? i : 0] * ldx;
                ys[i] = y + rows[i < m ? i : 0] * ldy;
            }
            shrink(buf, xs, a, lda, din, k);
            /* expand: y[t, slice i] += (scale * buf[slice i]) @ B_s[slice i], B read once for the m tokens */
            int64_t off = 0;
            for (int64_t i = 0; i < n_slices; i++) {
                float *yo[TOKENS];
                for (int mi = 0; mi < TOKENS; mi++) {
                    yo[mi] = ys[mi] + off;
                    for (int64_t r = 0; r < rank; r++)
                        coef[mi][r] = buf[mi][i * rank + r] * scale;
                }
                expand(yo, coef, b + i * rank * total_out + off, total_out, rank, slice_sizes[i], m);
                off += slice_sizes[i];
            }
        }
    }
    return 0;
}

/* One layer's call with everything but its rows prepared once per step plan and weights (lora_kernel.Layer):
 * through ctypes each argument costs ~0.1 us to convert, and the engine makes ~120 of these calls a step. */
struct quiver_lora_layer {
    const float *a_t, *b_t;
    const int64_t *slice_sizes, *slots;
    const uint8_t *in_use;
    int64_t num_tokens, din, num_slots, n_slices, rank, total_out;
    float scale;
};

int quiver_lora_f32_layer(const struct quiver_lora_layer *l, float *y, int64_t ldy, const float *x, int64_t ldx)
{
    return quiver_lora_f32(y, ldy, x, ldx, l->num_tokens, l->din, l->a_t, l->b_t, l->num_slots, l->n_slices,
                           l->rank, l->slice_sizes, l->total_out, l->slots, l->in_use, l->scale);
}
