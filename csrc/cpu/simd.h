// Runtime instruction-set dispatch for the CPU kernels' inner loops.
//
// The library is compiled for the baseline x86-64 ISA so it loads everywhere; hot loops are written once
// as always-inline templates and instantiated twice, for the baseline and for AVX2+FMA, the latter
// chosen at run time when the processor has it.
#pragma once

namespace iic_ext {

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define IIC_EXT_X86_DISPATCH 1
#define IIC_EXT_AVX2 __attribute__((target("avx2,fma,f16c")))
#define IIC_EXT_INLINE inline __attribute__((always_inline))
inline bool cpu_has_avx2() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return has;
}
#else
#define IIC_EXT_X86_DISPATCH 0
#define IIC_EXT_AVX2
#define IIC_EXT_INLINE inline
inline bool cpu_has_avx2() { return false; }
#endif

}  // namespace iic_ext
