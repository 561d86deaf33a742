// What ldmkit's flash-attention kernels share (attention_amx.c for bf16, attention_f32.c for
// fp32): the argument struct, the parallel driver, and the online-softmax step (AVX-512, base
// 2: c = scale * log2(e) folds the softmax scale into the exponent; the per-row scalars
// batched into 16-wide vectors). group_norm.c and gemm_amx.c use exp2_ps and the mask and
// rounding helpers.
#ifndef LDMKIT_FLASH_COMMON_H
#define LDMKIT_FLASH_COMMON_H

#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>

typedef struct {
  const void *q, *k, *v;  // [B, H, L or S, D], element type of the kernel
  void *out;
  int64_t B, H, L, S, D;
  int64_t qsb, qsh, qsl, ksb, ksh, ksl, vsb, vsh, vsl, osb, osh, osl;  // element strides
  float scale;
  void *kp, *vp;  // workspace for the packed k and v of every (batch, head)
} ldm_attn_args;

// Task t (index (b * H + h) * ceil(L / qb) + query block): its head (b * H + h), the element
// offsets of its first query row in q and out, and its number of query rows.
typedef struct {
  int64_t head, q, out, rows;
} flash_task;

static inline flash_task flash_task_at(const ldm_attn_args *a, int64_t t, int64_t qb) {
  const int64_t nq = (a->L + qb - 1) / qb, bh = t / nq, l0 = (t % nq) * qb;
  const int64_t b = bh / a->H, h = bh % a->H;
  const flash_task task = {bh, b * a->qsb + h * a->qsh + l0 * a->qsl,
                           b * a->osb + h * a->osh + l0 * a->osl, a->L - l0 < qb ? a->L - l0 : qb};
  return task;
}

// Packs every head's k and v (pack(a, head)), then runs the query blocks (run(a, t0, t1) for
// tasks [t0, t1), index (b * H + h) * ceil(L / qb) + block) on `threads` OpenMP threads. The
// kernels link against the libgomp PyTorch has loaded (same soname), so these are PyTorch's own
// worker threads, not a second pool. 0, or -1 when a thread ran out of memory.
static inline int flash_parallel(const ldm_attn_args *a, int64_t qb,
                                 void (*pack)(const ldm_attn_args *, int64_t),
                                 int (*run)(const ldm_attn_args *, int64_t, int64_t),
                                 int threads) {
  const int64_t heads = a->B * a->H, tasks = heads * ((a->L + qb - 1) / qb);
  int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
  {
    const int64_t n = omp_get_num_threads(), i = omp_get_thread_num();
    for (int64_t t = heads * i / n; t < heads * (i + 1) / n; t++) pack(a, t);
#pragma omp barrier
    failed |= run(a, tasks * i / n, tasks * (i + 1) / n) != 0;
  }
  return failed ? -1 : 0;
}

static inline __mmask16 first_n16(int64_t n) {
  return n >= 16 ? (__mmask16)0xffff : n <= 0 ? 0 : (__mmask16)((1u << n) - 1);
}

static inline __mmask32 first_n32(int64_t n) {
  return n >= 32 ? 0xffffffffu : n <= 0 ? 0 : (__mmask32)((1u << n) - 1);
}

static inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// 2^t = 2^round(t) * p(f), f = t - round(t) in [-1/2, 1/2], p a near-minimax polynomial of
// 2^f: degree 4 (relative error 2.6e-6, below the bf16 rounding of P) or 5 (7.5e-8, fp32's
// own rounding).
static inline __m512 exp2_ps(__m512 t, const int degree) {
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p;
  if (degree == 5) {
    p = _mm512_set1_ps(0.001327647196f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.009675541503f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.05550713275f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.2402211972f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6931469671f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.000000072f));
  } else {
    p = _mm512_set1_ps(0.00957010188f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.0559178639f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.240247449f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.693121814f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.999999261f));
  }
  return _mm512_scalef_ps(p, n);
}

// 2^t for the bf16 probabilities P: f = t - floor(t) in [0, 1) (one vreduceps where the
// build has AVX512DQ), a near-minimax degree-3 polynomial of 2^f (relative error 7.5e-5, under
// a twentieth of P's bf16 rounding), and vscalefps multiplies by 2^floor(t) itself.
static inline __m512 exp2_p(__m512 t) {
#ifdef __AVX512DQ__
  const __m512 f = _mm512_reduce_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
#else
  const __m512 f =
      _mm512_sub_ps(t, _mm512_roundscale_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC));
#endif
  __m512 p = _mm512_set1_ps(0.0780241936f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.226067215f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.695833743f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.999925196f));
  return _mm512_scalef_ps(p, t);
}

// Stores 16 probabilities: bf16 (rounded to nearest even) or fp32.
static inline void store_p(void *dst, __m512 p, __mmask16 keep, const int bf16) {
#ifdef __AVX512BF16__
  if (bf16) {
    _mm256_storeu_si256((__m256i *)dst, (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_mov_ps(keep, p)));
    return;
  }
#endif
  (void)bf16;
  _mm512_storeu_ps((float *)dst, _mm512_maskz_mov_ps(keep, p));
}

// One key block of the online softmax for `rows` query rows: s [rows, ld] scores of nk valid
// keys (computed up to nkp, a multiple of 16); updates the running max m and sum l, rescales
// the output accumulator o [rows, dv] by 2^(m_old - m_new), and writes P [rows, ld] (zero
// past nk). m and l hold `rows` (a multiple of 16) 64-byte aligned floats; l may be NULL when
// the caller gets the row sums elsewhere (the bf16 kernel: from a column of ones in v).
static inline void online_softmax(const float *s, int64_t ld, int64_t rows, int64_t nk,
                                  int64_t nkp, float c, float *m, float *l, float *o, int64_t dv,
                                  void *p, const int bf16) {
  const int degree = bf16 ? 4 : 5;
  const int64_t esize = bf16 ? 2 : 4;
  _Alignas(64) float bmax[64], bsum[64], alpha[64];
  for (int64_t i = 0; i < rows; i++) {  // row maxima of this block
    const float *srow = s + i * ld;
    __m512 m0 = _mm512_set1_ps(-INFINITY), m1 = m0;
    int64_t j = 0;
    for (; j + 32 <= nk; j += 32) {
      m0 = _mm512_max_ps(m0, _mm512_loadu_ps(srow + j));
      m1 = _mm512_max_ps(m1, _mm512_loadu_ps(srow + j + 16));
    }
    for (; j < nk; j += 16) {
      const __mmask16 mk = first_n16(nk - j);
      m0 = _mm512_mask_max_ps(m0, mk, m0, _mm512_maskz_loadu_ps(mk, srow + j));
    }
    bmax[i] = _mm512_reduce_max_ps(_mm512_max_ps(m0, m1));
  }
  const __m512 vc = _mm512_set1_ps(c), floor = _mm512_set1_ps(-200.0f);
  for (int64_t i = 0; i < rows; i += 16) {  // m_new = max(m, c * block max), alpha = 2^(m - m_new)
    const __m512 mo = _mm512_load_ps(m + i);
    const __m512 mn = _mm512_max_ps(mo, _mm512_mul_ps(vc, _mm512_load_ps(bmax + i)));
    _mm512_store_ps(alpha + i, exp2_ps(_mm512_max_ps(_mm512_sub_ps(mo, mn), floor), degree));
    _mm512_store_ps(m + i, mn);
  }
  for (int64_t i = 0; i < rows; i++) {  // P = 2^(c s - m_new) and its row sums
    const float *srow = s + i * ld;
    char *prow = (char *)p + i * ld * esize;
    const __m512 vm = _mm512_set1_ps(m[i]);
    __m512 s0 = _mm512_setzero_ps(), s1 = s0;
    int64_t j = 0;
    for (; j + 32 <= nk; j += 32) {
      const __m512 t0 = _mm512_fmsub_ps(_mm512_loadu_ps(srow + j), vc, vm);
      const __m512 t1 = _mm512_fmsub_ps(_mm512_loadu_ps(srow + j + 16), vc, vm);
      const __m512 p0 = bf16 ? exp2_p(t0) : exp2_ps(t0, degree);
      const __m512 p1 = bf16 ? exp2_p(t1) : exp2_ps(t1, degree);
      if (l) {
        s0 = _mm512_add_ps(s0, p0);
        s1 = _mm512_add_ps(s1, p1);
      }
#ifdef __AVX512BF16__
      if (bf16) {  // both halves rounded by one instruction
        _mm512_storeu_si512(prow + j * esize, (__m512i)_mm512_cvtne2ps_pbh(p1, p0));
        continue;
      }
#endif
      store_p(prow + j * esize, p0, 0xffff, bf16);
      store_p(prow + (j + 16) * esize, p1, 0xffff, bf16);
    }
    for (; j < nkp; j += 16) {  // tail: keys past nk get P = 0
      const __mmask16 keep = first_n16(nk - j);
      const __m512 t = _mm512_fmsub_ps(_mm512_loadu_ps(srow + j), vc, vm);
      const __m512 x = bf16 ? exp2_p(t) : exp2_ps(t, degree);
      s0 = _mm512_add_ps(s0, _mm512_maskz_mov_ps(keep, x));
      store_p(prow + j * esize, x, keep, bf16);
    }
    bsum[i] = _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
  }
  for (int64_t i = 0; l && i < rows; i += 16) {  // l = l * alpha + row sums
    const __m512 vl = _mm512_load_ps(l + i);
    _mm512_store_ps(l + i,
                    _mm512_fmadd_ps(vl, _mm512_load_ps(alpha + i), _mm512_load_ps(bsum + i)));
  }
  for (int64_t i = 0; i < rows; i++) {  // o *= alpha (rows whose max grew)
    if (alpha[i] == 1.0f) continue;
    const __m512 va = _mm512_set1_ps(alpha[i]);
    float *orow = o + i * dv;
    for (int64_t d = 0; d < dv; d += 16)
      _mm512_storeu_ps(orow + d, _mm512_mul_ps(va, _mm512_loadu_ps(orow + d)));
  }
}

#endif
