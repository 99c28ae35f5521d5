"""Decoders exported without a KV cache: the compiler adds one (passes/synthesize_kv_cache.py)
and decodes with it. For every zoo family the `--no-kv-cache` export gives the same greedy tokens
as the export with a cache; what cannot be cached exactly is refused, naming why."""

from __future__ import annotations

import onnx
import pytest
from onnx import helper
from zoo_cases import export

import llmc
from llmc import runtime, zoo
from llmc.errors import LlmcError

PROMPT = [5, 17, 33, 2, 99, 7, 200]
STEPS = 24
FAST = {"llama-tiny", "gpt2-tiny"}  # the others run with the slow tests


@pytest.mark.parametrize("name", [pytest.param(m.name, marks=() if m.name in FAST else pytest.mark.slow)
                                  for m in zoo.TINY_DECODERS])
def test_export_without_cache_decodes_like_the_export_with_one(name, artifacts, tmp_path):
    art = llmc.compile(export(name, exporter="dynamo", kv_cache=False), output=tmp_path / "m.llmc", max_seq_len=128)
    model = runtime.load(art)
    assert len(model.manifest["model"]["kv_cache"]["entries"]) == 2 * zoo.get(name).config().num_hidden_layers
    assert model.generate(PROMPT, STEPS) == runtime.load(artifacts(name)).generate(PROMPT, STEPS)


def test_positions_computed_inside_the_graph_are_refused(tmp_path):
    """Positions the graph counts from its own sequence would restart at 0 with a cache."""
    model = onnx.load(str(export("llama-tiny", exporter="torchscript", kv_cache=False)))
    g = model.graph
    g.initializer.extend([helper.make_tensor(n, onnx.TensorProto.INT64, [1], [v]) for n, v in (("c0", 0), ("c1", 1))])
    derive = [helper.make_node("Shape", ["input_ids"], ["shape"]), helper.make_node("Gather", ["shape", "c1"], ["s"]),
              helper.make_node("Squeeze", ["s"], ["s0"]), helper.make_node("Squeeze", ["c0"], ["zero"]),
              helper.make_node("Squeeze", ["c1"], ["one"]), helper.make_node("Range", ["zero", "s0", "one"], ["row"]),
              helper.make_node("Unsqueeze", ["row", "c0"], ["position_ids"])]
    inputs = [v for v in g.input if v.name != "position_ids"]
    del g.input[:]
    g.input.extend(inputs)
    nodes = derive + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    with pytest.raises(LlmcError, match="no positions input"):
        llmc.compile(path, output=tmp_path / "m.llmc", max_seq_len=64)
