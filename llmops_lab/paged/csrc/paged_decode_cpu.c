/* Paged decode attention on a CPU: one query token per sequence, keys and values read in place
 * from the block pool (no gather), each sequence to its own length (no padding to the longest).
 *
 * Layout: a sequence's token t lives in block tables[b][t / block_size] at row t % block_size; the
 * keys of token t and KV head g start at
 *     tables[b][t / block_size] * block_stride + (t % block_size) * token_stride + g * head_stride
 * floats into the key pool (the same offset into the value pool), and each head's D floats are
 * consecutive. The engine's token-major pools [num_blocks, block_size, Hkv, D] (paged/varlen.py)
 * and a contiguous cache [B, Hkv, S, D] (one block of S tokens per sequence: static batching) are
 * both such layouts. q and out are [B, H, D] with H = R * Hkv: the R query heads of KV head g are
 * g*R .. g*R+R-1 (grouped-query attention). Row b attends to positions starts[b] .. lens[b]-1
 * (starts: left padding, or none), and to no more than the last `window` of them when window > 0.
 *
 * For each sequence and KV head, three passes over its tokens (as the reference's SDPA computes
 * softmax(q K^T / sqrt(D)) V, in fp32):
 *   1. scores: 16 tokens at a time, each token's key read once for all R query heads; a token's
 *      dot product is accumulated over D in 16-lane vectors and the 16 tokens' lanes are summed
 *      together by a shuffle tree (reduce16) instead of one horizontal sum each;
 *   2. softmax over the row of scores (vexp: a vectorised e^x);
 *   3. out = sum of p_t v_t, the R x D accumulators held in vector registers.
 *
 * The vector types are GCC/Clang vector extensions: the compiler maps a 16-float vector onto
 * AVX-512, two AVX2 registers, or four SSE/NEON ones, whichever the machine has (-march=native).
 * Specialised for D in {32, 64, 128} and R in {1, 2, 4, 8} so the loops over D and R unroll;
 * anything else returns 1 and the caller runs its reference instead.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef float v16 __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));

static inline v16 load16(const float *p) { v16 v; memcpy(&v, p, sizeof v); return v; }
static inline void store16(float *p, v16 v) { memcpy(p, &v, sizeof v); }

typedef struct {
    int64_t block, token, head;     /* strides, in floats */
    int bs;                         /* tokens per block */
} layout_t;

/* offset of (block table entry, row in the block, KV head) */
static inline int64_t offset(const layout_t *l, int32_t block, int row, int g) {
    return (int64_t)block * l->block + (int64_t)row * l->token + (int64_t)g * l->head;
}

/* the first position row b attends to */
static inline int first_position(const int32_t *starts, const int32_t *lens, int window, int b) {
    int start = starts ? starts[b] : 0;
    if (window > 0 && lens[b] - window > start) start = lens[b] - window;
    return start;
}

/* out[i] = the sum of the 16 lanes of x[i], for i < 16: four levels, each adding lane pairs of
 * two vectors into one (8 + 4 + 2 + 1 shuffled adds for 16 sums). */
static inline v16 reduce16(const v16 *x) {
    v16 y[8], w[4], u[2];
    for (int j = 0; j < 8; j++)   /* y[j]: even lanes hold x[2j]'s pair sums, odd lanes x[2j+1]'s */
        y[j] = __builtin_shufflevector(x[2*j], x[2*j+1], 0,16,2,18,4,20,6,22,8,24,10,26,12,28,14,30)
             + __builtin_shufflevector(x[2*j], x[2*j+1], 1,17,3,19,5,21,7,23,9,25,11,27,13,29,15,31);
    for (int j = 0; j < 4; j++)   /* w[j]: lane 4p+i holds a partial sum of x[4j+i] */
        w[j] = __builtin_shufflevector(y[2*j], y[2*j+1], 0,1,16,17,4,5,20,21,8,9,24,25,12,13,28,29)
             + __builtin_shufflevector(y[2*j], y[2*j+1], 2,3,18,19,6,7,22,23,10,11,26,27,14,15,30,31);
    for (int j = 0; j < 2; j++)   /* u[j]: lanes i and 8+i hold the two halves of x[8j+i] */
        u[j] = __builtin_shufflevector(w[2*j], w[2*j+1], 0,1,2,3,16,17,18,19,8,9,10,11,24,25,26,27)
             + __builtin_shufflevector(w[2*j], w[2*j+1], 4,5,6,7,20,21,22,23,12,13,14,15,28,29,30,31);
    return __builtin_shufflevector(u[0], u[1], 0,1,2,3,4,5,6,7,16,17,18,19,20,21,22,23)
         + __builtin_shufflevector(u[0], u[1], 8,9,10,11,12,13,14,15,24,25,26,27,28,29,30,31);
}

/* e^x for x <= 0 (a score minus the row's maximum): x = n ln2 + r with |r| <= ln2/2, e^r by its
 * Taylor series to r^6 (relative error under 2e-7), times 2^n written into the exponent bits.
 * Below -87, e^x < 2e-38: clamped there, as good as 0 beside the row's largest term, 1. */
static inline v16 vexp(v16 x) {
    const v16i under = x < -87.0f;
    x = (v16)((under & (v16i)((v16){0} - 87.0f)) | (~under & (v16i)x));
    const v16i n = __builtin_convertvector(x * 1.44269504f - 0.5f, v16i);   /* round(x / ln2) */
    const v16 nf = __builtin_convertvector(n, v16);
    const v16 r = (x - nf * 0.693145752f) - nf * 1.42860677e-6f;            /* ln2 in two parts */
    v16 p = (v16){0} + 1.0f / 720;
    p = p * r + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    return (v16)((v16i)p + (n << 23));
}

#define TILE 16   /* tokens scored together */

/* Ask for all the keys and values of row b, KV head g, into the level-2 cache: called one row and
 * head ahead, so that a row's blocks arrive from memory while the previous row is computed. */
static inline void prefetch_row(const float *k, const float *v, const layout_t *l, const int32_t *table,
                                int start, int L, int g, int D) {
    for (int t = start; t < L; t++) {
        const int64_t at = offset(l, table[t / l->bs], t % l->bs, g);
        for (int c = 0; c < D; c += 16) {
            __builtin_prefetch(k + at + c, 0, 2);
            __builtin_prefetch(v + at + c, 0, 2);
        }
    }
}

static inline __attribute__((always_inline)) void decode_rows(
        const float *restrict q, const float *restrict k_pool, const float *restrict v_pool, const layout_t *l,
        const int32_t *restrict tables, int64_t table_stride, const int32_t *restrict starts,
        const int32_t *restrict lens, int window, float *restrict out, int B, int Hkv, float scale,
        float *restrict s, const int D, const int R) {
    const int C = D / 16;                           /* 16-float chunks of a head */
    const int bs = l->bs;
    if (B > 0)
        prefetch_row(k_pool, v_pool, l, tables, first_position(starts, lens, window, 0), lens[0], 0, D);
    for (int b = 0; b < B; b++) {
        const int L = lens[b];
        const int start = first_position(starts, lens, window, b);
        const int n = L - start;                    /* tokens attended: positions start .. L-1 */
        const int np = (n + TILE - 1) / TILE * TILE;
        const int32_t *restrict table = tables + b * table_stride;
        for (int g = 0; g < Hkv; g++) {
            if (g + 1 < Hkv)
                prefetch_row(k_pool, v_pool, l, table, start, L, g + 1, D);
            else if (b + 1 < B)
                prefetch_row(k_pool, v_pool, l, tables + (b + 1) * table_stride,
                             first_position(starts, lens, window, b + 1), lens[b + 1], 0, D);
            const float *restrict qg = q + ((int64_t)b * Hkv + g) * R * D;
            float *restrict og = out + ((int64_t)b * Hkv + g) * R * D;
            if (n <= 0) {                           /* nothing to attend to: zeros */
                memset(og, 0, sizeof(float) * R * D);
                continue;
            }
            v16 qv[R][C];
            for (int r = 0; r < R; r++)
                for (int c = 0; c < C; c++) qv[r][c] = load16(qg + r * D + 16 * c) * scale;
            /* 1. scores s[r][j] of position start + j. The pool is far bigger than the caches and a
             * sequence's blocks lie anywhere in it: besides the row prefetched ahead, each tile asks
             * for the next tile's keys and its own values (read in pass 3) to the level-1 cache. */
            int64_t next[TILE];                          /* offsets of the next tile's tokens */
            int nblk = start / bs, noff = start % bs;
            for (int i = 0; i < TILE; i++) {             /* past the end: the last token again, ignored */
                if (i > 0 && i < n && ++noff == bs) {
                    noff = 0;
                    nblk++;
                }
                next[i] = offset(l, table[nblk], noff, g);
            }
            for (int j0 = 0; j0 < n; j0 += TILE) {
                int64_t here[TILE];
                for (int i = 0; i < TILE; i++) here[i] = next[i];
                for (int i = 0; i < TILE; i++) {
                    if (j0 + TILE + i < n) {
                        if (++noff == bs) {
                            noff = 0;
                            nblk++;
                        }
                        next[i] = offset(l, table[nblk], noff, g);
                        for (int c = 0; c < D; c += 16) __builtin_prefetch(k_pool + next[i] + c);
                    }
                    for (int c = 0; c < D; c += 16) __builtin_prefetch(v_pool + here[i] + c);
                }
                for (int r = 0; r < R; r++) {
                    v16 x[TILE];
                    for (int i = 0; i < TILE; i++) {
                        const float *key = k_pool + here[i];
                        v16 a = qv[r][0] * load16(key);
                        for (int c = 1; c < C; c++) a += qv[r][c] * load16(key + 16 * c);
                        x[i] = a;
                    }
                    store16(s + (int64_t)r * np + j0, reduce16(x));
                }
            }
            /* 2. softmax of each query head's row; the tile's tail past n gets e^-100, about 0 */
            for (int r = 0; r < R; r++) {
                float *restrict sr = s + (int64_t)r * np;
                float m = sr[0];
                for (int j = 1; j < n; j++) m = sr[j] > m ? sr[j] : m;
                for (int j = n; j < np; j++) sr[j] = m - 100.0f;
                v16 sum = {0};
                for (int j = 0; j < np; j += 16) {
                    const v16 e = vexp(load16(sr + j) - m);
                    store16(sr + j, e);
                    sum += e;
                }
                float total = 0.0f;
                for (int i = 0; i < 16; i++) total += sum[i];
                const float inv = 1.0f / total;
                for (int j = 0; j < np; j += 16) store16(sr + j, load16(sr + j) * inv);
            }
            /* 3. out = P V */
            v16 acc[R][C];
            for (int r = 0; r < R; r++)
                for (int c = 0; c < C; c++) acc[r][c] = (v16){0};
            int blk = start / bs, off = start % bs;
            for (int j = 0; j < n; j++) {
                const float *restrict v = v_pool + offset(l, table[blk], off, g);
                if (++off == bs) {
                    off = 0;
                    blk++;
                }
                v16 vv[C];
                for (int c = 0; c < C; c++) vv[c] = load16(v + 16 * c);
                for (int r = 0; r < R; r++) {
                    const float p = s[(int64_t)r * np + j];
                    for (int c = 0; c < C; c++) acc[r][c] += p * vv[c];
                }
            }
            for (int r = 0; r < R; r++)
                for (int c = 0; c < C; c++) store16(og + r * D + 16 * c, acc[r][c]);
        }
    }
}

#define VARIANT(DD, RR)                                                                                \
    static void decode_d##DD##_r##RR(const float *q, const float *k, const float *v, const layout_t *l,  \
                                     const int32_t *tables, int64_t table_stride, const int32_t *starts, \
                                     const int32_t *lens, int window, float *out, int B, int Hkv,        \
                                     float scale, float *s) {                                            \
        decode_rows(q, k, v, l, tables, table_stride, starts, lens, window, out, B, Hkv, scale, s, DD, RR); \
    }
VARIANT(32, 1) VARIANT(32, 2) VARIANT(32, 4) VARIANT(32, 8)
VARIANT(64, 1) VARIANT(64, 2) VARIANT(64, 4) VARIANT(64, 8)
VARIANT(128, 1) VARIANT(128, 2) VARIANT(128, 4) VARIANT(128, 8)

/* 0: done; 1: no variant for this (D, H / Hkv), nothing written; 2: out of memory.
 * starts may be NULL (every row from position 0). Strides are in floats. */
int paged_decode_f32(const float *q, const float *k, const float *v, const int32_t *tables, int64_t table_stride,
                     const int32_t *starts, const int32_t *lens, int window, float *out, int B, int H, int Hkv,
                     int D, int bs, int64_t block_stride, int64_t token_stride, int64_t head_stride, float scale) {
    if (Hkv <= 0 || H % Hkv || bs <= 0) return 1;
    const int R = H / Hkv;
    const layout_t l = {block_stride, token_stride, head_stride, bs};
    int longest = 0;
    for (int b = 0; b < B; b++) {
        const int n = lens[b] - first_position(starts, lens, window, b);
        if (n > longest) longest = n;
    }
    float *s = malloc(sizeof(float) * (size_t)R * ((longest + TILE - 1) / TILE * TILE + TILE));
    if (!s) return 2;
    int status = 0;
#define CASE(DD, RR) else if (D == DD && R == RR) \
        decode_d##DD##_r##RR(q, k, v, &l, tables, table_stride, starts, lens, window, out, B, Hkv, scale, s);
    if (0) {}
    CASE(32, 1) CASE(32, 2) CASE(32, 4) CASE(32, 8)
    CASE(64, 1) CASE(64, 2) CASE(64, 4) CASE(64, 8)
    CASE(128, 1) CASE(128, 2) CASE(128, 4) CASE(128, 8)
    else status = 1;
    free(s);
    return status;
}
