"""Triton source of the CUDA target's kernel families (imported by `llmc.runtime.interpret.load_package`)."""
