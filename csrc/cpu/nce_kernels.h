// The CPU NCE kernels' work units: the problem descriptions and the units' declarations (for nce.cpp,
// which holds the ops, the plans and the dispatch; see there for what the ops compute), then, for the
// source file of one instruction set (nce_avx512.cpp, nce_avx2.cpp, nce_base.cpp, compiled in parallel),
// the SIMD building blocks and the inner loops, written once as always-inline templates. That file
// defines IIC_NCE_VEC_BYTES, the width of its vectors: 64 bytes for AVX-512, 32 for AVX2 (16 ymm
// registers: wider vectors would be split in two and the loops' sums spilled to the stack), 16 for the
// baseline. The building blocks live in a namespace of that width (vec64, vec32, vec16), so the three
// files' inline helpers never share a name.
#pragma once

#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "simd.h"

// The vector helpers are always inlined into the units of one instruction set: no vector is
// passed across a call whose ABI the instruction set would change.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"

namespace iic_ext {
namespace nce_cpu {

#define IIC_INLINE inline __attribute__((always_inline))
// for lambdas, which would otherwise be compiled out of line without the caller's instruction set
#define IIC_INLINE_FN __attribute__((always_inline))

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

// ---- constants shared by the units and the driver --------------------------------------------------

constexpr int64_t kPrefetchAhead = 8;  // rows
constexpr int64_t kGradAhead = 32;     // draws whose score gradients are prefetched ahead (grouped backward)
// The grouped IIC backward prefetches the three banks' rows this many rows ahead when the bank's rows
// are drawn at least kRowAheadMinDraws times each on average (see iic_bwd_rows_impl).
constexpr int64_t kRowAhead = 2;
constexpr int64_t kRowAheadMinDraws = 4;
constexpr int kDrawBlock = 16;  // draws whose exponentials are computed together

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

// The work units of one instruction set, in namespace NS. BODY is IIC_NCE_DECLARE (declarations, for
// the driver) or IIC_NCE_DEFINE (definitions, in the instruction set's own source file).
#define IIC_NCE_DECLARE(...) ;
#define IIC_NCE_DEFINE(...) { __VA_ARGS__; }
#define IIC_NCE_UNITS(NS, ATTR, BODY)                                                                           \
  namespace NS {                                                                                                \
  template <typename bank_t, typename acc_t>                                                                    \
  ATTR void fwd_gather(const Problem<bank_t, acc_t>& p, int64_t b, int64_t k0, int64_t k1, acc_t* buf)          \
  BODY(fwd_gather_impl(p, b, k0, k1, buf))                                                                      \
  template <typename bank_t, typename acc_t>                                                                    \
  ATTR void fwd_rows(const Problem<bank_t, acc_t>& p, const RowGroups& g, int64_t u0, int64_t u1,               \
                     acc_t* buf, acc_t* sc, int W)                                                              \
  BODY(if (p.iic) iic_fwd_rows_impl(p, g, u0, u1, buf, sc);                                                     \
       else fwd_rows_impl(p, g, u0, u1, buf, sc, W))                                                            \
  template <typename bank_t, typename acc_t>                                                                    \
  ATTR void bwd_gather(const Problem<bank_t, acc_t>& p, int64_t b, int64_t k0, int64_t k1,                      \
                       acc_t* const* acc, acc_t* buf)                                                           \
  BODY(bwd_gather_impl(p, b, k0, k1, acc, buf))                                                                 \
  template <typename bank_t, typename acc_t>                                                                    \
  ATTR void bwd_rows(const Problem<bank_t, acc_t>& p, const RowGroups& g, int64_t u0, int64_t u1,               \
                     acc_t* part, acc_t* buf)                                                                   \
  BODY(if (p.iic) iic_bwd_rows_impl(p, g, u0, u1, part, buf);                                                   \
       else bwd_rows_impl(p, g, u0, u1, part, buf))                                                             \
  template <typename bank_t, typename acc_t>                                                                    \
  ATTR void loss_gather(const LossProblem<bank_t, acc_t>& p, int64_t b, int64_t k0, int64_t k1,                 \
                        acc_t* m, acc_t* z, acc_t* acc, acc_t* buf)                                             \
  BODY(loss_gather_impl(p, b, k0, k1, m, z, acc, buf))                                                          \
  template <typename bank_t, typename acc_t>                                                                    \
  ATTR void loss_rows(const LossProblem<bank_t, acc_t>& p, const RowGroups& g, int64_t r0, int64_t r1,          \
                      acc_t* m, acc_t* z, acc_t* acc, acc_t* buf)                                               \
  BODY(loss_rows_impl(p, g, r0, r1, m, z, acc, buf))                                                            \
  }

// Explicit instantiation of every unit for every (bank, accumulation) type pair the ops dispatch to
// (Units takes each unit's address).
#define IIC_NCE_INSTANTIATE(NS)                                                                                 \
  namespace NS {                                                                                                \
  template <typename bank_t, typename acc_t>                                                                    \
  struct Units {                                                                                                \
    static constexpr auto fwd_gather_fn = &fwd_gather<bank_t, acc_t>;                                           \
    static constexpr auto fwd_rows_fn = &fwd_rows<bank_t, acc_t>;                                               \
    static constexpr auto bwd_gather_fn = &bwd_gather<bank_t, acc_t>;                                           \
    static constexpr auto bwd_rows_fn = &bwd_rows<bank_t, acc_t>;                                               \
    static constexpr auto loss_gather_fn = &loss_gather<bank_t, acc_t>;                                         \
    static constexpr auto loss_rows_fn = &loss_rows<bank_t, acc_t>;                                             \
  };                                                                                                            \
  }                                                                                                             \
  template struct NS::Units<float, float>;                                                                      \
  template struct NS::Units<c10::Half, float>;                                                                  \
  template struct NS::Units<c10::BFloat16, float>;                                                              \
  template struct NS::Units<float, double>;                                                                     \
  template struct NS::Units<double, double>;                                                                    \
  template struct NS::Units<c10::Half, double>;                                                                 \
  template struct NS::Units<c10::BFloat16, double>;

#if defined(__x86_64__) || defined(__i386__)
IIC_NCE_UNITS(isa_avx512, IIC_EXT_AVX512, IIC_NCE_DECLARE)
IIC_NCE_UNITS(isa_avx2, IIC_EXT_AVX2, IIC_NCE_DECLARE)
#endif
IIC_NCE_UNITS(isa_base, , IIC_NCE_DECLARE)

}  // namespace nce_cpu
}  // namespace iic_ext

#ifdef IIC_NCE_VEC_BYTES
#define IIC_NCE_CAT2(a, b) a##b
#define IIC_NCE_CAT(a, b) IIC_NCE_CAT2(a, b)
#define IIC_NCE_VEC_NS IIC_NCE_CAT(vec, IIC_NCE_VEC_BYTES)
namespace iic_ext {
namespace nce_cpu {
namespace IIC_NCE_VEC_NS {

// ---- SIMD building blocks (GCC/Clang vector extensions, IIC_NCE_VEC_BYTES wide) ------------------

constexpr int kVecBytes = IIC_NCE_VEC_BYTES;
static_assert(kVecBytes == 16 || kVecBytes == 32 || kVecBytes == 64, "IIC_NCE_VEC_BYTES: 16, 32 or 64");

// N lanes of T
template <typename T, int N>
struct VecN {
  typedef T type __attribute__((vector_size(N * sizeof(T))));
};

template <typename T>
struct Vec {
  static constexpr int W = kVecBytes / static_cast<int>(sizeof(T));
  typedef typename VecN<T, W>::type type;
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

// The two halves of v, added: N / 2 lanes, lane i = v[i] + v[i + N / 2].
template <typename T, int N>
IIC_INLINE typename VecN<T, N / 2>::type add_halves(typename VecN<T, N>::type v) {
  typename VecN<T, N / 2>::type lo, hi;
  std::memcpy(&lo, &v, sizeof(lo));
  std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(lo), sizeof(hi));
  return lo + hi;
}

// v's halves added until M lanes are left (M a power of two, at most N).
template <typename T, int N, int M>
IIC_INLINE typename VecN<T, M>::type fold_to(typename VecN<T, N>::type v) {
  if constexpr (N == M) {
    return v;
  } else {
    return fold_to<T, N / 2, M>(add_halves<T, N>(v));
  }
}

// Horizontal sum as a tree (halves added pairwise until one lane is left): a short dependency chain,
// a fixed order that depends only on the vector width. Every horizontal sum below follows it.
template <typename T>
IIC_INLINE T hsum(typename Vec<T>::type v) {
  return fold_to<T, Vec<T>::W, 1>(v)[0];
}

#if IIC_NCE_VEC_BYTES == 64
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

#endif

// Four horizontal sums, each in hsum's order (bit-identical to four hsum calls).
template <typename T>
IIC_INLINE void hsum4(typename Vec<T>::type v0, typename Vec<T>::type v1, typename Vec<T>::type v2,
                      typename Vec<T>::type v3, T out[4]) {
  constexpr int W = Vec<T>::W;
#if IIC_NCE_VEC_BYTES == 64
  if constexpr (std::is_same_v<T, float>) {
    hsum4_float(v0, v1, v2, v3, out);
  } else
#endif
  if constexpr (kVecBytes < 64 && W >= 4) {
    // each vector folded to 4 lanes, then two vectors' last two steps per vector operation
    using V4 = typename VecN<T, 4>::type;
    const V4 h0 = fold_to<T, W, 4>(v0), h1 = fold_to<T, W, 4>(v1), h2 = fold_to<T, W, 4>(v2),
             h3 = fold_to<T, W, 4>(v3);
    const V4 a = __builtin_shufflevector(h0, h1, 0, 1, 4, 5) + __builtin_shufflevector(h0, h1, 2, 3, 6, 7);
    const V4 c = __builtin_shufflevector(h2, h3, 0, 1, 4, 5) + __builtin_shufflevector(h2, h3, 2, 3, 6, 7);
    const V4 r = __builtin_shufflevector(a, c, 0, 2, 4, 6) + __builtin_shufflevector(a, c, 1, 3, 5, 7);
    std::memcpy(out, &r, sizeof(r));
  } else {
    out[0] = hsum<T>(v0), out[1] = hsum<T>(v1), out[2] = hsum<T>(v2), out[3] = hsum<T>(v3);
  }
}

#if IIC_NCE_VEC_BYTES == 64
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
#endif

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

// Row r of a bank, prefetched into the second-level cache (prefetcht1). The gathers prefetch a block of
// rows ahead, more lines than the first-level cache can have in flight; aimed at L2 they do not hold
// its fill buffers, and the gather of the fused loss at 1.28M rows was 10-13% faster than with
// prefetcht0 (alternating runs, one thread).
template <typename bank_t>
IIC_INLINE void prefetch_row(const bank_t* bank, int64_t ld, int64_t r, int64_t D) {
  const char* p = reinterpret_cast<const char*>(bank + r * ld);
  const int64_t bytes = D * static_cast<int64_t>(sizeof(bank_t));
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(p + o, 0, 2);
}

// ---- work units (compiled once per instruction set) ------------------------------------------------


// The pairs (b, k0 .. k1) of every job, gathering each row (prefetched ahead): four(job, k, r) for
// rows r[0..3] of pairs k .. k+3, then one(job, k, r) for each pair left.
template <typename bank_t, typename acc_t, typename Four, typename One>
IIC_INLINE void for_each_gathered(const Problem<bank_t, acc_t>& p, int64_t b, int64_t k0, int64_t k1, acc_t* buf,
                                  Four&& four, One&& one) {
  const int64_t D = p.D;
  const int64_t* ix = p.idx + b * p.Kc;
  for (int j = 0; j < p.njobs; ++j) {
    const auto& job = p.jobs[j];
    int64_t k = k0;
    for (; k + 4 <= k1; k += 4) {
      for (int64_t t = k + kPrefetchAhead; t < std::min(k + kPrefetchAhead + 4, k1); ++t)
        prefetch_row(job.bank, job.ld, ix[t], D);
      const acc_t* r[4];
      for (int t = 0; t < 4; ++t) r[t] = load_row(job.bank, job.ld, ix[k + t], D, buf + t * D);
      four(job, k, r);
    }
    for (; k < k1; ++k) one(job, k, load_row(job.bank, job.ld, ix[k], D, buf));
  }
}

// Scores of pairs (b, k0 .. k1): gather each row and dot it.
template <typename bank_t, typename acc_t>
IIC_INLINE void fwd_gather_impl(const Problem<bank_t, acc_t>& p, int64_t b, int64_t k0, int64_t k1, acc_t* buf) {
  const int64_t D = p.D, C = p.C;
  using JobT = Job<bank_t, acc_t>;
  const auto four = [&](const JobT& job, int64_t k, const acc_t* const* r) IIC_INLINE_FN {
    for (int i = 0; i < job.nf; ++i) {
      const acc_t* f = job.feat[i] + b * D;
      const acc_t* fv[4] = {f, f, f, f};
      acc_t o[4];
      dot4(r, fv, D, o);
      acc_t* out = job.mat[i] + b * C + job.off[i] + k;
      for (int t = 0; t < 4; ++t) out[t] = o[t] * p.scale;
    }
  };
  const auto one = [&](const JobT& job, int64_t k, const acc_t* r) IIC_INLINE_FN {
    for (int i = 0; i < job.nf; ++i) job.mat[i][b * C + job.off[i] + k] = dot1(r, job.feat[i] + b * D, D) * p.scale;
  };
  for_each_gathered(p, b, k0, k1, buf, four, one);
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
  const int64_t D = p.D, C = p.C;
  using JobT = Job<bank_t, acc_t>;
  const auto four = [&](const JobT& job, int64_t k, const acc_t* const* r) IIC_INLINE_FN {
    for (int i = 0; i < job.nf; ++i) {
      const acc_t* gin = job.mat[i] + b * C + job.off[i] + k;
      const acc_t gv[4] = {gin[0] * p.scale, gin[1] * p.scale, gin[2] * p.scale, gin[3] * p.scale};
      axpy4(acc[job.slot[i]], gv, r, D);
    }
  };
  const auto one = [&](const JobT& job, int64_t k, const acc_t* r) IIC_INLINE_FN {
    for (int i = 0; i < job.nf; ++i) axpy1(acc[job.slot[i]], job.mat[i][b * C + job.off[i] + k] * p.scale, r, D);
  };
  for_each_gathered(p, b, k0, k1, buf, four, one);
}

// part[slot][b][D] += contributions of the pairs of bank rows r0 .. r1.
template <typename bank_t, typename acc_t>
IIC_INLINE void bwd_rows_impl(const Problem<bank_t, acc_t>& p, const RowGroups& g, int64_t r0, int64_t r1,
                              acc_t* part, acc_t* buf) {
  const int64_t D = p.D, B = p.B;
  const int32_t* st = g.start.data();
  const int32_t* pr = g.pair.data();
  const int64_t npairs = static_cast<int64_t>(g.pair.size());
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t s = st[r], e = st[r + 1];
    if (s == e) continue;
    for (int j = 0; j < p.njobs; ++j) {
      const auto& job = p.jobs[j];
      const acc_t* row = load_row(job.bank, job.ld, r, D, buf);
      for (int i = 0; i < job.nf; ++i) {
        const acc_t* gin = job.mat[i] + job.off[i];
        acc_t* base = part + job.slot[i] * B * D;
        for (int64_t q = s; q < e; ++q) {
          // the score gradients of the draws ahead (scattered over the gradient matrix) start loading now
          if (q + kGradAhead < npairs) __builtin_prefetch(gin + g.at_of(pr[q + kGradAhead]));
          axpy1(base + g.b_of(pr[q]) * D, gin[g.at_of(pr[q])] * p.scale, row, D);
        }
      }
    }
  }
}

// ---- the fused softmax loss (units) -----------------------------------------------------------------

// A run: n draws (n <= kRun) of one bank row, by samples whose features are fl[j], fab[j]. The row's
// vectors are loaded once per run and shared by its draws. A run of n draws keeps 4 n vector sums
// (dot_run) beside the three rows' vectors: 4 draws take 19 of AVX-512's 32 registers; of AVX2's 16, 3
// draws take 15 (one thread at (16, 4096, 128, 9537): forward 1.83-1.96 ms against 1.97-2.24 with 2
// draws, alternating runs) and 4 would spill. The baseline's 16-byte vectors take runs of 2.
constexpr int kRun = kVecBytes == 64 ? 4 : kVecBytes == 32 ? 3 : 2;

// v, held in a register. With AVX2 a run of 3 draws keeps 12 sums and 3 row vectors in 15 of the 16
// registers; GCC then reads each feature vector twice, as a memory operand of both of its multiply-adds
// (15 loads per 12 multiply-adds). Loaded once into the last register, the vector serves both
// (9 loads): on an AMD EPYC (Zen 3), one thread, the IIC forward at (16, 4096, 128, 9537) took
// 1.74-1.86 ms against 1.87-2.08 (four alternating pairs of runs), at (16, 1024, 512, 9537) 2.84-3.19
// against 3.02-3.75. The empty asm makes v an opaque register value the compiler cannot fold into a
// later instruction. The 64-byte units read the features the same way but have 32 registers; they
// are left as they are (not measured).
template <typename V>
IIC_INLINE V in_register(V v) {
#if IIC_NCE_VEC_BYTES == 32 && (defined(__x86_64__) || defined(__i386__))
  asm("" : "+x"(v));
#endif
  return v;
}

// The logits of a run, out[4 j ..] = {r_ab . fl[j], r_neg . fl[j], r_l . fab[j], r_neg . fab[j]} (without
// the negative bank, NEG false, slots 1 and 3 are 0). Each dot: vector partial sums in d order, then one
// horizontal sum (float runs of 3 or 4 in 64-byte vectors: all at once with hsum16, so out has room for
// 4 kRun values).
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
      const V a = in_register(vload(fl[j] + d));
      s[j][0] += rab * a;
      if constexpr (NEG) s[j][1] += rn * a;
      const V b = in_register(vload(fab[j] + d));
      s[j][2] += rl * b;
      if constexpr (NEG) s[j][3] += rn * b;
    }
  }
#if IIC_NCE_VEC_BYTES == 64
  if constexpr (std::is_same_v<T, float> && n > 2) {  // the same sums as hsum4, in fewer operations
    V a[16];
    for (int j = 0; j < kRun; ++j)
      for (int q = 0; q < 4; ++q) a[4 * j + q] = j < n ? s[j][q] : V{};
    vstore(out, hsum16(a));
  } else
#endif
  {
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
// Cephes-style polynomial on 2^k, a vector of values at a time (within 2 ulp; below the smallest normal float
// the result is 0; NaN stays NaN); double: std::exp.
IIC_INLINE void exp_n(const float* x, float* out, int n) {
  using V = Vec<float>::type;
  typedef int32_t VI __attribute__((vector_size(kVecBytes)));
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
  if (n > kDrawBlock) __builtin_unreachable();  // callers pass at most kDrawBlock draws (exp_n's bound)
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
// for the n (<= kRun) pairs pair[q ..] of a row, with its three banks' rows loaded once per row. With
// ahead > 0 the visit of row r prefetches row r + ahead (while it is below r1).
template <typename bank_t, typename acc_t, typename Fn>
IIC_INLINE void for_each_iic_run(const Problem<bank_t, acc_t>& p, const RowGroups& g, int64_t r0, int64_t r1,
                                 acc_t* buf, int64_t ahead, Fn&& fn) {
  const int64_t D = p.D;
  const int32_t* st = g.start.data();
  const auto &j_ab = p.jobs[0], &j_l = p.jobs[1], &j_neg = p.jobs[2];
  for (int64_t r = r0; r < r1; ++r) {
    if (ahead > 0 && r + ahead < r1) {
      prefetch_row(j_l.bank, j_l.ld, r + ahead, D);
      prefetch_row(j_ab.bank, j_ab.ld, r + ahead, D);
      if (p.neg) prefetch_row(j_neg.bank, j_neg.ld, r + ahead, D);
    }
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
  for_each_iic_run(p, g, r0, r1, buf, 0, run);
}

// part[slot][b][D] += the IIC score gradients of bank rows r0 .. r1, each run of draws loading the rows
// once and updating both views' sums (axpy_run). With several draws per row the rows are prefetched
// kRowAhead rows ahead: on an AMD EPYC (AVX2 units), at (B, K, D, N) = (16, 4096, 128, 9537), two
// threads, the backward took 1.55 ms against 1.79 (25th percentiles of 290 calls, alternating in one
// process) and 10% less at (32, 16384, 128, 100000). With fewer draws per row the prefetches cost more
// than they save ((16, 1024, 512, 9537): 20% slower); the same prefetch in the IIC forward, the fused
// loss and the grouped bank_scores backward gained nothing.
template <typename bank_t, typename acc_t>
IIC_INLINE void iic_bwd_rows_impl(const Problem<bank_t, acc_t>& p, const RowGroups& g, int64_t r0, int64_t r1,
                                  acc_t* part, acc_t* buf) {
  const int64_t D = p.D, B = p.B, K1 = p.Kc;
  const int32_t* pr = g.pair.data();
  const acc_t* gl = p.jobs[0].mat[0];
  const acc_t* gab = p.jobs[1].mat[0];
  const int64_t npairs = static_cast<int64_t>(g.pair.size());
  const auto run = [&](const acc_t* r_l, const acc_t* r_ab, const acc_t* r_neg, int64_t q, int n) IIC_INLINE_FN {
    // the score gradients of the draws ahead (scattered over the gradient matrices) start loading now
    for (int64_t a = q + kGradAhead, ae = std::min(npairs, a + n); a < ae; ++a) {
      const int64_t at = g.at_of(pr[a]);
      __builtin_prefetch(gl + at);
      __builtin_prefetch(gab + at);
      if (p.neg) {
        __builtin_prefetch(gl + at + K1);
        __builtin_prefetch(gab + at + K1);
      }
    }
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
  const int64_t N = static_cast<int64_t>(g.start.size()) - 1;
  for_each_iic_run(p, g, r0, r1, buf, npairs >= kRowAheadMinDraws * N ? kRowAhead : 0, run);
}

}  // namespace IIC_NCE_VEC_NS
}  // namespace nce_cpu
}  // namespace iic_ext
#endif  // IIC_NCE_VEC_BYTES

#pragma GCC diagnostic pop
