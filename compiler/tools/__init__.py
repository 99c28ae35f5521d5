"""Measurements around the compiler, not part of it, each runnable as `python -m llmc.tools.NAME`:
the harnesses behind `llmc bench` (`bench`, `cuda_bench`, their process workers), `torch_bench`,
the quantization quality report (`quant_report`), `peak_memory`, the llama.cpp peer
(`llama_cpp`), the bandwidth probe (`bandwidth`), and the comparisons docs/benchmarks.md reports
(`real_model`, `native_runtime`, `paged_cache`, `fusion_vs_onnxruntime`, `gemv_bandwidth`,
`quantized_gemv`, `gpu_launches`)."""
