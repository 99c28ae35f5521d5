"""Tools around the compiler, not part of it: the benchmark harnesses (`bench`, `torch_bench`)
and the quantization quality report (`quant_report`)."""
