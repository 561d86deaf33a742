// Winograd F(2x2, 3x3) transforms for fp32 convolutions with stride 1 and padding 1
// (Lavin & Gray 2016). Each 2x2 output tile is A^T [ (G g G^T) * (B^T d B) ] A for its 4x4
// input tile d (rows 2ti-1 .. 2ti+2, columns 2tj-1 .. 2tj+2, zero outside the image); the
// element-wise products summed over input channels are 16 GEMMs [K, C] x [C, P] that the
// caller runs (ldmkit.accel.winograd). These two functions are the data transforms:
//   B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1],   A^T = [1 1 1 0; 0 1 -1 -1].
// Built and loaded at run time by ldmkit.accel.native.
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

// x [N, C, H, W] contiguous -> V [16, C, P], P = N * th * tw, th = ceil(H / 2), tw = ceil(W / 2).
// 0, or -1 when out of memory.
int ldm_wino_input(const float *x, float *V, int64_t N, int64_t C, int64_t H, int64_t W,
                   int threads) {
  const int64_t th = (H + 1) / 2, tw = (W + 1) / 2, P = N * th * tw;
  const int64_t hp = 2 * th + 2, wp = 2 * tw + 2;  // zero-padded plane: 1 before, 1-2 after
  int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
  {
    float *pad = calloc((size_t)(hp * wp), sizeof(float));
    if (!pad) failed = 1;
#pragma omp for collapse(2) schedule(static)
    for (int64_t n = 0; n < N; n++)
      for (int64_t c = 0; c < C; c++) {
        if (!pad) continue;
        const float *plane = x + (n * C + c) * H * W;
        for (int64_t r = 0; r < H; r++) memcpy(pad + (r + 1) * wp + 1, plane + r * W, W * 4);
        float *out = V + c * P + n * th * tw;
        for (int64_t ti = 0; ti < th; ti++) {
          const float *d0 = pad + 2 * ti * wp, *d1 = d0 + wp, *d2 = d1 + wp, *d3 = d2 + wp;
          float *o = out + ti * tw;
          for (int64_t tj = 0; tj < tw; tj++) {
            const int64_t s = 2 * tj;
            float a[4][4];  // B^T d: combine rows
            for (int k = 0; k < 4; k++) {
              a[0][k] = d0[s + k] - d2[s + k];
              a[1][k] = d1[s + k] + d2[s + k];
              a[2][k] = d2[s + k] - d1[s + k];
              a[3][k] = d1[s + k] - d3[s + k];
            }
            for (int r = 0; r < 4; r++) {  // (B^T d) B: combine columns
              o[(4 * r + 0) * C * P + tj] = a[r][0] - a[r][2];
              o[(4 * r + 1) * C * P + tj] = a[r][1] + a[r][2];
              o[(4 * r + 2) * C * P + tj] = a[r][2] - a[r][1];
              o[(4 * r + 3) * C * P + tj] = a[r][1] - a[r][3];
            }
          }
        }
      }
    free(pad);
  }
  return failed ? -1 : 0;
}

// M [16, K, P] -> y [N, K, H, W] contiguous (+ bias[K] when bias is not NULL).
void ldm_wino_output(const float *M, const float *bias, float *y, int64_t N, int64_t K, int64_t H,
                     int64_t W, int threads) {
  const int64_t th = (H + 1) / 2, tw = (W + 1) / 2, P = N * th * tw, KP = K * P;
#pragma omp parallel for collapse(2) num_threads(threads) schedule(static)
  for (int64_t n = 0; n < N; n++)
    for (int64_t k = 0; k < K; k++) {
      const float b = bias ? bias[k] : 0.0f;
      const float *m = M + k * P + n * th * tw;
      float *plane = y + (n * K + k) * H * W;
      for (int64_t ti = 0; ti < th; ti++) {
        const float *mt = m + ti * tw;
        float *r0 = plane + 2 * ti * W, *r1 = r0 + W;
        const int full_rows = 2 * ti + 1 < H;
        for (int64_t tj = 0; tj < tw; tj++) {
          float v[16], t[2][4];
          for (int i = 0; i < 16; i++) v[i] = mt[i * KP + tj];
          for (int c = 0; c < 4; c++) {  // A^T M: combine rows
            t[0][c] = v[c] + v[4 + c] + v[8 + c];
            t[1][c] = v[4 + c] - v[8 + c] - v[12 + c];
          }
          const int64_t s = 2 * tj;
          r0[s] = t[0][0] + t[0][1] + t[0][2] + b;  // (A^T M) A: combine columns
          if (s + 1 < W) r0[s + 1] = t[0][1] - t[0][2] - t[0][3] + b;
          if (full_rows) {
            r1[s] = t[1][0] + t[1][1] + t[1][2] + b;
            if (s + 1 < W) r1[s + 1] = t[1][1] - t[1][2] - t[1][3] + b;
          }
        }
      }
    }
}
