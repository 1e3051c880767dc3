"""Lean models of real backbones exported to ONNX: parity in ONNX Runtime, dynamic batch, no gate
logic in the graph, FLOPs that shrink as gates close, and the folded-slot shortcuts of prune."""

from __future__ import annotations

import collections

import numpy as np
import pytest
from safetensors.torch import load_file, save_file
import timm
import torch
from torch import nn

import gatedmtl
from gatedmtl.export import export_onnx, relative_error
from gatedmtl.prune import computed_slots
from gatedmtl.verify import perturb_slots, set_gates

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

T = ("seg", "depth", "normals")
SIZE = (3, 64, 64)
# ops through which gates would show up in a graph: STE sigmoid, alpha > 0, softmax of beta
GATE_OPS = {"Sigmoid", "Greater", "Softmax", "Exp", "Less", "Where", "Cast"}
# what the lean layers add to a backbone's graph: slot split, branch restore, shared mix, slot concat
# (ReduceSum of an empty Slice: a slot that skips a layer keeps its input stream alive)
LEAN_OPS = {"Reshape", "Gather", "Split", "Squeeze", "Unsqueeze", "Slice", "Concat", "Mul", "Add", "Identity",
            "Constant", "Shape", "ReduceSum"}

MODELS = [
    pytest.param("resnet18", lambda: timm.create_model("resnet18", pretrained=False), id="resnet18"),
    pytest.param("vit", lambda: timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=2), id="vit"),
    pytest.param("hrnet", lambda: timm.create_model("hrnet_w18_small_v2", pretrained=False, features_only=True),
                 id="hrnet_w18_small_v2", marks=pytest.mark.slow),
    pytest.param("efficientnet", lambda: timm.create_model("efficientnet_b0", pretrained=False),
                 id="efficientnet_b0", marks=pytest.mark.slow),
]


class _Plain(nn.Module):
    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x):
        return {"out": self.backbone(x)}


def _ops(path) -> collections.Counter:
    return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def _session(path):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _ort_tasks(runner, session, x: np.ndarray, tasks) -> dict[str, list[np.ndarray]]:
    """Each task's outputs as the edge runner groups them (through the file's task table: an output
    that tasks share is stored once)."""
    names = [o.name for o in session.get_outputs()]
    grouped = runner.group_outputs(dict(zip(names, session.run(names, {"image": x}))), runner.read_structure(session))
    assert list(grouped) == list(tasks)
    return {t: v if isinstance(v, list) else [v] for t, v in grouped.items()}


def _torch_tasks(model, x: np.ndarray) -> dict[str, list[torch.Tensor]]:
    with torch.no_grad():
        out = model(torch.from_numpy(x))
    return {t: [v] if isinstance(v, torch.Tensor) else list(v) for t, v in out.items()}


def _worst(onnx_out, torch_out) -> float:
    return max(relative_error(a, b.numpy()) for t in torch_out for a, b in zip(onnx_out[t], torch_out[t]))


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


@pytest.mark.parametrize("name,build", MODELS)
def test_lean_onnx_parity_dynamic_batch_no_gates(name, build, gen, tmp_path, edge_runner):
    backbone = build().eval()
    model = gatedmtl.convert(backbone, T, input_size=SIZE).eval()
    perturb_slots(model, generator=gen)
    set_gates(model, 0.5, gen)
    lean = gatedmtl.prune(model).eval()
    assert lean.slots == (0, 1, 2, 3)

    path = export_onnx(lean, tmp_path / "lean.onnx", (1, *SIZE), check=False).path
    session = _session(path)
    rng = np.random.default_rng(1)
    for batch in (1, 4):  # one file, two batch sizes
        x = rng.standard_normal((batch, *SIZE)).astype(np.float32)
        got = _ort_tasks(edge_runner, session, x, T)
        assert all(o.shape[0] == batch for outs in got.values() for o in outs)
        assert _worst(got, _torch_tasks(lean, x)) <= 1e-4, f"ORT vs lean torch, batch {batch}"
        assert _worst(got, _torch_tasks(model, x)) <= 1e-4, f"ORT vs gated torch, batch {batch}"

    plain = export_onnx(_Plain(backbone), tmp_path / "plain.onnx", (1, *SIZE), check=False)
    lean_ops, plain_ops = _ops(path), _ops(plain.path)
    # per-slot streams: no slot split / concat of the folded batch anywhere in the graph
    assert lean.streams and lean.folded_reason is None
    for op in ("Split", "Squeeze"):  # only the backbone's own, once per computed slot
        assert lean_ops[op] == len(lean.slots) * plain_ops[op], op
    assert set(lean_ops) <= set(plain_ops) | LEAN_OPS, set(lean_ops) - set(plain_ops)
    graph = onnx.load(str(path)).graph
    assert not any("alpha" in i.name or "beta" in i.name for i in graph.initializer)
    # gate logic reads only gate logits: any Sigmoid/Greater/Softmax/... in the lean graph must
    # compute on image data (an activation of the backbone), never on constants alone
    live = {i.name for i in graph.input}
    for node in graph.node:
        if any(i in live for i in node.input):
            live.update(node.output)
        elif node.op_type in GATE_OPS:
            raise AssertionError(f"{node.op_type} node {node.name} computes on constants only: gate logic?")


def test_flops_shrink_as_gates_close(gen):
    model = gatedmtl.convert(timm.create_model("resnet18", pretrained=False), T, input_size=SIZE).eval()
    flops = []
    for density in (1.0, 0.6, 0.3, 0.0):
        set_gates(model, density, torch.Generator().manual_seed(3))
        lean = gatedmtl.prune(model)
        flops.append(gatedmtl.count_flops(lean, (1, *SIZE)))
        assert abs(flops[-1] - gatedmtl.predict_flops(model, (1, *SIZE))) <= 0.005 * flops[-1]
    assert flops == sorted(flops, reverse=True) and len(set(flops)) == len(flops), flops
    backbone = gatedmtl.count_flops(timm.create_model("resnet18", pretrained=False), (1, *SIZE))
    assert flops[-1] == backbone  # all closed: the plain backbone
    assert abs(flops[0] - len(T) * backbone) <= 1e-4 * flops[0]  # all open: T task branches


def test_folded_slot_shortcuts_export_exactly(gen, tmp_path, edge_runner):
    """All gates closed: the lean graph is the plain backbone; all open: no shared slot."""
    backbone = timm.create_model("resnet18", pretrained=False).eval()
    convs = sum(isinstance(m, nn.Conv2d) for m in backbone.modules())
    model = gatedmtl.convert(backbone, T, input_size=SIZE).eval()
    perturb_slots(model, generator=gen)
    x = np.random.default_rng(2).standard_normal((3, *SIZE)).astype(np.float32)
    for pattern, slots in (("closed", (0,)), ("open", (1, 2, 3))):
        set_gates(model, pattern, gen)
        lean = gatedmtl.prune(model).eval()
        assert lean.slots == slots == computed_slots(model)
        path = export_onnx(lean, tmp_path / f"{pattern}.onnx", (1, *SIZE), check=False).path
        got = _ort_tasks(edge_runner, _session(path), x, T)
        assert _worst(got, _torch_tasks(model, x)) <= 1e-4, pattern
        ops = _ops(path)
        assert ops["Conv"] == len(slots) * convs, pattern
        if pattern == "closed":  # every task reads the shared branch's output: one ONNX output, no copies
            assert ops["Concat"] == ops["Gather"] == ops["Mul"] == ops["Identity"] == 0
            assert [o.name for o in _session(path).get_outputs()] == [T[0]]
        # lean checkpoints are safetensors state dicts: no shared tensors, and a fresh prune loads them
        save_file(lean.state_dict(), str(tmp_path / f"{pattern}.safetensors"))
        again = gatedmtl.prune(model).eval()
        with torch.no_grad():
            for p in again.parameters():
                p.add_(1.0)
        again.load_state_dict(load_file(str(tmp_path / f"{pattern}.safetensors")), strict=True)
        assert _worst(_ort_tasks(edge_runner, _session(path), x, T), _torch_tasks(again, x)) <= 1e-4, pattern
