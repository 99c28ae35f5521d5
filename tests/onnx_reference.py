"""onnxruntime as the reference for any decoder file: greedy decoding fed by the roles llmc
found (an artifact's `model.roles` and KV cache pairs), whatever the exporter named things."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from llmc.runtime.artifact import open_artifact


class OnnxDecoder:
    def __init__(self, onnx_path, artifact):
        manifest = open_artifact(artifact).manifest
        model, self.values = manifest["model"], manifest["plans"]["values"]
        self.roles = model["roles"]
        self.pairs = {e["past"]: e["present"] for e in model["kv_cache"]["entries"] if not e["past"].endswith(".scale")}
        self.session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.outputs = [o.name for o in self.session.get_outputs()]

    def _empty_past(self, name):
        # [batch, heads, past, head_dim] as llmc bound it (the file may leave the head dim
        # symbolic): batch 1, no past
        shape = self.values[name]["shape"]
        return np.zeros([1, shape[1], 0, shape[3]], _dtype(self.inputs[name]))

    def greedy(self, prompt, steps):
        """(tokens, the logits of the last position at each step)."""
        past = {name: self._empty_past(name) for name in self.pairs}
        ids, new, tokens, logits = list(prompt), list(prompt), [], []
        for _ in range(steps):
            start = len(ids) - len(new)
            feeds = {self.roles["tokens"]: np.array([new], np.int64), **past}
            if self.roles["mask"]:
                feeds[self.roles["mask"]] = np.ones((1, len(ids)), _dtype(self.inputs[self.roles["mask"]]))
            if self.roles["positions"]:
                feeds[self.roles["positions"]] = np.arange(start, len(ids), dtype=np.int64)[None]
            outs = dict(zip(self.outputs, self.session.run(None, feeds)))
            last = outs[self.roles["logits"]][0, -1]
            logits.append(last)
            tokens.append(int(last.argmax()))
            ids.append(tokens[-1])
            new = [tokens[-1]]
            past = {p: outs[q] for p, q in self.pairs.items()}
        return tokens, logits


def at_accuracy_level_0(path, folder):
    """A copy of an ONNX file in `folder` whose MatMulNBits compute in f32 (accuracy level 0):
    onnxruntime's CPU kernel at the builder's level 4 rounds the activations to int8 too, while
    llmc's f32-activation kernels compute with the same 4-bit weights and f32 activations."""
    import onnx

    model = onnx.load(str(path))
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            for a in node.attribute:
                if a.name == "accuracy_level":
                    a.i = 0
    out = folder / "model.onnx"
    onnx.save(model, str(out), save_as_external_data=True, location="model.onnx.data")
    return out


def _dtype(info):
    return {"tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(float)": np.float32,
            "tensor(float16)": np.float16}[info.type]
