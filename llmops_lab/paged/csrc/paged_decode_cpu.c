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
 * For each sequence, the offsets of its tokens are worked out once (no division per token and
 * head); then for each KV head, three passes over its tokens, as the reference's SDPA computes
 * softmax(q K^T / sqrt(D)) V in fp32:
 *   1. scores, 8 tokens at a time for one query head: each token's dot product is accumulated over
 *      D in 8-lane vectors, and the 8 tokens' lanes are summed together by a shuffle tree
 *      (reduce8) instead of one horizontal sum each;
 *   2. softmax over each query head's row of scores (vexp: a vectorised e^x);
 *   3. out = sum of p_t v_t, a few 8-float columns of V at a time for all R query heads, so the
 *      accumulators stay in registers (R x chunks <= 8 of them).
 *
 * The vectors are GCC/Clang vector extensions of 8 floats: one AVX/AVX2 register (the lower half
 * of an AVX-512 one), two SSE or NEON registers (-march=native picks). The first version used
 * 16-float vectors: on a machine without AVX-512 (the project's 2-core AMD EPYC with AVX2 only)
 * the compiler split them into pairs and spilled them to the stack in every loop, and the kernel
 * ran 3x slower than SDPA on two threads.
 * Specialised for D in {32, 64, 128} and R in {1, 2, 4, 8} so the loops over D and R unroll;
 * anything else returns 1 and the caller runs its reference instead.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef float v8 __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

static inline v8 load8(const float *p) { v8 v; memcpy(&v, p, sizeof v); return v; }
static inline void store8(float *p, v8 v) { memcpy(p, &v, sizeof v); }

/* the first position row b attends to */
static inline int first_position(const int32_t *starts, const int32_t *lens, int window, int b) {
    int start = starts ? starts[b] : 0;
    if (window > 0 && lens[b] - window > start) start = lens[b] - window;
    return start;
}

/* out[i] = the sum of the 8 lanes of x[i], for i < 8: three levels, each adding lane pairs of two
 * vectors into one (4 + 2 + 1 shuffled adds for 8 sums). */
static inline v8 reduce8(const v8 *x) {
    v8 y[4], w[2];
    for (int j = 0; j < 4; j++)   /* y[j]: even lanes hold x[2j]'s pair sums, odd lanes x[2j+1]'s */
        y[j] = __builtin_shufflevector(x[2*j], x[2*j+1], 0, 8, 2, 10, 4, 12, 6, 14)
             + __builtin_shufflevector(x[2*j], x[2*j+1], 1, 9, 3, 11, 5, 13, 7, 15);
    for (int j = 0; j < 2; j++)   /* w[j]: lane 4h+i holds half h of x[4j+i]'s sum */
        w[j] = __builtin_shufflevector(y[2*j], y[2*j+1], 0, 1, 8, 9, 4, 5, 12, 13)
             + __builtin_shufflevector(y[2*j], y[2*j+1], 2, 3, 10, 11, 6, 7, 14, 15);
    return __builtin_shufflevector(w[0], w[1], 0, 1, 2, 3, 8, 9, 10, 11)
         + __builtin_shufflevector(w[0], w[1], 4, 5, 6, 7, 12, 13, 14, 15);
}

/* e^x for x <= 0 (a score minus the row's maximum): x = n ln2 + r with |r| <= ln2/2, e^r by its
 * Taylor series to r^6 (relative error under 2e-7), times 2^n written into the exponent bits.
 * Below -87, e^x < 2e-38: clamped there, as good as 0 beside the row's largest term, 1. */
static inline v8 vexp(v8 x) {
    const v8i under = x < -87.0f;
    x = (v8)((under & (v8i)((v8){0} - 87.0f)) | (~under & (v8i)x));
    const v8i n = __builtin_convertvector(x * 1.44269504f - 0.5f, v8i);   /* round(x / ln2) */
    const v8 nf = __builtin_convertvector(n, v8);
    const v8 r = (x - nf * 0.693145752f) - nf * 1.42860677e-6f;           /* ln2 in two parts */
    v8 p = (v8){0} + 1.0f / 720;
    p = p * r + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    return (v8)((v8i)p + (n << 23));
}

#define TILE 8   /* tokens scored together: one vector of scores */
#define MIN_PARALLEL_TOKENS 512   /* fewer (rows x longest row) than this: one thread */

typedef struct {
    const float *q, *k, *v;
    const int32_t *tables, *starts, *lens;
    int64_t table_stride, block_stride, token_stride, head_stride;
    float *out;
    int window, Hkv, bs;
    float scale;
} problem_t;

/* row b: out[b] for all its heads; s and offs are this thread's buffers */
static inline __attribute__((always_inline)) void decode_row(const problem_t *P, int b, float *restrict s,
                                                             int64_t *restrict offs, const int D, const int R) {
    const int C = D / 8;                                 /* 8-float chunks of a head */
    const int CG = R >= 8 ? 1 : (8 / R < C ? 8 / R : C); /* chunks per pass 3 sweep: R*CG accumulators */
    const float *restrict q = P->q, *restrict k_pool = P->k, *restrict v_pool = P->v;
    const int32_t *restrict lens = P->lens;
    float *restrict out = P->out;
    const int Hkv = P->Hkv, bs = P->bs;
    const float scale = P->scale;
    const int64_t block_stride = P->block_stride, token_stride = P->token_stride, head_stride = P->head_stride;
    const int L = lens[b];
    const int start = first_position(P->starts, lens, P->window, b);
    const int n = L - start;                         /* tokens attended: positions start .. L-1 */
    if (n <= 0) {                                    /* nothing to attend to: zeros */
        memset(out + (int64_t)b * Hkv * R * D, 0, sizeof(float) * Hkv * R * D);
        return;
    }
    const int np = (n + TILE - 1) / TILE * TILE;
    const int32_t *restrict table = P->tables + b * P->table_stride;
    /* where each attended token's head 0 starts; the tile's tail past n repeats the last one */
    for (int j = 0, blk = start / bs, off = start % bs; j < np; j++) {
        offs[j] = j < n ? (int64_t)table[blk] * block_stride + (int64_t)off * token_stride : offs[j - 1];
        if (++off == bs) {
            off = 0;
            blk++;
        }
    }
    for (int g = 0; g < Hkv; g++) {
        const float *restrict kg = k_pool + (int64_t)g * head_stride;
        const float *restrict vg = v_pool + (int64_t)g * head_stride;
        const float *restrict qg = q + ((int64_t)b * Hkv + g) * R * D;
        float *restrict og = out + ((int64_t)b * Hkv + g) * R * D;
        /* 1. scores s[r][j] of position start + j; each tile asks for the next tile's keys */
        for (int j0 = 0; j0 < np; j0 += TILE) {
            if (j0 + TILE < np)
                for (int i = 0; i < TILE; i++)
                    for (int c = 0; c < D; c += 16) __builtin_prefetch(kg + offs[j0 + TILE + i] + c);
            for (int r = 0; r < R; r++) {
                v8 qr[C];
                for (int c = 0; c < C; c++) qr[c] = load8(qg + r * D + 8 * c) * scale;
                v8 x[TILE];
                for (int i = 0; i < TILE; i++) {
                    const float *key = kg + offs[j0 + i];
                    v8 a = qr[0] * load8(key);
                    for (int c = 1; c < C; c++) a += qr[c] * load8(key + 8 * c);
                    x[i] = a;
                }
                store8(s + (int64_t)r * np + j0, reduce8(x));
            }
        }
        /* 2. softmax of each query head's row; the tile's tail past n weighs 0 */
        for (int r = 0; r < R; r++) {
            float *restrict sr = s + (int64_t)r * np;
            float m = sr[0];
            for (int j = 1; j < n; j++) m = sr[j] > m ? sr[j] : m;
            for (int j = n; j < np; j++) sr[j] = m;
            v8 sum = {0};
            for (int j = 0; j < np; j += 8) {
                v8 e = vexp(load8(sr + j) - m);
                if (j + 8 > n)                       /* zero the lanes past n */
                    for (int i = n - j; i < 8; i++) e[i] = 0.0f;
                store8(sr + j, e);
                sum += e;
            }
            float total = 0.0f;
            for (int i = 0; i < 8; i++) total += sum[i];
            const float inv = 1.0f / total;
            for (int j = 0; j < np; j += 8) store8(sr + j, load8(sr + j) * inv);
        }
        /* 3. out = softmax(scores) V, CG chunks of D at a time */
        for (int c0 = 0; c0 < C; c0 += CG) {
            v8 acc[R][CG];
            for (int r = 0; r < R; r++)
                for (int c = 0; c < CG; c++) acc[r][c] = (v8){0};
            for (int j = 0; j < n; j++) {
                const float *restrict v = vg + offs[j] + 8 * c0;
                for (int c = 0; c < CG; c++) {
                    const v8 vv = load8(v + 8 * c);
                    for (int r = 0; r < R; r++) acc[r][c] += s[(int64_t)r * np + j] * vv;
                }
            }
            for (int r = 0; r < R; r++)
                for (int c = 0; c < CG; c++) store8(og + r * D + 8 * (c0 + c), acc[r][c]);
        }
    }
}

#define VARIANT(DD, RR)                                                                                  \
    static void decode_d##DD##_r##RR(const problem_t *P, int b, float *s, int64_t *offs) {               \
        decode_row(P, b, s, offs, DD, RR);                                                               \
    }
VARIANT(32, 1) VARIANT(32, 2) VARIANT(32, 4) VARIANT(32, 8)
VARIANT(64, 1) VARIANT(64, 2) VARIANT(64, 4) VARIANT(64, 8)
VARIANT(128, 1) VARIANT(128, 2) VARIANT(128, 4) VARIANT(128, 8)

typedef void (*row_fn)(const problem_t *, int, float *, int64_t *);

static row_fn variant(int D, int R) {
#define CASE(DD, RR) if (D == DD && R == RR) return decode_d##DD##_r##RR;
    CASE(32, 1) CASE(32, 2) CASE(32, 4) CASE(32, 8)
    CASE(64, 1) CASE(64, 2) CASE(64, 4) CASE(64, 8)
    CASE(128, 1) CASE(128, 2) CASE(128, 4) CASE(128, 8)
    return NULL;
}

/* 0: done; 1: no variant for this (D, H / Hkv), nothing written; 2: out of memory.
 * starts may be NULL (every row from position 0). Strides are in floats.
 * Rows are shared among the threads of the OpenMP runtime already loaded in the process (PyTorch's:
 * the library names libgomp.so.1, which the dynamic linker resolves to the one PyTorch loaded, so
 * both use one pool of threads and torch.set_num_threads sets both), each thread taking the next
 * row not yet taken. Built without OpenMP, it runs on the calling thread. */
int paged_decode_f32(const float *q, const float *k, const float *v, const int32_t *tables, int64_t table_stride,
                     const int32_t *starts, const int32_t *lens, int window, float *out, int B, int H, int Hkv,
                     int D, int bs, int64_t block_stride, int64_t token_stride, int64_t head_stride, float scale) {
    if (Hkv <= 0 || H % Hkv || bs <= 0) return 1;
    const row_fn fn = variant(D, H / Hkv);
    if (!fn) return 1;
    const problem_t P = {q, k, v, tables, starts, lens, table_stride, block_stride, token_stride, head_stride,
                         out, window, Hkv, bs, scale};
    int longest = 0;
    for (int b = 0; b < B; b++) {
        const int n = lens[b] - first_position(starts, lens, window, b);
        if (n > longest) longest = n;
    }
    const size_t np = (size_t)(longest + TILE - 1) / TILE * TILE + TILE;
    const size_t scores = (size_t)(H / Hkv) * np;
    int next = 0, failed = 0;
#ifdef _OPENMP
#pragma omp parallel if (B > 1 && longest * B >= MIN_PARALLEL_TOKENS)
#endif
    {
        float *s = malloc(sizeof(float) * scores);
        int64_t *offs = malloc(sizeof(int64_t) * np);
        if (!s || !offs)
            __atomic_store_n(&failed, 1, __ATOMIC_RELAXED);
        else
            for (int b; (b = __atomic_fetch_add(&next, 1, __ATOMIC_RELAXED)) < B;)
                fn(&P, b, s, offs);
        free(s);
        free(offs);
    }
    return failed ? 2 : 0;
}
