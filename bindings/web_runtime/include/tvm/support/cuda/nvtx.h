/*
 * qwen35-mobile: tvm/support/cuda/nvtx.h for building TVM's web runtime from the wheel
 * (see ../io.h).  NVTX ranges mark CUDA profiles; the web runtime has none, so the
 * scoped range is a no-op, as it is in a TVM built without NVTX.
 */
#ifndef TVM_SUPPORT_CUDA_NVTX_H_
#define TVM_SUPPORT_CUDA_NVTX_H_

#include <string>

namespace tvm {
namespace support {

class NVTXScopedRange {
 public:
  explicit NVTXScopedRange(const char*) {}
  explicit NVTXScopedRange(const std::string&) {}
  NVTXScopedRange(const NVTXScopedRange&) = delete;
  NVTXScopedRange& operator=(const NVTXScopedRange&) = delete;
};

}  // namespace support
}  // namespace tvm

#endif  // TVM_SUPPORT_CUDA_NVTX_H_
