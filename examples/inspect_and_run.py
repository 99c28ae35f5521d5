"""Export a zoo model, load it with llmc, print its IR summary, and run one decode step with the
reference executor next to onnxruntime.

    python examples/inspect_and_run.py [llama-tiny]
"""

import sys

import numpy as np
import onnxruntime as ort

import llmc
from llmc import zoo

name = sys.argv[1] if len(sys.argv) > 1 else "llama-tiny"
path = zoo.get(name).export()
graph = llmc.from_onnx(path)
print(f"{name}: {len(graph.nodes)} nodes, {graph.param_count():,} parameters")
print("inputs: ", ", ".join(f"{v.name}: {v.type}" for v in graph.inputs))

feeds = zoo.get(name).feeds(np.random.default_rng(0), batch=1, seq=1, past=7)
ours = llmc.run_reference(graph, feeds)
theirs = ort.InferenceSession(str(path)).run(["logits"], feeds)[0]
print("next token (llmc reference):", int(ours["logits"][0, -1].argmax()))
print("next token (onnxruntime):   ", int(theirs[0, -1].argmax()))
print("max abs logits difference:   %.2e" % np.abs(ours["logits"] - theirs).max())
