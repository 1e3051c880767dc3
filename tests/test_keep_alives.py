"""Keep-alives of skipped slots: kept where a slot's input stream would otherwise be dead (so that the
lean graph computes what the FLOP prediction counts), left out where the outputs read it anyway."""

from __future__ import annotations

import collections

import pytest
import timm
import torch
from torch import nn

import gatedmtl
from gatedmtl.export import relative_error
from gatedmtl.verify import perturb_slots, set_gates

SHAPE = (1, 3, 64, 64)


def _absent(lean) -> dict:
    return {m: frozenset(s for s in m.slots if not m.present[s]) for _, m in lean.lean_layers()}


class _Chain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.c3(torch.relu(self.c2(torch.relu(self.c1(x)))))


def test_a_stream_read_by_nothing_else_keeps_its_keep_alive():
    # task "b" keeps all of c1 for itself and is closed from c2 on; the hard mix at c1 reads the
    # shared branch, so b's c1 filters reach the outputs only through the keep-alive at c2
    model = gatedmtl.convert(_Chain(), ("b", "a"), input_size=(3, 8, 8), gate_group=1, mix="hard").eval()
    c1, c2, c3 = model.gates()
    with torch.no_grad():
        c1.alpha.copy_(torch.tensor([[1.0] * 8, [-1.0] * 8]))
        c1.set_mix_choice(torch.ones(8, dtype=torch.long))
        for gate in (c2, c3):
            gate.alpha.fill_(-1.0)
    lean = gatedmtl.prune(model).eval()
    absent = _absent(lean)
    layer_c2 = lean.backbone.c2
    assert 1 in absent[layer_c2] and 1 not in layer_c2.alive_redundant
    shape = (1, 3, 8, 8)
    predicted = gatedmtl.predict_flops(model, shape)
    assert gatedmtl.count_flops(lean, shape) == predicted
    for m, slots in absent.items():  # without it, b's c1 filters drop out of the graph
        m.alive_redundant = slots
    assert gatedmtl.count_flops(lean, shape) < predicted


def test_redundant_keep_alives_leave_the_graph_and_nothing_else_changes(tmp_path):
    pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    model = gatedmtl.convert(timm.create_model("resnet18", pretrained=False), ("normals", "seg", "depth"),
                             input_size=SHAPE[1:]).eval()
    perturb_slots(model, generator=torch.Generator().manual_seed(0))
    set_gates(model, 0.25, torch.Generator().manual_seed(0))
    lean = gatedmtl.prune(model).eval()
    absent = _absent(lean)
    assert sum(len(m.alive_redundant) for m in absent) > 0
    assert all(m.alive_redundant <= slots for m, slots in absent.items())
    x = torch.randn(2, *SHAPE[1:])
    with torch.no_grad():
        a, b = model(x), lean(x)
    assert max(relative_error(b[t].numpy(), a[t].numpy()) for t in a) <= 1e-5
    assert gatedmtl.count_flops(lean, SHAPE) == gatedmtl.predict_flops(model, SHAPE)
    lean_path = gatedmtl.export.export_onnx(lean, tmp_path / "lean.onnx", SHAPE).path  # checked in ORT
    for m in absent:
        m.alive_redundant = frozenset()
    every_path = gatedmtl.export.export_onnx(lean, tmp_path / "every.onnx", SHAPE).path

    def ops(path) -> collections.Counter:
        return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)

    lean_ops, every_ops = ops(lean_path), ops(every_path)
    assert lean_ops["ReduceSum"] < every_ops["ReduceSum"] and lean_ops["Conv"] == every_ops["Conv"]
