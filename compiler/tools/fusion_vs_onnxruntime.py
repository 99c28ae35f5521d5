"""Kernels: llmc's pass pipeline against onnxruntime's transformers optimizer on the same ONNX
exports (tiny zoo models, KV cache, the decode graph).

    python -m llmc.tools.fusion_vs_onnxruntime [--json]

A kernel is a node that is not a pure view or shape computation (Reshape, Squeeze, Unsqueeze,
Shape/Gather/Concat/Slice/Cast/Range arithmetic, Constant, Identity), for both. Per layer: the
kernels of layer 1 by source scope (onnxruntime's fused nodes carry no scope, so only llmc's
per-layer count is exact); whole graph: every kernel, which needs no scope and compares fairly.
"""

from __future__ import annotations

import argparse
import json
import re

import llmc
from llmc import zoo
from llmc.passes.manager import PassContext, run_passes
from llmc.options import CompileOptions
from llmc.ir.kernels import kernels_per_layer
from llmc.passes.pipeline import default_pipeline

# onnxruntime's optimizer model type per family ('gpt2' is its generic decoder fusion path).
ORT_TYPES = {"gpt2": "gpt2", "llama": "gpt2", "mistral": "gpt2", "qwen2": "qwen3", "phi": "phi",
             "gpt-neox": "gpt_neox", "opt": "gpt2"}
ORT_VIEWS = {"Reshape", "Squeeze", "Unsqueeze", "Constant", "Identity", "Shape", "Gather", "Concat",
             "Cast", "Range", "Slice", "Split", "ConstantOfShape", "Equal", "Where", "Expand"}


def llmc_kernels(path) -> tuple[list[str], int]:
    from llmc.ir.kernels import kernel_nodes

    graph = run_passes(llmc.from_onnx(path), default_pipeline(), PassContext(options=CompileOptions(max_seq_len=128)))
    return [n.op for n in kernels_per_layer(graph)], len(kernel_nodes(graph.nodes))


def ort_kernels(path, family, cfg) -> tuple[list[str], int]:
    from onnxruntime.transformers import optimizer

    model = optimizer.optimize_model(str(path), model_type=ORT_TYPES[family],
                                     num_heads=cfg.num_attention_heads, hidden_size=cfg.hidden_size)
    layer = re.compile(r"(layers?|h)[./_]1[./_]")
    kernels = [n for n in model.model.graph.node if n.op_type not in ORT_VIEWS]
    in_layer = [n.op_type for n in kernels if layer.search(n.name + " " + " ".join(
        p.value for p in n.metadata_props if p.key == "pkg.torch.onnx.name_scopes"))]
    return in_layer, len(kernels)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = []
    for family in ("llama", "mistral", "qwen2", "gpt2", "opt", "phi", "gpt-neox"):
        m = zoo.get(f"{family}-tiny")
        for exporter in ("dynamo", "torchscript"):
            path = m.export(kv_cache=True, exporter=exporter)
            ours, ours_total = llmc_kernels(path)
            try:
                theirs, theirs_total = ort_kernels(path, family, m.config())
            except Exception as e:  # noqa: BLE001 (the optimizer's own failure is a result)
                theirs, theirs_total = [f"optimizer failed: {type(e).__name__}: {e}"[:80]], None
            rows.append(dict(model=m.name, exporter=exporter, llmc_layer=len(ours), llmc_ops=ours,
                             llmc_total=ours_total, ort_layer_scoped=theirs, ort_total=theirs_total))
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print("| model | exporter | llmc kernels/layer | llmc kernels, graph | onnxruntime kernels, graph "
          "| onnxruntime layer 1 (scoped nodes) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['model']} | {r['exporter']} | {r['llmc_layer']} | {r['llmc_total']} | "
              f"{r['ort_total'] if r['ort_total'] is not None else '-'} | {', '.join(r['ort_layer_scoped'])} |")


if __name__ == "__main__":
    main()
