/* Fused element-wise kernels for the CPU hot loops of the tensor-wise merges.
 *
 * Each function does in one pass over memory what the torch path does in many, with the same float32
 * operations in the same order, so results match the torch path bit for bit (built with
 * -ffp-contract=off, no fast-math). Work is split over threads by the caller; these are single-threaded
 * and work on a contiguous range [0, n).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 256

/* The kernels are built three times on x86-64: for CPUs with AVX-512 (whose vectors also multiply 64-bit integers,
 * as the random draws need), for CPUs with AVX2 (eight floats a vector instead of four) and for any other; the loader
 * picks one per CPU. All do the same float32 operations in the same order (no contraction into fused multiply-adds,
 * no reassociation), so they give the same bits. A compiler without target_clones builds with MERGEKIT_NO_CLONES:
 * one build. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(MERGEKIT_NO_CLONES)
#define PER_CPU __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define PER_CPU
#endif

/* Helpers of the per-CPU kernels are inlined into each build, so that they are compiled for its CPU too. */
#if defined(__GNUC__)
#define INLINE static inline __attribute__((always_inline))
#else
#define INLINE static inline
#endif

/* Sum of squares of at most BLOCK values, in eight float lanes (32 terms each at most: ample precision for
 * norms), so it vectorizes without reassociating the merge's own arithmetic. */
INLINE double sum_squares(const float *restrict values, int len)
{
    float lanes[8] = {0};
    int i = 0;
    for (; i + 8 <= len; i += 8)
        for (int j = 0; j < 8; j++) lanes[j] += values[i + j] * values[i + j];
    double total = 0.0;
    for (; i < len; i++) total += (double)values[i] * (double)values[i];
    for (int j = 0; j < 8; j++) total += lanes[j];
    return total;
}

/* Experts become task vectors in place (expert -= base); magnitudes[t] = |task vector|; delta_sq[t] +=
 * its squared norm. */
PER_CPU
void task_vector_magnitudes(const float *base, float *const *experts, float *const *magnitudes, int32_t n_experts,
                            int64_t n, double *delta_sq)
{
    for (int32_t t = 0; t < n_experts; t++) {
        float *e = experts[t];
        float *m = magnitudes[t];
        for (int64_t i = 0; i < n; i++) {
            float d = e[i] - base[i];
            e[i] = d;
            m[i] = fabsf(d);
        }
        for (int64_t start = 0; start < n; start += BLOCK)
            delta_sq[t] += sum_squares(e + start, n - start < BLOCK ? (int)(n - start) : BLOCK);
    }
}

/* For each bracket j (lo, guess, hi at points[3j..3j+2]): counts[4j..4j+3] += #values > hi, #values > guess,
 * #values >= guess, #values >= lo. One pass over memory for all the brackets: a block at a time, in cache. */
PER_CPU
void count_brackets(const float *values, int64_t n, const float *points, int32_t brackets, int64_t *counts)
{
    for (int64_t start = 0; start < n; start += 4096) {
        int len = n - start < 4096 ? (int)(n - start) : 4096;
        const float *restrict v = values + start;
        for (int32_t j = 0; j < brackets; j++) {
            float lo = points[3 * j], guess = points[3 * j + 1], hi = points[3 * j + 2];
            int32_t above_hi = 0, above_guess = 0, reach_guess = 0, reach_lo = 0;
            for (int i = 0; i < len; i++) {
                above_hi += v[i] > hi;
                above_guess += v[i] > guess;
                reach_guess += v[i] >= guess;
                reach_lo += v[i] >= lo;
            }
            counts[4 * j] += above_hi;
            counts[4 * j + 1] += above_guess;
            counts[4 * j + 2] += reach_guess;
            counts[4 * j + 3] += reach_lo;
        }
    }
}

/* Rows as stored, one block at a time: a pointer into float32 rows, or bfloat16 rows (the high half of a float's
 * bits, so exact) widened into scratch, their NaN and Inf counted into *nonfinite. */
INLINE const float *load_block(const void *rows, int32_t bf16, int64_t start, int len, float *restrict scratch,
                               int64_t *nonfinite)
{
    if (!bf16) return (const float *)rows + start;
    const uint16_t *restrict src = (const uint16_t *)rows + start;
    uint16_t found = 0;  /* per block, so the count stays in narrow vector lanes */
    for (int i = 0; i < len; i++) {
        uint32_t bits = (uint32_t)src[i] << 16;
        memcpy(scratch + i, &bits, sizeof bits);
        found += (src[i] & 0x7f80u) == 0x7f80u;
    }
    *nonfinite += found;
    return scratch;
}

/* A block of float32 results into out: as they are, or rounded to bfloat16 the way torch rounds (to nearest,
 * ties to even; NaN as the quiet NaN 0x7fc0). */
INLINE void store_block(const float *restrict values, int len, void *out, int32_t bf16, int64_t start)
{
    if (!bf16) {
        memcpy((float *)out + start, values, (size_t)len * sizeof(float));
        return;
    }
    uint16_t *restrict dst = (uint16_t *)out + start;
    for (int i = 0; i < len; i++) {
        uint32_t bits;
        memcpy(&bits, values + i, sizeof bits);
        uint16_t rounded = (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
        dst[i] = values[i] != values[i] ? (uint16_t)0x7fc0u : rounded;
    }
}

/* For each band j (bounds[2j], bounds[2j+1], each end included or not as include[2j], include[2j+1]): the values
 * in it, in their order, into outs[j] (room for n each), and found[j] = how many. The bands an exact selection
 * finishes on, in one pass over memory instead of three comparisons and a gather per band; a band holds few of the
 * values, so each group of 16 is tested at once before any is copied. */
PER_CPU
void collect_bands(const float *values, int64_t n, const float *bounds, const int32_t *include, int32_t bands,
                   float *const *outs, int64_t *found)
{
    for (int32_t j = 0; j < bands; j++) found[j] = 0;
    for (int64_t start = 0; start < n; start += 4096) {
        int len = n - start < 4096 ? (int)(n - start) : 4096;
        const float *restrict v = values + start;
        for (int32_t j = 0; j < bands; j++) {
            float lo = bounds[2 * j], hi = bounds[2 * j + 1];
            int32_t include_lo = include[2 * j], include_hi = include[2 * j + 1];
            float *restrict out = outs[j];
            int64_t kept = found[j];
            for (int group = 0; group < len; group += 16) {
                int end = len - group < 16 ? len : group + 16, any = 0;
                for (int i = group; i < end; i++)  /* a vectorized test of 16 values first: bands are narrow */
                    any |= (include_lo ? v[i] >= lo : v[i] > lo) & (include_hi ? v[i] <= hi : v[i] < hi);
                if (!any) continue;
                for (int i = group; i < end; i++) {
                    out[kept] = v[i];
                    kept += (include_lo ? v[i] >= lo : v[i] > lo) & (include_hi ? v[i] <= hi : v[i] < hi);
                }
            }
            found[j] = kept;
        }
    }
}

/* d = expert - base over a block (or a copy when the expert already holds its task vector). */
INLINE void block_delta(const float *restrict base, const float *restrict expert, int are_deltas, int len,
                        float *restrict d)
{
    if (are_deltas)
        for (int i = 0; i < len; i++) d[i] = expert[i];
    else
        for (int i = 0; i < len; i++) d[i] = expert[i] - base[i];
}

/* out = weight * (|d| >= threshold ? d : 0); returns how many entries were kept. */
INLINE int64_t trim_weight(const float *restrict d, float threshold, float weight, int len, float *restrict out)
{
    int64_t kept = 0;
    if (threshold <= 0.0f) {
        for (int i = 0; i < len; i++) out[i] = weight * d[i];
        return len;
    }
    for (int i = 0; i < len; i++) {
        int keep = fabsf(d[i]) >= threshold;
        kept += keep;
        out[i] = weight * (keep ? d[i] : 0.0f);
    }
    return kept;
}

/* The TIES election over one block of weighted terms (term t at terms + t * BLOCK, summed in order t = 0.. into
 * total): the sign of
 * total per entry (+ where it is >= 0), the sum of the terms of that sign (normalize: divided by the agreeing
 * weights, at least min_weight when every weight is positive, else 1 where none agree), times scale, plus the
 * base, into result. tallies += [entries some expert kept, of those entries with a minority sign]; sums += [|result -
 * base|^2, |result|^2]. */
INLINE void elect_block(const float *restrict terms, const float *restrict total, int32_t n_experts,
                        int len, const float *weights, int normalize, float min_weight, float scale,
                        const float *restrict b, float *restrict result, int64_t *tallies, double *sums)
{
    float sign[BLOCK], agree[BLOCK], divisor[BLOCK];
    int positive_weights = min_weight > 0.0f;
    for (int i = 0; i < len; i++) {
        sign[i] = total[i] >= 0.0f ? 1.0f : -1.0f;
        agree[i] = 0.0f;
        divisor[i] = 0.0f;
    }
    for (int32_t t = 0; t < n_experts; t++) {
        const float *restrict term = terms + (size_t)t * BLOCK;
        float w = weights[t];
        for (int i = 0; i < len; i++) {  /* branch-free, so it vectorizes: agrees is 1 or 0 */
            float s = term[i] * sign[i];
            float agrees = (float)(s > 0.0f);
            agree[i] += s * agrees;
            divisor[i] += w * agrees;
        }
    }
    int64_t any_kept = 0, disagreed = 0;
    for (int i = 0; i < len; i++) {
        any_kept += agree[i] != 0.0f;
        disagreed += agree[i] > fabsf(total[i]);
    }
    for (int i = 0; i < len; i++) {
        float a = agree[i] * sign[i];
        if (normalize) {
            float q = divisor[i];
            q = positive_weights ? (q < min_weight ? min_weight : q) : (q == 0.0f ? 1.0f : q);
            a /= q;
        }
        if (scale != 1.0f) a *= scale;
        agree[i] = a;
        result[i] = a + b[i];
    }
    tallies[0] += any_kept;
    tallies[1] += disagreed;
    sums[0] += sum_squares(agree, len);
    sums[1] += sum_squares(result, len);
}

/* total = the terms (term t at terms + t * BLOCK) summed in order t = 0.. */
INLINE void sum_terms(const float *restrict terms, int32_t n_experts, int len, float *restrict total)
{
    for (int i = 0; i < len; i++) total[i] = terms[i];
    for (int32_t t = 1; t < n_experts; t++)
        for (int i = 0; i < len; i++) total[i] += terms[(size_t)t * BLOCK + i];
}

/* Scratch for one block of terms per expert, term t at + t * BLOCK (NULL when memory is short). */
static float *term_scratch(int32_t n_experts)
{
    return malloc((size_t)n_experts * BLOCK * sizeof(float));
}

/* bfloat16 -> float32 (exact: the high half of the float's bits); returns how many values are NaN or Inf,
 * so the reader can refuse them without another pass. */
PER_CPU
int64_t widen_bfloat16(const uint16_t *restrict src, float *restrict dst, int64_t n)
{
    int64_t nonfinite = 0;
    uint32_t *restrict bits = (uint32_t *)dst;
    for (int64_t start = 0; start < n; start += BLOCK) {
        int len = n - start < BLOCK ? (int)(n - start) : BLOCK;
        uint16_t found = 0;  /* per block, so the count stays in narrow vector lanes */
        for (int i = 0; i < len; i++) {
            uint16_t value = src[start + i];
            bits[start + i] = (uint32_t)value << 16;
            found += (value & 0x7f80u) == 0x7f80u;
        }
        nonfinite += found;
    }
    return nonfinite;
}

/* DELLA's keep probabilities: out[r * width + i] = low + span * (rank / (width - 1)), where rank is the rank of
 * |values[r * width + i]| within row r (0 for the smallest; equal magnitudes in index order, a stable sort), and
 * rank / (width - 1) is 0.5 for rows of one entry; float32 operations in the torch path's order. The ranks come
 * from an LSD radix sort of the magnitudes' bit patterns (for non-negative floats their order is the values'
 * order), four 8-bit digits counted in one pass, skipping a digit every entry of the row shares. Returns 0, or -1 when scratch memory
 * cannot be had. */
PER_CPU
int32_t rank_probabilities(const float *values, int64_t rows, int64_t width, float low, float span, float *out)
{
    /* each entry as one 64-bit word: its magnitude's bits above its index, so one store moves both */
    uint64_t *scratch = malloc((size_t)width * 2 * sizeof(uint64_t));
    if (scratch == NULL) return -1;
    float last = (float)(width - 1);
    for (int64_t r = 0; r < rows; r++) {
        const float *row = values + r * width;
        uint64_t *words = scratch, *next = scratch + width;
        uint32_t offsets[4][256] = {{0}};  /* all four digits' histograms in one pass */
        for (int64_t i = 0; i < width; i++) {
            float magnitude = fabsf(row[i]);
            uint32_t key;
            memcpy(&key, &magnitude, sizeof key);
            words[i] = ((uint64_t)key << 32) | (uint64_t)i;
            offsets[0][key & 0xffu]++;
            offsets[1][(key >> 8) & 0xffu]++;
            offsets[2][(key >> 16) & 0xffu]++;
            offsets[3][key >> 24]++;
        }
        for (int digit = 0; digit < 4; digit++) {
            int shift = 32 + 8 * digit;
            uint32_t *offset = offsets[digit];
            if (offset[(words[0] >> shift) & 0xffu] == (uint32_t)width) continue;  /* every entry shares it */
            uint32_t position = 0;
            for (int bucket = 0; bucket < 256; bucket++) {
                uint32_t count = offset[bucket];
                offset[bucket] = position;
                position += count;
            }
            for (int64_t i = 0; i < width; i++) {
                uint64_t word = words[i];
                next[offset[(word >> shift) & 0xffu]++] = word;
            }
            uint64_t *swap = words; words = next; next = swap;
        }
        float *row_out = out + r * width;
        for (int64_t i = 0; i < width; i++) {
            float position = width > 1 ? (float)i / last : 0.5f;
            row_out[words[i] & 0xffffffffu] = position * span + low;
        }
    }
    free(scratch);
    return 0;
}

/* Uniform draw number `index` of the stream `seed`, in [0, 1) with 24 random bits: splitmix64 of
 * seed + (index + 1) * golden ratio (a counter-based generator: any draw can be made alone, by any thread). */
INLINE float uniform_draw(uint64_t seed, uint64_t index)
{
    uint64_t z = seed + (index + 1) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return (float)(int32_t)(z >> 40) * 0x1.0p-24f;  /* 24 bits: exact, and a cheap conversion */
}

/* DARE's and DELLA's drop, in place: values[i] is kept where draw number first + i of stream `seed` is below its
 * keep probability (probability[i * stride]: stride 0 for one probability), then divided by it when `rescale`;
 * a dropped entry becomes value * 0 (a signed zero). The torch path's operations, in its order: lt, mul, div.
 * Returns the count kept. */
PER_CPU
int64_t random_drop(float *values, const float *probability, int64_t stride, int64_t n, uint64_t seed,
                    int64_t first, int32_t rescale)
{
    int64_t kept = 0;
    for (int64_t i = 0; i < n; i++) {
        float p = probability[i * stride];
        float draw = uniform_draw(seed, (uint64_t)(first + i));
        float keep = draw < p ? 1.0f : 0.0f;
        kept += draw < p;
        float value = values[i] * keep;
        values[i] = rescale ? value / p : value;
    }
    return kept;
}

/* How merge_blocks sparsifies each task vector: trim below thresholds[t] (TIES), or (thresholds NULL) DARE's random
 * drop: keep where draw number first + i of stream seeds[t] is below densities[t] (a density of 1 or more keeps all),
 * divided by it when rescale; a dropped entry becomes d * 0. */
struct sparsify {
    const float *thresholds;
    const uint64_t *seeds;
    const float *densities;
    int32_t rescale;
    int64_t first;
};

/* One expert's weighted term over a block after DARE's drop, in the torch path's order: lt, mul, div, mul by the
 * weight. Returns the count kept. */
INLINE int64_t drop_weight(const float *restrict d, uint64_t seed, uint64_t index, float p, int rescale, float w,
                           int len, float *restrict draws, float *restrict term)
{
    if (p >= 1.0f) {
        for (int i = 0; i < len; i++) term[i] = w * d[i];
        return len;
    }
    for (int i = 0; i < len; i++) draws[i] = uniform_draw(seed, index + (uint64_t)i);
    int32_t count = 0;
    for (int i = 0; i < len; i++) {
        float keep = draws[i] < p ? 1.0f : 0.0f;
        count += draws[i] < p;
        float value = d[i] * keep;
        term[i] = w * (rescale ? value / p : value);
    }
    return count;
}

/* The body of ties_merge and dare_merge: per block, each expert's task vector (delta_sq += its squared norm),
 * sparsified as `how` says and weighted; then the TIES election (elect) or the sum in order t = 0.. (divided by
 * divisor unless it is 0, times scale), plus the base, into out (which may be experts[0]). Inputs and out in
 * float32, or all in bfloat16 (bf16: read widened, results rounded once; *nonfinite += the NaN and Inf among the
 * inputs). kept[t] += entries kept; tallies as elect_block; sums += [delta_sq of each expert..., |result - base|^2,
 * |result|^2], of the float32 results. Returns 0, or -1 when no scratch memory was to be had. */
PER_CPU
static int32_t merge_blocks(const void *base, const void *const *experts, int32_t n_experts, int64_t n, int32_t bf16,
                            int32_t are_deltas, const struct sparsify *how, const float *weights, int32_t elect,
                            int32_t normalize, float min_weight, float divisor, float scale, void *out, int64_t *kept,
                            int64_t *tallies, double *sums, int64_t *nonfinite)
{
    float total[BLOCK], d[BLOCK], draws[BLOCK], result[BLOCK], base_scratch[BLOCK], row_scratch[BLOCK];
    float *terms = term_scratch(n_experts);
    if (!terms) return -1;
    for (int64_t start = 0; start < n; start += BLOCK) {
        int len = n - start < BLOCK ? (int)(n - start) : BLOCK;
        const float *b = load_block(base, bf16, start, len, base_scratch, nonfinite);
        for (int32_t t = 0; t < n_experts; t++) {
            float *term = terms + (size_t)t * BLOCK;
            block_delta(b, load_block(experts[t], bf16, start, len, row_scratch, nonfinite), are_deltas, len, d);
            sums[t] += sum_squares(d, len);
            if (how->thresholds)
                kept[t] += trim_weight(d, how->thresholds[t], weights[t], len, term);
            else
                kept[t] += drop_weight(d, how->seeds[t], (uint64_t)(how->first + start), how->densities[t],
                                       how->rescale, weights[t], len, draws, term);
        }
        sum_terms(terms, n_experts, len, total);
        if (elect) {
            elect_block(terms, total, n_experts, len, weights, normalize, min_weight, scale, b, result, tallies,
                        sums + n_experts);
        } else {
            for (int i = 0; i < len; i++) {
                float value = total[i];
                if (divisor != 0.0f) value /= divisor;
                if (scale != 1.0f) value *= scale;
                total[i] = value;
            }
            sums[n_experts] += sum_squares(total, len);
            for (int i = 0; i < len; i++) result[i] = total[i] + b[i];
            sums[n_experts + 1] += sum_squares(result, len);
        }
        store_block(result, len, out, bf16, start);
    }
    free(terms);
    return 0;
}

/* TIES: trim each task vector at its threshold, elect a sign per entry from the weighted sum, average the
 * agreeing entries (normalize: divide by the agreeing weights), scale, add to the base. Counters as merge_blocks. */
int32_t ties_merge(const float *base, float *const *experts, int32_t n_experts, int64_t n, int32_t are_deltas,
                   const float *thresholds, const float *weights, int32_t normalize, float min_weight, float scale,
                   float *out, int64_t *kept, int64_t *tallies, double *sums)
{
    struct sparsify how = {thresholds, NULL, NULL, 0, 0};
    int64_t nonfinite = 0;  /* float32 inputs, which the reader checked */
    return merge_blocks(base, (const void *const *)experts, n_experts, n, 0, are_deltas, &how, weights, 1, normalize,
                        min_weight, 0.0f, scale, out, kept, tallies, sums, &nonfinite);
}

/* DARE in one pass: each expert's task vector (expert - base) randomly dropped (draws first.. of stream seeds[t]),
 * rescaled, weighted; then the TIES election (elect) or the sum (divided by divisor unless 0), scale, base. The
 * torch path's operations in its order; inputs and out in float32 or all in bfloat16, counters as merge_blocks. */
int32_t dare_merge(const void *base, const void *const *experts, int32_t n_experts, int64_t n, int32_t bf16,
                   int64_t first, const uint64_t *seeds, const float *densities, int32_t rescale,
                   const float *weights, int32_t elect, int32_t normalize, float min_weight, float divisor,
                   float scale, void *out, int64_t *kept, int64_t *tallies, double *sums, int64_t *nonfinite)
{
    struct sparsify how = {NULL, seeds, densities, rescale, first};
    return merge_blocks(base, experts, n_experts, n, bf16, 0, &how, weights, elect, normalize, min_weight, divisor,
                        scale, out, kept, tallies, sums, nonfinite);
}

/* Linear: the sum, in order t = 0.., of weights[t] * models[t] (each product rounded, then added), divided by
 * divisor unless it is 0, into out (which may be models[0]). Inputs and out in float32, or all in bfloat16 (read
 * widened, results rounded once; *nonfinite += the NaN and Inf among the inputs). *result_sq += |result|^2, of the
 * float32 results. The torch path's operations in its order. */
PER_CPU
void weighted_sum(const void *const *models, int32_t n_models, int64_t n, int32_t bf16, const float *weights,
                  float divisor, void *out, double *result_sq, int64_t *nonfinite)
{
    float total[BLOCK], scratch[BLOCK];
    for (int64_t start = 0; start < n; start += BLOCK) {
        int len = n - start < BLOCK ? (int)(n - start) : BLOCK;
        const float *x = load_block(models[0], bf16, start, len, scratch, nonfinite);
        for (int i = 0; i < len; i++) total[i] = x[i] * weights[0];
        for (int32_t t = 1; t < n_models; t++) {
            x = load_block(models[t], bf16, start, len, scratch, nonfinite);
            float w = weights[t];
            for (int i = 0; i < len; i++) total[i] += x[i] * w;
        }
        if (divisor != 0.0f)
            for (int i = 0; i < len; i++) total[i] /= divisor;
        *result_sq += sum_squares(total, len);
        store_block(total, len, out, bf16, start);
    }
}

/* NearSwap: w = clamp(t / max(|base - other|, 1e-6), 0, 1), result = (other - base) * w + base, entry by entry,
 * into out (which may be other). t / x as torch computes a number over a tensor: its reciprocal times t. Inputs and
 * out in float32, or all in bfloat16 (as weighted_sum); sums += [|result - base|^2, |result|^2]. */
PER_CPU
void nearswap_merge(const void *base, const void *other, int64_t n, int32_t bf16, float t, void *out, double *sums,
                    int64_t *nonfinite)
{
    float change[BLOCK], result[BLOCK], base_scratch[BLOCK], other_scratch[BLOCK];
    for (int64_t start = 0; start < n; start += BLOCK) {
        int len = n - start < BLOCK ? (int)(n - start) : BLOCK;
        const float *b = load_block(base, bf16, start, len, base_scratch, nonfinite);
        const float *o = load_block(other, bf16, start, len, other_scratch, nonfinite);
        for (int i = 0; i < len; i++) {
            float distance = fabsf(b[i] - o[i]);
            distance = distance < 1e-6f ? 1e-6f : distance;
            float weight = (1.0f / distance) * t;
            weight = weight < 0.0f ? 0.0f : (weight > 1.0f ? 1.0f : weight);
            change[i] = (o[i] - b[i]) * weight;
            result[i] = change[i] + b[i];
        }
        sums[0] += sum_squares(change, len);
        sums[1] += sum_squares(result, len);
        store_block(result, len, out, bf16, start);
    }
}

/* RAM and RAM+ work on which models changed an entry: |d_t| > epsilon, d_t = expert - base (or the expert, when it
 * already holds its task vector); count = how many did. changed is 1 or 0 per model and entry, count their sum. The
 * base's and experts' rows of the block as float32 (rows[t] for expert t). */
INLINE void ram_changes(const float *restrict b, const float *const *rows, int32_t n_experts, int32_t are_deltas,
                        float epsilon, int len, float *restrict deltas, float *restrict changed, float *restrict count)
{
    for (int i = 0; i < len; i++) count[i] = 0.0f;
    for (int32_t t = 0; t < n_experts; t++) {
        float *restrict d = deltas + (size_t)t * BLOCK;
        float *restrict c = changed + (size_t)t * BLOCK;
        block_delta(b, rows[t], are_deltas, len, d);
        for (int i = 0; i < len; i++) {
            c[i] = fabsf(d[i]) > epsilon ? 1.0f : 0.0f;
            count[i] += c[i];
        }
    }
}

/* One block of the base's and each expert's rows as float32 into base_row and rows[t] (expert t's widened into
 * scratch + t * BLOCK when they are bfloat16). */
INLINE const float *load_inputs(const void *base, const void *const *experts, int32_t n_experts, int32_t bf16,
                                int64_t start, int len, float *restrict base_scratch, float *restrict scratch,
                                const float **rows, int64_t *nonfinite)
{
    for (int32_t t = 0; t < n_experts; t++)
        rows[t] = load_block(experts[t], bf16, start, len, scratch + (size_t)t * BLOCK, nonfinite);
    return load_block(base, bf16, start, len, base_scratch, nonfinite);
}

/* Scratch of the RAM kernels: per expert one block of its task vector, of its changed flags and of its rows
 * widened, and the pointers to its rows. */
struct ram_scratch {
    float *deltas, *changed, *widened;
    const float **rows;
};

static int ram_scratch_alloc(struct ram_scratch *scratch, int32_t n_experts)
{
    scratch->deltas = term_scratch(3 * n_experts);
    scratch->rows = malloc((size_t)(n_experts > 0 ? n_experts : 1) * sizeof *scratch->rows);
    if (!scratch->deltas || !scratch->rows) {
        free(scratch->deltas);
        free(scratch->rows);
        return -1;
    }
    scratch->changed = scratch->deltas + (size_t)n_experts * BLOCK;
    scratch->widened = scratch->changed + (size_t)n_experts * BLOCK;
    return 0;
}

static void ram_scratch_free(struct ram_scratch *scratch)
{
    free(scratch->rows);
    free(scratch->deltas);
}

/* RAM+'s first pass: shared[t] += entries model t changed along with another, unique[t] += those it alone changed.
 * Inputs in float32, or bfloat16 (bf16). Returns 0, or -1 when no scratch memory was to be had. */
PER_CPU
int32_t ram_counts(const void *base, const void *const *experts, int32_t n_experts, int64_t n, int32_t bf16,
                   int32_t are_deltas, float epsilon, int64_t *shared, int64_t *unique)
{
    float count[BLOCK], base_scratch[BLOCK];
    struct ram_scratch scratch;
    if (ram_scratch_alloc(&scratch, n_experts) != 0) return -1;
    int64_t nonfinite = 0;  /* the merge pass reports them */
    for (int64_t start = 0; start < n; start += BLOCK) {
        int len = n - start < BLOCK ? (int)(n - start) : BLOCK;
        const float *b = load_inputs(base, experts, n_experts, bf16, start, len, base_scratch, scratch.widened,
                                     scratch.rows, &nonfinite);
        ram_changes(b, scratch.rows, n_experts, are_deltas, epsilon, len, scratch.deltas, scratch.changed, count);
        for (int32_t t = 0; t < n_experts; t++) {
            const float *restrict c = scratch.changed + (size_t)t * BLOCK;
            int32_t with_others = 0, alone = 0;
            for (int i = 0; i < len; i++) {  /* & not &&: no branch, so it vectorizes */
                with_others += (c[i] != 0.0f) & (count[i] > 1.0f);
                alone += (c[i] != 0.0f) & (count[i] == 1.0f);
            }
            shared[t] += with_others;
            unique[t] += alone;
        }
    }
    ram_scratch_free(&scratch);
    return 0;
}

/* RAM (scales NULL): the sum over t of k_t = d_t * changed_t, divided by max(count, 1). RAM+: the sum over t of
 * k_t * [count == 1] * scales[t] + k_t * [count > 1] / max(count, 1). Plus the base, into out (which may be
 * experts[0]). Inputs and out in float32, or all in bfloat16 (bf16: read widened, results rounded once);
 * sums += [|d_t|^2 for each t..., |result - base|^2, |result|^2], of the float32 results; *nonfinite += the NaN
 * and Inf among bfloat16 inputs. The torch path's operations in its order. Returns 0, or -1 when no scratch memory
 * was to be had. */
PER_CPU
int32_t ram_merge(const void *base, const void *const *experts, int32_t n_experts, int64_t n, int32_t bf16,
                  int32_t are_deltas, float epsilon, const float *scales, void *out, double *sums, int64_t *nonfinite)
{
    float count[BLOCK], merged[BLOCK], base_scratch[BLOCK], result[BLOCK];
    struct ram_scratch scratch;
    if (ram_scratch_alloc(&scratch, n_experts) != 0) return -1;
    for (int64_t start = 0; start < n; start += BLOCK) {
        int len = n - start < BLOCK ? (int)(n - start) : BLOCK;
        const float *b = load_inputs(base, experts, n_experts, bf16, start, len, base_scratch, scratch.widened,
                                     scratch.rows, nonfinite);
        ram_changes(b, scratch.rows, n_experts, are_deltas, epsilon, len, scratch.deltas, scratch.changed, count);
        for (int i = 0; i < len; i++) merged[i] = 0.0f;
        for (int32_t t = 0; t < n_experts; t++) {
            const float *restrict d = scratch.deltas + (size_t)t * BLOCK;
            const float *restrict c = scratch.changed + (size_t)t * BLOCK;
            sums[t] += sum_squares(d, len);
            if (scales == NULL) {
                for (int i = 0; i < len; i++) merged[i] += d[i] * c[i];
                continue;
            }
            float scale = scales[t];
            for (int i = 0; i < len; i++) {
                float kept = d[i] * c[i];
                float alone = count[i] == 1.0f ? 1.0f : 0.0f, with_others = count[i] > 1.0f ? 1.0f : 0.0f;
                float divisor = count[i] < 1.0f ? 1.0f : count[i];
                merged[i] += kept * alone * scale + kept * with_others / divisor;
            }
        }
        if (scales == NULL)
            for (int i = 0; i < len; i++) merged[i] = merged[i] / (count[i] < 1.0f ? 1.0f : count[i]);
        sums[n_experts] += sum_squares(merged, len);
        for (int i = 0; i < len; i++) result[i] = merged[i] + b[i];
        sums[n_experts + 1] += sum_squares(result, len);
        store_block(result, len, out, bf16, start);
    }
    ram_scratch_free(&scratch);
    return 0;
}

/* SCE's merge: each model's task vector d_t (expert - base, or the expert when it already is one), kept where the
 * entry's variance across the models is at or above threshold (variances NULL: all kept; none_kept: none). The sign
 * of their sum elects per entry; each model whose d_t has that sign counts with its weight: the sum of the agreeing
 * weighted d_t over the agreeing weights (at least min_divisor), plus the base, into out (which may be experts[0]);
 * sums as ram_merge's. The torch path's operations in its order. Returns 0, or -1 when no scratch memory was to be
 * had. */
PER_CPU
int32_t sce_merge(const float *base, float *const *experts, int32_t n_experts, int64_t n, int32_t are_deltas,
                  const float *variances, float threshold, int32_t none_kept, const float *weights, float min_divisor,
                  float *out, double *sums)
{
    float total[BLOCK], majority[BLOCK], merged[BLOCK], divisor[BLOCK];
    float *deltas = term_scratch(n_experts);
    if (!deltas) return -1;
    for (int64_t start = 0; start < n; start += BLOCK) {
        int len = n - start < BLOCK ? (int)(n - start) : BLOCK;
        const float *b = base + start;
        for (int i = 0; i < len; i++) total[i] = merged[i] = divisor[i] = 0.0f;
        for (int32_t t = 0; t < n_experts; t++) {
            float *restrict d = deltas + (size_t)t * BLOCK;
            block_delta(b, experts[t] + start, are_deltas, len, d);
            sums[t] += sum_squares(d, len);
            if (none_kept)
                for (int i = 0; i < len; i++) d[i] = 0.0f;
            else if (variances)
                for (int i = 0; i < len; i++) d[i] = d[i] * (variances[start + i] >= threshold ? 1.0f : 0.0f);
            for (int i = 0; i < len; i++) total[i] += d[i];
        }
        for (int i = 0; i < len; i++) majority[i] = total[i] >= 0.0f ? 1.0f : -1.0f;
        for (int32_t t = 0; t < n_experts; t++) {
            const float *restrict d = deltas + (size_t)t * BLOCK;
            float w = weights[t];
            for (int i = 0; i < len; i++) {
                float sign = d[i] > 0.0f ? 1.0f : (d[i] < 0.0f ? -1.0f : 0.0f);
                float agrees = (sign == majority[i] ? 1.0f : 0.0f) * w;
                merged[i] += d[i] * agrees;
                divisor[i] += agrees;
            }
        }
        for (int i = 0; i < len; i++) merged[i] = merged[i] / (divisor[i] < min_divisor ? min_divisor : divisor[i]);
        sums[n_experts] += sum_squares(merged, len);
        float *o = out + start;
        for (int i = 0; i < len; i++) o[i] = merged[i] + b[i];
        sums[n_experts + 1] += sum_squares(o, len);
    }
    free(deltas);
    return 0;
}

#define GRAM_MAX_VECTORS 16

/* Block sums of every pairwise dot product of k float32 vectors (k <= GRAM_MAX_VECTORS): for pair p (i <= j, in
 * row-major order of the upper triangle) and block b of `block` entries, sums[p * total_blocks + b] is the sum,
 * from 0.0 and in index order, of (double)v_i * (double)v_j (exact products) over the block. Handles blocks
 * [first_block, last_block) of vectors of n entries; every pair's sum is its own chain, so the chains interleave. */
INLINE void gram_blocks(const float *const *vectors, int32_t k, int64_t n, int64_t block, int64_t first_block,
                        int64_t last_block, int64_t total_blocks, double *sums)
{
    int32_t pairs = k * (k + 1) / 2;
    for (int64_t b = first_block; b < last_block; b++) {
        double acc[GRAM_MAX_VECTORS * (GRAM_MAX_VECTORS + 1) / 2] = {0};
        int64_t start = b * block, stop = start + block < n ? start + block : n;
        for (int64_t e = start; e < stop; e++) {
            double x[GRAM_MAX_VECTORS];
            for (int32_t t = 0; t < k; t++) x[t] = (double)vectors[t][e];
            int32_t p = 0;
            for (int32_t i = 0; i < k; i++)
                for (int32_t j = i; j < k; j++) acc[p++] += x[i] * x[j];
        }
        for (int32_t p = 0; p < pairs; p++) sums[p * total_blocks + b] = acc[p];
    }
}

PER_CPU
void block_gram(const float *const *vectors, int32_t k, int64_t n, int64_t block, int64_t first_block,
                int64_t last_block, int64_t total_blocks, double *sums)
{
    /* the usual counts as constants, so the compiler unrolls the pairs and keeps the sums in registers */
    switch (k) {
    case 2: gram_blocks(vectors, 2, n, block, first_block, last_block, total_blocks, sums); break;
    case 3: gram_blocks(vectors, 3, n, block, first_block, last_block, total_blocks, sums); break;
    case 4: gram_blocks(vectors, 4, n, block, first_block, last_block, total_blocks, sums); break;
    case 5: gram_blocks(vectors, 5, n, block, first_block, last_block, total_blocks, sums); break;
    default: gram_blocks(vectors, k, n, block, first_block, last_block, total_blocks, sums);
    }
}
