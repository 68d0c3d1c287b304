// The NCE work units (nce_kernels.h) compiled for AVX-512.
#define IIC_NCE_VEC_BYTES 64
#include "nce_kernels.h"

// the instantiations below only pass vectors between always-inlined helpers (see nce_kernels.h)
#pragma GCC diagnostic ignored "-Wpsabi"

namespace iic_ext {
namespace nce_cpu {

#if defined(__x86_64__) || defined(__i386__)
namespace isa_avx512 {
using namespace IIC_NCE_VEC_NS;
}
IIC_NCE_UNITS(isa_avx512, IIC_EXT_AVX512, IIC_NCE_DEFINE)
IIC_NCE_INSTANTIATE(isa_avx512)
#endif

}  // namespace nce_cpu
}  // namespace iic_ext
