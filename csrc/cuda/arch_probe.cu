// Which GPUs this build of amgsn._C can run on (issue 16).  A kernel image exists for a device when
// the build holds SASS for its architecture or PTX of an older one that the driver can JIT;
// cudaFuncGetAttributes on an empty kernel answers exactly that, without launching anything.
// Python (amgsn/ops/_cuda_arch.py) asks once per device before the first CUDA op and turns a "no"
// into an error naming the device's compute capability and the rebuild command.
#include <cuda_runtime.h>
#include <torch/library.h>

#include <initializer_list>
#include <string>

namespace {

__global__ void amgsn_arch_probe_kernel() {}

// "" when this build has a kernel image for `device`, else CUDA's error text.
std::string cuda_arch_probe(int64_t device) {
  int previous = 0;
  cudaGetDevice(&previous);
  cudaError_t err = cudaSetDevice(static_cast<int>(device));
  if (err == cudaSuccess) {
    cudaFuncAttributes attributes;
    err = cudaFuncGetAttributes(&attributes, amgsn_arch_probe_kernel);
    cudaSetDevice(previous);
  }
  if (err == cudaSuccess) return "";
  cudaGetLastError();  // not a sticky error: clear it so that no later CUDA call is blamed for it
  return cudaGetErrorString(err);
}

// The virtual architectures nvcc compiled this file for, e.g. "800,860,890,900".
std::string cuda_arch_list() {
  std::string out;
#ifdef __CUDA_ARCH_LIST__
  for (int arch : {__CUDA_ARCH_LIST__}) out += (out.empty() ? "" : ",") + std::to_string(arch);
#endif
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(amgsn, m) {
  m.def("cuda_arch_probe(int device) -> str", &cuda_arch_probe);
  m.def("cuda_arch_list() -> str", &cuda_arch_list);
}
