"""Two ONNX-level rewrites of the exported lean graph, measured against the graph as exported.

The lean graph of a backbone whose widths are not multiples of 16 (hrnet: 18/36/72, mobilenetv3:
24/40/72/120) builds each task's input from gate-group pieces with a ragged last group, and ONNX
Runtime's CPU blocked layout (NCHWc) keeps a Concat in layout only when every input is a multiple
of 16 channels. This script measures the two rewrites that would remove that obstacle:

* ``pad``: every ragged channel width is padded to a multiple of 16 (zero filters at the end of a
  conv's output, zero input columns in the convs that read it, per-channel constants padded),
  tracking per tensor where its channels sit, so every conv and concat is in the blocked layout;
  outputs are sliced back. ORT then computes the padding.
* ``split``: a convolution of a concatenation becomes the sum of one convolution per concat input
  (its bias on the first): no concat in front of a conv.

Both are exact up to float rounding; each rewritten file is run against the exported one in ORT
and profiled (1 thread, per-node minimum kernel time, rounds interleaved). Writes
``layout_rewrites.md/.csv`` under ``--out``. Usage::

    python benchmarks/layout_rewrites.py [--models hrnet_w18_small_v2,mobilenetv3_large_100]
        [--densities 0.5] [--rounds 3] [--runs 12]
"""

from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch
from onnx import helper, numpy_helper, shape_inference

import gatedmtl
from _report import write_table
from gatedmtl.export import export_onnx, relative_error
from gatedmtl.network import build_backbone
from gatedmtl.profile import onnx_kernel_time, ort_session
from gatedmtl.verify import perturb_slots, set_gates

BLOCK = 16  # ORT's NCHWc block on AVX-512 (8 on AVX2)
CHANNELWISE = {"Relu", "Clip", "HardSwish", "HardSigmoid", "Sigmoid", "Identity", "LeakyRelu", "Tanh", "Resize",
               "Upsample", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool"}
ELEMENTWISE = {"Add", "Mul", "Sub", "Div", "Max", "Min"}


class _Graph:
    """Shapes, constants and new nodes/initializers of one ONNX graph being rewritten."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = shape_inference.infer_shapes(model)
        g = self.model.graph
        self.dims = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
                     for v in [*g.value_info, *g.output, *g.input]}
        self.init = {i.name: i for i in g.initializer}
        self.const = {n.output[0]: n.attribute[0].t for n in g.node if n.op_type == "Constant"}
        self.nodes: list[onnx.NodeProto] = []
        self.new_inits: list[onnx.TensorProto] = []
        self._count = 0

    def fresh(self, base: str) -> str:
        self._count += 1
        return f"{base}__rw{self._count}"

    def array(self, name: str) -> np.ndarray | None:
        if name in self.init:
            return numpy_helper.to_array(self.init[name])
        if name in self.const:
            return numpy_helper.to_array(self.const[name])
        return None

    def constant(self, value: np.ndarray, base: str) -> str:
        name = self.fresh(base)
        self.new_inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def channels(self, name: str) -> int | None:
        d = self.dims.get(name)
        return d[1] if d and len(d) == 4 and d[1] > 0 else None

    def finish(self) -> onnx.ModelProto:
        """Install the new node list, drop dead nodes and unused initializers."""
        g = self.model.graph
        outputs = {o.name for o in g.output}
        nodes = self.nodes
        while True:
            used = {i for n in nodes for i in n.input} | outputs
            alive = [n for n in nodes if any(o in used for o in n.output)]
            if len(alive) == len(nodes):
                break
            nodes = alive
        used = {i for n in nodes for i in n.input}
        inits = [i for i in [*g.initializer, *self.new_inits] if i.name in used]
        g.ClearField("node")
        g.node.extend(nodes)
        g.ClearField("initializer")
        g.initializer.extend(inits)
        g.ClearField("value_info")
        onnx.checker.check_model(self.model)
        return self.model


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _set_inputs(node: onnx.NodeProto, inputs: list[str]) -> onnx.NodeProto:
    node.ClearField("input")
    node.input.extend(inputs)
    return node


def _round(c: int) -> int:
    return -(-c // BLOCK) * BLOCK


def pad_channels(model: onnx.ModelProto) -> onnx.ModelProto:
    """Pad every ragged channel width to a multiple of :data:`BLOCK`; outputs keep their shapes.

    A padded tensor has a layout ``(width, positions)``: its ``C`` channels sit at ``positions`` of
    ``width`` (the rest hold finite values that nothing reads). Convs read it through zero input
    columns; channel-wise ops keep it; a concat of padded inputs concatenates the layouts; an op
    that mixes channels otherwise gets the natural tensor back (one Gather).
    """
    gr = _Graph(model)
    layout: dict[str, tuple[int, np.ndarray]] = {}

    def natural(name: str) -> str:
        if name not in layout:
            return name
        out = gr.fresh(name + "_natural")
        gr.nodes.append(helper.make_node("Gather", [name, gr.constant(layout[name][1].astype(np.int64), "index")],
                                         [out], axis=1))
        return out

    def layout_of(name: str) -> tuple[int, np.ndarray] | None:
        c = gr.channels(name)
        return layout.get(name) or ((c, np.arange(c)) if c else None)

    for node in gr.model.graph.node:
        op, attrs, ins = node.op_type, _attrs(node), list(node.input)
        if op == "Conv" and ins[1] in gr.init and layout_of(ins[0]) is not None:
            w = gr.array(ins[1])
            bias = gr.array(ins[2]) if len(ins) > 2 else None
            width_in, pos_in = layout_of(ins[0])
            out_ch, group = w.shape[0], attrs.get("group", 1)
            if group == 1:
                wide = np.zeros((out_ch, width_in, *w.shape[2:]), w.dtype)
                wide[:, pos_in] = w
                width_out = _round(out_ch) if out_ch % BLOCK and out_ch > 1 else out_ch
                wide = np.concatenate([wide, np.zeros((width_out - out_ch, *wide.shape[1:]), w.dtype)])
                pos_out = np.arange(out_ch)
            elif group == out_ch == len(pos_in) and w.shape[1] == 1:  # depthwise: the input's layout
                wide = np.zeros((width_in, 1, *w.shape[2:]), w.dtype)
                wide[pos_in] = w
                width_out, pos_out = width_in, pos_in
                for a in node.attribute:
                    if a.name == "group":
                        a.i = width_in
            else:
                gr.nodes.append(_set_inputs(node, [natural(ins[0]), *ins[1:]]))
                continue
            new_in = [ins[0], gr.constant(wide, ins[1])]
            if bias is not None:
                b = np.zeros(width_out, bias.dtype)
                b[pos_out] = bias
                new_in.append(gr.constant(b, ins[2]))
            gr.nodes.append(_set_inputs(node, new_in))
            if width_out != out_ch or not np.array_equal(pos_out, np.arange(out_ch)):
                layout[node.output[0]] = (width_out, pos_out)
            continue
        if op in CHANNELWISE:
            if ins[0] in layout:
                layout[node.output[0]] = layout[ins[0]]
            gr.nodes.append(node)
            continue
        if op in ELEMENTWISE and any(i in layout for i in ins):
            ref = next(layout[i] for i in ins if i in layout)
            new_in, ok = [], True
            for i in ins:
                a = gr.array(i)
                if i in layout:
                    ok &= layout[i][0] == ref[0] and np.array_equal(layout[i][1], ref[1])
                    new_in.append(i)
                elif a is not None and a.ndim == 4 and a.shape[1] == len(ref[1]) > 1:  # per-channel constant
                    wide = np.zeros((a.shape[0], ref[0], *a.shape[2:]), a.dtype)
                    wide[:, ref[1]] = a
                    new_in.append(gr.constant(wide, i))
                elif (a is not None and a.size == 1) or gr.channels(i) == 1:  # broadcast over channels
                    new_in.append(i)
                else:
                    ok = False
                    new_in.append(i)
            if ok:
                layout[node.output[0]] = ref
                gr.nodes.append(_set_inputs(node, new_in))
            else:
                gr.nodes.append(_set_inputs(node, [natural(i) for i in ins]))
            continue
        if op == "Concat" and attrs.get("axis") == 1 and any(i in layout for i in ins):
            parts = [layout_of(i) for i in ins]
            if all(p is not None and p[0] % BLOCK == 0 for p in parts):
                offsets = np.cumsum([0] + [p[0] for p in parts])
                layout[node.output[0]] = (int(offsets[-1]), np.concatenate([p[1] + o for p, o in zip(parts, offsets)]))
                gr.nodes.append(node)
            else:
                gr.nodes.append(_set_inputs(node, [natural(i) for i in ins]))
            continue
        index = gr.array(ins[1]) if op == "Gather" and len(ins) > 1 else None
        if (op == "Gather" and attrs.get("axis") == 1 and index is not None and index.ndim == 1 and index.size
                and layout_of(ins[0]) is not None):
            src = layout_of(ins[0])[1][index]
            width = _round(src.size) if src.size % BLOCK and src.size > 1 else src.size
            picks = np.concatenate([src, np.full(width - src.size, src[0])])  # any channel fills the padding
            gr.nodes.append(helper.make_node("Gather", [ins[0], gr.constant(picks.astype(np.int64), ins[1])],
                                             list(node.output), name=node.name, axis=1))
            if width != src.size:
                layout[node.output[0]] = (width, np.arange(src.size))
            continue
        gr.nodes.append(_set_inputs(node, [natural(i) if i else i for i in ins]))

    for out in gr.model.graph.output:  # outputs keep their names and shapes
        if out.name in layout:
            inner = gr.fresh(out.name + "_padded")
            for n in gr.nodes:
                n.output[:] = [inner if o == out.name else o for o in n.output]
                n.input[:] = [inner if i == out.name else i for i in n.input]
            layout[inner] = layout.pop(out.name)
            gr.nodes.append(helper.make_node("Gather", [inner, gr.constant(layout[inner][1].astype(np.int64),
                                                                           "index")], [out.name], axis=1))
    return gr.finish()


def split_conv_over_concat(model: onnx.ModelProto) -> onnx.ModelProto:
    """Replace ``Conv(Concat(a, b, ...))`` (group 1) by ``Conv(a) + Conv(b) + ...``; the bias goes to the first."""
    gr = _Graph(model)
    producer = {o: n for n in gr.model.graph.node for o in n.output}
    for node in gr.model.graph.node:
        attrs, ins = _attrs(node), list(node.input)
        src = producer.get(ins[0]) if ins else None
        if not (node.op_type == "Conv" and attrs.get("group", 1) == 1 and ins[1] in gr.init and src is not None
                and src.op_type == "Concat" and _attrs(src).get("axis") == 1
                and all(gr.channels(i) for i in src.input)):
            gr.nodes.append(node)
            continue
        w, bias = gr.array(ins[1]), (gr.array(ins[2]) if len(ins) > 2 else None)
        offset, terms = 0, []
        for k, piece in enumerate(src.input):
            c = gr.channels(piece)
            piece_in = [piece, gr.constant(w[:, offset:offset + c], ins[1])]
            if k == 0 and bias is not None:
                piece_in.append(gr.constant(bias, ins[2]))
            offset += c
            terms.append(gr.fresh(node.output[0] + "_piece"))
            gr.nodes.append(helper.make_node("Conv", piece_in, [terms[-1]], **attrs))
        total = terms[0]
        for k, term in enumerate(terms[1:], start=2):
            out = node.output[0] if k == len(terms) else gr.fresh(node.output[0] + "_sum")
            gr.nodes.append(helper.make_node("Add", [total, term], [out]))
            total = out
    return gr.finish()


REWRITES = {"pad": pad_channels, "split": split_conv_over_concat}


def lean_onnx(name: str, density: float, shape: tuple[int, ...], path: Path, seed: int) -> tuple[Path, float]:
    """The lean model of the latency benchmark's prefix + residual-tying rows at ``density``, exported
    (``--tie depthwise,skip-mix,residual --gate-structure prefix``; the depthwise options act only
    where a backbone has depthwise convs)."""
    backbone = build_backbone(name).eval()
    gated = gatedmtl.convert(backbone, ["task0", "task1", "task2"], input_size=shape[1:], mix="hard",
                             gate_structure="prefix", tie_depthwise=True, skip_depthwise_mix=True,
                             tie_residual=True).eval()
    perturb_slots(gated, generator=torch.Generator().manual_seed(seed))
    set_gates(gated, density, torch.Generator().manual_seed(seed + 1))
    lean = gatedmtl.prune(gated).eval()
    export_onnx(lean, path, shape)
    return path, gatedmtl.count_flops(lean, shape) / gatedmtl.count_flops(backbone, shape)


def max_difference(a: Path, b: Path, shape: tuple[int, ...], seed: int) -> float:
    """Largest :func:`~gatedmtl.export.relative_error` of ``b``'s outputs against ``a``'s on one random image."""
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    ra, rb = (ort_session(p, 1).run(None, {"image": x}) for p in (a, b))
    return max(relative_error(v, u) for u, v in zip(ra, rb))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="hrnet_w18_small_v2,mobilenetv3_large_100")
    p.add_argument("--densities", default="0.5")
    p.add_argument("--size", default="224x224")
    p.add_argument("--runs", type=int, default=12, help="profiled runs per file and round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; per file the fastest round counts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    shape = (1, 3, *map(int, a.size.split("x")))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.models.split(","):
            for density in a.densities.split(","):
                base, flops = lean_onnx(name, float(density), shape, Path(tmp) / f"{name}-{density}.onnx", a.seed)
                exported = onnx.load(base)  # each rewrite works on its own shape-inferred copy
                files, nodes = {"as exported": base}, {"as exported": len(exported.graph.node)}
                for rw, fn in REWRITES.items():
                    rewritten = fn(exported)
                    files[rw], nodes[rw] = base.with_name(f"{base.stem}-{rw}.onnx"), len(rewritten.graph.node)
                    onnx.save(rewritten, files[rw])
                best: dict[str, float] = {}
                order, rng = list(files), random.Random(a.seed)
                for _ in range(a.rounds):
                    rng.shuffle(order)
                    for k in order:
                        kt = onnx_kernel_time(files[k], shape, threads=1, runs=a.runs)
                        best[k] = min(best.get(k, float("inf")), kt.total_ms)
                        print(f"{name} {density} {k}: {kt.total_ms:.2f} ms", flush=True)
                for k, f in files.items():
                    difference = max_difference(base, f, shape, a.seed)
                    if difference > 1e-4:
                        raise RuntimeError(f"{name} {density}: the {k} rewrite changed the outputs by {difference:.1e}")
                    rows.append({"model": name, "density": density, "FLOPs / backbone": f"{flops:.2f}",
                                 "graph": k, "nodes": nodes[k],
                                 "kernel ms": f"{best[k]:.2f}",
                                 "vs as exported": f"{best[k] / best['as exported']:.3f}",
                                 "max rel. difference": f"{difference:.1e}"})
    notes = (f"Lean models of the latency benchmark's prefix + residual-tying configuration (random gates, hard "
             f"mix), {a.size}, T = 3, ONNX Runtime {onnxruntime.__version__}, 1 thread, all graph "
             f"optimisations; kernel ms: sum of per-node minimum kernel times, the fastest of {a.rounds} "
             f"interleaved rounds of {a.runs} runs. `pad`: ragged widths padded to multiples of {BLOCK}; `split`: "
             f"conv of a concat as a sum of convs. Command: python benchmarks/layout_rewrites.py --models "
             f"{a.models} --densities {a.densities} --rounds {a.rounds} --runs {a.runs}")
    print(write_table("layout_rewrites", "Layout rewrites of the exported lean graph", notes, rows, out=a.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
