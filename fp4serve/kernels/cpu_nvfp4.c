#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

/* Built once per CPU level with that level's flags (cpu_build.py LEVEL_CFLAGS): AVX-512 (with or
   without avx512_bf16), AVX2 + FMA + F16C, or portable C. Each path gives the same weights. */
#if defined(__AVX512F__)
#define KERNEL_ISA "avx512"
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define KERNEL_ISA "avx2"
#define AVX2_PATH 1
#else
#define KERNEL_ISA "scalar"
#endif
#ifndef AVX2_PATH
#define AVX2_PATH 0
#endif

static const float E2M1[16] = {0.f, .5f, 1.f, 1.5f, 2.f, 3.f, 4.f, 6.f,
                               -0.f, -.5f, -1.f, -1.5f, -2.f, -3.f, -4.f, -6.f};

/* fp32 -> bf16 round to nearest even, as c10::BFloat16 does (NaN kept NaN). */
static inline uint32_t bf16_bits(float v) {
    uint32_t u;
    memcpy(&u, &v, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0u;
    return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
}

#ifdef __AVX512F__
static inline __m512 round_bf16_lanes(__m512 w) {
    __m512i u = _mm512_castps_si512(w);
    __m512i bias = _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)),
                                    _mm512_set1_epi32(0x7fff));
    return _mm512_castsi512_ps(_mm512_and_si512(_mm512_add_epi32(u, bias), _mm512_set1_epi32((int)0xffff0000u)));
}

/* One block of 16 weights in element order: codes -> E2M1 values by a 16-lane permute, times the
   block scale, optionally rounded to bf16 (kept in fp32 lanes). */
static inline __m512 decode_block(const uint8_t *p, float scale, int round_bf16) {
    const __m512 lut = _mm512_loadu_ps(E2M1);
    const __m512i shifts = _mm512_set_epi32(4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0);
    __m128i bytes = _mm_loadl_epi64((const __m128i *)p);
    bytes = _mm_unpacklo_epi8(bytes, bytes); /* each byte twice: low nibble, then high nibble */
    __m512i codes = _mm512_srlv_epi32(_mm512_cvtepu8_epi32(bytes), shifts); /* permute reads 4 low bits */
    __m512 w = _mm512_mul_ps(_mm512_permutexvar_ps(codes, lut), _mm512_set1_ps(scale));
    return round_bf16 ? round_bf16_lanes(w) : w;
}

static inline __m512 load_x16(const void *x, int x_bf16) {
    if (!x_bf16) return _mm512_loadu_ps((const float *)x);
    __m512i h = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)x));
    return _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
}
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define GROUPED 1
/* bf16 bits of each code's E2M1 value, twice: vpermw indexes with 5 bits, so a whole byte b
   reads the value of its low nibble b & 15 without masking. */
static const uint16_t E2M1_BF16[32] = {
    0x0000, 0x3f00, 0x3f80, 0x3fc0, 0x4000, 0x4040, 0x4080, 0x40c0,
    0x8000, 0xbf00, 0xbf80, 0xbfc0, 0xc000, 0xc040, 0xc080, 0xc0c0,
    0x0000, 0x3f00, 0x3f80, 0x3fc0, 0x4000, 0x4040, 0x4080, 0x40c0,
    0x8000, 0xbf00, 0xbf80, 0xbfc0, 0xc000, 0xc040, 0xc080, 0xc0c0};

/* 64 weights (4 blocks, 32 bytes) -> 4 vectors of 16 scaled fp32 weights. Not in element order:
   lane k of vector i holds element 4 k + i (so lanes 4 l .. 4 l + 3 hold block l), and x is laid
   out to match (kernel_position below); the products with x do not care about the order. */
static inline void decode_group(const uint8_t *p, const float *scales, __m512 w[4]) {
    const __m512i lut = _mm512_loadu_si512(E2M1_BF16);
    const __m512i high = _mm512_set1_epi32((int)0xffff0000u);
    const __m512i lanes = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    __m512 scale = _mm512_permutexvar_ps(lanes, _mm512_castps128_ps512(_mm_loadu_ps(scales)));
    __m512i bytes = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)p));
    /* word j: bf16 value of element 2 j (even) or 2 j + 1 (odd) */
    __m512i even = _mm512_permutexvar_epi16(bytes, lut);
    __m512i odd = _mm512_permutexvar_epi16(_mm512_srli_epi16(bytes, 4), lut);
    /* bf16 -> fp32 is a 16-bit shift: the low word of each 32-bit lane by a shift, the high by a mask. */
    w[0] = _mm512_mul_ps(_mm512_castsi512_ps(_mm512_slli_epi32(even, 16)), scale);
    w[1] = _mm512_mul_ps(_mm512_castsi512_ps(_mm512_slli_epi32(odd, 16)), scale);
    w[2] = _mm512_mul_ps(_mm512_castsi512_ps(_mm512_and_si512(even, high)), scale);
    w[3] = _mm512_mul_ps(_mm512_castsi512_ps(_mm512_and_si512(odd, high)), scale);
}
#else
#define GROUPED 0
#endif

#if GROUPED && defined(__AVX512BF16__)
#define BF16_DOT 1
/* bf16 activations: weights rounded to bf16 (as the reference does) and multiplied 32 at a time. */
#define GROUP_LOOP_BF16(MT)                                                                          \
    if (x_bf16)                                                                                      \
        for (; k + 64 <= K; k += 64) {                                                               \
            __m512 w[4];                                                                             \
            decode_group(p + k / 2, s + k / 16, w);                                                  \
            __m512bh w01 = _mm512_cvtne2ps_pbh(w[1], w[0]), w23 = _mm512_cvtne2ps_pbh(w[3], w[2]);   \
            for (int i = 0; i < MT; i++) {                                                           \
                const uint16_t *xi = (const uint16_t *)x + i * K + k;                                \
                acc[i] = _mm512_dpbf16_ps(acc[i], w01, (__m512bh)_mm512_loadu_si512(xi));            \
                acc2[i] = _mm512_dpbf16_ps(acc2[i], w23, (__m512bh)_mm512_loadu_si512(xi + 32));     \
            }                                                                                        \
        }
#else
#define BF16_DOT 0
#define GROUP_LOOP_BF16(MT)
#endif

#if GROUPED
#define GROUP_LOOP(MT)                                                                               \
    GROUP_LOOP_BF16(MT)                                                                              \
    if (!x_bf16)                                                                                     \
        for (; k + 64 <= K; k += 64) {                                                               \
            __m512 w[4];                                                                             \
            decode_group(p + k / 2, s + k / 16, w);                                                  \
            if (round_bf16)                                                                          \
                for (int j = 0; j < 4; j++) w[j] = round_bf16_lanes(w[j]);                           \
            for (int i = 0; i < MT; i++) {                                                           \
                const float *xi = (const float *)x + i * K + k;                                      \
                acc[i] = _mm512_fmadd_ps(w[0], _mm512_loadu_ps(xi), acc[i]);                         \
                acc2[i] = _mm512_fmadd_ps(w[1], _mm512_loadu_ps(xi + 16), acc2[i]);                  \
                acc[i] = _mm512_fmadd_ps(w[2], _mm512_loadu_ps(xi + 32), acc[i]);                    \
                acc2[i] = _mm512_fmadd_ps(w[3], _mm512_loadu_ps(xi + 48), acc2[i]);                  \
            }                                                                                        \
        }
#else
#define GROUP_LOOP(MT)
#endif

#ifdef __AVX512F__
/* MT rows of x against one weight row p (scales s): full groups of 64, then single blocks. */
#define DEFINE_ROW_DOT(MT)                                                                           \
static void row_dot_##MT(const uint8_t *p, const float *s, const void *x, int x_bf16, int64_t K,    \
                         float *out, int round_bf16) {                                               \
    __m512 acc[MT], acc2[MT]; /* two chains per row: the adds' latency, not their count, bounds M = 1 */ \
    for (int i = 0; i < MT; i++) acc[i] = acc2[i] = _mm512_setzero_ps();                             \
    int64_t k = 0;                                                                                   \
    GROUP_LOOP(MT)                                                                                   \
    for (; k < K; k += 16) {                                                                         \
        __m512 w = decode_block(p + k / 2, s[k / 16], round_bf16);                                   \
        for (int i = 0; i < MT; i++)                                                                 \
            acc[i] = _mm512_fmadd_ps(w, load_x16((const char *)x + (i * K + k) * (x_bf16 ? 2 : 4), x_bf16), acc[i]); \
    }                                                                                                \
    for (int i = 0; i < MT; i++) out[i] = _mm512_reduce_add_ps(_mm512_add_ps(acc[i], acc2[i]));      \
}
#elif AVX2_PATH
/* 2 x E2M1 as int8, by code: pshufb turns 32 codes into these in one instruction. Twice the value
   keeps 1.5 and 0.5 integral; the row sum is halved at the end, which is exact (a power of two),
   so the products are the reference weight's, doubled. */
static const int8_t E2M1_TWICE[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};

static inline float hsum256(__m256 v) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}

static inline __m256 round_bf16_lanes(__m256 w) {
    __m256i u = _mm256_castps_si256(w);
    __m256i bias = _mm256_add_epi32(_mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1)),
                                    _mm256_set1_epi32(0x7fff));
    return _mm256_castsi256_ps(_mm256_and_si256(_mm256_add_epi32(u, bias), _mm256_set1_epi32((int)0xffff0000u)));
}

/* 8 int8 (2 x E2M1) -> 8 fp32 weights times 2, scaled, optionally rounded to bf16. */
static inline __m256 twice_weights(__m128i q8, __m256 scale, int round_bf16) {
    __m256 w = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q8)), scale);
    return round_bf16 ? round_bf16_lanes(w) : w;
}

/* Chains of independent adds per row of x: one row needs 4 to hide the FMA latency, 8 rows have
   8 already (and 16 ymm registers in all). */
#define CHAINS(MT) ((MT) <= 2 ? 4 : (MT) <= 4 ? 2 : 1)

/* x is in block order (kernel_position below): in each block of 16, the 8 even elements, then the 8
   odd ones, matching the low and high nibbles of the block's 8 bytes. */
#define DEFINE_ROW_DOT(MT)                                                                           \
static void row_dot_##MT(const uint8_t *p, const float *s, const void *x, int x_bf16, int64_t K,    \
                         float *out, int round_bf16) {                                               \
    const float *xf = (const float *)x;                                                              \
    const __m256i lut = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)E2M1_TWICE));   \
    const __m256i nibble = _mm256_set1_epi8(0x0f);                                                   \
    __m256 acc[MT][4];                                                                               \
    (void)x_bf16; /* always fp32 here */                                                             \
    for (int i = 0; i < MT; i++)                                                                     \
        for (int c = 0; c < 4; c++) acc[i][c] = _mm256_setzero_ps();                                 \
    int64_t k = 0;                                                                                   \
    for (; k + 64 <= K; k += 64) {                                                                   \
        __m256i bytes = _mm256_loadu_si256((const __m256i *)(p + k / 2));                            \
        __m256i even = _mm256_shuffle_epi8(lut, _mm256_and_si256(bytes, nibble));                    \
        __m256i odd = _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(bytes, 4), nibble)); \
        __m128i halves[4] = {_mm256_castsi256_si128(even), _mm256_castsi256_si128(odd),             \
                             _mm256_extracti128_si256(even, 1), _mm256_extracti128_si256(odd, 1)};   \
        _Pragma("GCC unroll 4")                                                                      \
        for (int b = 0; b < 4; b++) { /* block b: bytes 8 b .. 8 b + 7 */                            \
            __m256 scale = _mm256_broadcast_ss(s + k / 16 + b);                                      \
            __m128i e = halves[(b / 2) * 2], o = halves[(b / 2) * 2 + 1];                            \
            if (b & 1) e = _mm_srli_si128(e, 8), o = _mm_srli_si128(o, 8);                           \
            __m256 we = twice_weights(e, scale, round_bf16), wo = twice_weights(o, scale, round_bf16); \
            for (int i = 0; i < MT; i++) {                                                           \
                const float *xi = xf + i * K + k + 16 * b;                                           \
                int c = (2 * b) % CHAINS(MT);                                                        \
                acc[i][c] = _mm256_fmadd_ps(we, _mm256_loadu_ps(xi), acc[i][c]);                      \
                acc[i][(c + 1) % CHAINS(MT)] =                                                       \
                    _mm256_fmadd_ps(wo, _mm256_loadu_ps(xi + 8), acc[i][(c + 1) % CHAINS(MT)]);      \
            }                                                                                        \
        }                                                                                            \
    }                                                                                                \
    for (; k < K; k += 16) {                                                                         \
        __m128i bytes = _mm_loadl_epi64((const __m128i *)(p + k / 2));                               \
        const __m128i lut8 = _mm256_castsi256_si128(lut), nib8 = _mm256_castsi256_si128(nibble);    \
        __m128i e = _mm_shuffle_epi8(lut8, _mm_and_si128(bytes, nib8));                              \
        __m128i o = _mm_shuffle_epi8(lut8, _mm_and_si128(_mm_srli_epi16(bytes, 4), nib8));           \
        __m256 scale = _mm256_broadcast_ss(s + k / 16);                                              \
        __m256 we = twice_weights(e, scale, round_bf16), wo = twice_weights(o, scale, round_bf16);   \
        for (int i = 0; i < MT; i++) {                                                               \
            acc[i][0] = _mm256_fmadd_ps(we, _mm256_loadu_ps(xf + i * K + k), acc[i][0]);              \
            acc[i][1 % CHAINS(MT)] = _mm256_fmadd_ps(wo, _mm256_loadu_ps(xf + i * K + k + 8), acc[i][1 % CHAINS(MT)]); \
        }                                                                                            \
    }                                                                                                \
    for (int i = 0; i < MT; i++) {                                                                   \
        __m256 sum = acc[i][0];                                                                      \
        for (int c = 1; c < CHAINS(MT); c++) sum = _mm256_add_ps(sum, acc[i][c]);                    \
        out[i] = 0.5f * hsum256(sum);                                                                \
    }                                                                                                \
}

/* One block of 16 weights in element order, exactly the reference's e2m1 * scale (signed zeros
   too): magnitudes by an 8-entry permute, the sign bit moved in from the code. */
static inline void decode_block_exact(const uint8_t *p, float scale, __m256 w[2]) {
    const __m256 magnitudes = _mm256_loadu_ps(E2M1);
    __m128i bytes = _mm_loadl_epi64((const __m128i *)p);
    __m128i codes = _mm_unpacklo_epi8(_mm_and_si128(bytes, _mm_set1_epi8(0x0f)),
                                      _mm_and_si128(_mm_srli_epi16(bytes, 4), _mm_set1_epi8(0x0f)));
    for (int h = 0; h < 2; h++) {
        __m256i c = _mm256_cvtepu8_epi32(h ? _mm_srli_si128(codes, 8) : codes);
        __m256 m = _mm256_mul_ps(_mm256_permutevar8x32_ps(magnitudes, c), _mm256_set1_ps(scale));
        __m256i sign = _mm256_and_si256(_mm256_slli_epi32(c, 28), _mm256_set1_epi32((int)0x80000000u));
        w[h] = _mm256_xor_ps(m, _mm256_castsi256_ps(sign));
    }
}
#else
static inline void decode_block(const uint8_t *p, float scale, int round_bf16, float *w) {
    for (int i = 0; i < 8; i++) {
        w[2 * i] = E2M1[p[i] & 15] * scale;
        w[2 * i + 1] = E2M1[p[i] >> 4] * scale;
    }
    if (round_bf16)
        for (int i = 0; i < 16; i++) {
            uint32_t u = bf16_bits(w[i]) << 16;
            memcpy(&w[i], &u, 4);
        }
}

#define DEFINE_ROW_DOT(MT)                                                                           \
static void row_dot_##MT(const uint8_t *p, const float *s, const void *x, int x_bf16, int64_t K,    \
                         float *out, int round_bf16) {                                               \
    float acc[MT][16] = {{0}};                                                                       \
    float w[16];                                                                                     \
    (void)x_bf16; /* always fp32 here */                                                             \
    for (int64_t k = 0; k < K; k += 16) {                                                            \
        decode_block(p + k / 2, s[k / 16], round_bf16, w);                                           \
        for (int i = 0; i < MT; i++)                                                                 \
            for (int j = 0; j < 16; j++) acc[i][j] += w[j] * ((const float *)x)[i * K + k + j];      \
    }                                                                                                \
    for (int i = 0; i < MT; i++) {                                                                   \
        float sum = 0.f;                                                                             \
        for (int j = 0; j < 16; j++) sum += acc[i][j];                                               \
        out[i] = sum;                                                                                \
    }                                                                                                \
}
#endif

DEFINE_ROW_DOT(1) DEFINE_ROW_DOT(2) DEFINE_ROW_DOT(3) DEFINE_ROW_DOT(4)
DEFINE_ROW_DOT(5) DEFINE_ROW_DOT(6) DEFINE_ROW_DOT(7) DEFINE_ROW_DOT(8)

/* Block scales of one weight row: fp32(e4m3 * g), the reference's product. */
static void row_scales(const uint8_t *sc, int64_t blocks, const float *table, float g, float *s) {
    int64_t b = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
    /* e4m3 bits moved into fp16 fields are the value times 2^-8, exactly (subnormals too); times
       256 is exact again, so the one rounding is that of the product with g. 0x7f/0xff are NaN. */
    const __m512 nan = _mm512_set1_ps(__builtin_nanf(""));
    for (; b + 16 <= blocks; b += 16) {
        __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(sc + b)));
        __m256i magnitude = _mm256_and_si256(v, _mm256_set1_epi16(0x7f));
        __m256i half = _mm256_or_si256(_mm256_slli_epi16(_mm256_and_si256(v, _mm256_set1_epi16(0x80)), 8),
                                       _mm256_slli_epi16(magnitude, 7));
        __m512 value = _mm512_mul_ps(_mm512_cvtph_ps(half), _mm512_set1_ps(256.f));
        value = _mm512_mask_blend_ps(_mm256_cmpeq_epi16_mask(magnitude, _mm256_set1_epi16(0x7f)), value, nan);
        _mm512_storeu_ps(s + b, _mm512_mul_ps(value, _mm512_set1_ps(g)));
    }
#elif AVX2_PATH
    /* The same fp16 reading of e4m3 bits, 8 scales at a time through F16C. */
    for (; b + 8 <= blocks; b += 8) {
        __m128i v = _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)(sc + b)));
        __m128i magnitude = _mm_and_si128(v, _mm_set1_epi16(0x7f));
        __m128i half = _mm_or_si128(_mm_slli_epi16(_mm_and_si128(v, _mm_set1_epi16(0x80)), 8), _mm_slli_epi16(magnitude, 7));
        __m256 value = _mm256_mul_ps(_mm256_cvtph_ps(half), _mm256_set1_ps(256.f));
        __m256i is_nan = _mm256_cvtepi16_epi32(_mm_cmpeq_epi16(magnitude, _mm_set1_epi16(0x7f)));
        value = _mm256_blendv_ps(value, _mm256_set1_ps(__builtin_nanf("")), _mm256_castsi256_ps(is_nan));
        _mm256_storeu_ps(s + b, _mm256_mul_ps(value, _mm256_set1_ps(g)));
    }
#endif
    for (; b < blocks; b++) s[b] = table[sc[b]] * g;
}

typedef void (*row_dot_fn)(const uint8_t *, const float *, const void *, int, int64_t, float *, int);
static const row_dot_fn ROW_DOT[9] = {0, row_dot_1, row_dot_2, row_dot_3, row_dot_4,
                                      row_dot_5, row_dot_6, row_dot_7, row_dot_8};

#if BF16_DOT
/* Two weight rows against MT rows of bf16 x: each x load feeds both rows (loads, not multiplies,
   bound the single-row loop once several rows of x share the decoded weights). */
#define DEFINE_PAIR_DOT(MT)                                                                          \
static void pair_dot_##MT(const uint8_t *p0, const uint8_t *p1, const float *s0, const float *s1,   \
                          const uint16_t *x, int64_t K, float *out0, float *out1) {                  \
    __m512 a0[MT], a1[MT];                                                                           \
    for (int i = 0; i < MT; i++) a0[i] = a1[i] = _mm512_setzero_ps();                                \
    int64_t k = 0;                                                                                   \
    for (; k + 64 <= K; k += 64) {                                                                   \
        __m512 w[4], v[4];                                                                           \
        decode_group(p0 + k / 2, s0 + k / 16, w);                                                    \
        decode_group(p1 + k / 2, s1 + k / 16, v);                                                    \
        __m512bh w01 = _mm512_cvtne2ps_pbh(w[1], w[0]), w23 = _mm512_cvtne2ps_pbh(w[3], w[2]);       \
        __m512bh v01 = _mm512_cvtne2ps_pbh(v[1], v[0]), v23 = _mm512_cvtne2ps_pbh(v[3], v[2]);       \
        for (int i = 0; i < MT; i++) {                                                               \
            __m512bh xa = (__m512bh)_mm512_loadu_si512(x + i * K + k);                               \
            __m512bh xb = (__m512bh)_mm512_loadu_si512(x + i * K + k + 32);                          \
            a0[i] = _mm512_dpbf16_ps(_mm512_dpbf16_ps(a0[i], w01, xa), w23, xb);                     \
            a1[i] = _mm512_dpbf16_ps(_mm512_dpbf16_ps(a1[i], v01, xa), v23, xb);                     \
        }                                                                                            \
    }                                                                                                \
    for (; k < K; k += 16) {                                                                         \
        __m512 w = decode_block(p0 + k / 2, s0[k / 16], 1), v = decode_block(p1 + k / 2, s1[k / 16], 1); \
        for (int i = 0; i < MT; i++) {                                                               \
            __m512 xi = load_x16(x + i * K + k, 1);                                                  \
            a0[i] = _mm512_fmadd_ps(w, xi, a0[i]);                                                   \
            a1[i] = _mm512_fmadd_ps(v, xi, a1[i]);                                                   \
        }                                                                                            \
    }                                                                                                \
    for (int i = 0; i < MT; i++) {                                                                   \
        out0[i] = _mm512_reduce_add_ps(a0[i]);                                                       \
        out1[i] = _mm512_reduce_add_ps(a1[i]);                                                       \
    }                                                                                                \
}
DEFINE_PAIR_DOT(1) DEFINE_PAIR_DOT(2) DEFINE_PAIR_DOT(3) DEFINE_PAIR_DOT(4)
DEFINE_PAIR_DOT(5) DEFINE_PAIR_DOT(6) DEFINE_PAIR_DOT(7) DEFINE_PAIR_DOT(8)
typedef void (*pair_dot_fn)(const uint8_t *, const uint8_t *, const float *, const float *, const uint16_t *,
                            int64_t, float *, float *);
static const pair_dot_fn PAIR_DOT[9] = {0, pair_dot_1, pair_dot_2, pair_dot_3, pair_dot_4,
                                        pair_dot_5, pair_dot_6, pair_dot_7, pair_dot_8};
#endif

/* Weight rows are read one after another, each a few hundred bytes in two arrays (codes and
   scales): asking for a row a few ahead keeps the memory system busy across the row switches,
   which the hardware prefetchers alone do not (measured: 10 -> GB/s with 2 threads). */
#define PREFETCH_ROWS 8
static inline void prefetch_row(const uint8_t *packed, const uint8_t *scales, int64_t n, int64_t N, int64_t K) {
    if (n >= N) return;
    const char *p = (const char *)(packed + n * (K / 2));
    for (int64_t b = 0; b < K / 2; b += 64) __builtin_prefetch(p + b, 0, 0);
    __builtin_prefetch(scales + n * (K / 16), 0, 0);
}

/* 1: x may be passed as bf16 (then weights are rounded to bf16 and multiplied by vdpbf16ps). */
int nvfp4_bf16_dot(void) { return BF16_DOT; }

/* The instruction set this build's paths use: "avx512", "avx2" or "scalar". */
const char *nvfp4_kernel_isa(void) { return KERNEL_ISA; }

/* Where element e (of K) of a row of x goes in the order this build's row dot reads: AVX-512, in
   each full group of 64 position 16 i + k holds element 4 k + i (decode_group's lanes; the tail,
   K % 64, stays in element order); AVX2, in each block of 16 the 8 even elements, then the 8 odd
   ones (the low and high nibbles of the block's bytes); portable C, element order. */
static inline int64_t kernel_position(int64_t e, int64_t K) {
#if GROUPED
    int64_t base = e - e % 64, within = e % 64;
    return base + 64 <= K ? base + 16 * (within % 4) + within / 4 : e;
#elif AVX2_PATH
    int64_t base = e - e % 16, within = e % 16;
    (void)K;
    return base + (within % 2) * 8 + within / 2;
#else
    (void)K;
    return e;
#endif
}

/* M rows of x (fp32, or bf16 bits when x_bf16) into out (bf16 bits when out_bf16, rounded to
   nearest even, else fp32), in the row dot's order when kernel_order, else element order. */
static void order_rows(const void *x, int x_bf16, void *out, int out_bf16, int64_t M, int64_t K, int kernel_order) {
    for (int64_t m = 0; m < M; m++)
        for (int64_t e = 0; e < K; e++) {
            float v;
            if (x_bf16) {
                uint32_t u = (uint32_t)((const uint16_t *)x)[m * K + e] << 16;
                memcpy(&v, &u, 4);
            } else {
                v = ((const float *)x)[m * K + e];
            }
            int64_t at = m * K + (kernel_order ? kernel_position(e, K) : e);
            if (out_bf16) ((uint16_t *)out)[at] = (uint16_t)bf16_bits(v);
            else ((float *)out)[at] = v;
        }
}

/* y[M, N] (fp32) = x[M, K] @ W^T with W decoded block by block, never stored. x is fp32, or bf16
   when x_bf16 (only if nvfp4_bf16_dot()); round_bf16 rounds each weight to bf16 first.
   Returns 0, or -1 when out of memory. */
int nvfp4_gemv(const uint8_t *packed, const uint8_t *scales, const float *table, const float *g, int64_t g_stride,
               const void *x_in, int x_bf16, float *y, int64_t M, int64_t N, int64_t K, int round_bf16,
               int threads) {
    const int elem = x_bf16 ? 2 : 4;
    const void *x = x_in;
    if (GROUPED || AVX2_PATH) {
        void *ordered = malloc(M * K * elem);
        if (!ordered) return -1;
        order_rows(x_in, x_bf16, ordered, x_bf16, M, K, 1);
        x = ordered;
    }
#if BF16_DOT
    if (x_bf16 && M > 1) {
        #pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t n = 0; n < N - 1; n += 2) {
            float s0[K / 16], s1[K / 16], out0[8], out1[8];
            row_scales(scales + n * (K / 16), K / 16, table, g[n * g_stride], s0);
            row_scales(scales + (n + 1) * (K / 16), K / 16, table, g[(n + 1) * g_stride], s1);
            for (int64_t m0 = 0; m0 < M; m0 += 8) {
                int mt = M - m0 < 8 ? (int)(M - m0) : 8;
                PAIR_DOT[mt](packed + n * (K / 2), packed + (n + 1) * (K / 2), s0, s1, (const uint16_t *)x + m0 * K,
                             K, out0, out1);
                for (int i = 0; i < mt; i++) {
                    y[(m0 + i) * N + n] = out0[i];
                    y[(m0 + i) * N + n + 1] = out1[i];
                }
            }
        }
    }
    /* the rest: all rows, or the last row of an odd N */
    const int64_t first = x_bf16 && M > 1 && BF16_DOT ? N - N % 2 : 0;
#else
    const int64_t first = 0;
#endif
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = first; n < N; n++) {
        float s[K / 16], out[8];
        prefetch_row(packed, scales, n + PREFETCH_ROWS, N, K);
        row_scales(scales + n * (K / 16), K / 16, table, g[n * g_stride], s);
        for (int64_t m0 = 0; m0 < M; m0 += 8) {
            int mt = M - m0 < 8 ? (int)(M - m0) : 8;
            ROW_DOT[mt](packed + n * (K / 2), s, (const char *)x + m0 * K * elem, x_bf16, K, out, round_bf16);
            for (int i = 0; i < mt; i++) y[(m0 + i) * N + n] = out[i];
        }
    }
    if (x != x_in) free((void *)x);
    return 0;
}

/* Rows [0, N) of W into out in element order: bf16 bits (uint16) when out_bf16, else fp32. */
void nvfp4_dequantize(const uint8_t *packed, const uint8_t *scales, const float *table, const float *g, int64_t g_stride,
                      void *out, int64_t N, int64_t K, int out_bf16, int threads) {
#if BF16_DOT
    /* bf16 words of decode_group's vectors back in element order: output word e of a group of 64
       comes from vector e % 4, lane e / 4; pairs (w0, w1) and (w2, w3) are packed by cvtne2ps. */
    uint16_t natural[64];
    for (int e = 0; e < 64; e++) natural[e] = (uint16_t)((e % 4 >= 2 ? 32 : 0) + (e % 2) * 16 + e / 4);
    const __m512i first = _mm512_loadu_si512(natural), second = _mm512_loadu_si512(natural + 32);
#endif
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        int64_t b = 0;
#if BF16_DOT
        if (out_bf16) {
            float s[K / 16];
            row_scales(scales + n * (K / 16), K / 16, table, g[n * g_stride], s);
            for (; b + 4 <= K / 16; b += 4) {
                __m512 w[4];
                decode_group(packed + n * (K / 2) + 8 * b, s + b, w);
                __m512i lo = (__m512i)_mm512_cvtne2ps_pbh(w[1], w[0]), hi = (__m512i)_mm512_cvtne2ps_pbh(w[3], w[2]);
                uint16_t *dst = (uint16_t *)out + n * K + 16 * b;
                _mm512_storeu_si512(dst, _mm512_permutex2var_epi16(lo, first, hi));
                _mm512_storeu_si512(dst + 32, _mm512_permutex2var_epi16(lo, second, hi));
            }
        }
#endif
        for (; b < K / 16; b++) {
            const uint8_t *p = packed + n * (K / 2) + 8 * b;
            float scale = table[scales[n * (K / 16) + b]] * g[n * g_stride];
#ifdef __AVX512F__
            __m512 w = decode_block(p, scale, out_bf16);
            if (out_bf16)
                _mm256_storeu_si256((__m256i *)((uint16_t *)out + n * K + 16 * b),
                                    _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(w), 16)));
            else
                _mm512_storeu_ps((float *)out + n * K + 16 * b, w);
#elif AVX2_PATH
            __m256 w[2];
            decode_block_exact(p, scale, w);
            if (out_bf16) {
                __m256i lo = _mm256_srli_epi32(_mm256_castps_si256(round_bf16_lanes(w[0])), 16);
                __m256i hi = _mm256_srli_epi32(_mm256_castps_si256(round_bf16_lanes(w[1])), 16);
                /* packus works per 128-bit lane: put the four 64-bit quarters back in order */
                __m256i words = _mm256_permute4x64_epi64(_mm256_packus_epi32(lo, hi), 0xd8);
                _mm256_storeu_si256((__m256i *)((uint16_t *)out + n * K + 16 * b), words);
            } else {
                _mm256_storeu_ps((float *)out + n * K + 16 * b, w[0]);
                _mm256_storeu_ps((float *)out + n * K + 16 * b + 8, w[1]);
            }
#else
            float w[16];
            decode_block(p, scale, 0, w);
            for (int j = 0; j < 16; j++) {
                if (out_bf16) ((uint16_t *)out)[n * K + 16 * b + j] = (uint16_t)bf16_bits(w[j]);
                else ((float *)out)[n * K + 16 * b + j] = w[j];
            }
#endif
        }
    }
}
