"""``gatedmtl finetune``: a lean network trained further at its fixed architecture, through the CLI and files."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from gatedmtl.checkpoint import load_checkpoint
from gatedmtl.cli import main
from gatedmtl.cost import count_flops
from gatedmtl.prune import LeanModel
from gatedmtl.train import finetune_config, load_network
from test_cli_roundtrip import TASKS, TINY, _run


@pytest.fixture(scope="module")
def lean_file(tmp_path_factory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("finetune")
    assert main(["train", *TINY, "--out", str(root / "run")]) == 0
    assert main(["prune", str(root / "run" / "last.safetensors"), "--out", str(root / "lean.safetensors")]) == 0
    yield root / "lean.safetensors"
    shutil.rmtree(root, ignore_errors=True)  # about 600 MB: not kept for the rest of the session


def _model_state(path: Path) -> dict[str, torch.Tensor]:
    tensors, _ = load_checkpoint(path)
    return {k: v for k, v in tensors.items() if k.startswith("model.")}


def test_finetune_keeps_the_lean_architecture_and_changes_its_weights(tmp_path, capsys, lean_file):
    rc, out, err = _run(capsys, "finetune", lean_file, "--out", tmp_path / "ft", "--steps-per-epoch", "2",
                        "--no-progress")
    assert rc == 0, err[-2000:]
    last = tmp_path / "ft" / "last.safetensors"
    before, meta_before = load_network(lean_file)
    after, meta = load_network(last)
    assert meta["kind"] == "lean" and meta["finetuned_from"] == str(lean_file)
    assert after.tasks == tuple(TASKS.split(",")) and isinstance(after.encoder, LeanModel)
    shape = (1, *meta["input_size"])
    assert count_flops(after.encoder, shape) == count_flops(before.encoder, shape) == meta_before["flops"]["landed"]
    a, b = _model_state(lean_file), _model_state(last)
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    assert any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())
    summary = json.loads((tmp_path / "ft" / "summary.json").read_text())
    assert summary["steps"] == 4 and set(summary["val"]) == set(summary["val_before"]) == set(TASKS.split(","))
    assert meta["config"]["lr"] == pytest.approx(0.002)  # a tenth of the run's 0.02
    # eval reads the fine-tuned checkpoint back to the model the run evaluated
    rc, out, err = _run(capsys, "eval", last)
    assert rc == 0, err[-2000:]
    printed = json.loads(out[out.index("{"):])
    assert all(abs(printed[t][m] - summary["val"][t][m]) <= 1e-6 * max(1.0, abs(summary["val"][t][m]))
               for t in summary["val"] for m in summary["val"][t])
    # prune refuses it (already lean), export takes it
    assert _run(capsys, "prune", last, "--out", tmp_path / "x.safetensors")[0] == 2
    rc, _, err = _run(capsys, "export", last, "--out", tmp_path / "ft.onnx")
    assert rc == 0, err[-2000:]


def test_finetune_resume_is_exact(tmp_path, capsys, lean_file):
    # a constant schedule: extending the run from 1 to 2 epochs leaves the first steps as they were
    common = ["--steps-per-epoch", "2", "--balance", "dwa", "--schedule", "constant", "--no-progress"]
    assert _run(capsys, "finetune", lean_file, "--out", tmp_path / "straight", "--epochs", "2", *common)[0] == 0
    assert _run(capsys, "finetune", lean_file, "--out", tmp_path / "split", "--epochs", "1", *common)[0] == 0
    rc, out, err = _run(capsys, "finetune", "--resume", "--out", tmp_path / "split", "--epochs", "2", "--no-progress")
    assert rc == 0, err[-2000:]
    assert "from step 2 of 4" in out
    a, b = _model_state(tmp_path / "straight" / "last.safetensors"), _model_state(tmp_path / "split" / "last.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_finetune_errors(tmp_path, capsys, lean_file):
    run_ckpt = lean_file.parent / "run" / "last.safetensors"
    rc, _, err = _run(capsys, "finetune", run_ckpt, "--out", tmp_path / "a")
    assert rc == 2 and "not a lean checkpoint" in err
    rc, _, err = _run(capsys, "finetune", "--out", tmp_path / "b")
    assert rc == 2 and "give the lean checkpoint" in err
    rc, _, err = _run(capsys, "finetune", "--resume", "--out", lean_file.parent / "run")
    assert rc == 2 and "not a fine-tuning run" in err
    with pytest.raises(ValueError, match="model="):
        finetune_config(lean_file, {"model": "resnet34"})
    assert finetune_config(lean_file, {"lr": 0.5}).lr == 0.5


@pytest.mark.parametrize("mix", [["--mix", "hard"], ["--mix", "anneal", "--mix-anneal", "0.25,0.75"]],
                         ids=["hard", "anneal"])
def test_finetune_of_a_hard_mix_network_keeps_its_channel_selection(tmp_path, capsys, mix):
    assert main(["train", *TINY, *mix, "--out", str(tmp_path / "run")]) == 0
    lean_path = tmp_path / "lean.safetensors"
    assert main(["prune", str(tmp_path / "run" / "last.safetensors"), "--out", str(lean_path)]) == 0
    rc, _, err = _run(capsys, "finetune", lean_path, "--out", tmp_path / "ft", "--epochs", "1", "--steps-per-epoch", "1",
                      "--no-progress")
    assert rc == 0, err[-2000:]
    last = tmp_path / "ft" / "last.safetensors"
    mix = {k: v for k, v in load_checkpoint(lean_path)[0].items() if k.startswith("mix.")}
    assert mix and all(torch.equal(load_checkpoint(last)[0][k], v) for k, v in mix.items())
    before, _ = load_network(lean_path)
    after, _ = load_network(last)
    layers = [(m.mix, m.pool_slots) for _, m in after.encoder.lean_layers()]
    assert layers == [(m.mix, m.pool_slots) for _, m in before.encoder.lean_layers()]
    assert all(m.hard for _, m in after.encoder.lean_layers())
