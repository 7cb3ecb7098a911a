"""Whether the NVRTC JIT path can compile here (CuPy's NVRTC and the CUDA headers found): the
cuda_jit tests that compile skip, naming what is missing, where it cannot."""

import pytest

from lmmrt.kernels.cuda_jit import nvrtc_build

NVRTC_MISSING: str | None = None
try:
    nvrtc_build.nvrtc_version()
    nvrtc_build.cuda_include_dir()
except ImportError as e:  # CudaJitUnavailable is an ImportError
    NVRTC_MISSING = str(e)
needs_nvrtc = pytest.mark.skipif(NVRTC_MISSING is not None, reason=f"NVRTC unusable: {NVRTC_MISSING}")
