// Runtime instruction-set dispatch for the CPU kernels' inner loops.
//
// The library is compiled for the baseline x86-64 ISA so it loads everywhere; hot loops are written once
// as always-inline templates and instantiated for the baseline and for AVX2+FMA (the NCE and residual
// kernels also for AVX-512), the widest one chosen at run time when the processor has it.
#pragma once

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>

namespace iic_ext {

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define IIC_EXT_X86_DISPATCH 1
#define IIC_EXT_AVX2 __attribute__((target("avx2,fma,f16c")))
#define IIC_EXT_AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c")))
#define IIC_EXT_INLINE inline __attribute__((always_inline))
#else
#define IIC_EXT_X86_DISPATCH 0
#define IIC_EXT_AVX2
#define IIC_EXT_AVX512
#define IIC_EXT_INLINE inline
#endif

enum class Isa { kBase = 0, kAvx2 = 1, kAvx512 = 2 };

inline const char* isa_name(Isa isa) {
  return isa == Isa::kAvx512 ? "avx512" : isa == Isa::kAvx2 ? "avx2" : "base";
}

// The widest instruction set the CPU kernels use: what the processor supports, capped by the
// environment variable IIC_EXT_CPU_ISA (avx512, avx2 or base) when it is set. Read once per process;
// the tests use it to run every code path on one machine.
inline Isa cpu_isa() {
  static const Isa isa = [] {
    Isa best = Isa::kBase;
#if IIC_EXT_X86_DISPATCH
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
      best = Isa::kAvx512;
    else if (avx2)
      best = Isa::kAvx2;
#endif
    const char* cap = std::getenv("IIC_EXT_CPU_ISA");
    if (cap == nullptr || *cap == 0) return best;
    Isa want = Isa::kBase;
    if (std::strcmp(cap, "avx512") == 0)
      want = Isa::kAvx512;
    else if (std::strcmp(cap, "avx2") == 0)
      want = Isa::kAvx2;
    else
      TORCH_CHECK(std::strcmp(cap, "base") == 0, "IIC_EXT_CPU_ISA must be avx512, avx2 or base, got '", cap, "'");
    return want < best ? want : best;
  }();
  return isa;
}

inline bool cpu_has_avx2() { return cpu_isa() >= Isa::kAvx2; }

}  // namespace iic_ext
