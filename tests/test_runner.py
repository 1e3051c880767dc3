"""Tests for the stand-alone edge runner export/run.py (must work without torch and gatedmtl)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from gatedmtl.export import export_onnx

RUN_PY = Path(__file__).resolve().parents[1] / "export" / "run.py"
FORBIDDEN = ("torch", "gatedmtl", "timm", "onnx")

# Runs run.py as __main__ and reports, at interpreter exit, which forbidden packages were imported.
WRAPPER = """
import atexit, runpy, sys
def _report():
    bad = sorted({m.split('.')[0] for m in sys.modules} & set(%r))
    sys.stderr.write('FORBIDDEN-IMPORTS: %%s\\n' %% ','.join(bad))
atexit.register(_report)
sys.argv = [%r] + sys.argv[1:]
runpy.run_path(%r, run_name='__main__')
""" % (FORBIDDEN, str(RUN_PY), str(RUN_PY))


class TinyMT(nn.Module):
    """(N, 3, 24, 24) -> {"seg": (N, 4, 24, 24), "feats": [(N, 6, 12, 12), (N, 6)]}."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.seg = nn.Conv2d(6, 4, 1)
        self.down = nn.Conv2d(6, 6, 3, stride=2, padding=1)

    def forward(self, x):
        f = torch.relu(self.stem(x))
        return {"seg": self.seg(f), "feats": [self.down(f), f.amax(dim=(2, 3))]}


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("runner") / "tiny.onnx"
    export_onnx(TinyMT(), path, (1, 3, 24, 24))
    return path


@pytest.fixture(scope="module")
def no_torch_env(tmp_path_factory) -> dict[str, str]:
    """Environment whose PYTHONPATH shadows torch and gatedmtl with packages that refuse to import."""
    fake = tmp_path_factory.mktemp("fake_site")
    for name in ("torch", "gatedmtl"):
        (fake / name).mkdir()
        message = f"{name} must not be imported by the edge runner"
        (fake / name / "__init__.py").write_text(f"raise ImportError({message!r})\n")
    (fake / "wrapper.py").write_text(WRAPPER)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env["PYTHONPATH"] = str(fake)
    env["WRAPPER"] = str(fake / "wrapper.py")
    return env


def _cli(env: dict[str, str], *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, env["WRAPPER"], *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )


def _assert_clean_imports(proc: subprocess.CompletedProcess) -> None:
    assert "FORBIDDEN-IMPORTS: \n" in proc.stderr, proc.stderr


def test_cli_random_prints_outputs_and_latency(model_file, no_torch_env, tmp_path):
    proc = _cli(no_torch_env, str(model_file), "--input", "random", "--runs", "5", "--warmup", "1",
                "--threads", "1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for name, shape in [("seg", "(1, 4, 24, 24)"), ("feats.0", "(1, 6, 12, 12)"), ("feats.1", "(1, 6)")]:
        line = next(ln for ln in out.splitlines() if ln.strip().startswith(name + " "))
        assert shape in line and "float32" in line and "min" in line and "max" in line
    assert "tasks: seg: seg; feats: feats.0, feats.1" in out
    assert "latency: batch 1, 5 runs after 1 warm-up, threads 1" in out
    for key in ("mean", "median", "p90", "min"):
        assert f"{key} " in out.splitlines()[-1]
    _assert_clean_imports(proc)


def test_cli_image_batch_and_json(model_file, no_torch_env, tmp_path):
    pytest.importorskip("PIL")
    from PIL import Image

    Image.new("RGB", (40, 30), (200, 30, 10)).save(tmp_path / "img.png")
    proc = _cli(no_torch_env, str(model_file), "--input", "img.png", "--batch", "4", "--runs", "3",
                "--json", "out.json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["input"]["shape"] == [4, 3, 24, 24]
    assert report["outputs"]["seg"]["shape"] == [4, 4, 24, 24]
    assert report["tasks"] == {"seg": ["seg"], "feats": ["feats.0", "feats.1"]}
    assert set(report["latency"]) >= {"mean_ms", "median_ms", "p90_ms", "min_ms", "threads", "runs"}
    assert report["latency"]["runs"] == 3
    _assert_clean_imports(proc)


@pytest.mark.parametrize(
    "array_shape, message",
    [((1, 1, 24, 24), "channels is 1, must be 3"), ((2, 3, 24, 24, 1), "expects rank 4")],
)
def test_cli_wrong_input_shape_exit_2(model_file, no_torch_env, tmp_path, array_shape, message):
    np.save(tmp_path / "x.npy", np.zeros(array_shape, np.float32))
    proc = _cli(no_torch_env, str(model_file), "--input", "x.npy", cwd=tmp_path)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_cli_npy_without_batch_axis(model_file, no_torch_env, tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((3, 24, 24), np.float64))
    proc = _cli(no_torch_env, str(model_file), "--input", "x.npy", "--runs", "0", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "shape (1, 3, 24, 24)  float32" in proc.stdout and "latency" not in proc.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["missing.onnx"], "model file not found"),
        (["{model}", "--input", "nothing.png"], "input file not found"),
        (["{model}", "--input", "garbage.png"], "cannot read image"),
        (["garbage.png"], "cannot load model"),
        (["{model}", "--input", "garbage.txt"], "unsupported input"),
    ],
)
def test_cli_user_errors_exit_2(model_file, no_torch_env, tmp_path, args, message):
    (tmp_path / "garbage.png").write_bytes(b"not an image")
    (tmp_path / "garbage.txt").write_text("hello")
    proc = _cli(no_torch_env, *[a.format(model=model_file) for a in args], cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_library_run_model_benchmark_and_grouping(model_file, edge_runner):
    run = edge_runner
    x = np.random.default_rng(0).standard_normal((2, 3, 24, 24)).astype(np.float32)
    outputs = run.run_model(model_file, x, threads=1)
    assert list(outputs) == ["seg", "feats.0", "feats.1"]
    assert outputs["feats.0"].shape == (2, 6, 12, 12)
    grouped = run.group_outputs(outputs, run.read_structure(run.load_session(model_file)))
    assert list(grouped) == ["seg", "feats"] and len(grouped["feats"]) == 2
    stats = run.benchmark(model_file, (3, 3, 24, 24), warmup=1, runs=3, threads=1)
    assert stats["shape"] == [3, 3, 24, 24] and stats["runs"] == 3
    assert 0 < stats["min_ms"] <= stats["median_ms"] <= stats["p90_ms"]
    with pytest.raises(run.RunnerError, match="channels"):
        run.run_model(model_file, np.zeros((1, 2, 24, 24), np.float32))


def test_grouping_gives_an_output_that_tasks_share_to_each_of_them(edge_runner):
    run = edge_runner
    a, b, c = (np.full((1, 2), v, np.float32) for v in (1, 2, 3))
    structure = {"tasks": [{"task": "seg", "kind": "list", "outputs": ["seg.0", "seg.1"]},
                           {"task": "depth", "kind": "list", "outputs": ["seg.0", "depth.1"]}]}
    grouped = run.group_outputs({"seg.0": a, "seg.1": b, "depth.1": c}, structure)
    assert grouped["seg"][0] is a and grouped["depth"][0] is a and grouped["depth"][1] is c
