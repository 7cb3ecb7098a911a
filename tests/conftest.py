import os

import torch

# Triton kernels run under the CPU interpreter when there is no GPU. The variable must be set
# before any @triton.jit definition is executed, so before lmmrt.kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import sys
from pathlib import Path

# Shared test helpers (idefics_util, ...) live in tests/ itself.
sys.path.insert(0, str(Path(__file__).parent))
