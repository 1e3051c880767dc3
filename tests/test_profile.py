"""gatedmtl.profile: the numbers agree with count_flops / count_params / predict_flops, per-slot
FLOPs add up, gated and lean tables agree, ungated layers are listed, table/JSON/CLI work."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from torch import nn

import gatedmtl
from gatedmtl.cost import flops_by_module
from gatedmtl.profile import compare, main, profile
from gatedmtl.verify import set_gates

T = ("seg", "depth", "normals")
SHAPE = (1, 3, 64, 64)


@pytest.fixture(scope="module")
def resnet():
    backbone = timm.create_model("resnet18", pretrained=False).eval()
    model = gatedmtl.convert(backbone, T, input_size=SHAPE[1:]).eval()
    set_gates(model, 0.5, torch.Generator().manual_seed(0))
    lean = gatedmtl.prune(model).eval()
    return backbone, model, lean, [profile(m, SHAPE, latency=False) for m in (backbone, model, lean)]


def test_totals_equal_count_flops_and_params(resnet):
    backbone, model, lean, (pb, pg, pl) = resnet
    assert (pb.kind, pg.kind, pl.kind) == ("backbone", "gated", "lean")
    for m, p in zip((backbone, model, lean), (pb, pg, pl)):
        assert p.flops == gatedmtl.count_flops(m, SHAPE)
        assert p.params == gatedmtl.count_params(m)
    assert pg.predicted_flops == gatedmtl.predict_flops(model, SHAPE)
    assert abs(pg.predicted_flops - pl.flops) <= 0.005 * pl.flops
    assert pg.gate_params == sum(g.alpha.numel() + g.beta.numel() for g in model.gates())


def test_per_slot_flops_add_up(resnet):
    """Property: the lean model's per-slot FLOPs (fvcore's count of each slot's own modules) plus
    the slot-independent FLOPs equal its total, where the slot-independent part is exactly what
    the plain backbone spends outside parameterised layers (resnet18: the global average pool),
    once per slot folded on the batch axis. The gated model predicts the same per-slot FLOPs."""
    backbone, model, lean, (_, pg, pl) = resnet
    assert [s.slot for s in pl.slots] == ["shared", *T]
    assert sum(s.flops for s in pl.slots) + pl.slot_independent_flops == pl.flops
    pool = flops_by_module(backbone, SHAPE)["global_pool"]
    assert pool > 0 and pl.slot_independent_flops == len(lean.slots) * pool
    assert [s.flops for s in pg.slots] == [s.flops for s in pl.slots]
    assert sum(s.params for s in pl.slots) + pl.slot_independent_params == pl.params
    # the shared slot computes every channel that some task borrows, each task its open channels
    for row, gate in zip(pg.layers, model.gates()):
        open_ = gate.open_mask()
        assert row.kept == [int((~open_.all(0)).sum())] + [int(o.sum()) for o in open_]
    assert [(r.name, r.kind, r.norm, r.kept, r.channels) for r in pg.layers] == \
           [(r.name, r.kind, r.norm, r.kept, r.channels) for r in pl.layers]
    assert pl.layers[0].name == "conv1" and pl.layers[0].norm == "BatchNorm2d" and pl.layers[-1].kind == "linear"


def test_grouped_convs_are_gated_layers_not_ungated():
    shape = (1, 3, 32, 32)
    backbone = timm.create_model("regnetx_002", pretrained=False).eval()
    model = gatedmtl.convert(backbone, T, input_size=shape[1:]).eval()
    set_gates(model, 0.5, torch.Generator().manual_seed(0))
    lean = gatedmtl.prune(model).eval()
    pg, pl = profile(model, shape, latency=False), profile(lean, shape, latency=False)
    grouped = {n for n, m in backbone.named_modules() if isinstance(m, nn.Conv2d) and 1 < m.groups < m.in_channels}
    assert grouped
    for p in (pg, pl):
        assert not grouped & {u.name for u in p.ungated}
        layers = {layer.name for layer in p.layers}
        assert all(any(name == n or name.startswith(n.rsplit(".", 1)[0]) for name in layers) for n in grouped)
    assert sum(s.flops for s in pl.slots) + pl.slot_independent_flops == pl.flops
    assert [s.flops for s in pg.slots] == [s.flops for s in pl.slots]


def test_hard_mix_lean_profile_matches_the_prediction():
    """A hard mix changes no FLOP (the mix is no multiply-add): the same per-slot FLOPs and totals as the
    soft mix with the same gates, each equal to fvcore's count and the prediction."""
    backbone = timm.create_model("resnet18", pretrained=False).eval()
    profiles = {}
    for mix in ("soft", "hard"):
        model = gatedmtl.convert(backbone, T, input_size=SHAPE[1:], mix=mix).eval()
        set_gates(model, 0.5, torch.Generator().manual_seed(0))
        lean = gatedmtl.prune(model).eval()
        pg, pl = profile(model, SHAPE, latency=False), profile(lean, SHAPE, latency=False)
        assert pl.flops == gatedmtl.count_flops(lean, SHAPE) == pg.predicted_flops == gatedmtl.predict_flops(model, SHAPE)
        profiles[mix] = pl
    assert [s.flops for s in profiles["hard"].slots] == [s.flops for s in profiles["soft"].slots]
    assert profiles["hard"].params == profiles["soft"].params  # the same kept filters


def test_table_json_and_compare(resnet, tmp_path):
    *_, (pb, pg, pl) = resnet
    text = pl.table()
    for part in ("FLOPs (fvcore, multiply-adds)", "one multiply-add = 1 FLOP", "### per slot", "### gated layers", "| shared |", "layer4.1.conv2"):
        assert part in text
    assert "FLOPs after prune (predicted)" in pg.table()
    data = json.loads(pl.to_json(tmp_path / "p.json").read_text())
    assert data["flops"] == pl.flops and data["slots"][1]["slot"] == "seg" and data["layers"][0]["name"] == "conv1"
    side = compare([pb, pg, pl])
    assert side.count("\n") == 5 and "resnet18" in side


def test_latency_of_backbone_lean_and_gated():
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3)).eval()
    model = gatedmtl.convert(backbone, ("a", "b"), input_size=(3, 16, 16)).eval()
    set_gates(model, 0.5, torch.Generator().manual_seed(0))
    for m in (backbone, gatedmtl.prune(model), model):
        p = profile(m, (1, 3, 16, 16), runs=3)
        lat = p.latency
        assert lat is not None and 0 < lat.min_ms <= lat.median_ms <= lat.p90_ms and lat.runs == 3
        assert lat.threads == 1
    assert lat.of == "prune(model)" and "prune(model)" in p.table()


def test_cli(tmp_path, capsys):
    out = tmp_path / "p.json"
    rc = main(["resnet18", "--tasks", "seg,depth", "--density", "0.5", "--input", "1,3,32,32", "--no-latency",
               "--json", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert set(data) == {"backbone", "gated", "lean"} and data["lean"]["tasks"] == ["seg", "depth"]
    assert data["lean"]["flops"] < data["gated"]["flops"]
    assert "### gated layers" in capsys.readouterr().out
    assert main(["resnet18", "--tasks", "seg,depth", "--density", "0.5", "--input", "1,3,32,32", "--no-latency",
                 "--mix", "hard"]) == 0
    prefix = tmp_path / "prefix.json"  # the lean layers' rows read the first piece of a split shared branch
    assert main(["resnet18", "--tasks", "seg,depth", "--density", "0.5", "--input", "1,3,32,32", "--no-latency",
                 "--mix", "hard", "--gate-structure", "prefix", "--json", str(prefix)]) == 0
    data = json.loads(prefix.read_text())
    assert data["lean"]["flops"] < data["gated"]["flops"]
    assert "| conv |" in capsys.readouterr().out
    assert main(["resnet18", "--density", "2", "--no-latency"]) == 2
    assert main(["no_such_model_xyz", "--no-latency"]) == 2


def test_onnx_kernel_time_counts_every_node_and_sums_them(tmp_path):
    from gatedmtl.export import export_onnx
    from gatedmtl.profile import onnx_kernel_time, onnx_latency

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.convs = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 4, 3))

        def forward(self, x):
            return {"out": self.convs(x)}

    path = export_onnx(Net().eval(), tmp_path / "m.onnx", (1, 3, 16, 16), check=False).path
    kt = onnx_kernel_time(path, (1, 3, 16, 16), runs=2, warmup=1)
    convs = sum(n for op, n in kt.nodes_by_op.items() if "Conv" in op)
    assert convs == 3  # one node per conv, nothing merged away
    assert set(kt.by_op) == set(kt.nodes_by_op) and kt.runs == 2 and kt.threads == 1
    assert kt.total_ms == pytest.approx(sum(kt.by_op.values())) and kt.total_ms > 0
    lat = onnx_latency(path, (1, 3, 16, 16), runs=3, warmup=1)
    assert 0 < lat.cpu_median_ms and lat.runs == 3
    with pytest.raises(ValueError, match="runs"):
        onnx_kernel_time(path, (1, 3, 16, 16), runs=0)
