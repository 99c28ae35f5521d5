"""The `llmc` command line.

    llmc inspect model.onnx [--ir] [--svg FILE [--layer N]] [--passes]
    llmc compile model.onnx --target cpu -o model.llmc
    llmc compile model.onnx --target cuda [--dtype fp16] [--arch sm_80,sm_90] -o model.llmc
    llmc compile model.onnx --target opencl|metal -o model.llmc
    llmc run model.llmc --prompt-ids 1,2,3 --max-new-tokens 32  [--interpret: a cuda artifact on the CPU]
    llmc devices   (the OpenCL devices an opencl artifact can run on)
    llmc run model.llmc --prompt "Once upon a time"   (with a bundled tokenizer)
    llmc runtime build [--target x86_64|arm64] [--shared] -o llmc-run
    llmc package model.onnx --target arm64 [--cpu cortex-a76] -o DIR   (program + artifact + README)
    llmc ops [--markdown]
    llmc zoo list | llmc zoo export NAME [-o model.onnx]

Results go to stdout, logs (`-v`) to stderr. A problem with the input (a missing file, an
unsupported op) prints one clear message and exits with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import shutil
import sys
from pathlib import Path

from llmc.backends import BACKENDS

from . import __version__, model_files
from .errors import LlmcError

TARGETS = tuple(BACKENDS)

log = logging.getLogger("llmc")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose > 1 else
                        logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        return args.run(args) or 0
    except LlmcError as e:
        print(f"llmc: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmc", description="A compiler for Transformer language models.")
    p.add_argument("--version", action="version", version=f"llmc {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="log progress (-vv: debug)")
    sub = p.add_subparsers(metavar="COMMAND")

    ins = sub.add_parser("inspect", help="show a model's inputs, outputs, parameters and ops, or an "
                         "artifact's contents and memory")
    ins.add_argument("model", help="an ONNX file, or a compiled artifact (.llmc directory)")
    ins.add_argument("--ir", action="store_true", help="print the IR as text")
    ins.add_argument("--svg", metavar="FILE", help="draw the graph (one layer if large) as SVG")
    ins.add_argument("--layer", type=int, help="with --svg: draw this transformer layer")
    ins.add_argument("--passes", action="store_true",
                     help="run the pass pipeline: per pass what it rewrote, op counts, near misses")
    ins.add_argument("--dump-ir", metavar="DIR", help="with --passes: write the IR after each pass")
    ins.add_argument("--max-seq-len", type=int, metavar="N",
                     help="with --passes: specialize for contexts of at most N tokens")
    ins.set_defaults(run=_inspect)

    comp = sub.add_parser("compile", help="compile an ONNX decoder (with KV cache) to an artifact")
    comp.add_argument("model", help="an ONNX decoder with a KV cache, as any exporter writes it")
    comp.add_argument("--target", choices=TARGETS, default="cpu",
                      help="cpu: TVM kernels for this CPU; arm64: TVM kernels for an aarch64 CPU, cross-compiled "
                           "(run them with the native runtime: llmc runtime build --target arm64); cuda: Triton "
                           "kernels compiled to cubins (no GPU needed); opencl: TVM GPU kernels as OpenCL C "
                           "(Android GPUs; run here on any OpenCL device, pocl included); metal: the same kernels "
                           "as Metal Shading Language (Apple GPUs; no runtime for them yet)")
    comp.add_argument("--dtype", choices=("fp32", "fp16"),
                      help="the GEMM weights' precision (default: fp16 on cuda, fp32 elsewhere); sums are f32")
    comp.add_argument("--arch",
                      help="with --target cuda: the GPU architectures to compile for (default sm_80,sm_90)")
    comp.add_argument("--cpu", help="the CPU the kernels may assume. cpu: this machine's (native, the default and "
                                    "the fastest), or a portable level for artifacts shipped to other machines "
                                    "(x86-64-v3: AVX2+FMA, x86-64-v4: AVX-512); arm64: generic (NEON, the default), "
                                    "cortex-a55, cortex-a76, neoverse-n1, neoverse-v1, apple-m1 (dot-product "
                                    "instructions, used by --quant)")
    comp.add_argument("-o", "--output", help="the artifact directory (default: MODEL.llmc)")
    comp.add_argument("--max-seq-len", type=int, default=1024,
                      help="longest context (prompt + new tokens) the artifact serves (default 1024)")
    comp.add_argument("--eos-token-id", type=int,
                      help="stop generating at this token (default: the end-of-sequence tokens of the configs)")
    comp.add_argument("--tokenizer", metavar="DIR",
                      help="the folder with tokenizer.json and the configs to bundle (default: the model's folder)")
    _quant_arguments(comp)
    _tuning_arguments(comp)
    comp.set_defaults(run=_compile)

    tune = sub.add_parser("tune", help="measure a model's kernels on this machine into the tuning cache, or export "
                                       "the cache for identical machines")
    tune.add_argument("model", nargs="?", help="an ONNX decoder (compile options as for compile)")
    tune.add_argument("--target", choices=TARGETS, default="cpu")
    tune.add_argument("--cpu", help="as for compile")
    tune.add_argument("--dtype", choices=("fp32", "fp16"))
    tune.add_argument("--arch")
    tune.add_argument("--max-seq-len", type=int, default=1024)
    tune.add_argument("--tune-budget", type=float, metavar="SECONDS",
                      help="stop measuring after this long; unmeasured kernels keep their defaults")
    tune.add_argument("--export", metavar="FILE",
                      help="write this machine's entries of the tuning cache to FILE (after tuning MODEL, if given)")
    _quant_arguments(tune)
    tune.set_defaults(run=_tune)

    run = sub.add_parser("run", help="generate tokens with a compiled artifact")
    run.add_argument("artifact")
    prompt = run.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", action="append",
                        help="the prompt as text (the artifact must bundle a tokenizer); streams text. Repeated: a "
                             "batch, one output line per prompt (decoded together with a paged KV cache)")
    prompt.add_argument("--prompt-ids", action="append", help="comma-separated token ids, e.g. 1,2,3 (repeatable)")
    prompt.add_argument("--chat", metavar="MESSAGE",
                        help="one chat turn: MESSAGE as the user's, rendered with the model's chat template; prints "
                             "the reply only")
    run.add_argument("--system", help="with --chat: the system message (default: the template's own, if any)")
    run.add_argument("--max-new-tokens", type=int, default=32)
    _sampling_arguments(run)
    _load_arguments(run)
    run.add_argument("--json", action="store_true", help="print the result as JSON")
    run.set_defaults(run=_run)

    chat = sub.add_parser("chat", help="chat with a compiled chat model in the terminal (multi-turn; the KV cache "
                                       "is kept across turns)")
    chat.add_argument("artifact")
    chat.add_argument("--system", help="the system message (default: the template's own, if any)")
    chat.add_argument("--max-new-tokens", type=int, default=256, help="the longest reply, in tokens")
    _sampling_arguments(chat)
    _load_arguments(chat)
    chat.set_defaults(run=_chat)

    ppl = sub.add_parser("perplexity", help="perplexity of a text under a compiled artifact (chunked as "
                                            "llama.cpp's llama-perplexity)")
    ppl.add_argument("artifact")
    ppl.add_argument("--text", required=True, metavar="FILE", help="a UTF-8 text file")
    ppl.add_argument("--ctx", type=int, help="tokens a chunk (default: the artifact's context, up to 512)")
    ppl.add_argument("--chunks", type=int, help="at most this many chunks (default: every whole chunk)")
    _load_arguments(ppl)
    ppl.add_argument("--json", action="store_true", help="print the result as JSON")
    ppl.set_defaults(run=_perplexity)

    srv = sub.add_parser("serve", help="serve an artifact over an OpenAI-compatible HTTP API, many clients at once "
                                       "(continuous batching; needs the serve extra)")
    srv.add_argument("artifact")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--served-model-name", help="the model's name in the API (default: the artifact's)")
    srv.add_argument("--max-batch", type=_positive, default=8, help="sequences decoded together (a paged KV cache "
                     "is needed for more than 1)")
    srv.add_argument("--max-queue", type=_positive, default=64, help="requests waiting before new ones get 429")
    srv.add_argument("--prefill-chunk", type=_positive, default=16, metavar="TOKENS",
                     help="prompt tokens a step takes beside the decoding sequences' tokens: larger gives "
                     "more tokens/s, smaller a lower inter-token latency (default: 16)")
    srv.add_argument("--kv-blocks", type=_positive, metavar="N", help="a budget of KV cache blocks; past it the "
                     "newest sequence is preempted and recomputed later (default: as many as the batch needs)")
    srv.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false",
                     help="compute every prompt in full (by default a prompt starting with the tokens of an earlier "
                     "one reuses the cached KV blocks of that prefix)")
    srv.add_argument("--api-key", help="require `Authorization: Bearer KEY` (default: $LLMC_API_KEY, else none)")
    srv.add_argument("--threads", type=int, help="kernel threads (default: every core, or $LLMC_NUM_THREADS)")
    srv.add_argument("--grace", type=float, default=30.0, metavar="SECONDS",
                     help="at SIGTERM, how long running requests may go on before they are aborted")
    srv.set_defaults(run=_serve)

    bs = sub.add_parser("bench-serve", help="serving speed of an OpenAI-compatible server (llmc serve, llama-server, "
                                            "vLLM): TTFT, inter-token latency and output tokens/s per concurrency")
    bs.add_argument("url", help="the server's base URL, e.g. http://127.0.0.1:8000")
    bs.add_argument("--model", help="the model name to send (default: none; servers of one model accept that)")
    load = bs.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=_positive, nargs="+", default=[1, 2, 4, 8, 16],
                      help="requests in flight at once, one run per level")
    load.add_argument("--rate", type=float, help="Poisson arrivals at this many requests/s instead")
    bs.add_argument("--requests", type=_positive, default=16, help="requests per level")
    bs.add_argument("--input-len", type=_positive, default=40, help="words of each prompt")
    bs.add_argument("--output-len", type=_positive, default=64, help="tokens generated per request (ignore_eos)")
    bs.add_argument("--api-key", help="sent as Authorization: Bearer KEY")
    bs.add_argument("--json", metavar="FILE", help="also write the rows as JSON here")
    bs.set_defaults(run=_bench_serve)

    ben = sub.add_parser("bench", help="prefill and decode speed against onnxruntime, PyTorch eager and torch.compile")
    ben.add_argument("model", help="a zoo model name (all peers) or an ONNX decoder with KV cache (llmc only)")
    ben.add_argument("--prompt-len", type=int, default=128)
    ben.add_argument("--new-tokens", type=int, default=128)
    ben.add_argument("--repeats", type=int, default=3)
    ben.add_argument("--quant", nargs="+", choices=("w8", "w4"), default=[],
                     help="also run llmc's quantized artifacts (w4: groups of 128) and onnxruntime's quantized "
                          "models (dynamic int8; MatMulNBits 4-bit)")
    ben.add_argument("--target", choices=("cpu", "cuda"), default="cpu",
                     help="cuda: on this machine's NVIDIA GPU, fp16 and w4 against PyTorch eager and torch.compile "
                          "(zoo models only; default model size for it: llama-1b)")
    ben.add_argument("--tuned", action="store_true",
                     help="also run each llmc artifact compiled with --tune (tuned from an empty table)")
    ben.add_argument("--json", metavar="FILE", help="also write every figure as JSON here")
    ben.set_defaults(run=_bench)

    bt = sub.add_parser("bench-torch", help="decode speed under torch.compile: eager, inductor (with and without "
                        "freezing) and llmc, each in a process of its own")
    bt.add_argument("model", help="a zoo model name")
    bt.add_argument("--prompt-len", type=int, default=128)
    bt.add_argument("--new-tokens", type=int, default=64)
    bt.add_argument("--repeats", type=int, default=3)
    bt.add_argument("--systems", nargs="+", choices=("eager", "inductor", "inductor-freezing", "llmc", "llmc-runtime"),
                    default=["eager", "inductor", "inductor-freezing", "llmc", "llmc-runtime"],
                    help="llmc-runtime: the model's ONNX export compiled by llmc compile, run by the artifact runtime")
    bt.add_argument("--cache", choices=("dynamic", "static"), default="dynamic",
                    help="transformers' KV cache: its dynamic one, or StaticCache (written in place)")
    bt.add_argument("--loop", choices=("generate", "forward"), default="generate",
                    help="transformers' generate, or a plain greedy loop over the model's forward (what is left "
                         "is the forward the compiler runs)")
    bt.add_argument("--json", metavar="FILE", help="also write every figure as JSON here")
    bt.set_defaults(run=_bench_torch)

    qr = sub.add_parser("quant-report", help="quality of weight quantization against fp32: logits error, "
                        "top-1 agreement, perplexity")
    qr.add_argument("model", help="a zoo model name or an ONNX decoder with KV cache")
    qr.add_argument("--quant", nargs="+", choices=("w8", "w4"), default=["w8", "w4"])
    qr.add_argument("--group-size", nargs="+", type=int, choices=(32, 64, 128), default=[128],
                    help="w4 group sizes to report (default 128)")
    qr.add_argument("--zero-point", action="store_true", help="also report w4 with zero points")
    qr.add_argument("--lm-head", choices=("f32", "w8", "w4"), help="the LM head's encoding (default w8)")
    qr.add_argument("--embedding", choices=("f32", "w8"), help="the token embedding's encoding (default w8)")
    qr.add_argument("--awq", action="store_true", help="also report w4 with activation-aware scaling")
    qr.add_argument("--kv-int8", action="store_true", help="also report each scheme with an int8 KV cache")
    qr.add_argument("--activations", nargs="+", choices=("int8", "f32"), default=["int8"],
                    help="what the quantized GEMMs multiply (default int8, the cpu default; f32: weights "
                         "dequantized); several: each scheme with each")
    qr.add_argument("--tokens", type=int, default=256, help="length of the sampled held-out sequence")
    qr.add_argument("--token-ids", help="comma-separated held-out token ids instead of a sample")
    qr.add_argument("--text", metavar="FILE", help="a UTF-8 text whose first --tokens tokens are the held-out "
                                                   "sequence (a model with a tokenizer)")
    qr.add_argument("--seed", type=int, default=0)
    qr.add_argument("--onnxruntime", action="store_true",
                    help="also measure onnxruntime's own quantized models of the same schemes")
    qr.add_argument("--json", metavar="FILE", help="also write the figures as JSON here")
    qr.set_defaults(run=_quant_report)

    dev = sub.add_parser("devices", help="the OpenCL devices this machine has (llmc run --device N)")
    dev.set_defaults(run=_devices)

    rt = sub.add_parser("runtime", help="the native runtime (C, no Python): build it for a target")
    rsub = rt.add_subparsers(metavar="ACTION")
    rb = rsub.add_parser("build", help="build llmc-run (or libllmc.so) with the kernels' toolchain; prints the path")
    rb.add_argument("--target", default="x86_64", help="x86_64 (default) or arm64")
    rb.add_argument("--shared", action="store_true",
                    help="build the library libllmc.so with the C API of llmc.h (for apps: JNI, Swift) instead")
    rb.add_argument("-o", "--output", required=True, help="the program (or library) to write")
    rb.set_defaults(run=_runtime_build)

    pk = sub.add_parser("package", help="a folder to copy to a board or phone: llmc-run, the artifact, a README")
    pk.add_argument("model", help="an ONNX decoder")
    pk.add_argument("--target", choices=("arm64", "cpu"), default="arm64",
                    help="arm64 (default): an aarch64 Linux CPU; cpu: this machine's architecture")
    pk.add_argument("--cpu", help="as for compile: arm64 generic (default), cortex-a55, cortex-a76, neoverse-n1, "
                                  "neoverse-v1, apple-m1; cpu native, x86-64-v3, x86-64-v4")
    pk.add_argument("-o", "--output", required=True, help="the folder to write (a package there is replaced)")
    pk.add_argument("--max-seq-len", type=int, default=1024)
    pk.add_argument("--eos-token-id", type=int)
    pk.add_argument("--tokenizer", help="the folder with tokenizer.json and configs to bundle")
    pk.add_argument("--fp32", action="store_true", help="keep the weights in fp32 (default: --quant w4 --group-size 32, "
                                                         "the smallest encoding whose quality quant-report states)")
    _quant_arguments(pk)
    pk.set_defaults(run=_package, quant="w4", group_size=32)

    ops = sub.add_parser("ops", help="list the ONNX ops the frontend supports")
    ops.add_argument("--markdown", action="store_true", help="as the table in docs/onnx-ops.md")
    ops.add_argument("--aten", action="store_true",
                     help="the ATen ops the torch.fx frontend converts instead (torch.compile, torch.export)")
    ops.set_defaults(run=_ops)

    zoo = sub.add_parser("zoo", help="build the test/benchmark models (needs the 'zoo' extra)")
    zsub = zoo.add_subparsers(metavar="ACTION")
    zl = zsub.add_parser("list", help="list the zoo's models")
    zl.set_defaults(run=_zoo_list)
    ze = zsub.add_parser("export", help="export a zoo model to ONNX (cached); prints the path")
    ze.add_argument("name", help="a model name from `llmc zoo list`")
    ze.add_argument("-o", "--output", help="copy the ONNX file (and its data) here")
    ze.add_argument("--exporter", choices=("dynamo", "torchscript"), default="dynamo")
    ze.add_argument("--no-kv-cache", action="store_true", help="export without past/present")
    ze.add_argument("--dtype", choices=("f32", "f16"), default="f32")
    ze.add_argument("--opset", type=int, help="ONNX opset (the exporter's default if omitted)")
    ze.add_argument("--external-data", action="store_true", help="weights in a separate file")
    ze.set_defaults(run=_zoo_export)
    return p


def _inspect(args) -> int:
    from .frontends.onnx import from_onnx

    if Path(args.model).is_dir():
        return _inspect_artifact(args.model)
    log.info("loading %s", args.model)
    try:
        graph = from_onnx(args.model)
    except LlmcError:
        _inspect_file(args.model)  # what the file holds, then why it does not convert
        raise
    out = []
    meta = graph.metadata
    out.append(f"model:    {args.model}")
    out.append(f"producer: {meta.get('producer') or '?'}, opset {meta.get('opset')}")
    width = max(len(v.name) for v in graph.inputs + graph.outputs)
    out.append("inputs:")
    out += [f"  {v.name:<{width}}  {v.type}" for v in graph.inputs]
    out.append("outputs:")
    out += [f"  {v.name:<{width}}  {v.type}" for v in graph.outputs]
    out.append(f"symbolic dims: {', '.join(sorted(graph.symbols())) or 'none'}")
    roles = meta.get("roles")
    if roles:
        out.append("roles:    " + ", ".join(f"{role} {name}" for role, name in roles.items() if name) +
                   f", {len(meta['kv_pairs']) // 2 or 'no'} layers of KV cache")
    out.append(f"parameters: {graph.param_count():,} in {len(graph.params)} tensors, "
               f"{_bytes(graph.param_bytes())}")
    hist = collections.Counter(n.op for n in graph.nodes)
    out.append(f"ops: {len(graph.nodes)} nodes")
    out += [f"  {op:<18} {count}" for op, count in hist.most_common()]
    print("\n".join(out))
    passed = None
    if args.passes or args.dump_ir:
        # passes rewrite in place: they get their own copy, the drawing keeps the original
        passed = _run_passes(from_onnx(args.model), args.dump_ir, args.max_seq_len)
    if args.ir:
        print()
        print(passed or graph)
    if args.svg:
        from .ir.draw import to_svg, to_svg_side_by_side

        if passed is None:
            svg = to_svg(graph, layer=args.layer)
        else:
            svg = to_svg_side_by_side(graph, passed, layer=1 if args.layer is None else args.layer)
        Path(args.svg).write_text(svg)
        log.info("wrote %s", args.svg)
    return 0


def _inspect_file(path) -> None:
    """Inputs, outputs and ops of an ONNX file that does not convert, read from the file itself."""
    from .frontends.onnx.importer import describe_file

    try:
        info = describe_file(path)
    except LlmcError:
        return  # not even readable: the error says so
    width = max(len(name) for name, _ in info["inputs"] + info["outputs"])
    out = [f"model:    {path}", f"producer: {info['producer'] or '?'}, opset {info['opset']}", "inputs:"]
    out += [f"  {name:<{width}}  {desc}" for name, desc in info["inputs"]]
    out.append("outputs:")
    out += [f"  {name:<{width}}  {desc}" for name, desc in info["outputs"]]
    out.append(f"ops: {sum(info['ops'].values())} nodes")
    out += [f"  {op:<40} {count}" + ("" if op in info["supported"] else "  (unsupported)")
            for op, count in info["ops"].most_common()]
    print("\n".join(out))


def _inspect_artifact(path) -> int:
    """An artifact's target, model and plan, and the memory it needs to run (batch 1)."""
    from llmc.runtime import memory, safetensors
    from llmc.runtime.artifact import WEIGHTS, open_artifact

    art = open_artifact(path)
    m = art.manifest
    weights = safetensors.entries(safetensors.map_file(art.file(WEIGHTS)))
    mem = memory.footprint(m, weights, art.file(WEIGHTS).stat().st_size)
    model = m["model"]
    quant = model["quant"]
    pasts = {e["past"] for e in model["kv_cache"]["entries"]}
    values = m["plans"]["values"]
    precision = "f16" if any(values[w]["dtype"] == "float16" for w in m["plans"]["weights"]) else "f32"
    print("\n".join([
        f"artifact: {path} (format {m['format_version']}, llmc {m['llmc_version']})",
        f"target:   {m['target']['kind']} {m['target'].get('mtriple', '')}, CPU {m['cpu']['name']} "
        f"(needs {', '.join(m['cpu']['features']) or 'nothing beyond the architecture'})" if m["cpu"] else
        f"target:   cuda, cubins for {', '.join(m['kernels']['archs'])} (Triton {m['kernels']['triton_version']}), "
        f"--dtype {m['target']['dtype']}" if "archs" in m["kernels"] else
        f"target:   {m['target']['kind']}, {sum(len(g['kernels']) for g in m['kernels']['functions'].values())} GPU "
        f"kernels in {m['kernels']['source']}",
        f"model:    {model['name']}, context {model['max_seq_len']} tokens, KV cache {model['kv_cache']['dtype']} "
        f"{_layout_summary(model['kv_cache']['layout'])}, weights {_quant_summary(quant) if quant else precision}",
        f"inputs:   {', '.join(t['name'] for t in model['inputs'] if t['name'] not in pasts)}"
        + (f", and {len(pasts)} KV-cache inputs" if pasts else ""),
        f"plan:     {len(m['plans']['forward'])} kernel calls, {len(m['kernels']['functions'])} distinct kernels; "
        f"tuning: {_tuning_summary(m['kernels'].get('tuning', {}))}",
        "memory (batch 1, the whole context):",
        f"  weights      {_bytes(mem['weights'])} (mapped from the file, shared between processes)",
        f"  KV cache     {_bytes(mem['kv_cache'])}",
        f"  activations  {_bytes(mem['activations'])} (one arena, values planned by lifetime)",
        f"  total        {_bytes(mem['total'])}",
    ]))
    return 0


def _run_passes(graph, dump_ir, max_seq_len):
    from llmc.passes.manager import PassContext, run_passes
    from llmc.ir.kernels import kernels_per_layer
    from llmc.passes.pipeline import default_pipeline

    from .options import CompileOptions

    ctx = PassContext(debug=True, options=CompileOptions(max_seq_len=max_seq_len),
                      dump_dir=Path(dump_ir) if dump_ir else None)
    passed = run_passes(graph, default_pipeline(), ctx)
    print("\npasses:")
    for r in ctx.reports:
        print(f"  {r.summary()}")
        changed = {op: (r.ops_before[op], r.ops_after[op]) for op in set(r.ops_before) | set(r.ops_after)
                   if r.ops_before[op] != r.ops_after[op]}
        if changed:
            print("      ops: " + ", ".join(f"{op} {a}->{b}" for op, (a, b) in sorted(changed.items())))
        for miss in r.near_misses:
            print(f"      near miss: {miss}")
    kernels = kernels_per_layer(passed)
    if kernels:
        print(f"kernels per layer (layer 1): {len(kernels)}: " + ", ".join(n.op for n in kernels))
    return passed


def _layout_summary(layout: dict) -> str:
    if layout["page_tokens"]:
        return f"paged ({layout['page_tokens']} tokens a block, {layout['order']} blocks)"
    return layout["order"]


def _tuning_summary(tuning: dict) -> str:
    """"3 kernels with knobs: measured 2, default 1"."""
    sources = collections.Counter(t["source"] for t in tuning.values())
    return f"{len(tuning)} kernels with knobs: " + ", ".join(f"{k} {v}" for k, v in sorted(sources.items())) \
        if tuning else "no kernel has knobs"


def _quant_summary(quant: dict) -> str:
    """w4 g32 (LM head w8, embedding w8, int8 activations): how an artifact's weights are encoded."""
    scheme = quant["scheme"] + (f" g{quant['group_size']}" if quant.get("group_size") else "")
    parts = [f"LM head {quant['lm_head']}", f"embedding {quant['embedding']}"]
    if quant.get("activations"):
        parts.append(f"{quant['activations']} activations")
    return f"{scheme} ({', '.join(parts)})"


def _sampling_arguments(p) -> None:
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be at least 1")
    return value


def _serve(args) -> int:
    from .serve.server import Options, serve

    serve(Options(args.artifact, host=args.host, port=args.port, model_name=args.served_model_name,
                  max_batch=args.max_batch, max_queue=args.max_queue, prefill_chunk=args.prefill_chunk,
                  kv_blocks=args.kv_blocks, prefix_cache=args.prefix_cache, api_key=args.api_key or os.environ.get("LLMC_API_KEY"),
                  threads=args.threads, grace=args.grace))
    return 0


def _bench_serve(args) -> int:
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        raise LlmcError("llmc bench-serve needs aiohttp (pip install aiohttp)") from None
    from .tools import bench_serve

    rows = bench_serve.run(args.url, args.model, args.concurrency, args.rate, args.requests, args.input_len,
                           args.output_len, args.api_key)
    print(f"{args.url}: {args.requests} requests per level, prompts of {args.input_len} words, "
          f"{args.output_len} tokens out")
    print(bench_serve.table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    failed = sum(r["failed"] for r in rows)
    if failed:
        print(f"llmc: {failed} requests failed: {rows[0]['errors'] or [e for r in rows for e in r['errors']][:3]}",
              file=sys.stderr)
    return 1 if failed else 0


def _load_arguments(p) -> None:
    p.add_argument("--threads", type=int, help="kernel threads (default: every core, or $LLMC_NUM_THREADS)")
    p.add_argument("--interpret", action="store_true",
                   help="run a cuda artifact's Triton kernels under Triton's interpreter on the CPU (slow; needs "
                        "torch and triton)")
    p.add_argument("--device", type=int, metavar="N",
                   help="an opencl artifact: the OpenCL device to run on, by its index in `llmc devices` (default 0)")


def _load(args):
    from llmc import runtime

    return runtime.load(args.artifact, threads=args.threads, interpret=args.interpret, device=args.device)


def _sampling(args) -> dict:
    return {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed}


def _quant_arguments(p) -> None:
    p.add_argument("--quant", choices=("w8", "w4"),
                   help="weight-only quantization: w8 = int8 per output channel, w4 = 4-bit in groups")
    p.add_argument("--group-size", type=int, default=128, choices=(32, 64, 128),
                   help="with --quant w4: input features per scale (default 128)")
    p.add_argument("--zero-point", action="store_true", help="with --quant w4: asymmetric, a zero point per group")
    p.add_argument("--lm-head", choices=("f32", "w8", "w4"), help="with --quant: the LM head's encoding (default w8)")
    p.add_argument("--embedding", choices=("f32", "w8"),
                   help="with --quant: the token embedding's encoding (default w8: int8 rows, a quarter of the "
                        "bytes; f32)")
    p.add_argument("--awq", action="store_true", help="with --quant w4: activation-aware scaling (AWQ-style)")
    p.add_argument("--kv-cache", choices=("f32", "f16", "int8"),
                   help="the KV cache's encoding (default f16 on cuda with --dtype fp16, else f32): int8 keeps one scale "
                        "per head and token; f16 is for cuda")
    p.add_argument("--kv-layout", default="auto", metavar="{auto,bhsd,bshd,paged:N}",
                   help="the KV cache's layout: [batch, kv_heads, seq, head_dim] (bhsd), [batch, seq, kv_heads, "
                        "head_dim] (bshd), blocks of N tokens shared by the sequences of a batch as they grow "
                        "(paged:N), or auto (the target's choice: bhsd)")
    p.add_argument("--activations", choices=("int8", "f32"),
                   help="what the quantized GEMMs multiply: int8 activations (blocks of 32, integer dot products; "
                        "the cpu default) or f32 (weights dequantized; the cuda target's only choice)")
    p.add_argument("--calibration-text", metavar="FILE",
                   help="with --awq: a UTF-8 text to calibrate on, its first 512 tokens (default: an English "
                        "sample llmc ships; a model without a tokenizer: ids drawn from the vocabulary)")
    p.add_argument("--calibration-ids", help="with --awq: comma-separated token ids to calibrate on instead")


def _tuning_arguments(p) -> None:
    p.add_argument("--tune", action="store_true",
                   help="measure each kernel's knobs on this machine (results are cached: a second compile "
                        "measures nothing)")
    p.add_argument("--tune-budget", type=float, metavar="SECONDS",
                   help="with --tune: stop measuring after this long; unmeasured kernels keep their defaults")
    p.add_argument("--tuning", action="append", default=[], metavar="FILE",
                   help="a tuning table from `llmc tune --export` (entries for other machines are not used)")


# the flags of compile, tune and package that are `CompileOptions.of` keywords of the same name
OPTION_FLAGS = ("target", "max_seq_len", "eos_token_id", "tokenizer", "dtype", "activations", "kv_cache", "kv_layout",
                "cpu", "arch", "tune", "tune_budget", "tuning", "quant", "group_size", "zero_point", "lm_head",
                "embedding", "awq", "calibration_text")


def _compile_options(args, **changes):
    from .options import CompileOptions

    keywords = {k: getattr(args, k) for k in OPTION_FLAGS if getattr(args, k, None) is not None}
    if args.calibration_ids:
        keywords["calibration"] = _token_ids(args.calibration_ids, "--calibration-ids")
    return CompileOptions.of(**{**keywords, **changes})


def _compile(args) -> int:
    from .driver import compile as compile_model

    print(compile_model(args.model, _compile_options(args), args.output))
    return 0


def _tune(args) -> int:
    """Tune MODEL's kernels into the cache (its artifact is not kept); export this machine's entries."""
    import tempfile

    from . import tuning
    from .driver import compile as compile_model

    if not args.model and not args.export:
        raise LlmcError("llmc tune: give a model to tune, --export FILE, or both")
    options = _compile_options(args, tune=True)
    if args.model:
        scratch = Path(tempfile.mkdtemp(prefix="llmc-tune-"))
        try:
            compile_model(args.model, options, scratch / "model.llmc")
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    if args.export:
        machine = options.backend().machine(options.resolved())
        path = tuning.cache_file()
        table = tuning.Table.load(path) if path.exists() else tuning.Table()
        entries = table.for_machine(machine)
        table.save(Path(args.export), entries)
        print(f"{args.export}: {len(entries)} entries for this machine")
    return 0

def _devices(args) -> int:
    from llmc.runtime import opencl

    for i, d in enumerate(opencl.devices()):
        print(f"{i}: {d.name.strip()} ({d.platform.name.strip()}, {d.global_mem_size >> 20} MiB, "
              f"{d.max_compute_units} compute units)")
    return 0


def _run(args) -> int:
    import json
    import time

    if args.system is not None and args.chat is None:
        raise LlmcError("--system applies with --chat")
    model = _load(args)
    sampling = _sampling(args)
    if args.chat is not None:
        start = time.perf_counter()
        show = None if args.json else (lambda chunk: print(chunk, end="", flush=True))
        reply = model.chat(_messages(args.system, []) + [{"role": "user", "content": args.chat}], args.max_new_tokens,
                           **sampling, on_text=show)
        print(json.dumps({"reply": reply, "seconds": round(time.perf_counter() - start, 4)}) if args.json else "")
        return 0
    text = args.prompt is not None
    prompts = [model.text.encode(p) for p in args.prompt] if text else \
        [_token_ids(p, "--prompt-ids") for p in args.prompt_ids]
    start = time.perf_counter()
    if len(prompts) > 1:  # a batch: each output when all are done
        outputs = model.generate(prompts, args.max_new_tokens, **sampling)
    else:
        if args.json:
            show = None
        elif text:
            show = model.text.stream(lambda chunk: print(chunk, end="", flush=True))
        else:
            show = lambda t: print(t, end=" ", flush=True)  # noqa: E731
        outputs = [model.generate(prompts[0], args.max_new_tokens, **sampling, on_token=show)]
    seconds = time.perf_counter() - start
    results = [{"prompt_ids": prompt, "new_token_ids": tokens, **({"text": model.text.decode(tokens)} if text else {})}
               for prompt, tokens in zip(prompts, outputs)]
    if args.json:
        print(json.dumps({**results[0], "seconds": round(seconds, 4)} if len(results) == 1 else
                         {"outputs": results, "seconds": round(seconds, 4)}))
    elif len(prompts) > 1:
        for r in results:
            print(r["text"] if text else " ".join(map(str, r["new_token_ids"])))
    else:
        print()
    log.info("%d tokens in %.3f s", sum(map(len, outputs)), seconds)
    return 0


def _messages(system: str | None, turns: list[dict]) -> list[dict]:
    return ([{"role": "system", "content": system}] if system is not None else []) + turns


def _chat(args) -> int:
    """Read a user turn a line, stream the reply. Ctrl-C stops a reply (what came is kept, and the
    conversation goes on); Ctrl-C or Ctrl-D at the prompt ends the session; /reset starts anew."""
    model = _load(args)
    model.chat_template()  # no template: refused before the first prompt, not after it
    sampling, turns = _sampling(args), []
    interactive = sys.stdin.isatty()
    if interactive:
        print("llmc chat: Ctrl-C stops a reply, /reset starts a new conversation, Ctrl-D ends.", file=sys.stderr)
    while True:
        try:
            if interactive:
                print("> ", end="", file=sys.stderr, flush=True)
            line = sys.stdin.readline()
        except KeyboardInterrupt:
            line = ""
        if not line:
            if interactive:
                print(file=sys.stderr)
            return 0
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.strip() == "/reset":
            turns = []
            continue
        turns.append({"role": "user", "content": line})
        chunks: list[str] = []

        def show(chunk: str) -> None:
            chunks.append(chunk)
            print(chunk, end="", flush=True)
        try:
            model.chat(_messages(args.system, turns), args.max_new_tokens, **sampling, on_text=show)
        except KeyboardInterrupt:
            pass
        except LlmcError as e:  # the conversation outgrew the context, say: this turn is dropped
            print(f"llmc: {e}", file=sys.stderr)
            turns.pop()
            continue
        print()
        turns.append({"role": "assistant", "content": "".join(chunks)})


def _perplexity(args) -> int:
    import json

    from llmc.runtime.perplexity import of_model

    text = model_files.read_text(args.text, "--text")
    model = _load(args)
    ids = model.text.encode(text)
    result = of_model(model, ids, args.ctx, args.chunks,
                      on_chunk=lambda i, ppl: log.info("chunk %d: running ppl %.4f", i + 1, ppl))
    if args.json:
        print(json.dumps({"ppl": result.ppl, "stderr": result.stderr, "tokens": result.tokens,
                          "chunks": result.chunks, "ctx": result.ctx}))
    else:
        print(result)
    return 0


def _bench(args) -> int:
    if args.target == "cuda":
        from .tools.cuda_bench import bench_cuda, format_table

        return _print_result(bench_cuda(args.model, prompt_len=args.prompt_len, steps=args.new_tokens,
                                        rounds=args.repeats, output=args.json), format_table, args.json)
    from .tools.bench import bench, format_table

    return _print_result(bench(args.model, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                               repeats=args.repeats, quant=tuple(args.quant), tuned=args.tuned), format_table,
                         args.json)


def _bench_torch(args) -> int:
    from .tools.torch_bench import bench_torch, format_table

    return _print_result(bench_torch(args.model, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                                     repeats=args.repeats, systems=tuple(args.systems), cache=args.cache,
                                     loop=args.loop),
                         format_table, args.json)


def _print_result(result: dict, format_table, json_path) -> int:
    """A benchmark's table on stdout, and all its figures as JSON in `json_path` when given."""
    import json

    print(format_table(result))
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=1) + "\n")
    return 0


def _quant_report(args) -> int:
    import json

    from .tools.quant_report import format_table, report

    schemes = []
    for quant in args.quant:
        if quant == "w8":
            schemes.append({"quant": "w8"})
            continue
        for g in args.group_size:
            for zp in (False, True)[:1 + args.zero_point]:
                schemes += [{"quant": "w4", "group_size": g, "zero_point": zp, "awq": awq}
                            for awq in (False, True)[:1 + args.awq]]
    if args.lm_head:
        schemes = [dict(s, lm_head=args.lm_head) for s in schemes]
    if args.embedding:
        schemes = [dict(s, embedding=args.embedding) for s in schemes]
    if args.kv_int8:
        schemes += [dict(s, kv_cache="int8") for s in schemes]
    schemes = [dict(s, activations=a) for a in args.activations for s in schemes]
    ids = _token_ids(args.token_ids, "--token-ids") if args.token_ids else None
    text = model_files.read_text(args.text, "--text") if args.text else None
    result = report(args.model, schemes, tokens=args.tokens, token_ids=ids, seed=args.seed,
                    onnxruntime=args.onnxruntime, text=text)
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


def _token_ids(text: str, flag: str) -> list[int]:
    try:
        ids = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise LlmcError(f"{flag} must be comma-separated integers, not {text!r}") from None
    if not ids:
        raise LlmcError(f"{flag} is empty")
    return ids


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024


def _ops(args) -> int:
    from .frontends.onnx.converters import CONVERTERS

    if args.aten:
        from .frontends.fx import supported_ops

        print("\n".join(supported_ops()))
        return 0
    if not args.markdown:
        print("\n".join(sorted(CONVERTERS)))
        return 0
    sys.stdout.write(onnx_ops_markdown())
    return 0


def onnx_ops_markdown() -> str:
    """docs/onnx-ops.md, generated from the converter table (a test keeps the file current)."""
    from .frontends.onnx.converters import CONVERTERS

    lines = ["# ONNX ops supported by the frontend", "",
             "Generated by `llmc ops --markdown` from the converter table "
             "(`compiler/frontends/onnx/converters.py`); one converter function per op.", "",
             "| ONNX op | becomes |", "| --- | --- |"]
    for op in sorted(CONVERTERS):
        doc = " ".join((CONVERTERS[op].__doc__ or "").split("\n\n")[0].split())
        lines.append(f"| {op} | {doc} |")
    return "\n".join(lines) + "\n"


def _runtime_build(args) -> int:
    from . import toolchain

    print(toolchain.build_runtime(toolchain.arch_of(args.target), args.output, shared=args.shared))
    return 0


def _package(args) -> int:
    """Compile for the target, build llmc-run for it, and say in a README how to run them."""
    from .driver import compile as compile_model
    from . import toolchain

    from llmc.runtime.cpu import arch as host_arch

    out = Path(args.output)
    if not out.parent.is_dir():
        raise LlmcError(f"{out}: the folder {out.parent} does not exist")
    if out.exists() and any(out.iterdir()):
        if not (out / "README.txt").is_file() or not (out / "llmc-run").is_file():
            raise LlmcError(f"{out}: exists and is not a package llmc wrote; give a new folder")
        shutil.rmtree(out)
    out.mkdir(exist_ok=True)
    options = _compile_options(args, **({"quant": None, "group_size": 128} if args.fp32 else {}))
    program = toolchain.build_runtime("aarch64" if args.target == "arm64" else host_arch(), out / "llmc-run")
    artifact = compile_model(args.model, options, out / "model.llmc")
    (out / "README.txt").write_text(
        "Run on the device (token ids in, new token ids out): ./llmc-run model.llmc --prompt-ids 1,2,3 "
        "--max-new-tokens 32   (./llmc-run --help for sampling and threads)\n")
    size = sum(p.stat().st_size for p in artifact.rglob("*") if p.is_file())
    log.info("artifact %.1f MB, llmc-run %.0f KB", size / 1e6, program.stat().st_size / 1e3)
    print(out)
    return 0


def _zoo_list(args) -> int:
    from .zoo import ZOO

    for m in ZOO.values():
        print(f"{m.name:<12} {m.family:<9} {'decoder' if m.is_decoder else 'encoder'}  "
              + ", ".join(f"{k}={v}" for k, v in m.sizes.items()))
    return 0


def _zoo_export(args) -> int:
    from . import zoo

    try:
        model = zoo.get(args.name)
    except KeyError as e:
        raise LlmcError(str(e.args[0])) from None
    path = model.export(kv_cache=not args.no_kv_cache, exporter=args.exporter, dtype=args.dtype,
                        opset=args.opset, external_data=args.external_data)
    if args.output:
        dest = Path(args.output)
        shutil.copyfile(path, dest)
        data = path.with_name("model.onnx.data")
        if data.exists():
            # External data is referenced by file name; keep that name next to the copy.
            shutil.copyfile(data, dest.with_name("model.onnx.data"))
        for name, file in model_files.find(path.parent).items():  # a real model's tokenizer and configs
            shutil.copyfile(file, dest.with_name(name))
        path = dest
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
