"""Tests for gatedmtl.export: ONNX export with named task outputs, parity check, refusals, int8 quantization."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from gatedmtl.export import (
    METADATA_KEY,
    ExportError,
    compare_outputs,
    export_onnx,
    quantize_int8,
    relative_error,
)

ort = pytest.importorskip("onnxruntime")


class SmallMT(nn.Module):
    """(N, 3, H, W) -> {"a": (N, 5, H, W) logits, "b": [(N, 4, H/2, W/2), (N, 8)]}."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head_a = nn.Conv2d(8, 5, 1)
        self.head_b = nn.Conv2d(8, 4, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        f = self.stem(x)
        return {"a": self.head_a(f), "b": [self.head_b(f), f.mean(dim=(2, 3))]}


class FakeGate(nn.Module):
    _gatedmtl_gate = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class GatedMT(SmallMT):
    def __init__(self) -> None:
        super().__init__()
        self.gates = nn.ModuleList([FakeGate()])


class CountingMT(SmallMT):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor):
        self.calls += 1
        return super().forward(x)


class ExportDiffers(SmallMT):
    """Behaves differently while being exported, so the ONNX file cannot match PyTorch."""

    def forward(self, x: torch.Tensor):
        out = super().forward(x)
        if torch.onnx.is_in_onnx_export():
            out["a"] = out["a"] * 1.01
        return out


def _small(seed: int = 0) -> SmallMT:
    torch.manual_seed(seed)
    model = SmallMT()
    with torch.no_grad():  # non-trivial BN statistics so eval vs train mode matters
        model.stem[1].running_mean.uniform_(-0.5, 0.5)
        model.stem[1].running_var.uniform_(0.5, 2.0)
    return model


def _torch_flat(model: nn.Module, x: np.ndarray) -> dict[str, np.ndarray]:
    model.eval()
    with torch.no_grad():
        out = model(torch.from_numpy(x))
    flat = {}
    for task, value in out.items():
        if isinstance(value, torch.Tensor):
            flat[task] = value.numpy()
        else:
            flat.update({f"{task}.{i}": v.numpy() for i, v in enumerate(value)})
    return flat


def _ort_run(path: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, {"image": x})))


@pytest.fixture(scope="module")
def small_onnx(tmp_path_factory) -> tuple[SmallMT, Path]:
    model = _small()
    path = tmp_path_factory.mktemp("export") / "small.onnx"
    export_onnx(model, path, (1, 3, 32, 32))
    return model, path


def test_small_model_names_parity_and_metadata(tmp_path):
    model = _small()
    model.train()
    report = export_onnx(model, tmp_path / "m.onnx", (2, 3, 32, 32))
    assert model.training, "export must restore the caller's train/eval mode"
    assert list(report.outputs) == ["a", "b.0", "b.1"]
    assert report.outputs["b.0"] == (2, 4, 16, 16)
    assert report.tasks == {"a": ["a"], "b": ["b.0", "b.1"]}
    assert report.exporter == "torchscript" and report.opset >= 13
    assert sorted(report.checked_batches) == [1, 2]
    assert all(err <= 1e-4 for err in report.max_rel_error.values())
    assert report.file_size_bytes == (tmp_path / "m.onnx").stat().st_size
    assert report.external_data_path is None
    assert "b.0" in report.summary()

    sess = ort.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    (inp,) = sess.get_inputs()
    assert inp.name == "image" and inp.shape == ["batch", 3, 32, 32]
    assert [o.name for o in sess.get_outputs()] == ["a", "b.0", "b.1"]
    meta = json.loads(sess.get_modelmeta().custom_metadata_map[METADATA_KEY])
    assert meta["tasks"] == [
        {"task": "a", "kind": "tensor", "outputs": ["a"]},
        {"task": "b", "kind": "list", "outputs": ["b.0", "b.1"]},
    ]
    assert meta["input"]["name"] == "image"


class SharedOutputsMT(SmallMT):
    """Task "c" returns task "b"'s first tensor itself (as a lean model's tasks that all borrow one level)."""

    def forward(self, x: torch.Tensor):
        out = super().forward(x)
        return {**out, "c": [out["b"][0], out["a"].mean(dim=(2, 3))]}


def test_a_tensor_that_two_tasks_return_is_one_output_named_by_the_first(tmp_path):
    import onnx

    from gatedmtl.export import _flatten_outputs

    model = _small()
    shared = SharedOutputsMT()
    shared.load_state_dict(model.state_dict())
    shared.eval()
    report = export_onnx(shared, tmp_path / "s.onnx", (1, 3, 32, 32))
    assert list(report.outputs) == ["a", "b.0", "b.1", "c.1"]
    assert report.tasks == {"a": ["a"], "b": ["b.0", "b.1"], "c": ["b.0", "c.1"]}
    assert all(err <= 1e-4 for err in report.max_rel_error.values())
    graph = onnx.load(str(report.path)).graph
    assert [o.name for o in graph.output] == ["a", "b.0", "b.1", "c.1"]
    assert not [n for n in graph.node if n.op_type == "Identity"], "a repeated output costs a copy in ORT"
    meta = json.loads(ort.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
                      .get_modelmeta().custom_metadata_map[METADATA_KEY])
    assert meta["tasks"][2] == {"task": "c", "kind": "list", "outputs": ["b.0", "c.1"]}
    # equal values in different tensors stay separate outputs: only the same tensor is merged
    x = torch.randn(1, 3, 8, 8)
    _, names, tensors = _flatten_outputs({"p": x, "q": x.clone(), "r": [x, x]})
    assert names == ["p", "q"] and tensors[0] is x


@pytest.mark.parametrize("batch", [1, 4])
def test_batch_1_and_4_from_one_file(small_onnx, batch):
    model, path = small_onnx
    x = np.random.default_rng(batch).standard_normal((batch, 3, 32, 32)).astype(np.float32)
    got = _ort_run(path, x)
    ref = _torch_flat(model, x)
    assert got["a"].shape == (batch, 5, 32, 32) and got["b.1"].shape == (batch, 8)
    errors = compare_outputs(got, ref, rtol=1e-4)
    assert set(errors) == {"a", "b.0", "b.1"}


class Resnet18Tasks(nn.Module):
    """timm resnet18 features_only backbone wrapped into {"seg": logits, "feats": [5 feature maps]}."""

    def __init__(self) -> None:
        super().__init__()
        import timm

        self.backbone = timm.create_model("resnet18", pretrained=False, features_only=True)
        self.seg = nn.Conv2d(self.backbone.feature_info.channels()[-1], 3, 1)

    def forward(self, x: torch.Tensor):
        feats = self.backbone(x)
        return {"seg": self.seg(feats[-1]), "feats": feats}


def test_timm_resnet18_features_only(tmp_path):
    pytest.importorskip("timm")
    torch.manual_seed(0)
    model = Resnet18Tasks()
    report = export_onnx(model, tmp_path / "r18.onnx", (1, 3, 64, 64))
    assert list(report.outputs) == ["seg", "feats.0", "feats.1", "feats.2", "feats.3", "feats.4"]
    assert max(report.max_rel_error.values()) <= 1e-4
    x = np.random.default_rng(1).standard_normal((4, 3, 64, 64)).astype(np.float32)
    compare_outputs(_ort_run(report.path, x), _torch_flat(model, x), rtol=1e-4)


@pytest.mark.parametrize("mix", ["soft", "hard"])
def test_lean_resnet18_parity_and_the_shared_mix_in_the_graph(tmp_path, mix):
    """A lean features_only resnet18 (random gates, perturbed slots) in ONNX Runtime at 1e-4; the hard mix
    leaves no Mul in the graph (resnet18 has none of its own) and fewer nodes than the soft one."""
    import onnx
    import timm

    import gatedmtl
    from gatedmtl.verify import perturb_slots, set_gates

    backbone = timm.create_model("resnet18", pretrained=False, features_only=True).eval()
    ops = {}
    for m in dict.fromkeys(("soft", mix)):
        model = gatedmtl.convert(backbone, ("a", "b", "c"), input_size=(3, 64, 64), mix=m).eval()
        perturb_slots(model, generator=torch.Generator().manual_seed(0))
        set_gates(model, 0.5, torch.Generator().manual_seed(1))
        lean = gatedmtl.prune(model).eval()
        report = export_onnx(lean, tmp_path / f"{m}.onnx", (1, 3, 64, 64))
        assert max(report.max_rel_error.values()) <= 1e-4
        assert gatedmtl.count_flops(lean, (1, 3, 64, 64)) == gatedmtl.predict_flops(model, (1, 3, 64, 64))
        ops[m] = [n.op_type for n in onnx.load(str(report.path)).graph.node]
    assert ops["soft"].count("Mul") > 0
    if mix == "hard":
        assert ops["hard"].count("Mul") == 0 and len(ops["hard"]) < len(ops["soft"])


def test_external_data(tmp_path):
    report = export_onnx(_small(), tmp_path / "ext.onnx", (1, 3, 16, 16), external_data=True)
    data = tmp_path / "ext.onnx.data"
    assert report.external_data_path == data and data.stat().st_size > 0
    assert report.file_size_bytes == report.path.stat().st_size + data.stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ext.onnx", "ext.onnx.data"]  # no temp leftovers
    x = np.zeros((3, 3, 16, 16), np.float32)
    assert _ort_run(report.path, x)["a"].shape == (3, 5, 16, 16)


def test_gated_model_refused(tmp_path):
    with pytest.raises(TypeError, match=r"gated training model.*gatedmtl\.prune"):
        export_onnx(GatedMT(), tmp_path / "g.onnx", (1, 3, 16, 16))
    assert not (tmp_path / "g.onnx").exists()


def test_bad_paths_refused_before_export(tmp_path):
    model = CountingMT()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_onnx(model, tmp_path / "missing" / "m.onnx", (1, 3, 16, 16))
    with pytest.raises(ValueError, match="is a directory"):
        export_onnx(model, tmp_path, (1, 3, 16, 16))
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        export_onnx(model, tmp_path / "file" / "m.onnx", (1, 3, 16, 16))
    assert model.calls == 0, "path problems must be reported before running or exporting the model"


def test_read_only_folder_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        probe = ro / "probe"
        try:
            probe.write_text("x")
        except OSError:
            pass
        else:
            pytest.skip("running with privileges that ignore folder permissions (root)")
        with pytest.raises(PermissionError, match="cannot write"):
            export_onnx(_small(), ro / "m.onnx", (1, 3, 16, 16))
    finally:
        ro.chmod(0o700)


def test_bad_outputs_refused(tmp_path):
    class TensorOut(nn.Module):
        def forward(self, x):
            return x * 2

    class NestedOut(nn.Module):
        def forward(self, x):
            return {"a": {"b": x}}

    with pytest.raises(TypeError, match="must return a dict"):
        export_onnx(TensorOut(), tmp_path / "t.onnx", (1, 3, 8, 8))
    with pytest.raises(TypeError, match="task 'a'"):
        export_onnx(NestedOut(), tmp_path / "n.onnx", (1, 3, 8, 8))


def test_relative_error_is_scale_aware():
    ref = np.array([1000.0, -2000.0, 0.5])
    assert relative_error(ref + 0.1, ref) == pytest.approx(0.1 / 2000.0)
    assert relative_error(ref, ref) == 0.0
    assert relative_error(np.zeros(3), np.zeros(3)) == 0.0
    assert relative_error(np.zeros(2), np.zeros(3)) == float("inf")
    assert relative_error(np.array([np.nan]), np.array([1.0])) == float("inf")


def test_compare_outputs_raises_on_mismatch():
    ref = {"a": np.ones((2, 3), np.float32), "b.0": np.full((2,), 4.0, np.float32)}
    good = {k: v.copy() for k, v in ref.items()}
    assert compare_outputs(good, ref, rtol=0.0) == {"a": 0.0, "b.0": 0.0}
    bad = dict(good, **{"b.0": ref["b.0"] + 0.04})
    with pytest.raises(ExportError, match=r"'b\.0'.*1\.000e-02"):
        compare_outputs(bad, ref, rtol=1e-4)
    with pytest.raises(ExportError, match="shape"):
        compare_outputs(dict(good, a=np.ones((2, 4), np.float32)), ref, rtol=1e-4)
    with pytest.raises(ExportError, match="missing"):
        compare_outputs({"a": good["a"]}, ref, rtol=1e-4)


def test_check_detects_onnx_that_differs_from_torch(tmp_path):
    with pytest.raises(ExportError, match=r"'a'"):
        export_onnx(ExportDiffers(), tmp_path / "d.onnx", (1, 3, 16, 16))
    # Without the check the (wrong) file is written and reported as unchecked.
    report = export_onnx(ExportDiffers(), tmp_path / "d.onnx", (1, 3, 16, 16), check=False, force=True)
    assert report.max_rel_error == {} and report.checked_batches == []


def test_int8_quantization_reports_accuracy(small_onnx, tmp_path):
    _, path = small_onnx
    rng = np.random.default_rng(0)
    calib = [rng.standard_normal((4, 3, 32, 32)).astype(np.float32) for _ in range(4)]
    report = quantize_int8(path, tmp_path / "small.int8.onnx", calib)
    assert report.path.is_file() and report.calibration_batches == 4
    assert list(report.outputs) == ["a", "b.0", "b.1"]
    for stats in report.outputs.values():
        assert 0.0 <= stats.mean_abs_diff and stats.rel_error < 0.2
    assert report.outputs["a"].argmax_agreement is not None and report.outputs["a"].argmax_agreement > 80.0
    assert "argmax" in report.summary()
    sess = ort.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    ops = {n.op_type for n in __import__("onnx").load(str(report.path)).graph.node}
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    meta = sess.get_modelmeta().custom_metadata_map
    assert METADATA_KEY in meta and meta["gatedmtl.quantization"] == "int8-qdq"
    out = sess.run(None, {"image": calib[0][:1]})
    assert out[0].shape == (1, 5, 32, 32)


@pytest.mark.slow
def test_dynamo_exporter(tmp_path):
    model = _small()
    report = export_onnx(model, tmp_path / "dyn.onnx", (1, 3, 32, 32), exporter="dynamo")
    assert report.exporter == "dynamo" and list(report.outputs) == ["a", "b.0", "b.1"]
    x = np.random.default_rng(2).standard_normal((4, 3, 32, 32)).astype(np.float32)
    compare_outputs(_ort_run(report.path, x), _torch_flat(model, x), rtol=1e-4)


def test_invalid_arguments_refused(tmp_path):
    with pytest.raises(ValueError, match="exporter must be"):
        export_onnx(_small(), tmp_path / "m.onnx", (1, 3, 8, 8), exporter="tflite")
    with pytest.raises(ValueError, match="input_shape"):
        export_onnx(_small(), tmp_path / "m.onnx", (0, 3, 8, 8))
    with pytest.raises(FileNotFoundError, match="export it first"):
        quantize_int8(tmp_path / "none.onnx", tmp_path / "q.onnx", [np.zeros((1, 3, 8, 8), np.float32)])
