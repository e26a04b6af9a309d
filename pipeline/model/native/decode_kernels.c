/* CPU kernels for rdpt's decode steps of a few rows (pipeline/model/native_kernels.py builds and
 * loads this file; pipeline/model/fast_decode.py calls it).
 *
 * A decode step of a small model multiplies a few rows (the batch) by each weight matrix.
 * BLAS libraries are tuned for large products; for a few rows they spend much of their time
 * outside the multiply-adds. Here the weights are packed once into column panels and each
 * call streams every panel once per 8 rows, with the rows' accumulators in registers; a whole
 * decoder layer is one call, so a step pays no per-operation dispatch inside a layer.
 *
 * Plain C with GCC/Clang vector extensions (no intrinsics): the compiler maps a 16-float
 * vector onto one AVX-512 register, two AVX2 registers or four NEON registers. Sums over the
 * inner dimension run in order k = 0, 1, ..., K-1, per output element, with fused
 * multiply-adds where the CPU has them (-march=native; the same order as MKL's sgemm for the
 * shapes measured: products with K <= 128 came out bitwise equal to torch.mm on AVX-512).
 * Single-threaded: the decode calls these from one thread.
 */
#include <math.h>
#include <stddef.h>
#include <string.h>

#define PANEL 32 /* columns per packed panel: two 16-float vectors */

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4), may_alias));

static inline v16 load16(const float *p) { return *(const v16u *)p; }
static inline void store16(float *p, v16 v) { *(v16u *)p = v; }

int rdpt_kernels_abi(void) { return 3; }

/* w [K, N] row-major -> panels [ceil(N / 32)][K][32], the last panel zero-padded. */
void rdpt_pack_panels(const float *w, long K, long N, float *packed) {
  long n_panels = (N + PANEL - 1) / PANEL;
  for (long p = 0; p < n_panels; p++) {
    long n0 = p * PANEL, width = N - n0 < PANEL ? N - n0 : PANEL;
    float *dst = packed + p * K * PANEL;
    for (long k = 0; k < K; k++) {
      memcpy(dst + k * PANEL, w + k * N + n0, (size_t)width * sizeof(float));
      if (width < PANEL) memset(dst + k * PANEL + width, 0, (size_t)(PANEL - width) * sizeof(float));
    }
  }
}

/* MB rows times NP panels at a time (both known at compile time, so the 2 * MB * NP
 * accumulators live in registers; NP > 1 for few rows keeps enough independent multiply-add
 * chains in flight). Each output element is still summed over k in order. */
#define ROWS_KERNEL(MB, NP)                                                                    \
  static void gemm_##MB##_##NP(const float *restrict x, long ldx, const float *restrict w,      \
                               long K, long n0, long N, const float *add, long ldadd,          \
                               const float *restrict bias, float *out, long ldo) {             \
    v16 acc[NP][2][MB];                                                                        \
    _Pragma("GCC unroll 16") for (int p = 0; p < NP; p++)                                      \
      _Pragma("GCC unroll 16") for (int i = 0; i < MB; i++) acc[p][0][i] = acc[p][1][i] = (v16){0}; \
    for (long k = 0; k < K; k++) {                                                             \
      _Pragma("GCC unroll 16") for (int p = 0; p < NP; p++) {                                  \
        const float *wk = w + p * K * PANEL + k * PANEL;                                       \
        v16 w_lo = load16(wk), w_hi = load16(wk + 16);                                         \
        _Pragma("GCC unroll 16") for (int i = 0; i < MB; i++) {                                \
          float xi = x[i * ldx + k];                                                           \
          acc[p][0][i] += xi * w_lo;                                                           \
          acc[p][1][i] += xi * w_hi;                                                           \
        }                                                                                      \
      }                                                                                        \
    }                                                                                          \
    for (int p = 0; p < NP; p++) {                                                             \
      long c0 = n0 + p * PANEL, width = N - c0 < PANEL ? N - c0 : PANEL;                       \
      for (int i = 0; i < MB; i++) {                                                           \
        float row[PANEL];                                                                      \
        store16(row, acc[p][0][i]);                                                            \
        store16(row + 16, acc[p][1][i]);                                                       \
        float *o = out + i * ldo + c0;                                                         \
        const float *a = add ? add + i * ldadd + c0 : NULL;                                    \
        for (long j = 0; j < width; j++) {                                                     \
          float v = row[j];                                                                    \
          if (bias) v += bias[c0 + j];                                                         \
          if (a) v = a[j] + v;                                                                 \
          o[j] = v;                                                                            \
        }                                                                                      \
      }                                                                                        \
    }                                                                                          \
  }
ROWS_KERNEL(8, 1)
ROWS_KERNEL(4, 1)
ROWS_KERNEL(2, 2)
ROWS_KERNEL(2, 1)
ROWS_KERNEL(1, 4)
ROWS_KERNEL(1, 1)

/* MB rows over all panels: NP panels at a time, the remainder one by one. */
#define ROWS_ALL(MB, NP)                                                                       \
  static void rows_##MB(const float *x, long ldx, const float *packed, long K, long N,         \
                        const float *add, long ldadd, const float *bias, float *out,           \
                        long ldo) {                                                            \
    long n_panels = (N + PANEL - 1) / PANEL, p = 0;                                            \
    for (; p + NP <= n_panels; p += NP)                                                        \
      gemm_##MB##_##NP(x, ldx, packed + p * K * PANEL, K, p * PANEL, N, add, ldadd, bias, out,  \
                       ldo);                                                                   \
    for (; p < n_panels; p++)                                                                  \
      gemm_##MB##_1(x, ldx, packed + p * K * PANEL, K, p * PANEL, N, add, ldadd, bias, out,    \
                    ldo);                                                                      \
  }
ROWS_ALL(8, 1)
ROWS_ALL(4, 1)
ROWS_ALL(2, 2)
ROWS_ALL(1, 4)

/* out[m, :] = add[m, :] + bias + x[m, :] @ W for m < M (add, bias optional; W packed).
 * out may be add (an in-place residual update). */
void rdpt_gemm_rows(const float *x, long ldx, const float *packed, long K, long N,
                    const float *add, long ldadd, const float *bias, float *out, long ldo,
                    long M) {
  long m = 0;
#define CALL(MB)                                                                           \
  rows_##MB(x + m * ldx, ldx, packed, K, N, add ? add + m * ldadd : NULL, ldadd, bias, out + m * ldo, \
            ldo)
  for (; m + 8 <= M; m += 8) CALL(8);
  for (; m + 4 <= M; m += 4) CALL(4);
  for (; m + 2 <= M; m += 2) CALL(2);
  for (; m < M; m += 1) CALL(1);
#undef CALL
}

/* Attention of one query per (sequence b, head n) over its first L cached positions.
 * q of (b, n) at q + b * q_b + n * q_n; keys of (b, n) at k + b * kv_b + n * kv_n, position t
 * at + t * hd (values the same from v); out [B, heads * hd] row-major. softmax(q.k * scale) v,
 * the maximum subtracted before exp. */
void rdpt_attend_one(const float *q, long q_b, long q_n, const float *k, const float *v,
                     long kv_b, long kv_n, long B, long heads, long hd, long L, float scale,
                     float *scores, float *out) {
  for (long b = 0; b < B; b++) {
    for (long n = 0; n < heads; n++) {
      const float *qi = q + b * q_b + n * q_n;
      const float *kb = k + b * kv_b + n * kv_n, *vb = v + b * kv_b + n * kv_n;
      float *o = out + (b * heads + n) * hd;
      float mx = -INFINITY;
      for (long t = 0; t < L; t++) {
        const float *kt = kb + t * hd;
        float s;
        if (hd % 16 == 0) {
          v16 acc = (v16){0};
          for (long d = 0; d < hd; d += 16) acc += load16(qi + d) * load16(kt + d);
          s = 0.0f;
          for (int j = 0; j < 16; j++) s += acc[j];
        } else {
          s = 0.0f;
          for (long d = 0; d < hd; d++) s += qi[d] * kt[d];
        }
        s *= scale;
        scores[t] = s;
        if (s > mx) mx = s;
      }
      float sum = 0.0f;
      for (long t = 0; t < L; t++) {
        float e = expf(scores[t] - mx);
        scores[t] = e;
        sum += e;
      }
      float inv = 1.0f / sum;
      for (long d = 0; d < hd; d++) o[d] = 0.0f;
      if (hd % 16 == 0) {
        for (long d = 0; d < hd; d += 16) {
          v16 acc = (v16){0};
          for (long t = 0; t < L; t++) acc += scores[t] * load16(vb + t * hd + d);
          store16(o + d, acc * inv);
        }
      } else {
        for (long t = 0; t < L; t++)
          for (long d = 0; d < hd; d++) o[d] += scores[t] * vb[t * hd + d];
        for (long d = 0; d < hd; d++) o[d] *= inv;
      }
    }
  }
}

/* RMSNorm of M rows: out[m] = x[m] / sqrt(mean(x[m]^2) + eps) * w (rows ldx / ldo apart). */
void rdpt_rms_norm(const float *x, long ldx, const float *w, float eps, float *out, long ldo,
                   long M, long H) {
  for (long m = 0; m < M; m++) {
    const float *xm = x + m * ldx;
    float *o = out + m * ldo;
    float ss = 0.0f;
    long d = 0;
    if (H % 16 == 0) {
      v16 acc = (v16){0};
      for (; d < H; d += 16) {
        v16 xv = load16(xm + d);
        acc += xv * xv;
      }
      for (int j = 0; j < 16; j++) ss += acc[j];
    } else {
      for (; d < H; d++) ss += xm[d] * xm[d];
    }
    float rstd = 1.0f / sqrtf(ss / (float)H + eps);
    for (d = 0; d < H; d++) o[d] = xm[d] * rstd * w[d];
  }
}

/* One sandwich / pre-norm decoder layer over S new positions [pos, pos + S) of B sequences,
 * rows in (s, b) order (S = 1: a decode step; S > 1: a speculative verification, a prompt):
 *   h = n1(x); qkv = h @ Wqkv + b; RoPE on q and k; k, v -> cache[pos + s];
 *   o = attention(q, cache[0 .. pos + s]) (causal); x = x + o @ Wproj; x = n2(x) if n2;
 *   x = x + (silu(g) * u) @ Wfc2 where [g | u] = n3(x) @ Wfc1; x = n4(x) if n4.
 * qkv columns per head: [q (hd) | k (hd) | v (hd)]; RoPE of position p: t[d] cos[d] +
 * t[d ^ 1] sin[d] with cos, sin at + (p - pos) * rope_stride (sin carries the rotation's
 * signs); cache: keys of (b, n) at kv + b * kv_b + n * kv_n, position p at + p * hd, values
 * v_off further. scratch: S * B * (6 H + 3 F) + pos + S floats. x_in and x_out may be the
 * same. */
void rdpt_decoder_layer(const float *x_in, float *x_out, long S, long B, long H, long heads,
                        long hd, long F, float eps, const float *n1, const float *n2,
                        const float *n3, const float *n4, const float *w_qkv,
                        const float *b_qkv, const float *w_proj, const float *w_fc1,
                        const float *w_fc2, const float *cos, const float *sin,
                        long rope_stride, float *kv, long kv_b, long kv_n, long v_off, long pos,
                        float scale, float *scratch) {
  long R = S * B;
  float *qkv = scratch;            /* [R, 3H] */
  float *h = qkv + R * 3 * H;      /* [R, H]: normed input, then attention output */
  float *x = h + R * H;            /* [R, H]: the residual stream */
  float *gu = x + R * H;           /* [R, 2F] */
  float *act = gu + R * 2 * F;     /* [R, F] */
  float *scores = act + R * F;     /* [pos + S] */
  rdpt_rms_norm(x_in, H, n1, eps, h, H, R, H);
  rdpt_gemm_rows(h, H, w_qkv, H, 3 * H, NULL, 0, b_qkv, qkv, 3 * H, R);
  for (long s = 0; s < S; s++) {
    const float *c = cos + s * rope_stride, *sn = sin + s * rope_stride;
    for (long b = 0; b < B; b++) {
      for (long n = 0; n < heads; n++) {
        float *t = qkv + (s * B + b) * 3 * H + n * 3 * hd;
        float rot[2 * hd];
        for (long d = 0; d < 2 * hd; d++) {
          long dd = d % hd;
          rot[d] = t[d] * c[dd] + t[d ^ 1] * sn[dd];
        }
        memcpy(t, rot, sizeof(rot));
        float *slot = kv + b * kv_b + n * kv_n + (pos + s) * hd;
        memcpy(slot, t + hd, (size_t)hd * sizeof(float));
        memcpy(slot + v_off, t + 2 * hd, (size_t)hd * sizeof(float));
      }
    }
  }
  for (long s = 0; s < S; s++)
    rdpt_attend_one(qkv + s * B * 3 * H, 3 * H, 3 * hd, kv, kv + v_off, kv_b, kv_n, B, heads, hd,
                    pos + s + 1, scale, scores, h + s * B * H);
  rdpt_gemm_rows(h, H, w_proj, H, H, x_in, H, NULL, x, H, R);
  if (n2) rdpt_rms_norm(x, H, n2, eps, x, H, R, H);
  rdpt_rms_norm(x, H, n3, eps, h, H, R, H);
  rdpt_gemm_rows(h, H, w_fc1, H, 2 * F, NULL, 0, NULL, gu, 2 * F, R);
  for (long r = 0; r < R; r++) {
    const float *g = gu + r * 2 * F, *u = g + F;
    float *a = act + r * F;
    for (long j = 0; j < F; j++) a[j] = g[j] / (1.0f + expf(-g[j])) * u[j];
  }
  rdpt_gemm_rows(act, F, w_fc2, F, H, x, H, NULL, x_out, H, R);
  if (n4) rdpt_rms_norm(x_out, H, n4, eps, x_out, H, R, H);
}
