// bf16 GEMM on AMX tiles with a fused epilogue, for the linear layers of CPU inference.
//
// C = epilogue(A[M, K] W[N, K]^T + bias), A and C bf16 with row strides lda and ldc, the
// products and the epilogue in fp32, C rounded to bf16 once:
//   LDM_GEMM_PLAIN   C [M, N]     = A W^T + bias
//   LDM_GEMM_GEGLU   C [M, N / 2] = (A Wv^T + bv) * gelu(A Wg^T + bg), W = [Wv; Wg] (GEGLU,
//                    Shazeer 2020; gelu the exact erf form, as F.gelu)
// W is packed once (ldm_gemm_pack) into blocks of 32 columns: [N/32][K/32][2 tiles][16 k-pairs]
// [16 columns][2] (VNNI pairs along k), zero padded. For GEGLU block j holds value columns
// 16j..16j+15 in its first tile and the matching gate columns in its second, so one 32 x 32
// block of products is 16 finished output columns and the [M, N] product never exists.
// A 32 x 32 block is four accumulator tiles over the whole K (two tiles of A loaded in place,
// two of W from the pack), stored to a 4 KB fp32 buffer and finished on AVX-512; the epilogue
// of one block is finished a few rows at a time between the tile products of the next, so the
// two run side by side.
// 3x3 convolutions (ldm_conv3x3) are the same loop as an implicit GEMM: A is a zero-padded NHWC
// input, a tile 16 neighbouring output pixels of one image row at one tap, K taps x channels.
// Built and loaded at run time by ldmkit.accel.native; called from ldmkit.accel.amx_gemm.
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#include "amx_common.h"
#include "flash_common.h"

enum { LDM_GEMM_PLAIN = 0, LDM_GEMM_GEGLU = 1 };

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// Elements (bf16) of the pack of an [N, K] weight.
int64_t ldm_gemm_pack_size(int64_t N, int64_t K) { return round_up(N, 32) * round_up(K, 32); }

// Packs w [N, K] (row stride ldw) for `epilogue` (GEGLU: N even, value rows [0, N/2), gate
// rows [N/2, N)).
void ldm_gemm_pack(const uint16_t *w, int64_t N, int64_t K, int64_t ldw, int epilogue,
                   uint16_t *wp) {
  const int64_t nb = round_up(N, 32) / 32, kc = round_up(K, 32) / 32, half = N / 2;
  for (int64_t j = 0; j < nb; j++)
    for (int64_t c = 0; c < kc; c++)
      for (int64_t t = 0; t < 2; t++) {
        uint16_t *tile = wp + ((j * kc + c) * 2 + t) * 512;
        for (int64_t col = 0; col < 16; col++) {
          int64_t n;  // the row of w behind this tile column, -1 for padding
          if (epilogue == LDM_GEMM_GEGLU) {
            const int64_t o = j * 16 + col;  // output column
            n = o < half ? o + t * half : -1;
          } else {
            n = j * 32 + t * 16 + col < N ? j * 32 + t * 16 + col : -1;
          }
          for (int64_t p = 0; p < 16; p++)
            for (int64_t e = 0; e < 2; e++) {
              const int64_t k = c * 32 + 2 * p + e;
              tile[(p * 16 + col) * 2 + e] = (n >= 0 && k < K) ? w[n * ldw + k] : 0;
            }
        }
      }
}

// gelu(x) = x/2 (1 + erf(x / sqrt 2)); erf from Abramowitz & Stegun 7.1.26 (absolute error
// <= 1.5e-7): erf|z| = 1 - t (a1 + t (a2 + ...)) exp(-z^2), t = 1 / (1 + p |z|).
static inline __m512 gelu_ps(__m512 x) {
  const __m512 z = _mm512_mul_ps(x, _mm512_set1_ps(0.7071067811865476f));
  const __m512 az = _mm512_abs_ps(z);
  // t: 14-bit reciprocal and one Newton step (a division is several times slower)
  const __m512 d = _mm512_fmadd_ps(az, _mm512_set1_ps(0.3275911f), _mm512_set1_ps(1.0f));
  const __m512 r = _mm512_rcp14_ps(d);
  const __m512 t = _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.0f)));
  __m512 p = _mm512_set1_ps(1.061405429f);
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-1.453152027f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.421413741f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-0.284496736f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.254829592f));
  p = _mm512_mul_ps(p, t);
  const __m512 e = exp2_ps(_mm512_mul_ps(_mm512_mul_ps(az, az), _mm512_set1_ps(-1.4426950408889634f)), 5);
  const __m512 erf_abs = _mm512_fnmadd_ps(p, e, _mm512_set1_ps(1.0f));
  // 1 + erf(z) = 1 + erf|z| for z >= 0, 1 - erf|z| otherwise
  const __mmask16 neg = _mm512_cmp_ps_mask(z, _mm512_setzero_ps(), _CMP_LT_OQ);
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 s = _mm512_mask_sub_ps(_mm512_add_ps(one, erf_abs), neg, one, erf_abs);
  return _mm512_mul_ps(_mm512_mul_ps(x, _mm512_set1_ps(0.5f)), s);
}

typedef struct {
  const uint16_t *a, *wp;
  const float *bias;  // [N] fp32 or NULL
  uint16_t *c;
  int64_t M, N, K, lda, ldc;
  int epilogue;
  // 3x3 convolutions (H > 0): a is the zero-padded NHWC input [B, H + 2, W + 2, C], rows of
  // C are output pixels, and K runs over the nine taps, C channels each (C % 32 == 0).
  int64_t H, W, C;
} gemm_args;

// acc [32][32] fp32 products -> rows r0 + a .. r0 + b of C for column block j.
static void finish(const gemm_args *g, const float *acc, int64_t r0, int64_t a, int64_t b,
                   int64_t j) {
  if (g->epilogue == LDM_GEMM_GEGLU) {
    const int64_t half = g->N / 2, o0 = j * 16;
    const __mmask16 m = first_n16(half - o0);
    const __m512 bv = g->bias ? _mm512_maskz_loadu_ps(m, g->bias + o0) : _mm512_setzero_ps();
    const __m512 bg = g->bias ? _mm512_maskz_loadu_ps(m, g->bias + half + o0) : _mm512_setzero_ps();
    for (int64_t r = a; r < b; r++) {
      const __m512 v = _mm512_add_ps(_mm512_load_ps(acc + r * 32), bv);
      const __m512 gate = _mm512_add_ps(_mm512_load_ps(acc + r * 32 + 16), bg);
      const __m512 y = _mm512_mul_ps(v, gelu_ps(gate));
      _mm256_mask_storeu_epi16(g->c + (r0 + r) * g->ldc + o0, m, (__m256i)_mm512_cvtneps_pbh(y));
    }
    return;
  }
  const int64_t n0 = j * 32;
  const __mmask16 m0 = first_n16(g->N - n0), m1 = first_n16(g->N - n0 - 16);
  const __mmask32 m = ((__mmask32)m1 << 16) | m0;
  const __m512 b0 = g->bias ? _mm512_maskz_loadu_ps(m0, g->bias + n0) : _mm512_setzero_ps();
  const __m512 b1 = g->bias ? _mm512_maskz_loadu_ps(m1, g->bias + n0 + 16) : _mm512_setzero_ps();
  for (int64_t r = a; r < b; r++) {
    const __m512 y0 = _mm512_add_ps(_mm512_load_ps(acc + r * 32), b0);
    const __m512 y1 = _mm512_add_ps(_mm512_load_ps(acc + r * 32 + 16), b1);
    _mm512_mask_storeu_epi16(g->c + (r0 + r) * g->ldc + n0, m,
                             (__m512i)_mm512_cvtne2ps_pbh(y1, y0));
  }
}

// The previous 32 x 32 block, stored from the tiles and not yet finished (rows == 0: none).
typedef struct {
  const float *acc;
  int64_t r0, rows, j;
} pending_block;

// Accumulator tiles 0-3 = A (two 16-row tiles at a0 and a1, row stride sa) times the
// 32-column block wj, over `taps` shifts of A (element offsets tap[t]) of cc chunks of 32
// columns each (a GEMM: one tap, K / 32 chunks); left in the tiles (store_block writes them).
// The pending block's epilogue is finished a few rows after each chunk's tile products, so
// that it runs on AVX-512 while the AMX unit works: issued as one piece after all the
// products, it waited for them (the out-of-order window holds only part of a block): the
// GEGLU at K = 320 ran 1.66x faster with no epilogue at all, and 1.18x faster (bit-identical)
// once it was spread this way.
// With `prefetch` the weights are requested PREFETCH bytes ahead of their tile loads, for the
// blocks whose weights come from memory (tile loads alone keep too few misses in flight, it
// seems). In the SD 1.5 UNet at 256 px its GEMMs of at most 32 rows, which stream their
// weights, ran 1.27x faster than oneDNN's with it and 0.96x without (paired medians).
#define PREFETCH 8192
static inline void block32(const gemm_args *g, const uint16_t *a0, const uint16_t *a1,
                           int64_t sa, const int64_t *tap, int64_t taps, int64_t cc,
                           const uint16_t *wj, int prefetch, const pending_block *p) {
  const int64_t chunks = taps * cc;
  int64_t done = 0, chunk = 0;  // rows of the pending block finished, chunks issued
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t t = 0; t < taps; t++) {
    const uint16_t *p0 = a0 + tap[t], *p1 = a1 + tap[t], *w = wj + t * cc * 1024;
    for (int64_t c = 0; c < cc; c++) {
      if (prefetch)  // the 2 KB of two W tiles, PREFETCH bytes ahead
        for (int64_t l = 0; l < 2048; l += 64)
          _mm_prefetch((const char *)(w + c * 1024) + PREFETCH + l, _MM_HINT_T0);
      _tile_loadd(4, p0 + c * 32, sa * 2);
      _tile_loadd(5, p1 + c * 32, sa * 2);
      _tile_loadd(6, w + c * 1024, 64);
      _tile_loadd(7, w + c * 1024 + 512, 64);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
      const int64_t upto = p->rows * ++chunk / chunks;  // this chunk's share of the rows
      if (upto > done) {
        finish(g, p->acc, p->r0, done, upto, p->j);
        done = upto;
      }
    }
  }
}

static inline void store_block(float *acc) {
  _tile_stored(0, acc, 128);
  _tile_stored(1, acc + 16, 128);
  _tile_stored(2, acc + 16 * 32, 128);
  _tile_stored(3, acc + 16 * 32 + 16, 128);
}

// Rows r .. r + rows of A as tiles can load them: in place, or copied into pad (32 x Kp, zero
// padded) when K is not a multiple of 32 or fewer than 32 rows are left. *stride: its row
// stride in elements.
static const uint16_t *row_block(const gemm_args *g, int64_t r, int64_t rows, uint16_t *pad,
                                 int64_t *stride) {
  const int64_t Kp = round_up(g->K, 32);
  const uint16_t *a = g->a + r * g->lda;
  *stride = g->lda;
  if (rows == 32 && g->K % 32 == 0) return a;
  for (int64_t i = 0; i < 32; i++)
    for (int64_t k = 0; k < Kp; k += 32) {
      const __mmask32 m = first_n32(i < rows ? g->K - k : 0);
      _mm512_storeu_si512((void *)(pad + i * Kp + k), _mm512_maskz_loadu_epi16(m, a + i * g->lda + k));
    }
  *stride = Kp;
  return pad;
}

// Rows [m0, m1) x column blocks [j0, j1) on this thread, in groups of column blocks whose
// packed weights fit in half of L2 (so they are read from memory once); each 32-row block of A
// is reused across a group. acc holds two 32 x 32 blocks (the pipeline's two stages).
static void run_block(const gemm_args *g, int64_t m0, int64_t m1, int64_t j0, int64_t j1,
                      uint16_t *pad, float *acc) {
  const int64_t kc = round_up(g->K, 32) / 32;
  const int64_t group = (1 << 20) / (kc * 2048) > 1 ? (1 << 20) / (kc * 2048) : 1;
  const int64_t Wp = g->W + 2, taps = g->H ? 9 : 1, cc = kc / taps;
  int64_t tap[9] = {0};
  for (int64_t t = 0; g->H && t < 9; t++) tap[t] = ((t / 3) * Wp + t % 3) * g->C;
  pending_block prev = {acc, 0, 0, 0};  // rows == 0: nothing pending yet
  int64_t cur = 0;
  for (int64_t jg = j0; jg < j1; jg += group) {
    const int64_t je = min64(j1, jg + group);
    for (int64_t r = m0; r < m1; r += 32) {
      const int64_t rows = min64(32, m1 - r);
      const uint16_t *a0, *a1;
      int64_t sa;
      if (g->H) {  // the padded-input window of output pixels r and r + 16 (whole 16-pixel runs)
        const int64_t y0 = r / g->W, y1 = (r + 16) / g->W;  // image rows, all images stacked
        const int64_t b0 = y0 / g->H, b1 = y1 / g->H;
        a0 = g->a + ((y0 + 2 * b0) * Wp + r % g->W) * g->C;
        // (a last block of 16 pixels reads its first tile twice: no tile past the input)
        a1 = rows > 16 ? g->a + ((y1 + 2 * b1) * Wp + (r + 16) % g->W) * g->C : a0;
        sa = g->C;
      } else {
        a0 = row_block(g, r, rows, pad, &sa);
        a1 = a0 + 16 * sa;
      }
      for (int64_t j = jg; j < je; j++) {
        // (m0: the weights come from memory); finishes the previous block on the way
        block32(g, a0, a1, sa, tap, taps, cc, g->wp + j * kc * 1024, r == m0, &prev);
        store_block(acc + cur * 1024);
        prev = (pending_block){acc + cur * 1024, r, rows, j};
        cur ^= 1;
      }
    }
  }
  if (prev.rows) finish(g, prev.acc, prev.r0, 0, prev.rows, prev.j);
}

// Runs g on `threads` OpenMP threads (PyTorch's own pool: same libgomp). Threads split the
// column blocks when there are enough for an even share (each then reads only its part of the
// weights), else the rows. 0, or -1 when a thread ran out of memory.
static int run(const gemm_args *g, int threads) {
  const int64_t Kp = round_up(g->K, 32), nb = round_up(g->N, 32) / 32, mb = (g->M + 31) / 32;
  const int by_columns = nb % threads == 0 || nb >= 4 * threads || mb < threads;
  int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
  {
    const int64_t n = omp_get_num_threads(), i = omp_get_thread_num();
    uint16_t *pad = aligned_alloc(64, 64 * Kp);
    float *acc = aligned_alloc(64, 2 * 32 * 32 * sizeof(float));
    if (!pad || !acc) {
      failed = 1;
    } else {
      _Alignas(64) tile_config saved;
      amx_begin(&saved);
      const unsigned csr = _mm_getcsr();
      _mm_setcsr(csr | 0x8040);  // flush denormals: exp(-z^2) of large gelu inputs underflows
      if (by_columns)
        run_block(g, 0, g->M, nb * i / n, nb * (i + 1) / n, pad, acc);
      else
        run_block(g, min64(g->M, mb * i / n * 32), min64(g->M, mb * (i + 1) / n * 32), 0, nb, pad,
                  acc);
      _mm_setcsr(csr);
      amx_end(&saved);
    }
    free(pad);
    free(acc);
  }
  return failed ? -1 : 0;
}

// C [M, N or N / 2] = epilogue(A [M, K] W^T + bias), W packed by ldm_gemm_pack.
int ldm_gemm(const uint16_t *a, int64_t M, int64_t K, int64_t lda, const uint16_t *wp, int64_t N,
             const float *bias, int epilogue, uint16_t *c, int64_t ldc, int threads) {
  const gemm_args g = {a, wp, bias, c, M, N, K, lda, ldc, epilogue, 0, 0, 0};
  return run(&g, threads);
}

// 3x3 convolution, stride 1, padding 1: x the zero-padded NHWC input [B, H + 2, W + 2, C]
// (C % 32 == 0, W % 16 == 0), W packed by ldm_gemm_pack from the weight as [N, 3, 3, C]
// (tap-major), y the NHWC output [B, H, W, N] (+ bias). 0, or -1 when out of memory.
int ldm_conv3x3(const uint16_t *x, int64_t B, int64_t H, int64_t W, int64_t C, const uint16_t *wp,
                int64_t N, const float *bias, uint16_t *y, int threads) {
  if (C % 32 || W % 16 || H <= 0) return -2;
  const gemm_args g = {x, wp, bias, y, B * H * W, N, 9 * C, C, N, LDM_GEMM_PLAIN, H, W, C};
  return run(&g, threads);
}
