"""GPU kernels (Triton) for LSA decode, filled by the kernels issue; imports no serving code."""
