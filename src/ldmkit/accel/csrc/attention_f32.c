// Flash attention forward for fp32 on x86 CPUs with AVX-512.
//
// softmax(q k^T * scale) v for q [L, D], k, v [S, D] per (batch, head), all fp32. One task is a
// block of QB query rows against all keys, in key blocks of KB with the online softmax of
// FlashAttention (flash_common.h, degree-5 exponential: fp32 accuracy).
//   S = q k^T    register blocks of 8 rows x 32 keys; k packed once per head transposed in
//                blocks of 32 keys, [S/32][D][32], so 32 keys are two vector loads per d
//   O += P v     register blocks of 4 rows x up to 64 columns; v packed [S][Dv], zero padded
// Built and loaded at run time by ldmkit.accel.native; called from ldmkit.accel.cpu_attention.
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "flash_common.h"

#define QB 32  // query rows per task
#define KB 256  // keys per softmax block


int64_t ldm_kt_size(int64_t S, int64_t D) { return D * round_up(S, 32); }
int64_t ldm_vp_size(int64_t S, int64_t D) { return round_up(S, 32) * round_up(D, 16); }

// k [S, D] -> kt [Sp/32][D][32] (transposed per 32-key block), v [S, D] -> vp [Sp][Dv]; zero
// padded.
static void pack_head(const ldm_attn_args *a, int64_t t) {
  const int64_t b = t / a->H, h = t % a->H, S = a->S, D = a->D;
  const int64_t Sp = round_up(S, 32), Dv = round_up(D, 16);
  const float *k = (const float *)a->k + b * a->ksb + h * a->ksh;
  const float *v = (const float *)a->v + b * a->vsb + h * a->vsh;
  float *kt = (float *)a->kp + t * ldm_kt_size(S, D), *vp = (float *)a->vp + t * ldm_vp_size(S, D);
  memset(kt, 0, sizeof(float) * D * Sp);
  for (int64_t n = 0; n < S; n++)
    for (int64_t d = 0; d < D; d++) kt[((n / 32) * D + d) * 32 + n % 32] = k[n * a->ksl + d];
  for (int64_t n = 0; n < Sp; n++)
    for (int64_t d = 0; d < Dv; d++) vp[n * Dv + d] = n < S && d < D ? v[n * a->vsl + d] : 0.0f;
}

// s[0:8, 0:32] = q[0:8] k^T for one packed 32-key block kt [D][32].
static inline void scores_8x32(const float *q, int64_t D, const float *kt, float *s) {
  __m512 acc[8][2];
  for (int r = 0; r < 8; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; d++) {
    const __m512 k0 = _mm512_loadu_ps(kt + d * 32), k1 = _mm512_loadu_ps(kt + d * 32 + 16);
#pragma GCC unroll 8
    for (int r = 0; r < 8; r++) {
      const __m512 qv = _mm512_set1_ps(q[r * D + d]);
      acc[r][0] = _mm512_fmadd_ps(qv, k0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(qv, k1, acc[r][1]);
    }
  }
  for (int r = 0; r < 8; r++) {
    _mm512_storeu_ps(s + r * KB, acc[r][0]);
    _mm512_storeu_ps(s + r * KB + 16, acc[r][1]);
  }
}

// o[0:4, 0:16 nv] += p[0:4, 0:nk] v[0:nk, 0:16 nv] (nv 1..4 vectors; inlined per nv).
static inline __attribute__((always_inline)) void accumulate_4rows(const float *p, int64_t nk,
                                                                   const float *v, int64_t dv,
                                                                   float *o, const int nv) {
  __m512 acc[4][4];
  for (int r = 0; r < 4; r++)
    for (int t = 0; t < nv; t++) acc[r][t] = _mm512_loadu_ps(o + r * dv + 16 * t);
  for (int64_t j = 0; j < nk; j++) {
    __m512 vv[4];
    for (int t = 0; t < nv; t++) vv[t] = _mm512_loadu_ps(v + j * dv + 16 * t);
#pragma GCC unroll 4
    for (int r = 0; r < 4; r++) {
      const __m512 pv = _mm512_set1_ps(p[r * KB + j]);
      for (int t = 0; t < nv; t++) acc[r][t] = _mm512_fmadd_ps(pv, vv[t], acc[r][t]);
    }
  }
  for (int r = 0; r < 4; r++)
    for (int t = 0; t < nv; t++) _mm512_storeu_ps(o + r * dv + 16 * t, acc[r][t]);
}

typedef struct {
  float *q;  // [QB, D] query block, zero padded rows
  float *s;  // [QB, KB] scores
  float *p;  // [QB, KB] probabilities
  float *o;  // [QB, Dv] output accumulator
} block_buffers;

static void attend_block(const ldm_attn_args *a, const block_buffers *w, const float *q,
                         const float *kt, const float *vp, int64_t rows, float *out) {
  const int64_t D = a->D, Dv = round_up(D, 16);
  _Alignas(64) float m[QB], l[QB];
  for (int64_t i = 0; i < QB; i++) {
    m[i] = -INFINITY;
    l[i] = 0.0f;
    for (int64_t d = 0; d < D; d++) w->q[i * D + d] = i < rows ? q[i * a->qsl + d] : 0.0f;
  }
  memset(w->o, 0, sizeof(float) * QB * Dv);
  const float c = (float)((double)a->scale * 1.4426950408889634);  // one rounding
  for (int64_t k0 = 0; k0 < a->S; k0 += KB) {
    const int64_t nk = a->S - k0 < KB ? a->S - k0 : KB, nkp = round_up(nk, 32);
    for (int64_t i = 0; i < QB; i += 8)
      for (int64_t j = 0; j < nkp; j += 32)
        scores_8x32(w->q + i * D, D, kt + (k0 + j) * D, w->s + i * KB + j);
    online_softmax(w->s, KB, QB, nk, nkp, c, m, l, w->o, Dv, w->p, 0);
    for (int64_t i = 0; i < QB; i += 4)
      for (int64_t c0 = 0; c0 < Dv; c0 += 64) {
        const float *p = w->p + i * KB, *v = vp + k0 * Dv + c0;
        float *o = w->o + i * Dv + c0;
        switch ((Dv - c0) >= 64 ? 4 : (Dv - c0) / 16) {
          case 4: accumulate_4rows(p, nk, v, Dv, o, 4); break;
          case 3: accumulate_4rows(p, nk, v, Dv, o, 3); break;
          case 2: accumulate_4rows(p, nk, v, Dv, o, 2); break;
          default: accumulate_4rows(p, nk, v, Dv, o, 1);
        }
      }
  }
  for (int64_t i = 0; i < rows; i++) {  // O / l
    const __m512 inv = _mm512_set1_ps(1.0f / l[i]);
    for (int64_t d = 0; d < D; d += 16)
      _mm512_mask_storeu_ps(out + i * a->osl + d, first_n16(D - d),
                            _mm512_mul_ps(inv, _mm512_loadu_ps(w->o + i * Dv + d)));
  }
}

// Tasks [t0, t1) (index (b * H + h) * ceil(L / QB) + query block) on this thread; 0, or -1
// when out of memory.
static int run_tasks(const ldm_attn_args *a, int64_t t0, int64_t t1) {
  const int64_t D = a->D, Dv = round_up(D, 16);
  const int64_t kts = ldm_kt_size(a->S, D), vps = ldm_vp_size(a->S, D);
  const size_t qsize = (size_t)round_up(QB * D, 16) * 4;
  char *mem = aligned_alloc(64, qsize + 8 * QB * KB + 4 * QB * Dv);
  if (!mem) return -1;
  block_buffers w = {(float *)mem, (float *)(mem + qsize), (float *)(mem + qsize) + QB * KB,
                     (float *)(mem + qsize) + 2 * QB * KB};
  const unsigned csr = _mm_getcsr();
  _mm_setcsr(csr | 0x8040);  // flush denormals: exp2 of very negative scores
  const float *q = a->q, *kt = a->kp, *vp = a->vp;
  float *out = a->out;
  for (int64_t t = t0; t < t1; t++) {
    const flash_task task = flash_task_at(a, t, QB);
    attend_block(a, &w, q + task.q, kt + task.head * kts, vp + task.head * vps, task.rows,
                 out + task.out);
  }
  _mm_setcsr(csr);
  free(mem);
  return 0;
}

// The whole attention on `threads` OpenMP threads.
int ldm_attention_f32(const ldm_attn_args *a, int threads) {
  return flash_parallel(a, QB, pack_head, run_tasks, threads);
}
