"""Backends turn the kernels of a graph into callables and artifact files: `reference` (numpy),
and, in later work, `tvm` (x86, aarch64, Metal) and `triton` (CUDA)."""
