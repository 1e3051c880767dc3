"""Every file one command writes, another reads back to the same model: through the CLI and the files.

Tasks are given in a non-alphabetical order, so that a reader that rebuilds the branches in any
other order than the run's (e.g. sorted) gives another model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import load_file

from gatedmtl.cli import main
from gatedmtl.train import load_network

TASKS = "normals,seg,depth"
TINY = ["--model", "resnet18", "--tasks", TASKS, "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "2",
        "--image-size", "32x48", "--train-length", "8", "--val-length", "4", "--lr", "0.02", "--no-progress"]


def _run(capsys, *args: str) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _printed_json(text: str) -> dict:
    return json.loads(text[text.index("{"):])


def _close(a: dict, b: dict, rel: float = 1e-6) -> bool:
    return all(abs(a[t][m] - b[t][m]) <= rel * max(1.0, abs(b[t][m])) for t in b for m in b[t]) and a.keys() == b.keys()


def _onnx_vs_torch(onnx_path: Path, checkpoint: Path) -> float:
    net, meta = load_network(checkpoint)
    x = torch.randn(2, *meta["input_size"], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = net(x)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    got = dict(zip(names, session.run(names, {session.get_inputs()[0].name: x.numpy()})))
    assert set(got) == set(net.tasks), (sorted(got), net.tasks)
    return max(float(np.abs(got[t] - ref[t].numpy()).max() / max(float(ref[t].abs().max()), 1e-6)) for t in net.tasks)


@pytest.mark.parametrize("extra", [[], ["--gate-group", "8"], ["--mix", "soft"], ["--mix", "hard"],
                                   ["--mix", "anneal", "--mix-anneal", "0.25,0.75"], ["--arch", "shared"],
                                   ["--model", "mobilenetv3_small_050", "--tie-depthwise", "--tie-residual"],
                                   ["--model", "mobilenetv3_small_050", "--no-skip-depthwise-mix"],
                                   ["--gate-structure", "prefix", "--gate-group", "8"],
                                   ["--model", "mobilenetv3_small_050", "--gate-structure", "prefix"]],
                         ids=["gated", "group8", "softmix", "hardmix", "annealmix", "shared", "tied", "dwmix",
                              "prefix", "prefix-tied"])
def test_train_eval_prune_export_round_trip(tmp_path, capsys, extra):
    run = tmp_path / "run"
    rc, out, err = _run(capsys, "train", *TINY, *extra, "--out", run)
    assert rc == 0, err[-2000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["tasks"] == TASKS.split(",")
    last = run / "last.safetensors"
    net, _ = load_network(last)
    assert net.tasks == tuple(TASKS.split(","))
    if "--arch" not in extra:
        assert net.encoder.tasks == tuple(TASKS.split(","))
        # the gates come back tied (one gate object for several layers) exactly when the run tied them; with
        # --tie-residual one gate owns several layers (a stream), with --tie-depthwise alone each owns one
        tied = net.encoder.tied_gates
        assert bool(tied) == ("mobilenetv3_small_050" in extra)  # depthwise convs are tied by default
        if "--tie-residual" in extra:
            assert len(set(tied.values())) < len(tied)
        # by default a mobilenetv3 run skips the mix in front of its tied depthwise convs; rebuilt as trained
        assert bool(net.encoder.unmixed_layers) == (
            "mobilenetv3_small_050" in extra and "--no-skip-depthwise-mix" not in extra)
        structure = "prefix" if "prefix" in extra else "free"  # rebuilt with the run's gate structure
        assert {g.structure for g in net.encoder.gates()} == {structure}
        for layer, owner in net.encoder.tied_gates.items():
            assert net.encoder.backbone.get_submodule(layer).gate is net.encoder.backbone.get_submodule(owner).gate

    rc, out, err = _run(capsys, "eval", last)
    assert rc == 0, err[-2000:]
    assert _close(_printed_json(out), summary["val"])

    if "--arch" in extra:  # a hard-sharing run exports as it is
        model = last
    else:
        model = run / "lean.safetensors"
        rc, out, err = _run(capsys, "prune", last, "--out", model)
        assert rc == 0, err[-2000:]
        rc, out, err = _run(capsys, "eval", model)
        assert rc == 0, err[-2000:]
        assert _close(_printed_json(out), summary["val_lean"])
        lean, _ = load_network(model)
        assert lean.encoder.tasks == tuple(TASKS.split(","))
        hard = "soft" not in extra  # the default (anneal) ends as a hard-mix network
        assert net.encoder.gates()[0].mix_mode == ("hard" if hard else "soft")
        layers = [m for _, m in lean.encoder.lean_layers()]
        assert all(m.hard == hard for m in layers)
        if hard:  # the lean checkpoint rebuilds the layout of the trained beta's argmax (projected gates)
            masks = load_file(str(model))
            for gate in net.encoder.gates():
                gate.set_open(masks[f"mask.{gate.name}"].bool())
            trained = net.pruned()
            assert [(m.mix, m.pool_slots) for m in layers] == [(m.mix, m.pool_slots)
                                                               for _, m in trained.encoder.lean_layers()]
            assert all(torch.equal(a.mix_index, b.mix_index) for a, (_, b) in zip(layers, trained.encoder.lean_layers())
                       if a.mix == "select")
            assert [type(m.branches[0]) for m in layers] == [type(m.branches[0]) for _, m in trained.encoder.lean_layers()]

    onnx_path = run / "model.onnx"
    rc, out, err = _run(capsys, "export", model, "--out", onnx_path)
    assert rc == 0, err[-2000:]
    assert _onnx_vs_torch(onnx_path, model) <= 1e-4


def test_commands_never_overwrite_without_force(tmp_path, capsys):
    run = tmp_path / "run"
    assert _run(capsys, "train", *TINY, "--out", run)[0] == 0
    last, lean = run / "last.safetensors", run / "lean.safetensors"
    before = last.read_bytes()

    rc, _, err = _run(capsys, "prune", last, "--out", last)
    assert rc == 2 and "input" in err and last.read_bytes() == before
    rc, _, err = _run(capsys, "prune", last, "--out", lean)
    assert rc == 0, err
    lean_bytes = lean.read_bytes()
    rc, _, err = _run(capsys, "prune", last, "--out", lean)
    assert rc == 2 and "--force" in err and lean.read_bytes() == lean_bytes
    rc, _, err = _run(capsys, "prune", last, "--out", lean, "--force")
    assert rc == 0, err

    rc, _, err = _run(capsys, "export", lean, "--out", lean)
    assert rc == 2 and "input" in err and lean.read_bytes() == lean_bytes
    onnx_path = run / "m.onnx"
    onnx_path.write_bytes(b"keep me")
    rc, _, err = _run(capsys, "export", lean, "--out", onnx_path)
    assert rc == 2 and "--force" in err and onnx_path.read_bytes() == b"keep me"
    (run / "folder.onnx").mkdir()
    rc, _, err = _run(capsys, "export", lean, "--out", run / "folder.onnx", "--force")
    assert rc == 2 and (run / "folder.onnx").is_dir()

    # a fresh run never writes into a folder that holds another run's files
    other = tmp_path / "other"
    other.mkdir()
    (other / "summary.json").write_text("not mine")
    rc, _, err = _run(capsys, "train", *TINY, "--out", other)
    assert rc == 2 and "--resume" in err and (other / "summary.json").read_text() == "not mine"


def test_export_refuses_to_replace_a_device_node(tmp_path, capsys):
    run = tmp_path / "run"
    assert _run(capsys, "train", *TINY, "--arch", "shared", "--out", run)[0] == 0
    rc, _, err = _run(capsys, "export", run / "last.safetensors", "--out", "/dev/null", "--force")
    assert rc == 2 and "not a regular file" in err
    from gatedmtl.files import OutputError, check_output, replace_file

    with pytest.raises(OutputError, match="not a regular file"):
        check_output("/dev/null", force=True)
    src = tmp_path / "x"
    src.write_text("x")
    with pytest.raises(OutputError, match="not a regular file"):
        replace_file(src, "/dev/null")
    assert Path("/dev/null").is_char_device()


def test_resume_takes_the_saved_settings(tmp_path, capsys):
    run = tmp_path / "run"
    assert _run(capsys, "train", *TINY, "--save-every", "1", "--out", run)[0] == 0
    rc, out, err = _run(capsys, "train", "--resume", "--out", run, "--epochs", "2", "--no-progress")
    assert rc == 0, err[-2000:]
    assert "resuming" in out and "from step 2 of 4" in out
    log = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert log == [1, 2, 3, 4]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["tasks"] == TASKS.split(",")
    assert (run / "prev.safetensors").is_file()
    rc, _, err = _run(capsys, "train", "--resume", "--out", run, "--lr", "0.5")
    assert rc == 2 and "lr" in err
    rc, _, err = _run(capsys, "train", "--resume", "--force", "--out", run)
    assert rc == 2


def test_resume_truncates_log_records_after_the_checkpoint(tmp_path):
    from gatedmtl.train import TrainConfig, Trainer

    out = tmp_path / "run"
    cfg = dict(model="resnet18", tasks=("depth", "seg"), epochs=1, steps_per_epoch=2, batch_size=2, train_length=8,
               val_length=4, image_size=(32, 48), progress=False, out=str(out))
    Trainer(TrainConfig(**cfg)).fit()
    with open(out / "log.jsonl", "a") as f:  # records a killed run wrote after its last checkpoint
        f.write(json.dumps({"step": 3}) + "\n")
    trainer = Trainer(TrainConfig(**(cfg | {"epochs": 2})), resume=True)
    assert trainer.step == 2
    assert [json.loads(x)["step"] for x in (out / "log.jsonl").read_text().splitlines()] == [1, 2]


def test_stale_temp_files_of_dead_writers_are_removed(tmp_path):
    import subprocess
    import sys

    from gatedmtl.files import remove_stale_temps, temp_path

    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(proc.stdout)
    stale = tmp_path / f".last.safetensors.{dead}.0123abcd.tmp"
    stale.write_bytes(b"x" * 10)
    mine = temp_path(tmp_path / "last.safetensors")
    mine.write_bytes(b"y")
    other = tmp_path / ".hidden.txt"
    other.write_text("user file")
    assert remove_stale_temps(tmp_path) == [stale]
    assert not stale.exists() and mine.exists() and other.exists()
