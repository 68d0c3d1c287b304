// NCE memory-bank scores and the bank update on CUDA.
//
// bank_scores: scores[b, k] = <bank[idx[b, k]], feat[b]>.
//   Args: feat [B, D], bank [N, D] (float16/bfloat16/float32/float64 each, any strides), idx [B, K] int64
//   in [0, N). Returns [B, K] in feat's dtype; accumulated in float32 (float64 when feat or bank is).
// _bank_scores_backward: grad_feat[b] = sum_k grad[b, k] * bank[idx[b, k]]. Returns [B, D] in `dtype`.
// iic_scores: out_l = [bank_ab[idx] | bank_neg[idx]] . l * inv_t, out_ab = [bank_l[idx] | bank_neg[idx]] . ab
//   * inv_t, each [B, 2 (K+1)] ([B, K+1] without bank_neg), in l's dtype; idx [B, K+1].
// _iic_scores_backward: (grad l [B, D], grad ab [B, D]) in `dtype`.
// iic_softmax_loss: (loss_l [B], loss_ab [B], grad_l [B, D], grad_ab [B, D]): the scores, then one kernel
//   for both views' log-softmax at column 0 and softmax - onehot(0), then the scores' backward.
// bank_update_: bank[y] = normalize(m * bank[y] + (1 - m) * feat[b]) for y = idx[b] (idx [B]), in place.
//   Every update reads the row as it was before the call; with a repeated y the last occurrence wins.
//
// Scores: one warp per (b, k); its lanes stride over D and a shuffle tree adds them, so the sampled
// rows are read once, coalesced, and never materialised (IIC reads each bank_neg row once for both
// views). Backward: one block per (b, 32 columns of D, split of k); its 8 warps each sum a fixed chunk
// of the split, the chunks are added in order in the block and the splits in order by a second kernel:
// no atomics, the result depends only on the shapes. The number of splits comes from the shapes alone
// (enough blocks to fill a GPU, at least kMinRowsPerWarp rows per warp): with B (D / 32) blocks alone,
// a small batch leaves most of the GPU idle and each warp walks thousands of rows one load after the
// other. Update: one warp
// per b; it skips b when a later b' draws the same row, so each row has exactly one writer, which reads
// the row before writing it.
#include <ATen/Dispatch.h>

#include <type_traits>

#include "common.h"
#include "nce_checks.h"
#include "utils.cuh"

namespace iic_ext {
namespace {

using cuda::add_rn;
using cuda::mul_rn;

constexpr int kWarp = 32;
constexpr int kChunks = 8;  // warps of a backward block, each summing one chunk of k
constexpr int64_t kBackwardBlocks = 1024;  // blocks the backward aims for (several waves on any GPU)
constexpr int64_t kMinRowsPerWarp = 16;    // fewer rows per warp than this: no further split of k

// op over the warp's 32 values by a butterfly of shuffles; every lane returns the result.
template <typename T, typename Op>
__device__ __forceinline__ T warp_reduce(T v, Op op) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o /= 2) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  return warp_reduce(v, [](T a, T b) { return a + b; });
}

// A bank as the kernels see it: base pointer and strides (elements).
template <typename bank_t>
struct Rows {
  const bank_t* p;
  int64_t s0, s1;
  __device__ __forceinline__ const bank_t* row(int64_t r) const { return p + r * s0; }
};

template <typename bank_t>
Rows<bank_t> rows_of(const at::Tensor& bank) {
  return {bank.const_data_ptr<bank_t>(), bank.stride(0), bank.stride(1)};
}

// <row, f> over D, one warp; every lane returns the total.
template <typename bank_t, typename acc_t>
__device__ __forceinline__ acc_t warp_dot(const bank_t* row, int64_t s1, const acc_t* f, int64_t D, int lane) {
  acc_t s = 0;
  for (int64_t d = lane; d < D; d += kWarp) s += static_cast<acc_t>(row[d * s1]) * f[d];
  return warp_sum(s);
}

// scores [B, K] (acc_t) from feat [B, D] (acc_t, contiguous).
template <typename bank_t, typename acc_t>
__global__ void bank_scores_kernel(const acc_t* __restrict__ feat, Rows<bank_t> bank,
                                   const int64_t* __restrict__ idx, acc_t* __restrict__ out, int64_t P, int64_t K,
                                   int64_t D) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * blockDim.x / kWarp;
  for (int64_t p = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / kWarp; p < P; p += warps) {
    const int64_t b = p / K;
    const acc_t s = warp_dot(bank.row(idx[p]), bank.s1, feat + b * D, D, lane);
    if (lane == 0) out[p] = s;
  }
}

// out_l, out_ab [B, C] (acc_t), C = 2 K1 with bank_neg (bank_neg.p != nullptr), else K1.
template <typename bank_t, typename acc_t>
__global__ void iic_scores_kernel(const acc_t* __restrict__ l, const acc_t* __restrict__ ab, Rows<bank_t> bank_l,
                                  Rows<bank_t> bank_ab, Rows<bank_t> bank_neg, const int64_t* __restrict__ idx,
                                  acc_t* __restrict__ out_l, acc_t* __restrict__ out_ab, int64_t P, int64_t K1,
                                  int64_t C, int64_t D, acc_t scale) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * blockDim.x / kWarp;
  const bool neg = bank_neg.p != nullptr;
  for (int64_t p = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / kWarp; p < P; p += warps) {
    const int64_t b = p / K1, k = p - b * K1;
    const int64_t r = idx[p];
    const acc_t* fl = l + b * D;
    const acc_t* fab = ab + b * D;
    const bank_t* rab = bank_ab.row(r);
    const bank_t* rl = bank_l.row(r);
    acc_t s_l = 0, s_ab = 0, n_l = 0, n_ab = 0;
    if (neg) {
      const bank_t* rn = bank_neg.row(r);
      for (int64_t d = lane; d < D; d += kWarp) {
        const acc_t vl = fl[d], vab = fab[d];
        const acc_t vn = static_cast<acc_t>(rn[d * bank_neg.s1]);
        s_l += static_cast<acc_t>(rab[d * bank_ab.s1]) * vl;
        s_ab += static_cast<acc_t>(rl[d * bank_l.s1]) * vab;
        n_l += vn * vl;
        n_ab += vn * vab;
      }
    } else {
      for (int64_t d = lane; d < D; d += kWarp) {
        s_l += static_cast<acc_t>(rab[d * bank_ab.s1]) * fl[d];
        s_ab += static_cast<acc_t>(rl[d * bank_l.s1]) * fab[d];
      }
    }
    s_l = warp_sum(s_l);
    s_ab = warp_sum(s_ab);
    if (neg) {
      n_l = warp_sum(n_l);
      n_ab = warp_sum(n_ab);
    }
    if (lane == 0) {
      out_l[b * C + k] = s_l * scale;
      out_ab[b * C + k] = s_ab * scale;
      if (neg) {
        out_l[b * C + K1 + k] = n_l * scale;
        out_ab[b * C + K1 + k] = n_ab * scale;
      }
    }
  }
}

// Chunk c of [0, K) cut into n chunks, for the backward blocks: warp y of split s takes c = s kChunks + y.
__device__ __forceinline__ void chunk(int64_t K, int64_t c, int64_t n, int64_t& k0, int64_t& k1) {
  const int64_t per = (K + n - 1) / n;
  k0 = c * per < K ? c * per : K;
  k1 = k0 + per < K ? k0 + per : K;
}

// grad_feat = sum_k grad[b, k] * bank[idx[b, k]] over split blockIdx.y of k, into out [gridDim.y, B, D]
// (acc_t); block (32, kChunks) per (b, d-tile, split).
template <typename bank_t, typename acc_t>
__global__ void bank_scores_backward_kernel(const acc_t* __restrict__ grad, Rows<bank_t> bank,
                                            const int64_t* __restrict__ idx, acc_t* __restrict__ out, int64_t B,
                                            int64_t K, int64_t D) {
  __shared__ acc_t part[kChunks][kWarp];
  const int x = threadIdx.x, y = threadIdx.y;
  const int64_t tiles = (D + kWarp - 1) / kWarp;
  int64_t k0, k1;
  chunk(K, blockIdx.y * int64_t{kChunks} + y, gridDim.y * int64_t{kChunks}, k0, k1);
  out += blockIdx.y * B * D;
  for (int64_t tile = blockIdx.x; tile < B * tiles; tile += gridDim.x) {
    const int64_t b = tile / tiles;
    const int64_t d = (tile - b * tiles) * kWarp + x;
    acc_t s = 0;
    if (d < D) {
      const acc_t* g = grad + b * K;
      const int64_t* ix = idx + b * K;
#pragma unroll 4
      for (int64_t k = k0; k < k1; ++k) s += g[k] * static_cast<acc_t>(bank.row(ix[k])[d * bank.s1]);
    }
    part[y][x] = s;
    __syncthreads();
    if (y == 0 && d < D) {
      acc_t t = part[0][x];
#pragma unroll
      for (int c = 1; c < kChunks; ++c) t += part[c][x];
      out[b * D + d] = t;
    }
    __syncthreads();
  }
}

// grad_l, grad_ab of the IIC scores over split blockIdx.y of k, into out_l, out_ab [gridDim.y, B, D]
// (acc_t); same blocks as bank_scores_backward_kernel.
template <typename bank_t, typename acc_t>
__global__ void iic_scores_backward_kernel(const acc_t* __restrict__ gl, const acc_t* __restrict__ gab,
                                           Rows<bank_t> bank_l, Rows<bank_t> bank_ab, Rows<bank_t> bank_neg,
                                           const int64_t* __restrict__ idx, acc_t* __restrict__ out_l,
                                           acc_t* __restrict__ out_ab, int64_t B, int64_t K1, int64_t C, int64_t D,
                                           acc_t scale) {
  __shared__ acc_t part_l[kChunks][kWarp];
  __shared__ acc_t part_ab[kChunks][kWarp];
  const int x = threadIdx.x, y = threadIdx.y;
  const bool neg = bank_neg.p != nullptr;
  const int64_t tiles = (D + kWarp - 1) / kWarp;
  int64_t k0, k1;
  chunk(K1, blockIdx.y * int64_t{kChunks} + y, gridDim.y * int64_t{kChunks}, k0, k1);
  out_l += blockIdx.y * B * D;
  out_ab += blockIdx.y * B * D;
  for (int64_t tile = blockIdx.x; tile < B * tiles; tile += gridDim.x) {
    const int64_t b = tile / tiles;
    const int64_t d = (tile - b * tiles) * kWarp + x;
    acc_t sl = 0, sab = 0;
    if (d < D) {
      const acc_t* g_l = gl + b * C;
      const acc_t* g_ab = gab + b * C;
      const int64_t* ix = idx + b * K1;
#pragma unroll 4
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t r = ix[k];
        sl += (g_l[k] * scale) * static_cast<acc_t>(bank_ab.row(r)[d * bank_ab.s1]);
        sab += (g_ab[k] * scale) * static_cast<acc_t>(bank_l.row(r)[d * bank_l.s1]);
        if (neg) {
          const acc_t vn = static_cast<acc_t>(bank_neg.row(r)[d * bank_neg.s1]);
          sl += (g_l[K1 + k] * scale) * vn;
          sab += (g_ab[K1 + k] * scale) * vn;
        }
      }
    }
    part_l[y][x] = sl;
    part_ab[y][x] = sab;
    __syncthreads();
    if (y == 0 && d < D) {
      acc_t tl = part_l[0][x], tab = part_ab[0][x];
#pragma unroll
      for (int c = 1; c < kChunks; ++c) {
        tl += part_l[c][x];
        tab += part_ab[c][x];
      }
      out_l[b * D + d] = tl;
      out_ab[b * D + d] = tab;
    }
    __syncthreads();
  }
}

// out_v[i] = sum over s in order of part[v][s][i], for v < views (out_1 unused with one view); part
// [views, S, n].
template <typename acc_t>
__global__ void sum_splits_kernel(const acc_t* __restrict__ part, acc_t* __restrict__ out_0, acc_t* __restrict__ out_1,
                                  int64_t S, int64_t n, int views) {
  const int64_t total = n * views;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t v = i / n, j = i - v * n;
    const acc_t* p = part + v * S * n + j;
    acc_t t = p[0];
    for (int64_t s = 1; s < S; ++s) t += p[s * n];
    (v == 0 ? out_0 : out_1)[j] = t;
  }
}

// Block-wide reduction (kThreads threads) in a fixed order; every thread returns the result.
template <typename T, typename Op>
__device__ __forceinline__ T block_reduce(T v, Op op, T* shared) {
  v = warp_reduce(v, op);
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  __syncthreads();  // shared may still be read by a previous call
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  T t = shared[0];
  for (int w = 1; w < cuda::kThreads / kWarp; ++w) t = op(t, shared[w]);
  return t;
}

// Cross-entropy at label 0 of the logits rows, one block per (view, b): loss[b] = logsumexp(x) - x[0],
// and x is overwritten with d loss / d x = softmax(x) - onehot(0). x_l, x_ab [B, C] contiguous.
template <typename acc_t>
__global__ void softmax_ce_kernel(acc_t* __restrict__ x_l, acc_t* __restrict__ x_ab, acc_t* __restrict__ loss_l,
                                  acc_t* __restrict__ loss_ab, int64_t B, int64_t C) {
  __shared__ acc_t shared[cuda::kThreads / kWarp];
  for (int64_t r = blockIdx.x; r < 2 * B; r += gridDim.x) {  // uniform over the block
    const bool first = r < B;
    const int64_t b = first ? r : r - B;
    acc_t* x = (first ? x_l : x_ab) + b * C;
    acc_t mx = -std::numeric_limits<acc_t>::infinity();
    for (int64_t j = threadIdx.x; j < C; j += blockDim.x) mx = x[j] > mx ? x[j] : mx;
    mx = block_reduce(mx, [](acc_t u, acc_t v) { return u > v ? u : v; }, shared);
    acc_t se = 0;
    for (int64_t j = threadIdx.x; j < C; j += blockDim.x) se += exp(x[j] - mx);
    se = block_reduce(se, [](acc_t u, acc_t v) { return u + v; }, shared);
    // log_softmax's order, (x - max) - log(sum): x - max is exact for the large logits, where
    // x - (max + log(sum)) would carry the rounding of a sum at the logits' magnitude into
    // softmax - 1 at column 0, which cancels when the positive dominates
    const acc_t ls = log(se);
    if (threadIdx.x == 0) (first ? loss_l : loss_ab)[b] = ls - (x[0] - mx);  // before x[0] is overwritten
    for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
      x[j] = exp((x[j] - mx) - ls) - (j == 0 ? acc_t{1} : acc_t{0});
    }
  }
}

// One warp per b: bank[idx[b]] = normalize(m * bank[idx[b]] + (1 - m) * feat[b]) unless a later b' has
// the same row. The mixed row is computed twice (norm, then write) with unfused arithmetic, so both
// passes see identical values.
template <typename bank_t, typename acc_t>
__global__ void bank_update_kernel(bank_t* __restrict__ bank, int64_t s0, int64_t s1, const int64_t* __restrict__ idx,
                                   const acc_t* __restrict__ feat, int64_t B, int64_t D, acc_t m) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * blockDim.x / kWarp;
  const acc_t one_m = 1 - m;
  for (int64_t b = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / kWarp; b < B; b += warps) {
    const int64_t y = idx[b];
    bool later = false;
    for (int64_t j = b + 1 + lane; j < B; j += kWarp) later = later || idx[j] == y;
    if (__any_sync(0xffffffffu, later)) continue;  // warp-uniform
    bank_t* row = bank + y * s0;
    const acc_t* f = feat + b * D;
    acc_t ss = 0;
    for (int64_t d = lane; d < D; d += kWarp) {
      const acc_t v = add_rn(mul_rn(m, static_cast<acc_t>(row[d * s1])), mul_rn(one_m, f[d]));
      ss += v * v;
    }
    const acc_t norm = sqrt(warp_sum(ss));  // no epsilon, as the CPU kernel: a zero row gives NaN
    for (int64_t d = lane; d < D; d += kWarp) {
      const acc_t v = add_rn(mul_rn(m, static_cast<acc_t>(row[d * s1])), mul_rn(one_m, f[d]));
      row[d * s1] = static_cast<bank_t>(v / norm);
    }
  }
}

// ---- argument checks (the CPU kernels' messages) ----------------------------------------------------


unsigned int warp_blocks(int64_t warps) { return cuda::blocks_for(warps * kWarp); }

// (b, 32 columns of D) tiles of the backward
int64_t backward_tiles(int64_t B, int64_t D) { return B * cuda::ceil_div(D, kWarp); }

unsigned int tile_blocks(int64_t B, int64_t D) {
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(backward_tiles(B, D), int64_t{1} << 20)));
}

const dim3 kTileBlock(kWarp, kChunks);

// Splits of k for the backward (gridDim.y), from the shapes only.
int64_t backward_splits(int64_t B, int64_t K, int64_t D) {
  const int64_t tiles = backward_tiles(B, D);
  if (tiles == 0) return 1;
  const int64_t by_rows = cuda::ceil_div(K, kChunks * kMinRowsPerWarp);
  return std::max<int64_t>(1, std::min({cuda::ceil_div(kBackwardBlocks, tiles), by_rows, int64_t{65535}}));
}

// Adds the splits of part [views, S, n] into out_0 (and out_1); nothing to do with one split, where the
// backward kernel wrote the outputs.
template <typename acc_t>
void sum_splits(const at::Tensor& part, at::Tensor& out_0, at::Tensor* out_1, int64_t S, cudaStream_t stream) {
  if (S == 1) return;
  const int64_t n = out_0.numel();
  const int views = out_1 ? 2 : 1;
  sum_splits_kernel<acc_t><<<cuda::blocks_for(n * views), cuda::kThreads, 0, stream>>>(
      part.const_data_ptr<acc_t>(), out_0.mutable_data_ptr<acc_t>(), out_1 ? out_1->mutable_data_ptr<acc_t>() : nullptr,
      S, n, views);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---- ops -------------------------------------------------------------------------------------------

at::Tensor bank_scores_cuda(const at::Tensor& feat, const at::Tensor& bank, const at::Tensor& idx) {
  check_bank_scores(feat, bank, idx);
  c10::cuda::CUDAGuard device_guard(feat.device());
  const int64_t B = feat.size(0), K = idx.size(1), D = feat.size(1);
  const auto acc = acc_type_of(feat.scalar_type(), bank.scalar_type());
  at::Tensor out = at::empty({B, K}, feat.options().dtype(acc));
  if (out.numel() == 0) return out.to(feat.scalar_type());
  if (D == 0) return out.zero_().to(feat.scalar_type());
  const at::Tensor f = feat.to(acc).contiguous(), ix = idx.contiguous();
  const cudaStream_t stream = cuda::current_stream();
  dispatch_bank(bank.scalar_type(), acc, [&](auto bank_v, auto acc_v) {
    using bank_t = decltype(bank_v);
    using acc_t = decltype(acc_v);
    const int64_t P = B * K;
    bank_scores_kernel<bank_t, acc_t><<<warp_blocks(P), cuda::kThreads, 0, stream>>>(
        f.const_data_ptr<acc_t>(), rows_of<bank_t>(bank), ix.const_data_ptr<int64_t>(), out.mutable_data_ptr<acc_t>(),
        P, K, D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out.to(feat.scalar_type());
}

at::Tensor bank_scores_backward_cuda(const at::Tensor& grad, const at::Tensor& bank, const at::Tensor& idx,
                                     at::ScalarType dtype) {
  check_bank_scores_backward(grad, bank, idx, dtype);
  c10::cuda::CUDAGuard device_guard(grad.device());
  const int64_t B = grad.size(0), K = idx.size(1), D = bank.size(1);
  const auto acc = acc_type_of(dtype, bank.scalar_type());
  at::Tensor out = at::empty({B, D}, grad.options().dtype(acc));
  if (out.numel() > 0) {
    const at::Tensor g = grad.to(acc).contiguous(), ix = idx.contiguous();
    const int64_t S = backward_splits(B, K, D);
    const at::Tensor part = S == 1 ? out : at::empty({S, B, D}, out.options());
    const cudaStream_t stream = cuda::current_stream();
    dispatch_bank(bank.scalar_type(), acc, [&](auto bank_v, auto acc_v) {
      using bank_t = decltype(bank_v);
      using acc_t = decltype(acc_v);
      const dim3 grid(tile_blocks(B, D), static_cast<unsigned int>(S));
      bank_scores_backward_kernel<bank_t, acc_t><<<grid, kTileBlock, 0, stream>>>(
          g.const_data_ptr<acc_t>(), rows_of<bank_t>(bank), ix.const_data_ptr<int64_t>(),
          part.mutable_data_ptr<acc_t>(), B, K, D);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      sum_splits<acc_t>(part, out, nullptr, S, stream);
    });
  }
  return out.to(dtype);
}


template <typename bank_t>
Rows<bank_t> neg_rows(const std::optional<at::Tensor>& bank_neg) {
  return bank_neg.has_value() ? rows_of<bank_t>(*bank_neg) : Rows<bank_t>{nullptr, 0, 0};
}

std::tuple<at::Tensor, at::Tensor> iic_scores_cuda(const at::Tensor& l, const at::Tensor& ab,
                                                   const at::Tensor& bank_l, const at::Tensor& bank_ab,
                                                   const std::optional<at::Tensor>& bank_neg, const at::Tensor& idx,
                                                   double inv_t) {
  const IicArgs a = check_iic(l, ab, bank_l, bank_ab, bank_neg, idx);
  c10::cuda::CUDAGuard device_guard(l.device());
  const int64_t C = a.neg ? 2 * a.K1 : a.K1;
  const auto acc = acc_type_of(l.scalar_type(), bank_l.scalar_type());
  at::Tensor out_l = at::empty({a.B, C}, l.options().dtype(acc));
  at::Tensor out_ab = at::empty({a.B, C}, l.options().dtype(acc));
  if (out_l.numel() > 0 && a.D == 0) {
    out_l.zero_();
    out_ab.zero_();
  } else if (out_l.numel() > 0) {
    const at::Tensor fl = l.to(acc).contiguous(), fab = ab.to(acc).contiguous(), ix = idx.contiguous();
    const cudaStream_t stream = cuda::current_stream();
    dispatch_bank(bank_l.scalar_type(), acc, [&](auto bank_v, auto acc_v) {
      using bank_t = decltype(bank_v);
      using acc_t = decltype(acc_v);
      const int64_t P = a.B * a.K1;
      iic_scores_kernel<bank_t, acc_t><<<warp_blocks(P), cuda::kThreads, 0, stream>>>(
          fl.const_data_ptr<acc_t>(), fab.const_data_ptr<acc_t>(), rows_of<bank_t>(bank_l), rows_of<bank_t>(bank_ab),
          neg_rows<bank_t>(bank_neg), ix.const_data_ptr<int64_t>(), out_l.mutable_data_ptr<acc_t>(),
          out_ab.mutable_data_ptr<acc_t>(), P, a.K1, C, a.D, static_cast<acc_t>(inv_t));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {out_l.to(l.scalar_type()), out_ab.to(l.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor> iic_scores_backward_cuda(const at::Tensor& grad_l, const at::Tensor& grad_ab,
                                                            const at::Tensor& bank_l, const at::Tensor& bank_ab,
                                                            const std::optional<at::Tensor>& bank_neg,
                                                            const at::Tensor& idx, double inv_t,
                                                            at::ScalarType dtype) {
  const IicArgs a = check_iic_backward(grad_l, grad_ab, bank_l, bank_ab, bank_neg, idx, dtype);
  const int64_t B = a.B, K1 = a.K1, D = a.D;
  const int64_t C = a.neg ? 2 * K1 : K1;
  c10::cuda::CUDAGuard device_guard(grad_l.device());
  const auto acc = acc_type_of(dtype, bank_l.scalar_type());
  at::Tensor out_l = at::empty({B, D}, grad_l.options().dtype(acc));
  at::Tensor out_ab = at::empty({B, D}, grad_l.options().dtype(acc));
  if (out_l.numel() > 0) {
    const at::Tensor gl = grad_l.to(acc).contiguous(), gab = grad_ab.to(acc).contiguous(), ix = idx.contiguous();
    const int64_t S = backward_splits(B, K1, D);
    // with several splits: partial sums [2 (views), S, B, D], added in order by sum_splits
    const at::Tensor part = S == 1 ? at::Tensor() : at::empty({2, S, B, D}, out_l.options());
    const cudaStream_t stream = cuda::current_stream();
    dispatch_bank(bank_l.scalar_type(), acc, [&](auto bank_v, auto acc_v) {
      using bank_t = decltype(bank_v);
      using acc_t = decltype(acc_v);
      const dim3 grid(tile_blocks(B, D), static_cast<unsigned int>(S));
      acc_t* pl = S == 1 ? out_l.mutable_data_ptr<acc_t>() : part.mutable_data_ptr<acc_t>();
      acc_t* pab = S == 1 ? out_ab.mutable_data_ptr<acc_t>() : pl + S * B * D;
      iic_scores_backward_kernel<bank_t, acc_t><<<grid, kTileBlock, 0, stream>>>(
          gl.const_data_ptr<acc_t>(), gab.const_data_ptr<acc_t>(), rows_of<bank_t>(bank_l), rows_of<bank_t>(bank_ab),
          neg_rows<bank_t>(bank_neg), ix.const_data_ptr<int64_t>(), pl, pab, B, K1, C, D, static_cast<acc_t>(inv_t));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      sum_splits<acc_t>(part, out_l, &out_ab, S, stream);
    });
  }
  return {out_l.to(dtype), out_ab.to(dtype)};
}

// iic_softmax_loss on CUDA: three kernels (scores, softmax_ce, scores' backward), no autograd graph;
// the logits are written once and overwritten with their gradient.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> iic_softmax_loss_cuda(
    const at::Tensor& l, const at::Tensor& ab, const at::Tensor& bank_l, const at::Tensor& bank_ab,
    const std::optional<at::Tensor>& bank_neg, const at::Tensor& idx, double inv_t) {
  const IicArgs a = check_iic_loss(l, ab, bank_l, bank_ab, bank_neg, idx);
  const IndicesAlreadyChecked checked;  // idx, above: the calls below do not read it back again
  c10::cuda::CUDAGuard device_guard(l.device());
  const auto acc = acc_type_of(l.scalar_type(), bank_l.scalar_type());
  auto [x_l, x_ab] = iic_scores_cuda(l.to(acc), ab.to(acc), bank_l, bank_ab, bank_neg, idx, inv_t);
  at::Tensor loss_l = at::empty({a.B}, x_l.options()), loss_ab = at::empty({a.B}, x_l.options());
  if (a.B > 0) {
    const cudaStream_t stream = cuda::current_stream();
    AT_DISPATCH_FLOATING_TYPES(acc, "iic_softmax_loss", [&] {
      softmax_ce_kernel<scalar_t><<<cuda::blocks_for(2 * a.B * cuda::kThreads), cuda::kThreads, 0, stream>>>(
          x_l.mutable_data_ptr<scalar_t>(), x_ab.mutable_data_ptr<scalar_t>(), loss_l.mutable_data_ptr<scalar_t>(),
          loss_ab.mutable_data_ptr<scalar_t>(), a.B, x_l.size(1));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  auto [grad_l, grad_ab] = iic_scores_backward_cuda(x_l, x_ab, bank_l, bank_ab, bank_neg, idx, inv_t, acc);
  return {loss_l, loss_ab, grad_l, grad_ab};
}

void bank_update_cuda(const at::Tensor& bank, const at::Tensor& idx, const at::Tensor& feat, double momentum) {
  check_bank_update(bank, idx, feat);
  const int64_t B = feat.size(0), D = bank.size(1);
  if (B == 0 || D == 0) return;
  c10::cuda::CUDAGuard device_guard(bank.device());
  const at::Tensor ix = idx.contiguous();
  const auto acc = acc_type_of(feat.scalar_type(), bank.scalar_type());
  const at::Tensor f = feat.detach().to(acc).contiguous();
  const cudaStream_t stream = cuda::current_stream();
  dispatch_bank(bank.scalar_type(), acc, [&](auto bank_v, auto acc_v) {
    using bank_t = decltype(bank_v);
    using acc_t = decltype(acc_v);
    bank_update_kernel<bank_t, acc_t><<<warp_blocks(B), cuda::kThreads, 0, stream>>>(
        bank.mutable_data_ptr<bank_t>(), bank.stride(0), bank.stride(1), ix.const_data_ptr<int64_t>(),
        f.const_data_ptr<acc_t>(), B, D, static_cast<acc_t>(momentum));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(iic_ext, CUDA, m) {
  m.impl("bank_scores", &bank_scores_cuda);
  m.impl("_bank_scores_backward", &bank_scores_backward_cuda);
  m.impl("iic_scores", &iic_scores_cuda);
  m.impl("_iic_scores_backward", &iic_scores_backward_cuda);
  m.impl("iic_softmax_loss", &iic_softmax_loss_cuda);
  m.impl("bank_update_", &bank_update_cuda);
}

}  // namespace iic_ext
