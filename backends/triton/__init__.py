"""The CUDA target: Triton kernels, compiled ahead of time to cubins (`backend.py`)."""
