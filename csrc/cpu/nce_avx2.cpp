// The NCE work units (nce_kernels.h) compiled for AVX2 + FMA.
#define IIC_NCE_VEC_BYTES 32
#include "nce_kernels.h"

// the instantiations below only pass vectors between always-inlined helpers (see nce_kernels.h)
#pragma GCC diagnostic ignored "-Wpsabi"

namespace iic_ext {
namespace nce_cpu {

#if defined(__x86_64__) || defined(__i386__)
namespace isa_avx2 {
using namespace IIC_NCE_VEC_NS;
}
IIC_NCE_UNITS(isa_avx2, IIC_EXT_AVX2, IIC_NCE_DEFINE)
IIC_NCE_INSTANTIATE(isa_avx2)
#endif

}  // namespace nce_cpu
}  // namespace iic_ext
