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
#define BLOCK 8

int quiver_lora_f32(float *y, int64_t ldy, const float *x, int64_t ldx, int64_t num_tokens, int64_t din,
                    const float *a_t, const float *b_t, int64_t num_slots, int64_t n_slices, int64_t rank,
                    const int64_t *slice_sizes, int64_t total_out, const int64_t *slots,
                    const uint8_t *in_use, float scale)
{
    const int64_t k = n_slices * rank, lda = num_slots * k;
    if (k <= 0 || k > QUIVER_MAX_K)
        return -1;
    float buf[QUIVER_MAX_K];
    for (int64_t t = 0; t < num_tokens; t++) {
        const int64_t s = slots[t];
        if (s < 0 || s >= num_slots || !in_use[s])
            continue;
        const float *xr = x + t * ldx;
        const float *a = a_t + s * k;
        /* shrink: buf = x[t] @ A_s^T, BLOCK columns at a time so the accumulators stay in registers */
        int64_t j0 = 0;
        for (; j0 + BLOCK <= k; j0 += BLOCK) {
            float acc[BLOCK] = {0};
            for (int64_t d = 0; d < din; d++) {
                const float xd = xr[d];
                const float *ad = a + d * lda + j0;
                for (int jj = 0; jj < BLOCK; jj++)
                    acc[jj] += xd * ad[jj];
            }
            memcpy(buf + j0, acc, sizeof acc);
        }
        for (; j0 < k; j0++) {
            float acc = 0.0f;
            for (int64_t d = 0; d < din; d++)
                acc += xr[d] * a[d * lda + j0];
            buf[j0] = acc;
        }
        /* expand: y[t, slice i] += (scale * buf[slice i]) @ B_s[slice i] */
        float *yr = y + t * ldy;
        const float *b = b_t + s * k * total_out;
        int64_t off = 0;
        for (int64_t i = 0; i < n_slices; i++) {
            const int64_t size = slice_sizes[i];
            float *yo = yr + off;
            for (int64_t r = 0; r < rank; r++) {
                const float c = buf[i * rank + r] * scale;
                const float *br = b + (i * rank + r) * total_out + off;
                for (int64_t o = 0; o < size; o++)
                    yo[o] += c * br[o];
            }
            off += size;
        }
    }
    return 0;
}
