// Flash attention forward for bf16 on x86 CPUs with AMX (Sapphire Rapids and later).
//
// softmax(q k^T * scale) v for q [L, D], k, v [S, D] per (batch, head); inputs and output
// bf16, scores, softmax and the output accumulator fp32. One task is a block of QB query
// rows against all keys, in key blocks of KB (the online softmax of FlashAttention:
// running row max m and sum l, the accumulator rescaled by exp(m_old - m_new)).
//   S = q k^T    AMX tiles, k packed once per head into tiles (VNNI pairs along d)
//   P = exp2(S * scale * log2(e) - m)    AVX-512, P rounded to bf16
//   O += P v     AMX tiles, v packed once per head into tiles (VNNI pairs along keys)
// Where the head dim D is not a multiple of 16, v's first padding column is ones, so P v also
// sums each row of P as rounded to bf16 (the weights then sum to 1 exactly) and the softmax
// loop skips its row sums.
// Built and loaded at run time by ldmkit.accel.native; called from ldmkit.accel.cpu_attention.
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "amx_common.h"
#include "flash_common.h"

#define QB 32   // query rows per task (two 16-row tiles)
#define KB 256  // keys per softmax block

int64_t ldm_kp_size(int64_t S, int64_t D) { return round_up(S, 32) * round_up(D, 32); }
int64_t ldm_vp_size(int64_t S, int64_t D) { return round_up(S, 32) * round_up(D, 16); }

// k [S, D] (row stride ks, 16 ks < 2^31: 32-bit gather offsets) -> tiles
// [S/16][Dq/32][16 d-pairs][16 keys][2]; v [S, D] (row stride vs) -> tiles
// [Sp/32][Dv/16][16 key-pairs][16 columns][2]; zero padded but for column D of v (if
// D % 16 != 0), which is ones.
static void pack_kv(const uint16_t *k, int64_t ks, const uint16_t *v, int64_t vs, int64_t S,
                    int64_t D, uint16_t *kp, uint16_t *vp) {
  const int64_t Sp = round_up(S, 32), nd = round_up(D, 32) / 32, nc = round_up(D, 16) / 16;
  const __m512i keys = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5,
                                                           4, 3, 2, 1, 0),
                                          _mm512_set1_epi32((int)(ks / 2)));
  for (int64_t n0 = 0; n0 < Sp; n0 += 16) {
    const __mmask16 valid = first_n16(S - n0);
    for (int64_t ds = 0; ds < nd; ds++)
      for (int64_t i = 0; i < 16; i++) {  // d-pair i of this 32-wide slice: gather 16 keys
        const int64_t d = ds * 32 + 2 * i;
        __m512i x = _mm512_setzero_si512();
        if (d < D)
          x = _mm512_mask_i32gather_epi32(x, valid, keys, (const int *)(k + n0 * ks + d), 4);
        _mm512_store_si512((void *)(kp + (((n0 / 16) * nd + ds) * 16 + i) * 32), x);
      }
  }
  // interleave rows 2j and 2j+1: output column 2c <- row 2j, 2c+1 <- row 2j+1
  const __m512i mix = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24,
                                       8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  for (int64_t j = 0; j < Sp / 2; j++) {
    const int64_t n = 2 * j;
    for (int64_t c = 0; c < nc; c++) {
      const __mmask16 cols = first_n16(D - 16 * c);
      __m256i a = _mm256_setzero_si256(), b = _mm256_setzero_si256();
      if (n < S) a = _mm256_maskz_loadu_epi16(cols, v + n * vs + 16 * c);
      if (n + 1 < S) b = _mm256_maskz_loadu_epi16(cols, v + (n + 1) * vs + 16 * c);
      if (c == nc - 1 && D % 16) {  // the row-sum column (P is 0 for padded keys)
        a = _mm256_mask_set1_epi16(a, (__mmask16)(1u << (D % 16)), 0x3F80);  // bf16 1.0
        b = _mm256_mask_set1_epi16(b, (__mmask16)(1u << (D % 16)), 0x3F80);
      }
      __m512i x = _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1);
      _mm512_store_si512((void *)(vp + (((j / 16) * nc + c) * 16 + j % 16) * 32),
                         _mm512_permutexvar_epi16(mix, x));
    }
  }
}

// Tile ids must be compile-time constants: C tiles 0-3 are selected by a switch.
#define TILE_LOAD_C(t, p, s) \
  switch (t) {               \
    case 0: _tile_loadd(0, p, s); break; \
    case 1: _tile_loadd(1, p, s); break; \
    case 2: _tile_loadd(2, p, s); break; \
    default: _tile_loadd(3, p, s);       \
  }
#define TILE_STORE_C(t, p, s) \
  switch (t) {                \
    case 0: _tile_stored(0, p, s); break; \
    case 1: _tile_stored(1, p, s); break; \
    case 2: _tile_stored(2, p, s); break; \
    default: _tile_stored(3, p, s);       \
  }

typedef struct {
  uint16_t *q;  // [QB, Dq] bf16 query block, zero padded
  float *s;     // [QB, KB] scores
  uint16_t *p;  // [QB, KB] bf16 probabilities
  float *o;     // [QB, Dv] output accumulator
} block_buffers;

// S[:, 0:nkp] = q k^T for keys k0 .. k0 + nkp.
static void scores(const block_buffers *w, const uint16_t *kp, int64_t k0, int64_t nkp,
                   int64_t nd) {
  const int64_t Dq = nd * 32;  // 2 x 2 output tiles of 16 rows x 16 keys, d in steps of 32
  for (int64_t j = 0; j < nkp; j += 32) {
    const uint16_t *kt = kp + ((k0 + j) / 16) * nd * 512;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t ds = 0; ds < nd; ds++) {
      _tile_loadd(4, w->q + ds * 32, Dq * 2);
      _tile_loadd(5, w->q + 16 * Dq + ds * 32, Dq * 2);
      _tile_loadd(6, kt + ds * 512, 64);
      _tile_loadd(7, kt + (nd + ds) * 512, 64);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
    _tile_stored(0, w->s + j, KB * 4);
    _tile_stored(1, w->s + j + 16, KB * 4);
    _tile_stored(2, w->s + 16 * KB + j, KB * 4);
    _tile_stored(3, w->s + 16 * KB + j + 16, KB * 4);
  }
}

// O += P v for keys k0 .. k0 + nkp, output columns in groups of up to four 16-wide tiles.
static void accumulate(const block_buffers *w, const uint16_t *vp, int64_t k0, int64_t nkp,
                       int64_t nc) {
  const int64_t Dv = nc * 16;
  for (int64_t r = 0; r < 2; r++)
    for (int64_t c0 = 0; c0 < nc; c0 += 4) {
      const int64_t cn = nc - c0 < 4 ? nc - c0 : 4;
      float *o = w->o + r * 16 * Dv + c0 * 16;
      for (int64_t t = 0; t < cn; t++) TILE_LOAD_C(t, o + 16 * t, Dv * 4);
      for (int64_t s = 0; s < nkp; s += 32) {
        const uint16_t *vt = vp + (((k0 + s) / 32) * nc + c0) * 512;
        _tile_loadd(4, w->p + r * 16 * KB + s, KB * 2);
        _tile_loadd(6, vt, 64);
        _tile_dpbf16ps(0, 4, 6);
        if (cn > 1) {
          _tile_loadd(7, vt + 512, 64);
          _tile_dpbf16ps(1, 4, 7);
        }
        if (cn > 2) {
          _tile_loadd(6, vt + 1024, 64);
          _tile_dpbf16ps(2, 4, 6);
        }
        if (cn > 3) {
          _tile_loadd(7, vt + 1536, 64);
          _tile_dpbf16ps(3, 4, 7);
        }
      }
      for (int64_t t = 0; t < cn; t++) TILE_STORE_C(t, o + 16 * t, Dv * 4);
    }
}

// One task: query rows l0 .. l0 + rows of one head against all S keys.
static void attend_block(const ldm_attn_args *a, const block_buffers *w, const uint16_t *q,
                         const uint16_t *kp, const uint16_t *vp, int64_t rows, uint16_t *out) {
  const int64_t D = a->D, nd = round_up(D, 32) / 32, nc = round_up(D, 16) / 16;
  const int64_t Dq = nd * 32, Dv = nc * 16, ones = D % 16 != 0;  // v's column D: row sums
  _Alignas(64) float m[QB], l[QB];
  for (int64_t i = 0; i < QB; i++) {
    m[i] = -INFINITY;
    l[i] = 0.0f;
    for (int64_t d = 0; d < Dq; d += 32)
      _mm512_storeu_si512((void *)(w->q + i * Dq + d),
                          i < rows ? _mm512_maskz_loadu_epi16(first_n32(D - d), q + i * a->qsl + d)
                                   : _mm512_setzero_si512());
  }
  memset(w->o, 0, sizeof(float) * QB * Dv);
  const float c = (float)((double)a->scale * 1.4426950408889634);  // one rounding
  for (int64_t k0 = 0; k0 < a->S; k0 += KB) {
    const int64_t nk = a->S - k0 < KB ? a->S - k0 : KB, nkp = round_up(nk, 32);
    scores(w, kp, k0, nkp, nd);
    online_softmax(w->s, KB, QB, nk, nkp, c, m, ones ? NULL : l, w->o, Dv, w->p, 1);
    accumulate(w, vp, k0, nkp, nc);
  }
  if (ones)  // the row sums came out of P v
    for (int64_t i = 0; i < rows; i++) l[i] = w->o[i * Dv + D];
  for (int64_t i = 0; i < rows; i++) {  // O / l, rounded to bf16
    const __m512 inv = _mm512_set1_ps(1.0f / l[i]);
    for (int64_t d = 0; d < D; d += 16) {
      const __m512 x = _mm512_mul_ps(inv, _mm512_loadu_ps(w->o + i * Dv + d));
      _mm256_mask_storeu_epi16(out + i * a->osl + d, first_n16(D - d),
                               (__m256i)_mm512_cvtneps_pbh(x));
    }
  }
}

// Packs k and v of head t (index b * H + h).
static void pack_head(const ldm_attn_args *a, int64_t t) {
  const int64_t b = t / a->H, h = t % a->H;
  const uint16_t *k = a->k, *v = a->v;
  uint16_t *kp = a->kp, *vp = a->vp;
  pack_kv(k + b * a->ksb + h * a->ksh, a->ksl, v + b * a->vsb + h * a->vsh, a->vsl, a->S, a->D,
          kp + t * ldm_kp_size(a->S, a->D), vp + t * ldm_vp_size(a->S, a->D));
}

// Runs tasks [t0, t1) (index (b * H + h) * ceil(L / QB) + query block) on this thread. 0, or
// -1 when out of memory. The thread's AMX tile configuration and MXCSR are restored.
static int run_tasks(const ldm_attn_args *a, int64_t t0, int64_t t1) {
  const int64_t Dq = round_up(a->D, 32), Dv = round_up(a->D, 16);
  const int64_t kps = ldm_kp_size(a->S, a->D), vps = ldm_vp_size(a->S, a->D);
  block_buffers w;
  char *mem = aligned_alloc(64, 2 * QB * Dq + 4 * QB * KB + 2 * QB * KB + 4 * QB * Dv);
  if (!mem) return -1;
  w.q = (uint16_t *)mem;
  w.s = (float *)(mem + 2 * QB * Dq);
  w.p = (uint16_t *)((char *)w.s + 4 * QB * KB);
  w.o = (float *)((char *)w.p + 2 * QB * KB);
  _Alignas(64) tile_config saved;
  amx_begin(&saved);
  const unsigned csr = _mm_getcsr();
  _mm_setcsr(csr | 0x8040);  // flush denormals: exp2 of very negative scores
  const uint16_t *q = a->q, *kp = a->kp, *vp = a->vp;
  uint16_t *out = a->out;
  for (int64_t t = t0; t < t1; t++) {
    const flash_task task = flash_task_at(a, t, QB);
    attend_block(a, &w, q + task.q, kp + task.head * kps, vp + task.head * vps, task.rows,
                 out + task.out);
  }
  _mm_setcsr(csr);
  amx_end(&saved);
  free(mem);
  return 0;
}

// The whole attention on `threads` OpenMP threads.
int ldm_attention(const ldm_attn_args *a, int threads) {
  return flash_parallel(a, QB, pack_head, run_tasks, threads);
}
