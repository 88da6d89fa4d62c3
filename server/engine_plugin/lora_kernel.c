/* quiver's CPU LoRA kernel: one call per LoRA linear for decode-sized steps.
 *
 * Why: a decode step's LoRA work is tiny (16 tokens x rank 8), and as torch ops it is 3 small GEMMs and
 * elementwise ops per layer, each paying dispatch and an OpenMP fork/join that cost more than the math
 * (py-spy: the engine thread sat at OpenMP's barrier for most of add_lora_linear). Here each token
 * multiplies only its own adapter's weights, in one call whose passes (a slot's tokens, four at a time)
 * share the engine's own OpenMP threads (built with GCC's -fopenmp: libgomp, the runtime torch already
 * loaded); every token's result is computed the same way whatever else is in the batch.
 *
 * Layout (grouped_ops.FusedLoRA.kernel_weights): one contiguous block per slot, so that a slot's weights are
 * read as one sequential stream (in the engine they come from memory: the base model's weights have just
 * streamed through every cache). a is (num_slots, din, k) with column i*rank + r of slot s's block being row
 * r of slice i's A; b is (num_slots, rank, total_out) with row r of slot s's block holding row r of every
 * slice's B^T, slice i in its columns [off_i, off_i + size_i).
 * Numerics follow vLLM's stock CPU ops: fp32 shrink, scaled, then added through B into y.
 *
 * Weights are float32 or bfloat16 (the engine's --lora-dtype): a bfloat16 weight widens to float32 exactly
 * (its 16 bits are the top half of the float's), so the arithmetic is the same and the result bit-identical
 * to float32 weights of the same values, from half the bytes (the passes ~12 % faster in a decode step).
 */
#include <stdint.h>
#include <string.h>

#define QUIVER_MAX_K 2048
#define TOKENS 4 /* tokens of one slot per pass: each weight load serves four tokens */

/* GCC/Clang vector extensions: eight floats in a register on AVX2 (half of one on AVX-512, two on NEON),
 * without tying the source to one instruction set. Unaligned loads and stores go through memcpy. */
typedef float v8 __attribute__((vector_size(32)));

typedef uint16_t h8 __attribute__((vector_size(16)));
typedef uint32_t u8 __attribute__((vector_size(32)));

static inline v8 load8(const float *p) { v8 v; memcpy(&v, p, sizeof v); return v; }
static inline void store8(float *p, v8 v) { memcpy(p, &v, sizeof v); }

/* Weights: `w` points at float32 or bfloat16 values (`bf16`, a constant wherever these are inlined, so each
 * weight type gets its own loops); element `i` of them, and eight from `i` on, as float32. */
#define INLINE static inline __attribute__((always_inline))
INLINE v8 wload8(const void *w, int64_t i, const int bf16)
{
    if (!bf16)
        return load8((const float *)w + i);
    h8 h;
    memcpy(&h, (const uint16_t *)w + i, sizeof h);
    const u8 bits = __builtin_convertvector(h, u8) << 16;
    v8 v;
    memcpy(&v, &bits, sizeof v);
    return v;
}
/* (one-value tails use fmaf: whether the compiler fuses a multiply-add there depends on how it vectorises the
 * loop, which differs between the weight types; fused everywhere, both give the same bits) */
INLINE float wload1(const void *w, int64_t i, const int bf16)
{
    if (!bf16)
        return ((const float *)w)[i];
    const uint32_t bits = (uint32_t)((const uint16_t *)w)[i] << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* buf[m][j0 + j] = sum_d x_m[d] * a[d * lda + j0 + j] for j < 8 * W: W register columns of eight, for all
 * TOKENS rows at once (4 * W independent accumulators keep the FMA pipes busy; a load of `a` serves four) */
#define SHRINK_BLOCK(W)                                                                                       \
    INLINE void shrink_##W(float buf[TOKENS][QUIVER_MAX_K], const float *const xs[TOKENS], const void *a,    \
                           int64_t lda, int64_t din, int64_t j0, const int bf16)                              \
    {                                                                                                         \
        v8 acc[TOKENS][W] = {{{0}}};                                                                          \
        for (int64_t d = 0; d < din; d++) {                                                                   \
            v8 ad[W];                                                                                         \
            for (int w = 0; w < W; w++)                                                                       \
                ad[w] = wload8(a, d * lda + j0 + 8 * w, bf16);                                                \
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
INLINE void shrink(float buf[TOKENS][QUIVER_MAX_K], const float *const xs[TOKENS], const void *a, int64_t lda,
                   int64_t din, int64_t k, const int bf16)
{
    int64_t j0 = 0;
    for (; j0 + 24 <= k; j0 += 24)
        shrink_3(buf, xs, a, lda, din, j0, bf16);
    if (j0 + 16 <= k) {
        shrink_2(buf, xs, a, lda, din, j0, bf16);
        j0 += 16;
    }
    if (j0 + 8 <= k) {
        shrink_1(buf, xs, a, lda, din, j0, bf16);
        j0 += 8;
    }
    for (; j0 < k; j0++) {
        for (int m = 0; m < TOKENS; m++) {
            float acc = 0.0f;
            for (int64_t d = 0; d < din; d++)
                acc = __builtin_fmaf(xs[m][d], wload1(a, d * lda + j0, bf16), acc);
            buf[m][j0] = acc;
        }
    }
}

/* y_m[o] += sum_r c[m][r] * b[r * ldb + o], o < size, r < rank, for TOKENS rows y_m: each 16 columns of the
 * rows stay in registers across all ranks, so y is read and written once (a short pass: m_used rows) */
INLINE void expand(float *const ys[TOKENS], const float c[TOKENS][QUIVER_MAX_K], const void *b, int64_t ldb,
                   int64_t rank, int64_t size, int m_used, const int bf16)
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
                const v8 b0 = wload8(b, r * ldb + o, bf16), b1 = wload8(b, r * ldb + o + 8, bf16);
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
                        acc[w] += c[m][r] * wload8(b, r * ldb + p + 8 * w, bf16);
                for (int w = 0; w < 4; w++)
                    store8(ys[m] + p + 8 * w, acc[w]);
            }
        }
        for (; p < size; p++) {
            float acc = ys[m][p];
            for (int64_t r = 0; r < rank; r++)
                acc = __builtin_fmaf(c[m][r], wload1(b, r * ldb + p, bf16), acc);
            ys[m][p] = acc;
        }
    }
}

/* One pass: up to TOKENS tokens of one slot (rows), each through that slot's A and B only. */
struct pass {
    int64_t slot;
    int m;
    int64_t rows[TOKENS];
};

/* The slot of each token of the current step: one per engine, shared by every layer and set once when the
 * step's mapping changes (lora_kernel.Step), so that a new mapping costs no layer a new binding. */
struct quiver_lora_step {
    const int64_t *slots;
    int64_t num_tokens;
};

/* Everything about one layer but where its rows are, prepared once per weights (lora_kernel.Layer): through
 * ctypes each argument costs ~0.1 us to convert, and the engine makes ~120 of these calls a step. */
struct quiver_lora_layer {
    const void *a, *b; /* float32, or bfloat16 where weight_bf16 */
    const int64_t *slice_sizes;
    const uint8_t *in_use;
    const struct quiver_lora_step *step;
    int64_t din, num_slots, n_slices, rank, total_out;
    float scale;
    int32_t weight_bf16;
};

INLINE void run_pass(const struct quiver_lora_layer *l, const struct pass *p, float *y, int64_t ldy,
                     const float *x, int64_t ldx, const int bf16)
{
    static __thread float buf[TOKENS][QUIVER_MAX_K], coef[TOKENS][QUIVER_MAX_K];
    const int64_t k = l->n_slices * l->rank, size = bf16 ? 2 : 4;
    const char *a = (const char *)l->a + p->slot * l->din * k * size;
    const char *b = (const char *)l->b + p->slot * l->rank * l->total_out * size;
    const float *xs[TOKENS];
    float *ys[TOKENS];
    for (int i = 0; i < TOKENS; i++) {
        xs[i] = x + p->rows[i < p->m ? i : 0] * ldx;
        ys[i] = y + p->rows[i < p->m ? i : 0] * ldy;
    }
    /* B is read only once the shrink is done: requested now, its lines arrive while A streams through (in the
     * engine both come from memory; this cut the kernel's time in a decode step by ~6 %) */
    for (int64_t i = 0; i < l->rank * l->total_out * size; i += 64)
        __builtin_prefetch(b + i, 0, 3);
    shrink(buf, xs, a, k, l->din, k, bf16);
    /* expand: y[t, slice i] += (scale * buf[slice i]) @ B_s[slice i], B read once for the m tokens */
    int64_t off = 0;
    for (int64_t i = 0; i < l->n_slices; i++) {
        float *yo[TOKENS];
        for (int mi = 0; mi < TOKENS; mi++) {
            yo[mi] = ys[mi] + off;
            for (int64_t r = 0; r < l->rank; r++)
                coef[mi][r] = buf[mi][i * l->rank + r] * l->scale;
        }
        expand(yo, coef, b + off * size, l->total_out, l->rank, l->slice_sizes[i], p->m, bf16);
        off += l->slice_sizes[i];
    }
}

/* A pass compiled for each weight type. */
typedef void pass_fn(const struct quiver_lora_layer *, const struct pass *, float *, int64_t, const float *, int64_t);
static void run_pass_f32(const struct quiver_lora_layer *l, const struct pass *p, float *y, int64_t ldy,
                         const float *x, int64_t ldx)
{
    run_pass(l, p, y, ldy, x, ldx, 0);
}
static void run_pass_bf16(const struct quiver_lora_layer *l, const struct pass *p, float *y, int64_t ldy,
                          const float *x, int64_t ldx)
{
    run_pass(l, p, y, ldy, x, ldx, 1);
}

/* Passes write disjoint rows (a token has one slot), so they run on OpenMP's threads in any order; a
 * token's result is the same whichever thread computes it. Without OpenMP the pragma is ignored. */
static void run_passes(const struct quiver_lora_layer *l, const struct pass *passes, int n, float *y, int64_t ldy,
                       const float *x, int64_t ldx)
{
    pass_fn *const pass = l->weight_bf16 ? run_pass_bf16 : run_pass_f32;
#pragma omp parallel for schedule(static) if (n > 1)
    for (int i = 0; i < n; i++)
        pass(l, &passes[i], y, ldy, x, ldx);
}

#define PASSES 64

int quiver_lora_f32_layer(const struct quiver_lora_layer *l, float *y, int64_t ldy, const float *x, int64_t ldx)
{
    const int64_t k = l->n_slices * l->rank;
    if (k <= 0 || k > QUIVER_MAX_K)
        return -1;
    const int64_t *slots = l->step->slots, num_tokens = l->step->num_tokens;
    struct pass passes[PASSES];
    int n = 0;
    for (int64_t s = 0; s < l->num_slots; s++) {
        if (!l->in_use[s])
            continue;
        /* the slot's tokens, TOKENS at a time, in batch order */
        for (int64_t t = 0;;) {
            struct pass *p = &passes[n];
            p->slot = s;
            p->m = 0;
            for (; t < num_tokens && p->m < TOKENS; t++)
                if (slots[t] == s)
                    p->rows[p->m++] = t;
            if (p->m == 0)
                break;
            if (++n == PASSES) {
                run_passes(l, passes, n, y, ldy, x, ldx);
                n = 0;
            }
        }
    }
    run_passes(l, passes, n, y, ldy, x, ldx);
    return 0;
}
