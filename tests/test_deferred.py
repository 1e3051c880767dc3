"""Deferred restores: ops on the parts equal ops on the restored tensor, never modify shared parts,
compose channel selections into one gather, and make the exported lean graph fuse activations."""

from __future__ import annotations


import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import gatedmtl
from gatedmtl.deferred import Deferred, call, materialize
from gatedmtl.export import relative_error
from gatedmtl.verify import perturb_slots, set_gates

T = ("seg", "depth", "normals")


@pytest.fixture
def parts():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 5, 4, 4, generator=g)
    index = torch.tensor([4, 0, 7, 1, 5, 2])  # 6 of the 8 channels of cat([a, b])
    return a, b, index


def _full(a, b, index):
    return torch.cat([a, b], 1)[:, index]


def test_elementwise_ops_run_once_per_part_and_equal_the_restored_tensor(parts):
    a, b, index = parts
    memo: dict = {}
    d1 = Deferred([a, b], index, 1, memo)
    d2 = Deferred([a, b], torch.tensor([1, 1, 3]), 1, memo)  # another stream of the same layer
    r1, r2 = F.relu(d1), torch.relu(d2)
    assert isinstance(r1, Deferred) and isinstance(r2, Deferred)
    assert all(p is q for p, q in zip(r1.parts, r2.parts))  # computed once per part
    assert torch.equal(materialize(r1), F.relu(_full(a, b, index)))
    assert torch.equal(materialize(r2), F.relu(torch.cat([a, b], 1)[:, [1, 1, 3]]))
    chain = F.hardswish(d1 * 2.0 + 1.0) / 3.0
    assert isinstance(chain, Deferred)
    torch.testing.assert_close(materialize(chain), F.hardswish(_full(a, b, index) * 2.0 + 1.0) / 3.0)
    pooled = F.max_pool2d(d1, 2)
    assert isinstance(pooled, Deferred) and pooled.shape == (2, 6, 2, 2)
    assert torch.equal(materialize(pooled), F.max_pool2d(_full(a, b, index), 2))


def test_in_place_ops_never_modify_the_parts(parts):
    a, b, index = parts
    a0, b0 = a.clone(), b.clone()
    d = Deferred([a, b], index, 1)
    expect = _full(a0, b0, index)
    r = F.relu(d, inplace=True)
    s = nn.SiLU(inplace=True)(Deferred([a], None, 1))  # a single part, as a task that keeps every channel
    d2 = Deferred([a, b], index, 1)
    d2 += torch.ones(6, 1, 1)  # materialised, then added out of place
    t = Deferred([a, b], index, 1).add_(1.0)
    assert torch.equal(a, a0) and torch.equal(b, b0)
    assert torch.equal(materialize(r), F.relu(expect))
    assert torch.equal(materialize(s), F.silu(a0))
    assert torch.equal(d2, expect + 1)
    assert torch.equal(materialize(t), expect + 1)


def test_channel_selections_and_concats_compose_into_one_gather(parts):
    a, b, index = parts
    d = Deferred([a, b], index, 1)
    sel = d.index_select(1, torch.tensor([5, 0, 2]))
    nar = torch.narrow(d, 1, 2, 3)
    assert isinstance(sel, Deferred) and sel.parts == d.parts
    assert torch.equal(materialize(sel), _full(a, b, index)[:, [5, 0, 2]])
    assert torch.equal(materialize(nar), _full(a, b, index)[:, 2:5])
    extra = torch.randn(2, 2, 4, 4)
    joined = torch.cat([d, extra, sel], dim=1)
    assert isinstance(joined, Deferred) and len(joined.parts) == 3  # a, b and extra, each once
    assert torch.equal(materialize(joined), torch.cat([_full(a, b, index), extra, materialize(sel)], 1))


def test_a_selection_of_one_whole_part_is_that_part_without_a_gather(parts):
    a, b, _ = parts
    d = Deferred([a, b], torch.tensor([6, 3, 0, 4, 7, 5, 1]), 1)
    whole_b = d.select(torch.tensor([1, 3, 5, 0, 4]))  # channels 3..7 of cat([a, b]): exactly b, in order
    assert materialize(whole_b) is b
    assert materialize(Deferred([a, b], torch.arange(3), 1)) is a
    # b's channels out of order, or b with one of a's: gathered, equal to the restored tensor
    shuffled = Deferred([a, b], torch.tensor([4, 3, 5, 6, 7]), 1)
    mixed = Deferred([a, b], torch.tensor([2, 3, 4, 5, 6]), 1)
    for x in (shuffled, mixed):
        assert materialize(x) is not b
        assert torch.equal(materialize(x), torch.cat([a, b], 1)[:, x.index])


def test_other_ops_get_the_restored_tensor(parts):
    a, b, index = parts
    d = Deferred([a, b], index, 1)
    w = torch.randn(4, 6, 3, 3)
    out = F.conv2d(d, w, padding=1)
    assert isinstance(out, torch.Tensor)
    assert torch.equal(out, F.conv2d(_full(a, b, index), w, padding=1))
    scale = torch.randn(1, 6, 1, 1)
    assert torch.equal(d * scale, _full(a, b, index) * scale)  # a tensor operand: restored first
    assert torch.equal(d.mean((2, 3)), _full(a, b, index).mean((2, 3)))
    assert torch.equal(call(torch.Tensor.__add__, (d, d), {}), 2 * _full(a, b, index))
    assert d.shape == (2, 6, 4, 4) and d.size(1) == 6 and d.dim() == 4 and d.ndim == 4 and len(d) == 2
    # pooling over the last dim of [B, N, C] tokens mixes channels: not run on the parts
    tokens = Deferred([a.flatten(2).transpose(1, 2), b.flatten(2).transpose(1, 2)], index, -1)
    pooled = F.max_pool1d(tokens, 2)
    assert isinstance(pooled, torch.Tensor)
    assert torch.equal(pooled, F.max_pool1d(torch.cat([a, b], 1).flatten(2).transpose(1, 2)[..., index], 2))


def test_bad_construction():
    with pytest.raises(ValueError, match="one part without an index"):
        Deferred([torch.zeros(1, 2), torch.zeros(1, 2)], None, 1)


def _lean(backbone: nn.Module, size=(3, 64, 64), mix="hard"):
    model = gatedmtl.convert(backbone, T, input_size=size, mix=mix).eval()
    perturb_slots(model, generator=torch.Generator().manual_seed(0))
    set_gates(model, 0.5, torch.Generator().manual_seed(1))
    return model, gatedmtl.prune(model).eval()


@pytest.mark.parametrize("mix", ["hard", "soft"])
def test_lean_resnet_defers_every_restore_and_keeps_parity(mix):
    model, lean = _lean(timm.create_model("resnet18", pretrained=False), mix=mix)
    assert lean.streams and all(m.defer for _, m in lean.lean_layers())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a, b = model(x), lean(x)
    assert max(relative_error(b[t].numpy(), a[t].numpy()) for t in T) <= 1e-5
    assert "deferred" in gatedmtl.profile.profile(lean, (1, 3, 64, 64), latency=False).notes[-1]


def _relus_after_gathers(path) -> int:
    onnx = pytest.importorskip("onnx")
    graph = onnx.load(str(path)).graph
    producer = {o: n.op_type for n in graph.node for o in n.output}
    return sum(1 for n in graph.node if n.op_type == "Relu" and producer.get(n.input[0]) == "Gather")


def test_exported_activations_follow_the_branch_convs(tmp_path):
    """With deferred restores no Relu reads a Gather (so ONNX Runtime fuses it into the conv); without, many do."""
    pytest.importorskip("onnxruntime")
    _, lean = _lean(timm.create_model("resnet18", pretrained=False))
    deferred = gatedmtl.export.export_onnx(lean, tmp_path / "deferred.onnx", (1, 3, 64, 64))  # checked in ORT
    for _, m in lean.lean_layers():
        m.defer = False
    eager = gatedmtl.export.export_onnx(lean, tmp_path / "eager.onnx", (1, 3, 64, 64))
    assert max(deferred.max_rel_error.values()) <= 1e-4 and max(eager.max_rel_error.values()) <= 1e-4
    # Relus after residual adds remain; those right after a layer's restore are gone
    assert _relus_after_gathers(deferred.path) == 0 < _relus_after_gathers(eager.path)


class _InPlaceNet(nn.Module):
    """Backbone code that relies on an in-place op without using its result."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x):
        x = self.bn1(self.conv1(x))
        x.relu_()
        return self.conv2(x)


def test_backbone_code_that_defeats_deferral_runs_without_it_and_says_so():
    model, lean = _lean(_InPlaceNet(), size=(3, 16, 16))
    assert lean.streams and not any(m.defer for _, m in lean.lean_layers())
    assert "differ from the folded model" in lean.deferred_reason
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        a, b = model(x), lean(x)
    assert max(relative_error(b[t].numpy(), a[t].numpy()) for t in T) <= 1e-5
    note = gatedmtl.profile.profile(lean, (1, 3, 16, 16), latency=False).notes[-1]
    assert "deferred at 0 of" in note and "differ from the folded model" in note


def test_deferral_leaves_the_flop_count_unchanged():
    model, lean = _lean(timm.create_model("resnet18", pretrained=False))
    deferred = gatedmtl.count_flops(lean, (1, 3, 64, 64))
    for _, m in lean.lean_layers():
        m.defer = False
    assert gatedmtl.count_flops(lean, (1, 3, 64, 64)) == deferred
    assert abs(gatedmtl.predict_flops(model, (1, 3, 64, 64)) - deferred) <= 0.005 * deferred


def test_sum_of_two_deferred_tensors_with_one_layout_adds_part_by_part(parts):
    a, b, index = parts
    g = torch.Generator().manual_seed(1)
    c, d = torch.randn(a.shape, generator=g), torch.randn(b.shape, generator=g)
    memo: dict = {}
    x1, y1 = Deferred([a, b], index, 1, memo), Deferred([c, d], index, 1)
    x2, y2 = Deferred([a, b], torch.tensor([2, 6]), 1, memo), Deferred([c, d], torch.tensor([2, 6]), 1)
    s1, s2 = x1 + y1, torch.add(x2, y2)  # two streams of the same pair of layers
    assert isinstance(s1, Deferred) and torch.equal(s1.index, index)
    assert all(p is q for p, q in zip(s1.parts, s2.parts))  # each pair of parts added once
    assert torch.equal(materialize(s1), _full(a, b, index) + _full(c, d, index))
    assert torch.equal(materialize(s2), torch.cat([a, b], 1)[:, [2, 6]] + torch.cat([c, d], 1)[:, [2, 6]])
    x = Deferred([a, b], index, 1)
    x += y1  # in place on a deferred tensor: out of place, the parts stay as they were
    assert isinstance(x, Deferred) and torch.equal(materialize(x), materialize(s1))
    # another layout (other index, or parts of other widths): the full tensors are added
    other = Deferred([c, d], torch.tensor([0, 1, 2, 3, 4, 5]), 1)
    mixed = x1 + other
    assert isinstance(mixed, torch.Tensor) and torch.equal(mixed, _full(a, b, index) + _full(c, d, torch.arange(6)))
    narrow = Deferred([c[:, :2], torch.cat([c[:, 2:], d], 1)], index, 1)
    assert isinstance(x1 + narrow, torch.Tensor)
