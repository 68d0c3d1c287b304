// The NCE work units (nce_kernels.h) compiled for the baseline x86-64 (or any other) instruction set.
#define IIC_NCE_VEC_BYTES 16
#include "nce_kernels.h"

// the instantiations below only pass vectors between always-inlined helpers (see nce_kernels.h)
#pragma GCC diagnostic ignored "-Wpsabi"

namespace iic_ext {
namespace nce_cpu {

namespace isa_base {
using namespace IIC_NCE_VEC_NS;
}
IIC_NCE_UNITS(isa_base, , IIC_NCE_DEFINE)
IIC_NCE_INSTANTIATE(isa_base)

}  // namespace nce_cpu
}  // namespace iic_ext
