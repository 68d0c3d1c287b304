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
// thread count. With many draws per row (float32 or float64 banks in the sums' dtype) a GEMM against
// the whole bank, then a gather (backward: a scatter, then a GEMM), is cheaper still, for the logits
// ops and for the softmax loss (computed from them); its products are BLAS's, over fixed chunks of
// bank rows, so they do not depend on the thread count either. The inner loops
// (nce_kernels.h) are compiled for AVX-512, AVX2 and baseline x86-64, each in a source file of its own
// (nce_avx512.cpp, nce_avx2.cpp, nce_base.cpp) with vectors of that instruction set's width (64, 32
// and 16 bytes; a vector sum's order follows the width), and picked at run time.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>

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
#include "nce_kernels.h"
#include "op_handles.h"
#include "simd.h"

namespace iic_ext {
namespace {

using namespace nce_cpu;

int ceil_log2(int64_t x) {
  int s = 0;
  while ((int64_t{1} << s) < x) ++s;
  return s;
}

// Row grouping needs the pair codes to fit 31 bits.
bool groupable(int64_t B, int64_t Kc, int64_t N) {
  return N < (int64_t{1} << 31) && ceil_log2(Kc) < 31 && B <= (int64_t{1} << (31 - ceil_log2(Kc))) - 1;
}

// Counting sort, on one thread: every row lists its pairs in (b, k) order. Split over threads, it was
// slower: by ranges of rows, each thread scans every pair (one unpredictable branch per pair); by
// ranges of pairs, both threads store into the same cache lines of the output. Its cost is the pair
// stores scattered over the output (a cache miss each): the store's line is prefetched kSortAhead
// pairs ahead, from the row's write position then.
constexpr int64_t kSortAhead = 16;

RowGroups group_by_row(const int64_t* idx, int64_t B, int64_t Kc, int64_t C, int64_t N, bool with_where = false) {
  RowGroups g;
  g.shift = ceil_log2(Kc);
  g.C = C;
  const int64_t P = B * Kc;
  std::vector<int32_t> pos(N + 1, 0);
  for (int64_t p = 0; p < P; ++p) ++pos[idx[p]];
  g.start.resize(N + 1);
  int32_t* st = g.start.data();
  st[0] = 0;
  for (int64_t r = 0; r < N; ++r) st[r + 1] = st[r] + pos[r];
  std::copy(g.start.begin(), g.start.end(), pos.begin());  // write positions
  g.pair.resize(P);
  if (with_where) g.where.resize(P);
  int32_t* __restrict pr = g.pair.data();
  int32_t* __restrict wh = g.where.data();
  int32_t* __restrict ps = pos.data();
  for (int64_t b = 0; b < B; ++b) {
    const int64_t* ix = idx + b * Kc;
    const int32_t hi = static_cast<int32_t>(b << g.shift);
    for (int64_t k = 0; k < Kc; ++k) {
      if (k + kSortAhead < Kc) __builtin_prefetch(pr + ps[ix[k + kSortAhead]], 1);
      const int32_t q = ps[ix[k]]++;
      pr[q] = hi | static_cast<int32_t>(k);
      if (with_where) wh[b * Kc + k] = q;
    }
  }
  return g;
}

// The grouping of the last grouped forward on this thread, for the backward of the same draws: one
// autograd step passes its forward and its backward the same idx tensor (saved for backward). The entry
// holds that tensor, so its memory cannot be reused by another one, and its version counter, which any
// in-place change of idx bumps (what autograd's own check of saved tensors relies on). A backward takes
// the entry; anything else groups afresh.
struct CachedGroups {
  at::Tensor idx;
  int64_t version = 0, N = 0, C = 0;
  std::shared_ptr<const RowGroups> groups;
};
thread_local CachedGroups cached_groups;

bool same_draws(const CachedGroups& c, const at::Tensor& idx, int64_t N, int64_t C) {
  return c.groups && c.idx.unsafeGetTensorImpl() == idx.unsafeGetTensorImpl() && c.version == idx._version() &&
         c.N == N && c.C == C;
}

// The row grouping of a forward (with_where), kept for its backward when one is expected (see
// nce_backward_expected); key is the caller's idx tensor.
std::shared_ptr<const RowGroups> forward_groups(const int64_t* ix, int64_t B, int64_t Kc, int64_t C, int64_t N,
                                                const at::Tensor& key) {
  auto g = std::make_shared<const RowGroups>(group_by_row(ix, B, Kc, C, N, /*with_where=*/true));
  if (nce_backward_expected()) cached_groups = CachedGroups{key, key._version(), N, C, g};
  return g;
}

// The row grouping of a backward: the forward's when it grouped the same draws, else a new one.
std::shared_ptr<const RowGroups> backward_groups(const int64_t* ix, int64_t B, int64_t Kc, int64_t C, int64_t N,
                                                 const at::Tensor& key) {
  if (same_draws(cached_groups, key, N, C)) {
    auto g = std::move(cached_groups.groups);
    cached_groups = CachedGroups{};
    return g;
  }
  return std::make_shared<const RowGroups>(group_by_row(ix, B, Kc, C, N));
}

}  // namespace

bool nce_cpu_holds_grouping() { return cached_groups.groups != nullptr; }

namespace {

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
constexpr int64_t kScoreAhead = 16;  // scores prefetched ahead when moving them to the output

// Grouping by row pays once the draws outnumber the bank's rows (every touched row is then read once
// and in order); with few draws, gathering avoids the O(N) pass. With several draws per row a GEMM
// against the whole bank (B dots per row, at BLAS speed) beats both: from 4 draws per row for one bank,
// from 8 for the IIC scores and loss, whose grouped kernels read the three banks' rows once for all four
// dots (measured at 7 draws per row they match the GEMMs, at 5 they are 1.5x faster; the loss: equal
// at 8, the GEMM plan 1.5-2.4x faster at 16 and 33). IIC_EXT_NCE_GROUP_RATIO
// and IIC_EXT_NCE_DENSE_RATIO (draws per bank row; the IIC switch is twice the latter) tune the switches.
double env_ratio(const char* name, double fallback) {
  const char* s = std::getenv(name);
  return s ? std::atof(s) : fallback;
}

bool group_rows(int64_t pairs, int64_t N) {
  static const double ratio = env_ratio("IIC_EXT_NCE_GROUP_RATIO", 1.0);
  return static_cast<double>(pairs) > ratio * static_cast<double>(N);
}

// The GEMM plan for `pairs` draws from a bank of N rows (iic: the IIC scores or loss). It reads the bank
// in the accumulation type, so only float32 banks with float32 sums and float64 with float64 qualify.
bool dense_pays(int64_t pairs, int64_t N, bool iic, bool bank_is_acc) {
  static const double ratio = env_ratio("IIC_EXT_NCE_DENSE_RATIO", 4.0);
  return bank_is_acc && static_cast<double>(pairs) > (iic ? 2 : 1) * ratio * static_cast<double>(N);
}

template <typename bank_t, typename acc_t>
bool use_dense(const Problem<bank_t, acc_t>& p, int64_t N) {
  return dense_pays(p.B * p.Kc, N, p.iic, std::is_same_v<bank_t, acc_t>);
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

// The dense forward's scores of one job in bank-row order ([N, nf B]) when they take at most this many
// bytes, else in feature order ([nf B, N]). BLAS computes bank @ feat.T 1.4-2x faster than
// feat @ bank.T for up to 32 features (two cores: N = 1000-20000, D = 128 and 512; equal at 64), but
// gathering from it reads one score per cache line anywhere in the matrix, which pays only while the
// matrix stays in the second-level cache; in feature order each sample gathers from its own row.
// Measured IIC forward (B, K, D, N): (16, 4096, 512, 3570) 4.1-4.3 -> 2.0-2.2 ms in bank-row order;
// (32, 16384, 128, 20000) 6.9 ms in feature order against 9.4 in bank-row order.
constexpr int64_t kDenseRowMajorMaxBytes = int64_t{1} << 20;

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

// The GEMM plan's products are computed over fixed chunks of bank rows, by shape only (at least two,
// about 1024 rows each), one chunk per task of a parallel loop: BLAS called inside the parallel region
// runs on its calling thread (MKL and OpenMP builds of OpenBLAS do), so no product is split by the
// thread count (MKL splits the long reduction of the backward's product by it: an 8x97 by 97x33
// product differed at three threads), and the backward's partial products are added in chunk order.
// The pool's threads do not carry the caller's dispatch state (inference mode, say), so the products
// are dispatched below autograd (AutoDispatchBelowADInplaceOrView): straight to the CPU kernel.
int64_t dense_chunks(int64_t N) { return std::clamp<int64_t>(N / 1024, 2, 64); }

// fn(c, n0, n) for each chunk c of rows n0 .. n0 + n of a bank of N rows (n may be 0), on the pool.
template <typename Fn>
void for_each_dense_chunk(int64_t N, const Fn& fn) {
  const int64_t nch = dense_chunks(N);
  at::parallel_for(0, nch, 1, [&](int64_t c0, int64_t c1) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t n0 = N * c / nch;
      fn(c, n0, N * (c + 1) / nch - n0);
    }
  });
}

template <typename bank_t, typename acc_t>
void forward_dense(const Problem<bank_t, acc_t>& p, int64_t N) {
  const int64_t B = p.B, Kc = p.Kc, C = p.C;
  for (int j = 0; j < p.njobs; ++j) {
    const auto& job = p.jobs[j];
    auto [bank, feat] = job_tensors(p, job, N, true);
    const int64_t W = job.nf * B;
    // score (i, b, r) at s[r * rs + (i B + b) * fs]
    const bool row_major = N * W * static_cast<int64_t>(sizeof(acc_t)) <= kDenseRowMajorMaxBytes;
    const at::Tensor S = row_major ? at::empty({N, W}, feat.options()) : at::empty({W, N}, feat.options());
    for_each_dense_chunk(N, [&](int64_t, int64_t n0, int64_t n) {
      if (n == 0) return;
      const at::Tensor rows = bank.narrow(0, n0, n);
      if (row_major) {
        at::Tensor out = S.narrow(0, n0, n);
        at::mm_out(out, rows, feat.t());
      } else {
        at::Tensor out = S.narrow(1, n0, n);
        at::mm_out(out, feat, rows.t());
      }
    });
    const int64_t rs = row_major ? W : 1, fs = row_major ? 1 : N;
    const acc_t* s = S.const_data_ptr<acc_t>();
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      const DenormalsAreZero daz;
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t* ix = p.idx + b * Kc;
        for (int i = 0; i < job.nf; ++i) {
          const acc_t* sr = s + (i * B + b) * fs;
          acc_t* out = job.mat[i] + b * C + job.off[i];
          for (int64_t k = 0; k < Kc; ++k) out[k] = sr[ix[k] * rs] * p.scale;
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
    // [nf B, D]: the partial products of the chunks, added in chunk order
    const int64_t nch = dense_chunks(N);
    at::Tensor part = at::empty({nch, job.nf * B, p.D}, opts);
    for_each_dense_chunk(N, [&](int64_t c, int64_t n0, int64_t n) {
      at::Tensor out = part[c];
      if (n == 0) {
        out.zero_();
      } else {
        at::mm_out(out, G.narrow(1, n0, n), bank.narrow(0, n0, n));
      }
    });
    at::Tensor P = at::empty({job.nf * B, p.D}, opts);
    sum_partials(part.const_data_ptr<acc_t>(), nch, job.nf * B * p.D, P.mutable_data_ptr<acc_t>());
    for (int i = 0; i < job.nf; ++i) grads[job.slot[i]].add_(P.narrow(0, i * B, B));
  }
  return grads;
}

template <typename bank_t, typename acc_t>
void run_forward(const Problem<bank_t, acc_t>& p, int64_t N, const at::Tensor& key) {
  const int64_t P = p.B * p.Kc;
  if (P == 0) return;
  const int64_t D = p.D;
  if (use_dense(p, N)) {
    forward_dense(p, N);
  } else if (group_rows(P, N) && groupable(p.B, p.Kc, N)) {
    const auto gp = forward_groups(p.idx, p.B, p.Kc, p.C, N, key);
    const RowGroups& g = *gp;
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
        acc_t* out[4];
        for (int w = 0; w < W; ++w) out[w] = mat[w] + b * C + off[w];
        for (int64_t k = 0; k < Kc; ++k) {
          // the W scores of a pair are adjacent; those of the pairs ahead, scattered over sc, prefetched
          if (k + kScoreAhead < Kc) __builtin_prefetch(sc.get() + static_cast<int64_t>(q[k + kScoreAhead]) * W);
          const acc_t* src = sc.get() + static_cast<int64_t>(q[k]) * W;
          for (int w = 0; w < W; ++w) out[w][k] = src[w];
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

// Returns the feature gradients [nslots, B, D] (acc_t). Work units are fixed by the shapes (never by
// the thread count) and their partial sums are added in unit order, so the result is deterministic.
template <typename bank_t, typename acc_t>
at::Tensor run_backward(const Problem<bank_t, acc_t>& p, int64_t N, const at::TensorOptions& opts,
                        const at::Tensor& key) {
  const int64_t B = p.B, D = p.D, S = p.nslots;
  const int64_t P = B * p.Kc;
  if (P == 0 || D == 0) return at::zeros({S, B, D}, opts);
  if (use_dense(p, N)) return backward_dense(p, N);
  if (group_rows(P, N) && groupable(p.B, p.Kc, N)) {
    const auto gp = backward_groups(p.idx, p.B, p.Kc, p.C, N, key);
    const RowGroups& g = *gp;
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
    run_forward(p, bk.size(0), idx);
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
    out = run_backward(p, bk.size(0), grad.options().dtype(acc), idx)[0];
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
      run_forward(p, a.N, idx);
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
    grads = run_backward(p, bl.size(0), grad_l.options().dtype(acc), idx);
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
  if (dense_pays(B * K1, a.N, true, bank_l.scalar_type() == acc) && D > 0) {
    // Many draws per bank row: the logits and the gradient by the GEMM plan of iic_scores (each bank
    // read whole, twice, at BLAS speed) beat the one pass that dots and accumulates every draw (at
    // (16, 4096, 128, 2000), 33 draws per row: 1.6-2.1 against 3.1-3.5 ms on two cores).
    static auto unfused = op_handle<LossFn>("iic_ext::_iic_softmax_loss_unfused");
    const IndicesAlreadyChecked checked;  // idx, above
    return unfused.call(l, ab, bank_l, bank_ab, bank_neg, idx, inv_t);
  }
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
