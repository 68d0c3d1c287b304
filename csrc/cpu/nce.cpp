// NCE memory-bank scores and the bank update on the CPU.
//
// bank_scores: scores[b, k] = <bank[idx[b, k]], feat[b]>.
//   Args: feat [B, D] (float16/bfloat16/float32/float64, any strides), bank [N, D] (same dtypes),
//   idx [B, K] int64 in [0, N). Returns [B, K] in feat's dtype; accumulated in float32 (float64 when
//   feat or bank is float64).
// _bank_scores_backward: grad_feat[b] = sum_k grad[b, k] * bank[idx[b, k]]. Returns [B, D] in `dtype`.
// iic_scores: the two-view IIC logits, each sampled row of the shared negative bank read once:
//   out_l = [bank_ab[idx] | bank_neg[idx]] . l * inv_t, out_ab = [bank_l[idx] | bank_neg[idx]] . ab * inv_t,
//   each [B, 2 (K+1)]; without bank_neg the CMC form [B, K+1]. Returns feature dtype.
// _iic_scores_backward: gradients of both outputs with respect to l and ab.
// bank_update_: bank[y] = normalize(m * bank[y] + (1 - m) * feat[b]) for y = idx[b], in place. Every
//   update reads the row as it was before the call; with a repeated y the last occurrence is written
//   (what index_copy_ gives on the CPU).
//
// Strategy: the gathered rows are never materialised. With few draws relative to the bank (B*K <= N)
// each task gathers its rows and dots them on the fly (prefetching ahead). With more draws than bank
// rows the (b, k) pairs are counting-sorted by row, so every touched row is read once, in address
// order, and dotted with every feature that drew it: the bank streams like a GEMM would read it, but
// only B*K dot products are computed instead of B*N. The backward uses the same two plans, summing in
// a fixed order (fixed work units, partial sums reduced in order), so results do not depend on the
// thread count. The inner loops are compiled for AVX-512, AVX2 and baseline x86-64 and picked at run
// time.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#if defined(__SSE__) || defined(__x86_64__)
#include <xmmintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "common.h"
#include "nce_checks.h"
#include "simd.h"

namespace iic_ext {
namespace {

#define IIC_INLINE inline __attribute__((always_inline))
// for lambdas, which would otherwise be compiled out of line without the caller's instruction set
#define IIC_INLINE_FN __attribute__((always_inline))

// ---- SIMD building blocks (GCC/Clang vector extensions: 64-byte vectors) ------------------------

template <typename T>
struct Vec;
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(64)));
  static constexpr int W = 16;
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(64)));
  static constexpr int W = 8;
};

template <typename T>
IIC_INLINE typename Vec<T>::type vload(const T* p) {
  typename Vec<T>::type v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T>
IIC_INLINE void vstore(T* p, typename Vec<T>::type v) {
  std::memcpy(p, &v, sizeof(v));
}

// Horizontal sum as a tree (halves added pairwise): a short dependency chain, fixed order.
template <typename T>
IIC_INLINE T hsum(typename Vec<T>::type v) {
  typedef T half_t __attribute__((vector_size(32)));
  typedef T quarter_t __attribute__((vector_size(16)));
  half_t lo, hi;
  std::memcpy(&lo, &v, 32);
  std::memcpy(&hi, reinterpret_cast<const char*>(&v) + 32, 32);
  lo += hi;
  quarter_t a, b;
  std::memcpy(&a, &lo, 16);
  std::memcpy(&b, reinterpret_cast<const char*>(&lo) + 16, 16);
  a += b;
  constexpr int n = 16 / sizeof(T);
  T s[n];
  std::memcpy(s, &a, 16);
  if constexpr (n == 4) {
    return (s[0] + s[2]) + (s[1] + s[3]);
  } else {
    return s[0] + s[1];
  }
}

// Four horizontal sums at once, each in hsum's order (bit-identical to four hsum calls): the halves of
// every vector are added as hsum adds them, with two vectors' quarters and all four vectors' last
// steps packed into one vector operation each.
IIC_INLINE void hsum4_float(Vec<float>::type v0, Vec<float>::type v1, Vec<float>::type v2, Vec<float>::type v3,
                            float out[4]) {
  typedef float V8 __attribute__((vector_size(32)));
  typedef float V4 __attribute__((vector_size(16)));
#define IIC_HALVES(v) \
  (V8(__builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7)) + V8(__builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15)))
  const V8 h0 = IIC_HALVES(v0), h1 = IIC_HALVES(v1), h2 = IIC_HALVES(v2), h3 = IIC_HALVES(v3);
#undef IIC_HALVES
  // [quarters of v0 | quarters of v1], [v2 | v3]: lane i + lane i + 4, as hsum's a += b
  const V8 q01 = __builtin_shufflevector(h0, h1, 0, 1, 2, 3, 8, 9, 10, 11) +
                 __builtin_shufflevector(h0, h1, 4, 5, 6, 7, 12, 13, 14, 15);
  const V8 q23 = __builtin_shufflevector(h2, h3, 0, 1, 2, 3, 8, 9, 10, 11) +
                 __builtin_shufflevector(h2, h3, 4, 5, 6, 7, 12, 13, 14, 15);
  // (s0 + s2) and (s1 + s3) of each vector, then their sum
  const V8 x = __builtin_shufflevector(q01, q23, 0, 4, 8, 12, 1, 5, 9, 13) +
               __builtin_shufflevector(q01, q23, 2, 6, 10, 14, 3, 7, 11, 15);
  const V4 r = V4(__builtin_shufflevector(x, x, 0, 1, 2, 3)) + V4(__builtin_shufflevector(x, x, 4, 5, 6, 7));
  std::memcpy(out, &r, 16);
}

template <typename T>
IIC_INLINE void hsum4(typename Vec<T>::type v0, typename Vec<T>::type v1, typename Vec<T>::type v2,
                      typename Vec<T>::type v3, T out[4]) {
  if constexpr (std::is_same_v<T, float>) {
    hsum4_float(v0, v1, v2, v3, out);
  } else {
    out[0] = hsum<T>(v0), out[1] = hsum<T>(v1), out[2] = hsum<T>(v2), out[3] = hsum<T>(v3);
  }
}

// Sixteen horizontal sums at once: lane i of the result is the sum of the lanes of v[i]. Each step adds
// the two halves of every vector and packs two vectors' halves into one (512 -> 256 -> 128 -> 64 -> 32
// bits per sum), so a sum's order depends only on its own vector.
IIC_INLINE Vec<float>::type hsum16(const Vec<float>::type v[16]) {
  using V = Vec<float>::type;
  V x[8], y[4], z[2];
  for (int i = 0; i < 8; ++i) {
    const V a = v[2 * i], b = v[2 * i + 1];
    x[i] = __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  }
  for (int i = 0; i < 4; ++i)
    y[i] = __builtin_shufflevector(x[2 * i], x[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
           __builtin_shufflevector(x[2 * i], x[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  for (int i = 0; i < 2; ++i)
    z[i] = __builtin_shufflevector(y[2 * i], y[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
           __builtin_shufflevector(y[2 * i], y[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  return __builtin_shufflevector(z[0], z[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         __builtin_shufflevector(z[0], z[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

// One dot product, two accumulators to halve the dependency chain.
template <typename T>
IIC_INLINE T dot1(const T* a, const T* b, int64_t D) {
  using V = typename Vec<T>::type;
  constexpr int W = Vec<T>::W;
  V s0{}, s1{};
  int64_t d = 0;
  for (; d + 2 * W <= D; d += 2 * W) {
    s0 += vload(a + d) * vload(b + d);
    s1 += vload(a + d + W) * vload(b + d + W);
  }
  if (d + W <= D) {
    s0 += vload(a + d) * vload(b + d);
    d += W;
  }
  T r = hsum<T>(s0 + s1);
  for (; d < D; ++d) r += a[d] * b[d];
  return r;
}

// Four independent dot products a_t . b_t (pointers may repeat).
template <typename T>
IIC_INLINE void dot4(const T* const a[4], const T* const b[4], int64_t D, T out[4]) {
  using V = typename Vec<T>::type;
  constexpr int W = Vec<T>::W;
  V s0{}, s1{}, s2{}, s3{};
  int64_t d = 0;
  for (; d + W <= D; d += W) {
    s0 += vload(a[0] + d) * vload(b[0] + d);
    s1 += vload(a[1] + d) * vload(b[1] + d);
    s2 += vload(a[2] + d) * vload(b[2] + d);
    s3 += vload(a[3] + d) * vload(b[3] + d);
  }
  T r[4];
  hsum4<T>(s0, s1, s2, s3, r);
  T r0 = r[0], r1 = r[1], r2 = r[2], r3 = r[3];
  for (; d < D; ++d) {
    r0 += a[0][d] * b[0][d];
    r1 += a[1][d] * b[1][d];
    r2 += a[2][d] * b[2][d];
    r3 += a[3][d] * b[3][d];
  }
  out[0] = r0;
  out[1] = r1;
  out[2] = r2;
  out[3] = r3;
}

// Four dot products a . b_t of one row a.
template <typename T>
IIC_INLINE void dot1x4(const T* a, const T* const b[4], int64_t D, T out[4]) {
  using V = typename Vec<T>::type;
  constexpr int W = Vec<T>::W;
  V s0{}, s1{}, s2{}, s3{};
  int64_t d = 0;
  for (; d + W <= D; d += W) {
    const V x = vload(a + d);
    s0 += x * vload(b[0] + d);
    s1 += x * vload(b[1] + d);
    s2 += x * vload(b[2] + d);
    s3 += x * vload(b[3] + d);
  }
  T r[4];
  hsum4<T>(s0, s1, s2, s3, r);
  T r0 = r[0], r1 = r[1], r2 = r[2], r3 = r[3];
  for (; d < D; ++d) {
    r0 += a[d] * b[0][d];
    r1 += a[d] * b[1][d];
    r2 += a[d] * b[2][d];
    r3 += a[d] * b[3][d];
  }
  out[0] = r0;
  out[1] = r1;
  out[2] = r2;
  out[3] = r3;
}

// acc += g * r
template <typename T>
IIC_INLINE void axpy1(T* __restrict acc, T g, const T* r, int64_t D) {
  constexpr int W = Vec<T>::W;
  int64_t d = 0;
  for (; d + W <= D; d += W) vstore(acc + d, vload(acc + d) + g * vload(r + d));
  for (; d < D; ++d) acc[d] += g * r[d];
}

// acc += g0 r0 + g1 r1 + g2 r2 + g3 r3 (summed left to right)
template <typename T>
IIC_INLINE void axpy4(T* __restrict acc, const T g[4], const T* const r[4], int64_t D) {
  using V = typename Vec<T>::type;
  constexpr int W = Vec<T>::W;
  int64_t d = 0;
  for (; d + W <= D; d += W) {
    V s = vload(acc + d);
    s += g[0] * vload(r[0] + d);
    s += g[1] * vload(r[1] + d);
    s += g[2] * vload(r[2] + d);
    s += g[3] * vload(r[3] + d);
    vstore(acc + d, s);
  }
  for (; d < D; ++d) {
    T s = acc[d];
    s += g[0] * r[0][d];
    s += g[1] * r[1][d];
    s += g[2] * r[2][d];
    s += g[3] * r[3][d];
    acc[d] = s;
  }
}

// Row r of the bank in the accumulation type: the row itself, or converted into buf.
template <typename bank_t, typename acc_t>
IIC_INLINE const acc_t* load_row(const bank_t* bank, int64_t ld, int64_t r, int64_t D, acc_t* buf) {
  const bank_t* src = bank + r * ld;
  if constexpr (std::is_same_v<bank_t, acc_t>) {
    return src;
  } else {
    for (int64_t d = 0; d < D; ++d) buf[d] = static_cast<acc_t>(src[d]);
    return buf;
  }
}

template <typename bank_t>
IIC_INLINE void prefetch_row(const bank_t* bank, int64_t ld, int64_t r, int64_t D) {
  const char* p = reinterpret_cast<const char*>(bank + r * ld);
  const int64_t bytes = D * static_cast<int64_t>(sizeof(bank_t));
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(p + o);
}

// ---- the problem: which bank rows are dotted with which features, and where the results go --------

// A job pairs one bank with the one or two feature matrices its rows are dotted with (the negative
// bank of IIC serves both views). Forward: mat[i][b, off[i] + k] = scale * <bank[idx[b, k]], feat[i][b]>.
// Backward: grad[slot[i]][b] += scale * mat[i][b, off[i] + k] * bank[idx[b, k]].
template <typename bank_t, typename acc_t>
struct Job {
  const bank_t* bank;
  int64_t ld;
  int nf;
  const acc_t* feat[2];  // [B, D] contiguous (forward)
  acc_t* mat[2];         // [B, C] contiguous: scores written (forward) or gradients read (backward)
  int64_t off[2];
  int slot[2];  // which feature gradient (backward)
};

template <typename bank_t, typename acc_t>
struct Problem {
  int64_t B, Kc, C, D;  // rows and columns of idx, columns of mat, feature size
  const int64_t* idx;   // [B, Kc] contiguous
  acc_t scale;
  int njobs;
  int nslots;  // feature gradients (backward)
  Job<bank_t, acc_t> jobs[3];
  // the IIC layout (set_iic_jobs): jobs bank_ab with l, bank_l with ab and, when neg, bank_neg with both
  bool iic = false, neg = false;
};

// (b, k) pairs grouped by bank row (a counting sort, stable): the pairs of row r are
// pair[start[r] .. start[r + 1]), encoded (b << shift) | k, in increasing (b, k) order. When asked for,
// where[b * Kc + k] is the position of pair (b, k) in pair (the inverse permutation).
struct RowGroups {
  std::vector<int32_t> start, pair, where;
  int shift;
  int64_t C;
  IIC_INLINE int64_t b_of(int32_t e) const { return e >> shift; }
  IIC_INLINE int64_t at_of(int32_t e) const { return (e >> shift) * C + (e & ((1 << shift) - 1)); }
};

int ceil_log2(int64_t x) {
  int s = 0;
  while ((int64_t{1} << s) < x) ++s;
  return s;
}

// Row grouping needs the pair codes to fit 31 bits.
bool groupable(int64_t B, int64_t Kc, int64_t N) {
  return N < (int64_t{1} << 31) && ceil_log2(Kc) < 31 && B <= (int64_t{1} << (31 - ceil_log2(Kc))) - 1;
}

// Counting sort, in parallel over ranges of rows: each task scans all pairs in (b, k) order and keeps
// those of its rows, so the tasks write disjoint parts of the output (no shared cache lines) and every
// row lists its pairs in (b, k) order whatever the number of tasks.
RowGroups group_by_row(const int64_t* idx, int64_t B, int64_t Kc, int64_t C, int64_t N, bool with_where = false) {
  RowGroups g;
  g.shift = ceil_log2(Kc);
  g.C = C;
  const int64_t P = B * Kc;
  // small problems stay on one thread: a parallel region costs more than the sort
  const int64_t nch = P < (int64_t{1} << 18) ? 1 : std::max<int64_t>(1, std::min<int64_t>(N / 1024, at::get_num_threads()));
  std::vector<int32_t> cnt(N + 1, 0);
  at::parallel_for(0, nch, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const uint64_t lo = N * c / nch, span = N * (c + 1) / nch - lo;
      int32_t* ct = cnt.data();
      for (int64_t p = 0; p < P; ++p)
        if (static_cast<uint64_t>(idx[p]) - lo < span) ++ct[idx[p]];
    }
  });
  g.start.assign(N + 1, 0);
  int32_t* st = g.start.data();
  for (int64_t r = 0; r < N; ++r) st[r + 1] = st[r] + cnt[r];
  std::copy(g.start.begin(), g.start.end(), cnt.begin());  // write positions
  g.pair.resize(P);
  if (with_where) g.where.resize(P);
  int32_t* pr = g.pair.data();
  int32_t* wh = g.where.data();
  at::parallel_for(0, nch, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const uint64_t lo = N * c / nch, span = N * (c + 1) / nch - lo;
      int32_t* pos = cnt.data();
      for (int64_t b = 0; b < B; ++b) {
        const int64_t* ix = idx + b * Kc;
        const int32_t hi = static_cast<int32_t>(b << g.shift);
        for (int64_t k = 0; k < Kc; ++k) {
          if (static_cast<uint64_t>(ix[k]) - lo >= span) continue;
          const int32_t q = pos[ix[k]]++;
          pr[q] = hi | static_cast<int32_t>(k);
          if (with_where) wh[b * Kc + k] = q;
        }
      }
    }
  });
  return g;
}

// ---- work units (compiled once per instruction set) ------------------------------------------------

constexpr int64_t kPrefetchAhead = 8;  // rows

// Scores of pairs (b, k0 .. k1): gather each row and dot it.
template <typename bank_t, typename acc_t>
IIC_INLINE void fwd_gather_impl(const Problem<bank_t, acc_t>& p, int64_t b, int64_t k0, int64_t k1, acc_t* buf) {
  const int64_t D = p.D, Kc = p.Kc, C = p.C;
  const int64_t* ix = p.idx + b * Kc;
  for (int j = 0; j < p.njobs; ++j) {
    const auto& job = p.jobs[j];
    int64_t k = k0;
    for (; k + 4 <= k1; k += 4) {
      for (int64_t t = k + kPrefetchAhead; t < std::min(k + kPrefetchAhead + 4, k1); ++t)
        prefetch_row(job.bank, job.ld, ix[t], D);
      const acc_t* r[4];
      for (int t = 0; t < 4; ++t) r[t] = load_row(job.bank, job.ld, ix[k + t], D, buf + t * D);
      for (int i = 0; i < job.nf; ++i) {
        const acc_t* f = job.feat[i] + b * D;
        const acc_t* fv[4] = {f, f, f, f};
        acc_t o[4];
        dot4(r, fv, D, o);
        acc_t* out = job.mat[i] + b * C + job.off[i] + k;
        for (int t = 0; t < 4; ++t) out[t] = o[t] * p.scale;
      }
    }
    for (; k < k1; ++k) {
      const acc_t* r = load_row(job.bank, job.ld, ix[k], D, buf);
      for (int i = 0; i < job.nf; ++i)
        job.mat[i][b * C + job.off[i] + k] = dot1(r, job.feat[i] + b * D, D) * p.scale;
    }
  }
}

// Scores of every pair of bank rows r0 .. r1: each touched row read once, dotted with all its pairs.
// The scores go to sc[q * W + w] in pair order (q the pair's position, w counting (job, feature) in
// order, W in all): the tasks write disjoint ranges, where writing each score to its place in the
// output would have both threads storing into the same cache lines (a row's pairs are spread over
// the whole output).
template <typename bank_t, typename acc_t>
IIC_INLINE void fwd_rows_impl(const Problem<bank_t, acc_t>& p, const RowGroups& g, int64_t r0, int64_t r1,
                              acc_t* buf, acc_t* sc, int W) {
  const int64_t D = p.D;
  const int32_t* st = g.start.data();
  const int32_t* pr = g.pair.data();
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t s = st[r], e = st[r + 1];
    if (s == e) continue;
    int w = 0;
    for (int j = 0; j < p.njobs; ++j) {
      const auto& job = p.jobs[j];
      const acc_t* row = load_row(job.bank, job.ld, r, D, buf);
      for (int i = 0; i < job.nf; ++i, ++w) {
        const acc_t* feat = job.feat[i];
        acc_t* out = sc + w;
        int64_t q = s;
        for (; q + 4 <= e; q += 4) {
          const acc_t* fv[4];
          for (int t = 0; t < 4; ++t) fv[t] = feat + g.b_of(pr[q + t]) * D;
          acc_t o[4];
          dot1x4(row, fv, D, o);
          for (int t = 0; t < 4; ++t) out[(q + t) * W] = o[t] * p.scale;
        }
        for (; q < e; ++q) out[q * W] = dot1(row, feat + g.b_of(pr[q]) * D, D) * p.scale;
      }
    }
  }
}

// acc[slot][D] for this b += contributions of pairs (b, k0 .. k1).
template <typename bank_t, typename acc_t>
IIC_INLINE void bwd_gather_impl(const Problem<bank_t, acc_t>& p, int64_t b, int64_t k0, int64_t k1, acc_t* const* acc,
                                acc_t* buf) {
  const int64_t D = p.D, Kc = p.Kc, C = p.C;
  const int64_t* ix = p.idx + b * Kc;
  for (int j = 0; j < p.njobs; ++j) {
    const auto& job = p.jobs[j];
    int64_t k = k0;
    for (; k + 4 <= k1; k += 4) {
      for (int64_t t = k + kPrefetchAhead; t < std::min(k + kPrefetchAhead + 4, k1); ++t)
        prefetch_row(job.bank, job.ld, ix[t], D);
      const acc_t* r[4];
      for (int t = 0; t < 4; ++t) r[t] = load_row(job.bank, job.ld, ix[k + t], D, buf + t * D);
      for (int i = 0; i < job.nf; ++i) {
        const acc_t* gin = job.mat[i] + b * C + job.off[i] + k;
        const acc_t gv[4] = {gin[0] * p.scale, gin[1] * p.scale, gin[2] * p.scale, gin[3] * p.scale};
        axpy4(acc[job.slot[i]], gv, r, D);
      }
    }
    for (; k < k1; ++k) {
      const acc_t* r = load_row(job.bank, job.ld, ix[k], D, buf);
      for (int i = 0; i < job.nf; ++i)
        axpy1(acc[job.slot[i]], job.mat[i][b * C + job.off[i] + k] * p.scale, r, D);
    }
  }
}

// part[slot][b][D] += contributions of the pairs of bank rows r0 .. r1.
template <typename bank_t, typename acc_t>
IIC_INLINE void bwd_rows_impl(const Problem<bank_t, acc_t>& p, const RowGroups& g, int64_t r0, int64_t r1,
                              acc_t* part, acc_t* buf) {
  const int64_t D = p.D, B = p.B;
  const int32_t* st = g.start.data();
  const int32_t* pr = g.pair.data();
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t s = st[r], e = st[r + 1];
    if (s == e) continue;
    for (int j = 0; j < p.njobs; ++j) {
      const auto& job = p.jobs[j];
      const acc_t* row = load_row(job.bank, job.ld, r, D, buf);
      for (int i = 0; i < job.nf; ++i) {
        const acc_t* gin = job.mat[i] + job.off[i];
        acc_t* base = part + job.slot[i] * B * D;
        for (int64_t q = s; q < e; ++q) axpy1(base + g.b_of(pr[q]) * D, gin[g.at_of(pr[q])] * p.scale, row, D);
      }
    }
  }
}

// ---- the fused softmax loss: logits, cross-entropy and its gradient in one pass ------------------------
//
// For each sample b and view v the logits s_j = inv_t <row_j, f_b> over the view's sampled rows (column
// 0 the positive) give loss = logsumexp(s) - s_0 and d loss / d f_b = inv_t (sum_j p_j row_j - row_0),
// p = softmax(s). Both come from an online softmax: a state (m, z, acc) with m a running shift,
// z = sum exp(s_j - m) and acc = sum exp(s_j - m) row_j, so every sampled row is read once and the
// logits are never stored. The shift starts at s_0 (the positive, in every row set) and grows only when
// a larger logit arrives. States of separate work units merge exactly: (m, z, acc) rescaled to the
// larger m and added, in unit order.

template <typename acc_t>
struct SoftmaxState {
  acc_t* m;    // [2, B]
  acc_t* z;    // [2, B]
  acc_t* acc;  // [2, B, D]
};

template <typename bank_t, typename acc_t>
struct LossProblem {
  int64_t B, K1, D;
  const int64_t* idx;  // [B, K1]
  acc_t scale;
  const bank_t* bank[3];  // bank_l, bank_ab, bank_neg (used only when neg)
  int64_t ld[3];
  bool neg;
  const acc_t* feat[2];  // l, ab: [B, D]
  const acc_t* s0;       // [2, B] logits of the positives
};

// A run: n draws (n <= kRun) of one bank row, by samples whose features are fl[j], fab[j]. The row's
// vectors are loaded once per run and shared by its draws.
constexpr int kRun = 4;

// The logits of a run, out[4 j ..] = {r_ab . fl[j], r_neg . fl[j], r_l . fab[j], r_neg . fab[j]} (without
// the negative bank, NEG false, slots 1 and 3 are 0). Each dot: vector partial sums in d order, then one
// horizontal sum (float runs of 3 or 4: all at once with hsum16, so out has room for 4 kRun values).
template <typename T, int n, bool NEG>
IIC_INLINE void dot_run(const T* r_l, const T* r_ab, const T* r_neg, const T* const* fl, const T* const* fab,
                        int64_t D, T* out) {
  using V = typename Vec<T>::type;
  constexpr int W = Vec<T>::W;
  V s[n][4];
  for (int j = 0; j < n; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = V{};
  int64_t d = 0;
  for (; d + W <= D; d += W) {
    const V rl = vload(r_l + d), rab = vload(r_ab + d);
    V rn{};
    if constexpr (NEG) rn = vload(r_neg + d);
    for (int j = 0; j < n; ++j) {
      const V a = vload(fl[j] + d), b = vload(fab[j] + d);
      s[j][0] += rab * a;
      s[j][2] += rl * b;
      if constexpr (NEG) {
        s[j][1] += rn * a;
        s[j][3] += rn * b;
      }
    }
  }
  if constexpr (std::is_same_v<T, float> && n > 2) {  // the same sums as hsum4, in fewer operations
    V a[16];
    for (int j = 0; j < kRun; ++j)
      for (int q = 0; q < 4; ++q) a[4 * j + q] = j < n ? s[j][q] : V{};
    vstore(out, hsum16(a));
  } else {
    for (int j = 0; j < n; ++j) hsum4<T>(s[j][0], s[j][1], s[j][2], s[j][3], out + 4 * j);
  }
  for (int j = 0; j < n; ++j) {
    T* o = out + 4 * j;
    for (int64_t e = d; e < D; ++e) {
      o[0] += r_ab[e] * fl[j][e];
      o[2] += r_l[e] * fab[j][e];
      if constexpr (NEG) {
        o[1] += r_neg[e] * fl[j][e];
        o[3] += r_neg[e] * fab[j][e];
      }
    }
  }
}

// The accumulation of a run: acc_l[j] += w0 r_ab + w1 r_neg, acc_ab[j] += w2 r_l + w3 r_neg with
// w = w[4 j ..] (without the negative bank only the first terms). Two draws of a run may share a sample
// (the same pointers): each update is loaded and stored in draw order.
template <typename T, int n, bool NEG>
IIC_INLINE void axpy_run(T* const* acc_l, T* const* acc_ab, const T* w, const T* r_l, const T* r_ab,
                         const T* r_neg, int64_t D) {
  using V = typename Vec<T>::type;
  constexpr int W = Vec<T>::W;
  int64_t d = 0;
  for (; d + W <= D; d += W) {
    const V rl = vload(r_l + d), rab = vload(r_ab + d);
    V rn{};
    if constexpr (NEG) rn = vload(r_neg + d);
    for (int j = 0; j < n; ++j) {
      const T* wj = w + 4 * j;
      if constexpr (NEG) {
        vstore(acc_l[j] + d, vload(acc_l[j] + d) + wj[0] * rab + wj[1] * rn);
        vstore(acc_ab[j] + d, vload(acc_ab[j] + d) + wj[2] * rl + wj[3] * rn);
      } else {
        vstore(acc_l[j] + d, vload(acc_l[j] + d) + wj[0] * rab);
        vstore(acc_ab[j] + d, vload(acc_ab[j] + d) + wj[2] * rl);
      }
    }
  }
  for (; d < D; ++d) {
    for (int j = 0; j < n; ++j) {
      const T* wj = w + 4 * j;
      if constexpr (NEG) {
        acc_l[j][d] += wj[0] * r_ab[d] + wj[1] * r_neg[d];
        acc_ab[j][d] += wj[2] * r_l[d] + wj[3] * r_neg[d];
      } else {
        acc_l[j][d] += wj[0] * r_ab[d];
        acc_ab[j][d] += wj[2] * r_l[d];
      }
    }
  }
}

// dot_run / axpy_run for a run length n (1 .. kRun) known at run time.
template <bool NEG, typename T>
IIC_INLINE void dot_run_n(int n, const T* r_l, const T* r_ab, const T* r_neg, const T* const* fl,
                          const T* const* fab, int64_t D, T* out) {
  switch (n) {
    case 1: dot_run<T, 1, NEG>(r_l, r_ab, r_neg, fl, fab, D, out); break;
    case 2: dot_run<T, 2, NEG>(r_l, r_ab, r_neg, fl, fab, D, out); break;
    case 3: dot_run<T, 3, NEG>(r_l, r_ab, r_neg, fl, fab, D, out); break;
    default: dot_run<T, kRun, NEG>(r_l, r_ab, r_neg, fl, fab, D, out); break;
  }
}

template <bool NEG, typename T>
IIC_INLINE void axpy_run_n(int n, T* const* acc_l, T* const* acc_ab, const T* w, const T* r_l, const T* r_ab,
                           const T* r_neg, int64_t D) {
  switch (n) {
    case 1: axpy_run<T, 1, NEG>(acc_l, acc_ab, w, r_l, r_ab, r_neg, D); break;
    case 2: axpy_run<T, 2, NEG>(acc_l, acc_ab, w, r_l, r_ab, r_neg, D); break;
    case 3: axpy_run<T, 3, NEG>(acc_l, acc_ab, w, r_l, r_ab, r_neg, D); break;
    default: axpy_run<T, kRun, NEG>(acc_l, acc_ab, w, r_l, r_ab, r_neg, D); break;
  }
}

// x *= c
template <typename T>
IIC_INLINE void scale_row(T* __restrict x, T c, int64_t D) {
  constexpr int W = Vec<T>::W;
  int64_t d = 0;
  for (; d + W <= D; d += W) vstore(x + d, c * vload(x + d));
  for (; d < D; ++d) x[d] *= c;
}

// out[i] = exp(x[i]), i < n rounded up to whole vectors (x and out hold that many values). float: a
// Cephes-style polynomial on 2^k, 16 values per vector (within 2 ulp; below the smallest normal float
// the result is 0; NaN stays NaN); double: std::exp.
IIC_INLINE void exp_n(const float* x, float* out, int n) {
  using V = Vec<float>::type;
  typedef int32_t VI __attribute__((vector_size(64)));
  constexpr int W = Vec<float>::W;
  for (int i = 0; i < n; i += W) {
    const V v = vload(x + i);
    const V lo = v - v - 87.33654f, hi = v - v + 88.0f, zero = v - v;
    V t = v < lo ? lo : (v > hi ? hi : v);
    const V fx = t * 1.44269504088896341f + 0.5f;
    VI k = __builtin_convertvector(fx, VI);  // truncation: floor for fx >= 0, floor + 1 below
    k = __builtin_convertvector(k, V) > fx ? k - 1 : k;
    const V fk = __builtin_convertvector(k, V);
    V r = t - fk * 0.693359375f;
    r = r - fk * -2.12194440e-4f;
    V y = zero + 1.9875691500E-4f;
    y = y * r + 1.3981999507E-3f;
    y = y * r + 8.3334519073E-3f;
    y = y * r + 4.1665795894E-2f;
    y = y * r + 1.6666665459E-1f;
    y = y * r + 5.0000001201E-1f;
    y = y * r * r + r + 1.0f;
    const VI bits = (k + 127) << 23;
    V p2;
    std::memcpy(&p2, &bits, sizeof(p2));
    y = y * p2;
    y = v < lo ? zero : y;
    y = v != v ? v : y;
    vstore(out + i, y);
  }
}

IIC_INLINE void exp_n(const double* x, double* out, int n) {
  for (int i = 0; i < n; ++i) out[i] = std::exp(x[i]);
}

// Raise the shift of a state to mx (> m): z and acc scale by exp(m - mx).
template <typename acc_t>
IIC_INLINE void raise_shift(acc_t& m, acc_t& z, acc_t* acc, acc_t mx, int64_t D) {
  const acc_t c = std::exp(m - mx);
  z *= c;
  scale_row(acc, c, D);
  m = mx;
}

constexpr int kDrawBlock = 16;  // draws whose exponentials are computed together

// Draws (b[i], r[i]), i < n, added to the states m, z [2, B] and acc [2, B, D] (view l first): bank_ab
// and bank_neg rows scored against l, bank_l and bank_neg rows against ab. The logits of the block come
// first, then the shifts are raised where a logit exceeds them, then all exponentials at once (they
// are independent: the vector unit and the out-of-order core overlap them), then the accumulation.
// Consecutive draws of the same row form runs (up to kRun draws) that load the row once.
// buf: 3 kDrawBlock D values (rows converted from a low-precision bank).
template <bool NEG, typename bank_t, typename acc_t>
IIC_INLINE void loss_block_runs(const LossProblem<bank_t, acc_t>& p, const int64_t* bs, const int64_t* rs, int n,
                                acc_t* buf, acc_t* m, acc_t* z, acc_t* acc, int64_t B) {
  const int64_t D = p.D;
  acc_t s[4 * kDrawBlock + 4 * kRun], w[4 * kDrawBlock];  // s: room for dot_run's whole-vector store
  int run[kDrawBlock + 1];  // run u is draws run[u] .. run[u + 1]
  const acc_t* rows[kDrawBlock][3];
  int nr = 0;
  for (int i = 0; i < n; ++nr) {
    int e = i + 1;
    while (e < n && e - i < kRun && rs[e] == rs[i]) ++e;
    run[nr] = i;
    const int64_t r = rs[i];
    acc_t* bb = buf + 3 * nr * D;
    const acc_t* r_l = rows[nr][0] = load_row(p.bank[0], p.ld[0], r, D, bb);
    const acc_t* r_ab = rows[nr][1] = load_row(p.bank[1], p.ld[1], r, D, bb + D);
    const acc_t* r_neg = rows[nr][2] = NEG ? load_row(p.bank[2], p.ld[2], r, D, bb + 2 * D) : nullptr;
    const acc_t* fl[kRun];
    const acc_t* fab[kRun];
    for (int j = 0; j < e - i; ++j) fl[j] = p.feat[0] + bs[i + j] * D, fab[j] = p.feat[1] + bs[i + j] * D;
    acc_t* si = s + 4 * i;
    dot_run_n<NEG>(e - i, r_l, r_ab, r_neg, fl, fab, D, si);
    i = e;
  }
  run[nr] = n;
  for (int i = 0; i < 4 * n; ++i) s[i] *= p.scale;
  for (int i = 0; i < n; ++i) {
    const int64_t b = bs[i];
    const acc_t* si = s + 4 * i;
    const acc_t mx_l = NEG ? std::max(si[0], si[1]) : si[0];
    const acc_t mx_ab = NEG ? std::max(si[2], si[3]) : si[2];
    if (mx_l > m[b]) raise_shift(m[b], z[b], acc + b * D, mx_l, D);
    if (mx_ab > m[B + b]) raise_shift(m[B + b], z[B + b], acc + (B + b) * D, mx_ab, D);
  }
  for (int i = 0; i < n; ++i) {
    const int64_t b = bs[i];
    for (int j = 0; j < 4; ++j) s[4 * i + j] -= m[j < 2 ? b : B + b];
  }
  for (int i = 4 * n; i < 4 * kDrawBlock; ++i) s[i] = 0;  // whole vectors: the padding is computed, unused
  exp_n(s, w, 4 * n);
  for (int i = 0; i < n; ++i) {
    const int64_t b = bs[i];
    const acc_t* wi = w + 4 * i;
    if (NEG) {
      z[b] += wi[0] + wi[1];
      z[B + b] += wi[2] + wi[3];
    } else {
      z[b] += wi[0];
      z[B + b] += wi[2];
    }
  }
  for (int u = 0; u < nr; ++u) {
    const int i = run[u], len = run[u + 1] - i;
    acc_t* acc_l[kRun];
    acc_t* acc_ab[kRun];
    for (int j = 0; j < len; ++j) acc_l[j] = acc + bs[i + j] * D, acc_ab[j] = acc + (B + bs[i + j]) * D;
    const acc_t* const* r = rows[u];
    axpy_run_n<NEG>(len, acc_l, acc_ab, w + 4 * i, r[0], r[1], r[2], D);
  }
}

template <typename bank_t, typename acc_t>
IIC_INLINE void loss_block(const LossProblem<bank_t, acc_t>& p, const int64_t* bs, const int64_t* rs, int n,
                           acc_t* buf, acc_t* m, acc_t* z, acc_t* acc, int64_t B) {
  if (p.neg) {
    loss_block_runs<true>(p, bs, rs, n, buf, m, z, acc, B);
  } else {  // the CMC form: slots 1 and 3 (the negative bank's) stay unused
    loss_block_runs<false>(p, bs, rs, n, buf, m, z, acc, B);
  }
}

template <typename bank_t, typename acc_t>
IIC_INLINE void prefetch_draw(const LossProblem<bank_t, acc_t>& p, int64_t r) {
  for (int j = 0; j < (p.neg ? 3 : 2); ++j) prefetch_row(p.bank[j], p.ld[j], r, p.D);
}

// Draws (b, k0 .. k1) of one sample into a state laid out for a single sample (B = 1).
template <typename bank_t, typename acc_t>
IIC_INLINE void loss_gather_impl(const LossProblem<bank_t, acc_t>& p, int64_t b, int64_t k0, int64_t k1,
                                 acc_t* m, acc_t* z, acc_t* acc, acc_t* buf) {
  const int64_t* ix = p.idx + b * p.K1;
  // the state of sample b, addressed as sample 0 of a one-sample problem
  LossProblem<bank_t, acc_t> q = p;
  q.feat[0] = p.feat[0] + b * p.D;
  q.feat[1] = p.feat[1] + b * p.D;
  const int64_t zeros[kDrawBlock] = {};
  for (int64_t k = k0; k < k1; k += kDrawBlock) {
    const int n = static_cast<int>(std::min<int64_t>(kDrawBlock, k1 - k));
    for (int64_t t = k + kDrawBlock; t < std::min(k + 2 * kDrawBlock, k1); ++t) prefetch_draw(p, ix[t]);
    loss_block(q, zeros, ix + k, n, buf, m, z, acc, 1);
  }
}

// Draws of bank rows r0 .. r1 (grouped by row: each touched row read once) into states of all samples.
template <typename bank_t, typename acc_t>
IIC_INLINE void loss_rows_impl(const LossProblem<bank_t, acc_t>& p, const RowGroups& g, int64_t r0, int64_t r1,
                               acc_t* m, acc_t* z, acc_t* acc, acc_t* buf) {
  const int32_t* st = g.start.data();
  const int32_t* pr = g.pair.data();
  int64_t bs[kDrawBlock], rs[kDrawBlock];
  int n = 0;
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t q = st[r]; q < st[r + 1]; ++q) {
      bs[n] = g.b_of(pr[q]);
      rs[n] = r;
      if (++n == kDrawBlock) {
        loss_block(p, bs, rs, n, buf, m, z, acc, p.B);
        n = 0;
      }
    }
  }
  if (n > 0) loss_block(p, bs, rs, n, buf, m, z, acc, p.B);
}

// Runs of the draws of bank rows r0 .. r1 (grouped by row) for the IIC scores: fn(r_l, r_ab, r_neg, q, n)
// for the n (<= kRun) pairs pair[q ..] of a row, with its three banks' rows loaded once per row.
template <typename bank_t, typename acc_t, typename Fn>
IIC_INLINE void for_each_iic_run(const Problem<bank_t, acc_t>& p, const RowGroups& g, int64_t r0, int64_t r1,
                                 acc_t* buf, Fn&& fn) {
  const int64_t D = p.D;
  const int32_t* st = g.start.data();
  const auto &j_ab = p.jobs[0], &j_l = p.jobs[1], &j_neg = p.jobs[2];
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t s = st[r], e = st[r + 1];
    if (s == e) continue;
    const acc_t* r_l = load_row(j_l.bank, j_l.ld, r, D, buf);
    const acc_t* r_ab = load_row(j_ab.bank, j_ab.ld, r, D, buf + D);
    const acc_t* r_neg = p.neg ? load_row(j_neg.bank, j_neg.ld, r, D, buf + 2 * D) : nullptr;
    for (int64_t q = s; q < e; q += kRun) fn(r_l, r_ab, r_neg, q, static_cast<int>(std::min<int64_t>(kRun, e - q)));
  }
}

// The IIC scores of bank rows r0 .. r1: all three banks' rows loaded once per run of draws and dotted
// with both features (dot_run), as the loss does. Written to sc in pair order as fwd_rows_impl does,
// in the order of the jobs set by set_iic_jobs: {bank_ab . l, bank_l . ab, bank_neg . l, bank_neg . ab}.
template <typename bank_t, typename acc_t>
IIC_INLINE void iic_fwd_rows_impl(const Problem<bank_t, acc_t>& p, const RowGroups& g, int64_t r0, int64_t r1,
                                  acc_t* buf, acc_t* sc) {
  const int64_t D = p.D;
  const int32_t* pr = g.pair.data();
  const auto run = [&](const acc_t* r_l, const acc_t* r_ab, const acc_t* r_neg, int64_t q, int n) IIC_INLINE_FN {
    const acc_t* fl[kRun];
    const acc_t* fab[kRun];
    for (int j = 0; j < n; ++j) {
      const int64_t b = g.b_of(pr[q + j]);
      fl[j] = p.jobs[0].feat[0] + b * D, fab[j] = p.jobs[1].feat[0] + b * D;
    }
    acc_t o[4 * kRun];
    if (p.neg) {
      dot_run_n<true>(n, r_l, r_ab, r_neg, fl, fab, D, o);
      acc_t* out = sc + q * 4;
      for (int j = 0; j < n; ++j, out += 4) {
        out[0] = o[4 * j] * p.scale;
        out[1] = o[4 * j + 2] * p.scale;
        out[2] = o[4 * j + 1] * p.scale;
        out[3] = o[4 * j + 3] * p.scale;
      }
    } else {
      dot_run_n<false>(n, r_l, r_ab, r_neg, fl, fab, D, o);
      acc_t* out = sc + q * 2;
      for (int j = 0; j < n; ++j, out += 2) {
        out[0] = o[4 * j] * p.scale;
        out[1] = o[4 * j + 2] * p.scale;
      }
    }
  };
  for_each_iic_run(p, g, r0, r1, buf, run);
}

// part[slot][b][D] += the IIC score gradients of bank rows r0 .. r1, each run of draws loading the rows
// once and updating both views' sums (axpy_run).
template <typename bank_t, typename acc_t>
IIC_INLINE void iic_bwd_rows_impl(const Problem<bank_t, acc_t>& p, const RowGroups& g, int64_t r0, int64_t r1,
                                  acc_t* part, acc_t* buf) {
  const int64_t D = p.D, B = p.B, K1 = p.Kc;
  const int32_t* pr = g.pair.data();
  const acc_t* gl = p.jobs[0].mat[0];
  const acc_t* gab = p.jobs[1].mat[0];
  const auto run = [&](const acc_t* r_l, const acc_t* r_ab, const acc_t* r_neg, int64_t q, int n) IIC_INLINE_FN {
    acc_t w[4 * kRun];
    acc_t* acc_l[kRun];
    acc_t* acc_ab[kRun];
    for (int j = 0; j < n; ++j) {
      const int64_t at = g.at_of(pr[q + j]), b = g.b_of(pr[q + j]);
      w[4 * j] = gl[at] * p.scale;
      w[4 * j + 2] = gab[at] * p.scale;
      w[4 * j + 1] = p.neg ? gl[at + K1] * p.scale : acc_t(0);
      w[4 * j + 3] = p.neg ? gab[at + K1] * p.scale : acc_t(0);
      acc_l[j] = part + b * D, acc_ab[j] = part + (B + b) * D;
    }
    if (p.neg) {
      axpy_run_n<true>(n, acc_l, acc_ab, w, r_l, r_ab, r_neg, D);
    } else {
      axpy_run_n<false>(n, acc_l, acc_ab, w, r_l, r_ab, r_neg, D);
    }
  };
  for_each_iic_run(p, g, r0, r1, buf, run);
}

#define IIC_NCE_UNITS(NS, ATTR)                                                                           \
  namespace NS {                                                                                          \
  template <typename bank_t, typename acc_t>                                                              \
  ATTR void fwd_gather(const Problem<bank_t, acc_t>& p, int64_t b, int64_t k0, int64_t k1, acc_t* buf) {  \
    fwd_gather_impl(p, b, k0, k1, buf);                                                                   \
  }                                                                                                       \
  template <typename bank_t, typename acc_t>                                                              \
  ATTR void fwd_rows(const Problem<bank_t, acc_t>& p, const RowGroups& g, int64_t u0, int64_t u1,         \
                     acc_t* buf, acc_t* sc, int W) {                                                      \
    if (p.iic) iic_fwd_rows_impl(p, g, u0, u1, buf, sc); else fwd_rows_impl(p, g, u0, u1, buf, sc, W);    \
  }                                                                                                       \
  template <typename bank_t, typename acc_t>                                                              \
  ATTR void bwd_gather(const Problem<bank_t, acc_t>& p, int64_t b, int64_t k0, int64_t k1,                \
                       acc_t* const* acc, acc_t* buf) {                                                   \
    bwd_gather_impl(p, b, k0, k1, acc, buf);                                                              \
  }                                                                                                       \
  template <typename bank_t, typename acc_t>                                                              \
  ATTR void bwd_rows(const Problem<bank_t, acc_t>& p, const RowGroups& g, int64_t u0, int64_t u1,         \
                     acc_t* part, acc_t* buf) {                                                           \
    if (p.iic) iic_bwd_rows_impl(p, g, u0, u1, part, buf); else bwd_rows_impl(p, g, u0, u1, part, buf);   \
  }                                                                                                       \
  template <typename bank_t, typename acc_t>                                                              \
  ATTR void loss_gather(const LossProblem<bank_t, acc_t>& p, int64_t b, int64_t k0, int64_t k1, acc_t* m,  \
                        acc_t* z, acc_t* acc, acc_t* buf) {                                               \
    loss_gather_impl(p, b, k0, k1, m, z, acc, buf);                                                       \
  }                                                                                                       \
  template <typename bank_t, typename acc_t>                                                              \
  ATTR void loss_rows(const LossProblem<bank_t, acc_t>& p, const RowGroups& g, int64_t r0, int64_t r1,    \
                      acc_t* m, acc_t* z, acc_t* acc, acc_t* buf) {                                       \
    loss_rows_impl(p, g, r0, r1, m, z, acc, buf);                                                         \
  }                                                                                                       \
  }

#if defined(__x86_64__) || defined(__i386__)
IIC_NCE_UNITS(isa_avx512, __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c"))))
IIC_NCE_UNITS(isa_avx2, __attribute__((target("avx2,fma,f16c"))))
#endif
IIC_NCE_UNITS(isa_base, )

#if defined(__x86_64__) || defined(__i386__)
#define IIC_NCE_DISPATCH(FN, ...)                                         \
  do {                                                                    \
    switch (cpu_isa()) {                                                  \
      case Isa::kAvx512: isa_avx512::FN(__VA_ARGS__); break;              \
      case Isa::kAvx2: isa_avx2::FN(__VA_ARGS__); break;                  \
      default: isa_base::FN(__VA_ARGS__);                                 \
    }                                                                     \
  } while (0)
#else
#define IIC_NCE_DISPATCH(FN, ...) isa_base::FN(__VA_ARGS__)
#endif

// ---- plans -------------------------------------------------------------------------------------
// Work units run with denormal inputs read as zero and denormal results flushed to zero (x86 MXCSR,
// restored afterwards). Score gradients from a softmax over unnormalised features at a low temperature
// are often below the smallest normal float (exp(-100) and less); computed with denormals they cost
// ~100x a normal multiply-add, and each of them changes a sum by less than 1e-38.
struct DenormalsAreZero {
#if defined(__SSE__) || defined(__x86_64__)
  unsigned saved = _mm_getcsr();
  DenormalsAreZero() { _mm_setcsr(saved | 0x8040u); }  // FTZ (bit 15) | DAZ (bit 6)
  ~DenormalsAreZero() { _mm_setcsr(saved); }
#endif
};


constexpr int64_t kPairBlock = 256;  // pairs (b, k) per gather task

// Grouping by row pays once the draws outnumber the bank's rows (every touched row is then read once
// and in order); with few draws, gathering avoids the O(N) pass. With several draws per row a GEMM
// against the whole bank (B dots per row, at BLAS speed) beats both: from 4 draws per row for one bank,
// from 8 for the IIC scores, whose grouped kernels read the three banks' rows once for all four dots
// (measured at 7 draws per row they match the GEMMs, at 5 they are 1.5x faster). IIC_EXT_NCE_GROUP_RATIO
// and IIC_EXT_NCE_DENSE_RATIO (draws per bank row; the IIC switch is twice the latter) tune the switches.
double env_ratio(const char* name, double fallback) {
  const char* s = std::getenv(name);
  return s ? std::atof(s) : fallback;
}

bool group_rows(int64_t pairs, int64_t N) {
  static const double ratio = env_ratio("IIC_EXT_NCE_GROUP_RATIO", 1.0);
  return static_cast<double>(pairs) > ratio * static_cast<double>(N);
}

template <typename bank_t, typename acc_t>
bool use_dense(const Problem<bank_t, acc_t>& p, int64_t N) {
  static const double ratio = env_ratio("IIC_EXT_NCE_DENSE_RATIO", 4.0);
  const double pairs = static_cast<double>(p.B * p.Kc);
  // the GEMM reads the bank in the accumulation type: float32 with float32, float64 with float64
  return std::is_same_v<bank_t, acc_t> && pairs > (p.iic ? 2 : 1) * ratio * static_cast<double>(N);
}

template <typename acc_t>
at::TensorOptions acc_options() {
  return at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value);
}

// The job's bank as a tensor [N, D] and its features stacked [nf B, D] (views of the problem's memory).
template <typename bank_t, typename acc_t>
std::pair<at::Tensor, at::Tensor> job_tensors(const Problem<bank_t, acc_t>& p, const Job<bank_t, acc_t>& job,
                                              int64_t N, bool with_feat) {
  const auto opts = acc_options<acc_t>();
  at::Tensor bank = at::from_blob(const_cast<bank_t*>(job.bank), {N, p.D}, {job.ld, 1}, opts);
  if (!with_feat) return {bank, at::Tensor()};
  std::vector<at::Tensor> f;
  for (int i = 0; i < job.nf; ++i) f.push_back(at::from_blob(const_cast<acc_t*>(job.feat[i]), {p.B, p.D}, opts));
  return {bank, job.nf == 1 ? f[0] : at::cat(f)};
}

template <typename bank_t, typename acc_t>
void forward_dense(const Problem<bank_t, acc_t>& p, int64_t N) {
  const int64_t B = p.B, Kc = p.Kc, C = p.C;
  for (int j = 0; j < p.njobs; ++j) {
    const auto& job = p.jobs[j];
    auto [bank, feat] = job_tensors(p, job, N, true);
    const at::Tensor S = at::mm(feat, bank.t()).contiguous();  // [nf B, N]
    const acc_t* s = S.const_data_ptr<acc_t>();
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      const DenormalsAreZero daz;
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t* ix = p.idx + b * Kc;
        for (int i = 0; i < job.nf; ++i) {
          const acc_t* sr = s + (i * B + b) * N;
          acc_t* out = job.mat[i] + b * C + job.off[i];
          for (int64_t k = 0; k < Kc; ++k) out[k] = sr[ix[k]] * p.scale;
        }
      }
    });
  }
}

template <typename bank_t, typename acc_t>
at::Tensor backward_dense(const Problem<bank_t, acc_t>& p, int64_t N) {
  const int64_t B = p.B, Kc = p.Kc, C = p.C;
  const auto opts = acc_options<acc_t>();
  at::Tensor grads = at::zeros({p.nslots, B, p.D}, opts);
  for (int j = 0; j < p.njobs; ++j) {
    const auto& job = p.jobs[j];
    at::Tensor bank = job_tensors(p, job, N, false).first;
    at::Tensor G = at::zeros({job.nf * B, N}, opts);  // the score gradients scattered over the bank rows
    acc_t* gp = G.mutable_data_ptr<acc_t>();
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      const DenormalsAreZero daz;
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t* ix = p.idx + b * Kc;
        for (int i = 0; i < job.nf; ++i) {
          acc_t* gr = gp + (i * B + b) * N;
          const acc_t* gin = job.mat[i] + b * C + job.off[i];
          for (int64_t k = 0; k < Kc; ++k) gr[ix[k]] += gin[k] * p.scale;
        }
      }
    });
    const at::Tensor P = at::mm(G, bank);  // [nf B, D]
    for (int i = 0; i < job.nf; ++i) grads[job.slot[i]].add_(P.narrow(0, i * B, B));
  }
  return grads;
}

template <typename bank_t, typename acc_t>
void run_forward(const Problem<bank_t, acc_t>& p, int64_t N) {
  const int64_t P = p.B * p.Kc;
  if (P == 0) return;
  const int64_t D = p.D;
  if (use_dense(p, N)) {
    forward_dense(p, N);
  } else if (group_rows(P, N) && groupable(p.B, p.Kc, N)) {
    const RowGroups g = group_by_row(p.idx, p.B, p.Kc, p.C, N, /*with_where=*/true);
    // scores in pair order (see fwd_rows_impl), then moved to their places sample by sample
    acc_t* mat[4];
    int64_t off[4];
    int W = 0;
    for (int j = 0; j < p.njobs; ++j)
      for (int i = 0; i < p.jobs[j].nf; ++i, ++W) mat[W] = p.jobs[j].mat[i], off[W] = p.jobs[j].off[i];
    std::unique_ptr<acc_t[]> sc(new acc_t[static_cast<size_t>(P) * W]);  // every entry is written
    at::parallel_for(0, N, 256, [&](int64_t r0, int64_t r1) {
      const DenormalsAreZero daz;
      std::vector<acc_t> buf(3 * D);
      IIC_NCE_DISPATCH(fwd_rows, p, g, r0, r1, buf.data(), sc.get(), W);
    });
    const int32_t* wh = g.where.data();
    const int64_t Kc = p.Kc, C = p.C;
    at::parallel_for(0, p.B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int32_t* q = wh + b * Kc;
        for (int w = 0; w < W; ++w) {
          acc_t* out = mat[w] + b * C + off[w];
          const acc_t* src = sc.get() + w;
          for (int64_t k = 0; k < Kc; ++k) out[k] = src[static_cast<int64_t>(q[k]) * W];
        }
      }
    });
  } else {
    const int64_t nkb = (p.Kc + kPairBlock - 1) / kPairBlock;
    at::parallel_for(0, p.B * nkb, 1, [&](int64_t begin, int64_t end) {
      const DenormalsAreZero daz;
      std::vector<acc_t> buf(4 * D);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t b = t / nkb, kb = t % nkb;
        IIC_NCE_DISPATCH(fwd_gather, p, b, kb * kPairBlock, std::min(p.Kc, (kb + 1) * kPairBlock), buf.data());
      }
    });
  }
}

// out[i] = sum over u of part[u][i] for part [U, M] (contiguous), summed in u order.
template <typename acc_t>
void sum_partials(const acc_t* part, int64_t U, int64_t M, acc_t* out) {
  at::parallel_for(0, M, 4096, [&](int64_t m0, int64_t m1) {
    const DenormalsAreZero daz;
    for (int64_t i = m0; i < m1; ++i) out[i] = part[i];
    for (int64_t u = 1; u < U; ++u)
      for (int64_t i = m0; i < m1; ++i) out[i] += part[u * M + i];
  });
}

// Returns the feature gradients [nslots, B, D] (acc_t). Work units are fixed by the shapes (never by
// the thread count) and their partial sums are added in unit order, so the result is deterministic.
template <typename bank_t, typename acc_t>
at::Tensor run_backward(const Problem<bank_t, acc_t>& p, int64_t N, const at::TensorOptions& opts) {
  const int64_t B = p.B, D = p.D, S = p.nslots;
  const int64_t P = B * p.Kc;
  if (P == 0 || D == 0) return at::zeros({S, B, D}, opts);
  if (use_dense(p, N)) return backward_dense(p, N);
  if (group_rows(P, N) && groupable(p.B, p.Kc, N)) {
    const RowGroups g = group_by_row(p.idx, p.B, p.Kc, p.C, N);
    const int64_t nseg = std::clamp<int64_t>(std::min(N, P) / 2048, 1, 32);
    at::Tensor part = at::zeros({nseg, S, B, D}, opts);
    acc_t* pp = part.mutable_data_ptr<acc_t>();
    at::parallel_for(0, nseg, 1, [&](int64_t s0, int64_t s1) {
      const DenormalsAreZero daz;
      std::vector<acc_t> buf(3 * D);
      for (int64_t s = s0; s < s1; ++s) {
        IIC_NCE_DISPATCH(bwd_rows, p, g, N * s / nseg, N * (s + 1) / nseg, pp + s * S * B * D, buf.data());
      }
    });
    at::Tensor out = at::empty({S, B, D}, opts);
    sum_partials(pp, nseg, S * B * D, out.mutable_data_ptr<acc_t>());
    return out;
  }
  const int64_t nkb = (p.Kc + kPairBlock - 1) / kPairBlock;
  // partial sums [nkb, B, S, D]: unit (b, kb) owns its slice
  at::Tensor part = at::zeros({nkb, B, S, D}, opts);
  acc_t* pp = part.mutable_data_ptr<acc_t>();
  at::parallel_for(0, B * nkb, 1, [&](int64_t begin, int64_t end) {
    const DenormalsAreZero daz;
    std::vector<acc_t> buf(4 * D);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / nkb, kb = t % nkb;
      acc_t* base = pp + (kb * B + b) * S * D;
      acc_t* acc[2] = {base, base + (S > 1 ? D : 0)};
      IIC_NCE_DISPATCH(bwd_gather, p, b, kb * kPairBlock, std::min(p.Kc, (kb + 1) * kPairBlock), acc, buf.data());
    }
  });
  at::Tensor out = at::empty({B, S, D}, opts);
  sum_partials(pp, nkb, B * S * D, out.mutable_data_ptr<acc_t>());
  return out.permute({1, 0, 2}).contiguous();
}

// dst = merge(dst, src) for S states of D values each (m, z: [S]; acc: [S, D]).
template <typename acc_t>
void merge_states(acc_t* m, acc_t* z, acc_t* acc, const acc_t* m2, const acc_t* z2, const acc_t* acc2, int64_t S,
                  int64_t D) {
  for (int64_t i = 0; i < S; ++i) {
    if (z2[i] == 0) continue;  // no draws in this unit
    const acc_t mm = std::max(m[i], m2[i]);
    const acc_t c1 = std::exp(m[i] - mm), c2 = std::exp(m2[i] - mm);
    z[i] = z[i] * c1 + z2[i] * c2;
    acc_t* a = acc + i * D;
    const acc_t* a2 = acc2 + i * D;
    for (int64_t d = 0; d < D; ++d) a[d] = a[d] * c1 + a2[d] * c2;
    m[i] = mm;
  }
}

constexpr int64_t kLossPairBlock = 512;  // draws per gather unit

// Fills m, z [2, B] and acc [2, B, D] (m preset to the positives' logits, z and acc zero).
template <typename bank_t, typename acc_t>
void run_loss(const LossProblem<bank_t, acc_t>& p, int64_t N, acc_t* m, acc_t* z, acc_t* acc) {
  const int64_t B = p.B, D = p.D, K1 = p.K1, P = B * K1;
  const auto opts = acc_options<acc_t>();
  if (group_rows(P, N) && groupable(B, K1, N)) {
    const RowGroups g = group_by_row(p.idx, B, K1, K1, N);
    // fixed units (by shape, not thread count), merged in order: deterministic
    const int64_t nseg = std::clamp<int64_t>(std::min(N, P) / 512, 1, 16);
    const int64_t S = 2 * B;
    at::Tensor part = at::empty({nseg, S * (D + 2)}, opts);
    acc_t* pp = part.mutable_data_ptr<acc_t>();
    at::parallel_for(0, nseg, 1, [&](int64_t s0, int64_t s1) {
      const DenormalsAreZero daz;
      std::vector<acc_t> buf(3 * kDrawBlock * D);
      for (int64_t s = s0; s < s1; ++s) {
        acc_t* um = pp + s * S * (D + 2);
        acc_t* uz = um + S;
        acc_t* ua = uz + S;
        std::copy(m, m + S, um);
        std::fill(uz, uz + S + S * D, acc_t(0));
        IIC_NCE_DISPATCH(loss_rows, p, g, N * s / nseg, N * (s + 1) / nseg, um, uz, ua, buf.data());
      }
    });
    for (int64_t s = 0; s < nseg; ++s) {
      const acc_t* um = pp + s * S * (D + 2);
      merge_states(m, z, acc, um, um + S, um + 2 * S, S, D);
    }
    return;
  }
  const int64_t nkb = (K1 + kLossPairBlock - 1) / kLossPairBlock;
  // unit (b, kb): states of both views of sample b, [nkb, B, 2, D + 2]
  at::Tensor part = at::empty({nkb, B, 2 * (D + 2)}, opts);
  acc_t* pp = part.mutable_data_ptr<acc_t>();
  at::parallel_for(0, B * nkb, 1, [&](int64_t begin, int64_t end) {
    const DenormalsAreZero daz;
    std::vector<acc_t> buf(3 * kDrawBlock * D);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / nkb, kb = t % nkb;
      acc_t* um = pp + (kb * B + b) * 2 * (D + 2);
      acc_t* uz = um + 2;
      acc_t* ua = uz + 2;
      um[0] = m[b], um[1] = m[B + b];
      std::fill(uz, uz + 2 + 2 * D, acc_t(0));
      IIC_NCE_DISPATCH(loss_gather, p, b, kb * kLossPairBlock, std::min(K1, (kb + 1) * kLossPairBlock), um, uz, ua,
                       buf.data());
    }
  });
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    const DenormalsAreZero daz;
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t kb = 0; kb < nkb; ++kb) {
        const acc_t* um = pp + (kb * B + b) * 2 * (D + 2);
        for (int v = 0; v < 2; ++v) {
          const int64_t i = v * B + b;
          merge_states(m + i, z + i, acc + i * D, um + v, um + 2 + v, um + 4 + v * D, 1, D);
        }
      }
    }
  });
}

// ---- argument checks -------------------------------------------------------------------------------


// A bank as a [N, D] matrix with unit column stride (copied only when its rows are strided).
at::Tensor rows_of(const at::Tensor& bank) { return bank.stride(1) == 1 || bank.size(1) <= 1 ? bank : bank.contiguous(); }

// The IIC banks as [N, D] matrices with unit column stride; bank_neg stays absent in the CMC form.
std::tuple<at::Tensor, at::Tensor, std::optional<at::Tensor>> iic_banks(const at::Tensor& bank_l,
                                                                          const at::Tensor& bank_ab,
                                                                          const std::optional<at::Tensor>& bank_neg) {
  return {rows_of(bank_l), rows_of(bank_ab),
          bank_neg.has_value() ? std::optional<at::Tensor>(rows_of(*bank_neg)) : std::nullopt};
}

// ---- ops -------------------------------------------------------------------------------------------

at::Tensor bank_scores_cpu(const at::Tensor& feat, const at::Tensor& bank, const at::Tensor& idx) {
  check_bank_scores(feat, bank, idx);
  const int64_t B = feat.size(0), K = idx.size(1), D = feat.size(1);
  const auto acc = acc_type_of(feat.scalar_type(), bank.scalar_type());
  at::Tensor out = at::empty({B, K}, feat.options().dtype(acc));
  if (out.numel() == 0) return out.to(feat.scalar_type());
  if (D == 0) return out.zero_().to(feat.scalar_type());
  const at::Tensor f = feat.to(acc).contiguous(), ix = idx.contiguous(), bk = rows_of(bank);
  dispatch_bank(bk.scalar_type(), acc, [&](auto bank_v, auto acc_v) {
    using bank_t = decltype(bank_v);
    using acc_t = decltype(acc_v);
    Problem<bank_t, acc_t> p{};
    p.B = B, p.Kc = K, p.C = K, p.D = D, p.idx = ix.const_data_ptr<int64_t>(), p.scale = 1, p.njobs = 1;
    p.jobs[0].bank = bk.const_data_ptr<bank_t>();
    p.jobs[0].ld = bk.stride(0);
    p.jobs[0].nf = 1;
    p.jobs[0].feat[0] = f.const_data_ptr<acc_t>();
    p.jobs[0].mat[0] = out.mutable_data_ptr<acc_t>();
    run_forward(p, bk.size(0));
  });
  return out.to(feat.scalar_type());
}

at::Tensor bank_scores_backward_cpu(const at::Tensor& grad, const at::Tensor& bank, const at::Tensor& idx,
                                    at::ScalarType dtype) {
  check_bank_scores_backward(grad, bank, idx, dtype);
  const int64_t B = grad.size(0), K = idx.size(1), D = bank.size(1);
  const auto acc = acc_type_of(dtype, bank.scalar_type());
  const at::Tensor g = grad.to(acc).contiguous(), ix = idx.contiguous(), bk = rows_of(bank);
  at::Tensor out;
  dispatch_bank(bk.scalar_type(), acc, [&](auto bank_v, auto acc_v) {
    using bank_t = decltype(bank_v);
    using acc_t = decltype(acc_v);
    Problem<bank_t, acc_t> p{};
    p.B = B, p.Kc = K, p.C = K, p.D = D, p.idx = ix.const_data_ptr<int64_t>(), p.scale = 1, p.njobs = 1;
    p.nslots = 1;
    p.jobs[0].bank = bk.const_data_ptr<bank_t>();
    p.jobs[0].ld = bk.stride(0);
    p.jobs[0].nf = 1;
    p.jobs[0].mat[0] = const_cast<acc_t*>(g.const_data_ptr<acc_t>());
    p.jobs[0].slot[0] = 0;
    out = run_backward(p, bk.size(0), grad.options().dtype(acc))[0];
  });
  return out.to(dtype);
}


// Jobs of the IIC scores: bank_ab with l, bank_l with ab, bank_neg with both (one read per row).
template <typename bank_t, typename acc_t>
void set_iic_jobs(Problem<bank_t, acc_t>& p, const at::Tensor& bl, const at::Tensor& bab,
                  const std::optional<at::Tensor>& bneg, const acc_t* l, const acc_t* ab, acc_t* mat_l,
                  acc_t* mat_ab) {
  auto& j0 = p.jobs[0];
  j0.bank = bab.const_data_ptr<bank_t>(), j0.ld = bab.stride(0), j0.nf = 1;
  j0.feat[0] = l, j0.mat[0] = mat_l, j0.off[0] = 0, j0.slot[0] = 0;
  auto& j1 = p.jobs[1];
  j1.bank = bl.const_data_ptr<bank_t>(), j1.ld = bl.stride(0), j1.nf = 1;
  j1.feat[0] = ab, j1.mat[0] = mat_ab, j1.off[0] = 0, j1.slot[0] = 1;
  p.njobs = 2;
  p.iic = true, p.neg = bneg.has_value();
  if (bneg.has_value()) {
    auto& j2 = p.jobs[2];
    j2.bank = bneg->const_data_ptr<bank_t>(), j2.ld = bneg->stride(0), j2.nf = 2;
    j2.feat[0] = l, j2.mat[0] = mat_l, j2.off[0] = p.Kc, j2.slot[0] = 0;
    j2.feat[1] = ab, j2.mat[1] = mat_ab, j2.off[1] = p.Kc, j2.slot[1] = 1;
    p.njobs = 3;
  }
}

std::tuple<at::Tensor, at::Tensor> iic_scores_cpu(const at::Tensor& l, const at::Tensor& ab, const at::Tensor& bank_l,
                                                  const at::Tensor& bank_ab, const std::optional<at::Tensor>& bank_neg,
                                                  const at::Tensor& idx, double inv_t) {
  const IicArgs a = check_iic(l, ab, bank_l, bank_ab, bank_neg, idx);
  const int64_t C = a.neg ? 2 * a.K1 : a.K1;
  const auto acc = acc_type_of(l.scalar_type(), bank_l.scalar_type());
  at::Tensor out_l = at::empty({a.B, C}, l.options().dtype(acc));
  at::Tensor out_ab = at::empty({a.B, C}, l.options().dtype(acc));
  if (out_l.numel() > 0 && a.D == 0) {
    out_l.zero_();
    out_ab.zero_();
  } else if (out_l.numel() > 0) {
    const at::Tensor fl = l.to(acc).contiguous(), fab = ab.to(acc).contiguous(), ix = idx.contiguous();
    const auto [bl, bab, bneg] = iic_banks(bank_l, bank_ab, bank_neg);
    dispatch_bank(bl.scalar_type(), acc, [&](auto bank_v, auto acc_v) {
      using bank_t = decltype(bank_v);
      using acc_t = decltype(acc_v);
      Problem<bank_t, acc_t> p{};
      p.B = a.B, p.Kc = a.K1, p.C = C, p.D = a.D, p.idx = ix.const_data_ptr<int64_t>();
      p.scale = static_cast<acc_t>(inv_t);
      set_iic_jobs<bank_t, acc_t>(p, bl, bab, bneg, fl.const_data_ptr<acc_t>(), fab.const_data_ptr<acc_t>(),
                                  out_l.mutable_data_ptr<acc_t>(), out_ab.mutable_data_ptr<acc_t>());
      run_forward(p, a.N);
    });
  }
  return {out_l.to(l.scalar_type()), out_ab.to(l.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor> iic_scores_backward_cpu(const at::Tensor& grad_l, const at::Tensor& grad_ab,
                                                           const at::Tensor& bank_l, const at::Tensor& bank_ab,
                                                           const std::optional<at::Tensor>& bank_neg,
                                                           const at::Tensor& idx, double inv_t, at::ScalarType dtype) {
  const IicArgs a = check_iic_backward(grad_l, grad_ab, bank_l, bank_ab, bank_neg, idx, dtype);
  const int64_t B = a.B, K1 = a.K1, D = a.D;
  const int64_t C = a.neg ? 2 * K1 : K1;
  const auto acc = acc_type_of(dtype, bank_l.scalar_type());
  const at::Tensor gl = grad_l.to(acc).contiguous(), gab = grad_ab.to(acc).contiguous(), ix = idx.contiguous();
  const auto [bl, bab, bneg] = iic_banks(bank_l, bank_ab, bank_neg);
  at::Tensor grads;
  dispatch_bank(bl.scalar_type(), acc, [&](auto bank_v, auto acc_v) {
    using bank_t = decltype(bank_v);
    using acc_t = decltype(acc_v);
    Problem<bank_t, acc_t> p{};
    p.B = B, p.Kc = K1, p.C = C, p.D = D, p.idx = ix.const_data_ptr<int64_t>();
    p.scale = static_cast<acc_t>(inv_t);
    p.nslots = 2;
    set_iic_jobs<bank_t, acc_t>(p, bl, bab, bneg, nullptr, nullptr, const_cast<acc_t*>(gl.const_data_ptr<acc_t>()),
                                const_cast<acc_t*>(gab.const_data_ptr<acc_t>()));
    grads = run_backward(p, bl.size(0), grad_l.options().dtype(acc));
  });
  // two separate tensors (views of one buffer would alias)
  return {grads[0].to(dtype, false, true), grads[1].to(dtype, false, true)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> iic_softmax_loss_cpu(
    const at::Tensor& l, const at::Tensor& ab, const at::Tensor& bank_l, const at::Tensor& bank_ab,
    const std::optional<at::Tensor>& bank_neg, const at::Tensor& idx, double inv_t) {
  const IicArgs a = check_iic_loss(l, ab, bank_l, bank_ab, bank_neg, idx);
  const int64_t B = a.B, D = a.D, K1 = a.K1;
  const auto acc = acc_type_of(l.scalar_type(), bank_l.scalar_type());
  const auto opts = l.options().dtype(acc);
  at::Tensor loss = at::empty({2, B}, opts);
  at::Tensor grad = at::empty({2, B, D}, opts);
  if (B > 0) {
    const at::Tensor fl = l.to(acc).contiguous(), fab = ab.to(acc).contiguous(), ix = idx.contiguous();
    const auto [bl, bab, bneg] = iic_banks(bank_l, bank_ab, bank_neg);
    dispatch_bank(bl.scalar_type(), acc, [&](auto bank_v, auto acc_v) {
      using bank_t = decltype(bank_v);
      using acc_t = decltype(acc_v);
      LossProblem<bank_t, acc_t> p{};
      p.B = B, p.K1 = K1, p.D = D, p.idx = ix.const_data_ptr<int64_t>(), p.scale = static_cast<acc_t>(inv_t);
      p.bank[0] = bl.const_data_ptr<bank_t>(), p.ld[0] = bl.stride(0);
      p.bank[1] = bab.const_data_ptr<bank_t>(), p.ld[1] = bab.stride(0);
      p.bank[2] = bneg.has_value() ? bneg->const_data_ptr<bank_t>() : nullptr;
      p.ld[2] = bneg.has_value() ? bneg->stride(0) : 0;
      p.neg = bneg.has_value();
      p.feat[0] = fl.const_data_ptr<acc_t>(), p.feat[1] = fab.const_data_ptr<acc_t>();
      // the positives: logits s_0 and rows, view l against bank_ab, view ab against bank_l
      std::vector<acc_t> s0(2 * B), z(2 * B, acc_t(0)), pos(2 * B * D);
      for (int64_t b = 0; b < B; ++b) {
        const int64_t y = p.idx[b * K1];
        for (int v = 0; v < 2; ++v) {
          const bank_t* src = p.bank[1 - v] + y * p.ld[1 - v];
          acc_t* row = pos.data() + (v * B + b) * D;
          for (int64_t d = 0; d < D; ++d) row[d] = static_cast<acc_t>(src[d]);
          acc_t s = 0;
          for (int64_t d = 0; d < D; ++d) s += row[d] * p.feat[v][b * D + d];
          s0[v * B + b] = s * p.scale;
        }
      }
      p.s0 = s0.data();
      std::vector<acc_t> m(s0);
      acc_t* g = grad.mutable_data_ptr<acc_t>();
      std::fill(g, g + 2 * B * D, acc_t(0));
      run_loss(p, a.N, m.data(), z.data(), g);
      acc_t* ls = loss.mutable_data_ptr<acc_t>();
      for (int64_t i = 0; i < 2 * B; ++i) {
        ls[i] = m[i] + std::log(z[i]) - s0[i];
        const acc_t inv_z = acc_t(1) / z[i];
        acc_t* gi = g + i * D;
        const acc_t* row = pos.data() + i * D;
        for (int64_t d = 0; d < D; ++d) gi[d] = p.scale * (gi[d] * inv_z - row[d]);
      }
    });
  }
  // four separate tensors (views of one buffer would alias)
  return {loss[0].clone(), loss[1].clone(), grad[0].clone(), grad[1].clone()};
}

template <typename bank_t, typename acc_t>
void update_rows(const at::Tensor& bank, const std::vector<int64_t>& rows, const std::vector<int64_t>& src,
                 const at::Tensor& feat, acc_t m) {
  const int64_t D = bank.size(1), s0 = bank.stride(0), s1 = bank.stride(1);
  bank_t* bk = bank.mutable_data_ptr<bank_t>();
  const acc_t* f = feat.const_data_ptr<acc_t>();
  at::parallel_for(0, static_cast<int64_t>(rows.size()), 16, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> v(D);
    for (int64_t i = begin; i < end; ++i) {
      bank_t* row = bk + rows[i] * s0;
      const acc_t* fb = f + src[i] * D;
      acc_t ss = 0;
      for (int64_t d = 0; d < D; ++d) {
        const acc_t x = m * static_cast<acc_t>(row[d * s1]) + (1 - m) * fb[d];
        v[d] = x;
        ss += x * x;
      }
      const acc_t norm = std::sqrt(ss);  // no epsilon, as the original: a zero row gives NaN
      for (int64_t d = 0; d < D; ++d) row[d * s1] = static_cast<bank_t>(v[d] / norm);
    }
  });
}

void bank_update_cpu(const at::Tensor& bank, const at::Tensor& idx, const at::Tensor& feat, double momentum) {
  check_bank_update(bank, idx, feat);
  const int64_t B = feat.size(0);
  if (B == 0 || bank.size(1) == 0) return;
  // the last occurrence of each row wins; every update reads the row as it was before the call
  const at::Tensor ix = idx.contiguous();
  const int64_t* y = ix.const_data_ptr<int64_t>();
  std::vector<int64_t> order(B);
  for (int64_t b = 0; b < B; ++b) order[b] = b;
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t c) { return y[a] < y[c]; });
  std::vector<int64_t> rows, src;
  for (int64_t i = 0; i < B; ++i) {
    if (i + 1 < B && y[order[i + 1]] == y[order[i]]) continue;
    rows.push_back(y[order[i]]);
    src.push_back(order[i]);
  }
  const auto acc = acc_type_of(feat.scalar_type(), bank.scalar_type());
  const at::Tensor f = feat.detach().to(acc).contiguous();
  dispatch_bank(bank.scalar_type(), acc, [&](auto bank_v, auto acc_v) {
    using bank_t = decltype(bank_v);
    using acc_t = decltype(acc_v);
    update_rows<bank_t, acc_t>(bank, rows, src, f, static_cast<acc_t>(momentum));
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(iic_ext, CPU, m) {
  m.impl("bank_scores", &bank_scores_cpu);
  m.impl("_bank_scores_backward", &bank_scores_backward_cpu);
  m.impl("iic_scores", &iic_scores_cpu);
  m.impl("_iic_scores_backward", &iic_scores_backward_cpu);
  m.impl("bank_update_", &bank_update_cpu);
  m.impl("iic_softmax_loss", &iic_softmax_loss_cpu);
}

}  // namespace iic_ext
