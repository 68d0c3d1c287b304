// Launch and indexing helpers shared by the CUDA kernels of iic_ext.
#pragma once
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <limits>

namespace iic_ext {
namespace cuda {

constexpr int kThreads = 256;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Blocks for a grid-stride loop over n items: one item per thread up to 2^20 blocks (many waves on
// any device), beyond that each thread loops.
inline unsigned int blocks_for(int64_t n, int threads = kThreads) {
  constexpr int64_t cap = int64_t{1} << 20;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min(ceil_div(n, threads), cap)));
}

// The stream kernels are launched on (ATen's current stream; c10 spelling of
// at::cuda::getCurrentCUDAStream, which needs no cuBLAS/cuSPARSE headers).
inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// The largest element offset a tensor reaches (strides are never negative in torch), plus one.
inline int64_t span(const at::Tensor& t) {
  int64_t s = 1;
  for (int64_t d = 0; d < t.dim(); ++d)
    if (t.size(d) > 0) s += (t.size(d) - 1) * t.stride(d);
  return s;
}

// True when every index and offset of these tensors fits in int32 (32-bit division is much cheaper).
inline bool fits_int32(std::initializer_list<const at::Tensor*> ts) {
  constexpr int64_t lim = std::numeric_limits<int32_t>::max();
  for (const at::Tensor* t : ts)
    if (t->numel() > lim || span(*t) > lim) return false;
  return true;
}

inline bool aligned(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Dims of a 5-D iteration in the memory order of the written tensor (outermost first), so that
// consecutive threads write consecutive addresses for any layout of the output.
template <typename index_t>
struct Geometry {
  index_t size[5];
  index_t in_stride[5];
  index_t out_stride[5];
  int dim[5];  // original dim of each position
};

// sizes: the iteration space (the output's); in/out: strides of the read and written tensors.
template <typename index_t>
Geometry<index_t> make_geometry(at::IntArrayRef sizes, at::IntArrayRef in_strides, at::IntArrayRef out_strides) {
  int order[5] = {0, 1, 2, 3, 4};
  // outermost first: larger output stride first; size-1 dims carry no information, keep them outer
  std::stable_sort(order, order + 5, [&](int a, int b) {
    const bool a1 = sizes[a] == 1, b1 = sizes[b] == 1;
    if (a1 != b1) return a1;
    return out_strides[a] > out_strides[b];
  });
  Geometry<index_t> g;
  for (int p = 0; p < 5; ++p) {
    const int d = order[p];
    g.size[p] = static_cast<index_t>(sizes[d]);
    g.in_stride[p] = static_cast<index_t>(in_strides[d]);
    g.out_stride[p] = static_cast<index_t>(out_strides[d]);
    g.dim[p] = d;
  }
  return g;
}

// Rounded arithmetic that the compiler may not fuse into FMAs: results then match the CPU kernels,
// which compute the same expressions without contraction.
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }

// N values of T moved as one aligned load/store.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

}  // namespace cuda
}  // namespace iic_ext
