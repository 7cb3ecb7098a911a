// Shared helpers for lmmrt's torch-free CUDA kernels.
#pragma once
#include <cuda_runtime.h>
#include <cstdint>

namespace lmmrt {

// Every kernel entry point returns the launch status so the binding can raise it.
inline cudaError_t last_launch_error() { return cudaGetLastError(); }

}  // namespace lmmrt
