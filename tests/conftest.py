"""Session-wide test setup: without a GPU, Triton kernels run in Triton's interpreter on CPU.

Set before anything imports ``triton`` (``@triton.jit`` picks interpreter or compiler when the
kernel module is imported), so CPU CI exercises the same kernels at tiny shapes.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
