"""gatedmtl.demo's comparison networks: T separate networks built from a gated encoder's task branches."""

from __future__ import annotations

import torch
from torch import nn

import gatedmtl
from gatedmtl.demo import SeparateNetworks, slot_backbone
from gatedmtl.slots import SlotModule
from gatedmtl.verify import perturb_slots, set_gates


def _encoder():
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6)).eval()
    model = gatedmtl.convert(backbone, ("a", "b"), input_size=(3, 12, 12)).eval()
    perturb_slots(model, generator=torch.Generator().manual_seed(0))
    return model


def test_slot_backbone_equals_the_task_output_with_every_gate_open():
    model = _encoder()
    set_gates(model, "open", torch.Generator().manual_seed(1))  # no task reads the shared slot
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        out = model(x)
        for i, task in enumerate(model.tasks):
            plain = slot_backbone(model, i + 1)
            assert not any(isinstance(m, SlotModule) for m in plain.modules())
            torch.testing.assert_close(plain(x), out[task], rtol=1e-5, atol=1e-5)
        # the tasks' branches differ, so each network has its own weights
        assert not torch.allclose(slot_backbone(model, 1)(x), slot_backbone(model, 2)(x))


def test_separate_networks_run_each_task_head_on_its_own_branch():
    model = _encoder()
    set_gates(model, "open", torch.Generator().manual_seed(1))
    heads = nn.ModuleDict({"a": nn.Conv2d(6, 2, 1), "b": nn.Conv2d(6, 1, 1)})
    net = SeparateNetworks(model, heads).eval()
    x = torch.randn(1, 3, 12, 12)
    with torch.no_grad():
        got, feats = net(x), model(x)
        for t in ("a", "b"):
            torch.testing.assert_close(got[t], heads[t](feats[t]), rtol=1e-5, atol=1e-5)
    assert set(got) == {"a", "b"}


def test_demo_with_finetuning_runs_end_to_end_and_reruns_in_its_folder(tmp_path, capsys):
    import json

    import pytest

    from gatedmtl.demo import main

    args = ["--epochs", "1", "--image-size", "32x32", "--train-length", "16", "--batch-size", "4",
            "--finetune-epochs", "1", "--out", str(tmp_path / "demo")]
    with pytest.warns(UserWarning):  # a one-epoch run ends far from the budget (ProjectionWarning)
        assert main(args) == 0
    summary = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert set(summary["lean_finetuned"]) == {"seg", "depth", "normals"}
    assert (tmp_path / "demo" / "finetune" / "last.safetensors").is_file()
    assert "fine-tuned lean model" in capsys.readouterr().out
    with pytest.warns(UserWarning):
        assert main(args) == 0  # an earlier demo's files (fine-tuning run included) are replaced
    (tmp_path / "demo" / "finetune" / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="finetune/notes.txt"):
        main(args)
