"""Every user error of the command line gets one clear line and exit code 2 (no traceback, no silence)."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from gatedmtl.cli import _parser, main

TINY = ["--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "2", "--image-size", "32x48",
        "--train-length", "4", "--val-length", "2", "--no-progress"]
RUNNER = Path(__file__).resolve().parents[1] / "export" / "run.py"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Iterator[dict[str, Path]]:
    """A lean checkpoint and its ONNX file (through the CLI), a torch pickle and resnet34 weights."""
    root = tmp_path_factory.mktemp("cli")
    assert main(["train", *TINY, "--tasks", "seg,depth", "--out", str(root / "run")]) == 0
    assert main(["prune", str(root / "run" / "last.safetensors"), "--out", str(root / "lean.safetensors")]) == 0
    assert main(["export", str(root / "lean.safetensors"), "--out", str(root / "lean.onnx")]) == 0
    torch.save({"w": torch.zeros(1)}, root / "weights.pt")
    r34 = timm.create_model("resnet34", pretrained=False, features_only=True).state_dict()
    save_file({k: v.contiguous() for k, v in r34.items()}, str(root / "resnet34.safetensors"))
    yield {"root": root, "lean": root / "lean.safetensors", "onnx": root / "lean.onnx", "pt": root / "weights.pt",
           "r34": root / "resnet34.safetensors"}
    shutil.rmtree(root, ignore_errors=True)  # about 600 MB: not kept for the rest of the session


CASES = [
    (["train", "--device", "tpu"], "unknown device"),
    (["train", "--steps-per-epoch", "0"], "steps_per_epoch must be >= 1"),
    (["train", "--budget", "1"], "0.250"),
    (["train", "--budget", "0.1"], "infeasible"),
    (["train", "--checkpoint", "{r34}"], "does not match resnet18"),
    (["train", "--tau", "seg"], "key=value"),
    (["verify", "--model", "nope_net"], "unknown timm model"),
    (["eval", "{pt}"], "PyTorch pickle"),
    (["eval", "{onnx}"], "ONNX model"),
    (["eval", "{root}/missing.safetensors"], "does not exist"),
    (["export", "{lean}", "--out", "{lean}/model.onnx"], "is a file, not a folder"),
    (["export", "{lean}", "--out", "{root}/no/such/folder/model.onnx"], "does not exist"),
    (["export", "{lean}", "--out", "{onnx}"], "--force"),
    (["export", "{lean}", "--out", "{root}/model.bin"], ".onnx"),
    (["profile", "resnet18", "--tasks", "foo,bar", "--no-latency"], "unknown task"),
    (["profile", "nope_net", "--no-latency"], "unknown timm model"),
]


@pytest.mark.parametrize("argv,message", CASES, ids=[" ".join(a[:2]) + f" {i}" for i, (a, _) in enumerate(CASES)])
def test_user_errors_exit_2_with_one_clear_line(files, capsys, argv, message, tmp_path):
    args = [a.format(**{k: str(v) for k, v in files.items()}) for a in argv]
    if args[0] == "train":  # the case's flags come last, so they win
        args = ["train", *TINY, *args[1:], "--out", str(tmp_path / "run")]
    rc = main(args)
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("error: ") and "Traceback" not in err and message in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu_is_a_clear_error(capsys, tmp_path):
    assert main(["train", *TINY, "--device", "cuda", "--out", str(tmp_path / "r")]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_the_runner_refuses_a_size_that_a_fixed_model_would_ignore(files):
    proc = subprocess.run([sys.executable, str(RUNNER), str(files["onnx"]), "--size", "64x64", "--runs", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "fixed input size 32x48" in proc.stderr


def test_the_runner_saves_outputs_and_maps_and_says_when_it_resizes(files, tmp_path):
    from PIL import Image

    Image.fromarray(torch.randint(0, 255, (60, 80, 3), dtype=torch.uint8).numpy()).save(tmp_path / "photo.png")
    cmd = [sys.executable, str(RUNNER), str(files["onnx"]), "--input", str(tmp_path / "photo.png"), "--runs", "0",
           "--save", str(tmp_path / "out.npz")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "resized the image from 60x80 to the model's 32x48" in proc.stderr
    import numpy as np

    saved = np.load(tmp_path / "out.npz")
    assert set(saved.files) == {"seg", "depth"} and saved["seg"].shape == (1, 7, 32, 48)
    assert Image.open(tmp_path / "out.seg.png").size == (48, 32)
    assert Image.open(tmp_path / "out.depth.png").size == (48, 32)
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "--force" in again.stderr


def test_every_option_has_help_and_shows_its_default():
    parser, subs = _parser()
    for name, sub in subs.items():
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help and action.help != argparse.SUPPRESS, f"{name} {action.option_strings or action.dest}"
    text = subs["train"].format_help()
    assert "(default: 96x128)" in text and "(default: target)" in text
    assert "multiply-add" in parser.format_help()


def test_nan_stop_without_a_checkpoint_says_so(tmp_path):
    from gatedmtl.train import NonFiniteLossError, TrainConfig, Trainer, make_datasets

    cfg = TrainConfig(model="resnet18", tasks=("seg", "depth"), epochs=1, steps_per_epoch=1, batch_size=2,
                      train_length=4, val_length=2, image_size=(32, 48), progress=False, out=str(tmp_path / "r"))
    train, val = make_datasets(cfg)

    class Poisoned(torch.utils.data.Dataset):
        tasks = train.tasks

        def __len__(self):
            return len(train)

        def __getitem__(self, i):
            item = dict(train[i])
            # a NaN image (NaN depth targets would be masked as invalid pixels): every prediction is NaN
            item["image"] = torch.full_like(item["image"], float("nan"))
            return item

    with pytest.raises(NonFiniteLossError, match="No checkpoint was written yet"):
        Trainer(cfg, datasets=(Poisoned(), val)).fit()


def test_partial_checkpoint_loads_only_matching_weights(files, tmp_path, capsys):
    from gatedmtl.network import build_backbone

    from safetensors.torch import load_file

    backbone = build_backbone("resnet18", checkpoint=files["r34"], partial=True)
    saved = load_file(str(files["r34"]))
    assert "partial checkpoint" in capsys.readouterr().out
    assert torch.equal(backbone.conv1.weight, saved["conv1.weight"])  # same name and shape: loaded
    assert torch.equal(backbone.layer1[1].conv2.weight, saved["layer1.1.conv2.weight"])
