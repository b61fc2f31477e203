"""Fused element-wise numba kernels (compiled lazily, at first call)."""
