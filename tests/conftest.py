"""Session-wide test setup: without a GPU, Triton kernels run in Triton's interpreter on CPU.

Set before anything imports ``triton`` (``@triton.jit`` picks interpreter or compiler when the
kernel module is imported), so CPU CI exercises the same kernels at tiny shapes.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of tiny ops (the DeepSeek-V4 tests): intra-op threads gain nothing there, and
    on a busy 2-core machine every parallel region waits for a descheduled worker (measured: 60x
    slower decode steps). Use with ``pytestmark = pytest.mark.usefixtures(...)``; restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
