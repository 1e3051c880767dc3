"""Budgets, projection, trainer, checkpoints, exact resume, data parallel and bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import warnings
import textwrap
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file
from torch.utils.data import Dataset

import gatedmtl
from gatedmtl.verify import relative_error
from gatedmtl.budget import BudgetError, project_to_budget, resolve_budget
from gatedmtl.checkpoint import CheckpointError, load_checkpoint, load_weights
from gatedmtl.train import NonFiniteLossError, TrainConfig, Trainer, load_network, prune_checkpoint

T = ("seg", "depth", "normals")
TINY = dict(model="resnet18", epochs=2, steps_per_epoch=3, batch_size=2, train_length=16, val_length=4,
            image_size=(32, 48), progress=False)


def _random_gates(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in model.gates():
            gate.alpha.copy_(torch.randn(gate.alpha.shape, generator=g))


@pytest.mark.parametrize("name,kw,size", [
    ("resnet18", {}, (3, 64, 64)),
    ("hrnet_w18_small_v2", {"features_only": True}, (3, 64, 64)),
])
@pytest.mark.parametrize("budget", [0.3, 0.5, 0.7])
def test_projection_lands_on_budget(name, kw, size, budget):
    model = gatedmtl.convert(timm.create_model(name, pretrained=False, **kw), T, input_size=size)
    _random_gates(model)
    target = resolve_budget(model, budget, (1, *size))
    predicted = project_to_budget(model, target, (1, *size))
    landed = gatedmtl.count_flops(gatedmtl.prune(model.eval()), (1, *size))
    assert predicted == landed or abs(predicted - landed) <= 0.005 * landed
    assert abs(landed / target - 1) <= 0.01, (landed, target)
    assert landed <= target * 1.0001


def test_projection_with_gate_groups_lands_on_budget():
    size = (3, 64, 64)
    model = gatedmtl.convert(timm.create_model("resnet18", pretrained=False), T, input_size=size, gate_group=16)
    _random_gates(model)
    target = resolve_budget(model, 0.5, (1, *size))
    predicted = project_to_budget(model, target, (1, *size))
    landed = gatedmtl.count_flops(gatedmtl.prune(model.eval()), (1, *size))
    assert predicted == landed
    assert abs(landed / target - 1) <= 0.01 and landed <= target * 1.0001, (landed, target)
    layers = [layer for _, layer in gatedmtl.prune(model.eval()).lean_layers() if layer.channels % 16 == 0]
    assert layers and all(k % 16 == 0 for layer in layers for k in layer.kept)  # (the 1000-way fc is not)


def test_projection_keeps_gates_already_within_tolerance():
    size = (3, 32, 32)
    model = gatedmtl.convert(timm.create_model("resnet18", pretrained=False), T, input_size=size)
    _random_gates(model)
    current = gatedmtl.predict_flops(model, (1, *size))
    alphas = [g.alpha.detach().clone() for g in model.gates()]
    assert project_to_budget(model, current / 0.995, (1, *size)) == current  # 0.5 % below: nothing opened
    assert all(torch.equal(a, g.alpha) for a, g in zip(alphas, model.gates()))
    opened = project_to_budget(model, current / 0.95, (1, *size), tolerance=0.0)  # 5 % below, no tolerance: opened
    assert current < opened <= current / 0.95
    with pytest.raises(ValueError, match="tolerance"):
        project_to_budget(model, current, (1, *size), tolerance=1.5)


def test_two_sided_sparsity_pulls_a_cheap_model_up_to_the_budget():
    size = (3, 32, 32)
    model = gatedmtl.convert(timm.create_model("resnet18", pretrained=False), T, input_size=size, init_logit=-0.5)
    low, _ = gatedmtl.flop_bounds(model, (1, *size))
    target = resolve_budget(model, 0.5, (1, *size))
    hinge = gatedmtl.budget.sparsity_loss(model, target, (1, *size))
    assert hinge.item() == 0.0  # below the budget: the hinge is silent
    loss = gatedmtl.budget.sparsity_loss(model, target, (1, *size), two_sided=True)
    assert loss.item() == pytest.approx(1 - low / target, rel=1e-6)
    loss.backward()
    assert all(bool((g.alpha.grad <= 0).all()) for g in model.gates())  # descent raises the logits: gates open
    assert sum(float(g.alpha.grad.sum()) for g in model.gates()) < 0


def test_finalize_warns_when_training_ended_far_from_the_budget(tmp_path):
    from gatedmtl.train import ProjectionWarning, finalize

    trainer = Trainer(TrainConfig(**TINY, out=str(tmp_path / "run")))
    size = trainer.input_size
    target = resolve_budget(trainer.net.encoder, 0.5, (1, *size))
    with pytest.warns(ProjectionWarning, match=r"changed \d+ of \d+ gates"):  # every gate open: far above
        _, report = finalize(trainer.net, target, size)
    assert report["changed_gates"] > 0 and report["gates"] == sum(g.alpha.numel() for g in trainer.net.encoder.gates())
    with warnings.catch_warnings():
        warnings.simplefilter("error", ProjectionWarning)  # now on the budget: silent, nothing changes
        _, again = finalize(trainer.net, target, size)
    assert again["changed_gates"] == 0


def test_projection_opens_gates_when_below_budget():
    model = gatedmtl.convert(timm.create_model("resnet18", pretrained=False), T, input_size=(3, 32, 32))
    with torch.no_grad():
        for gate in model.gates():
            gate.alpha.fill_(-1.0)
    target = resolve_budget(model, 0.5, (1, 3, 32, 32))
    project_to_budget(model, target, (1, 3, 32, 32))
    landed = gatedmtl.count_flops(gatedmtl.prune(model.eval()), (1, 3, 32, 32))
    assert abs(landed / target - 1) <= 0.01


def test_budget_parsing_and_infeasible_budgets():
    model = gatedmtl.convert(timm.create_model("resnet18", pretrained=False), T, input_size=(3, 32, 32))
    low, high = gatedmtl.flop_bounds(model, (1, 3, 32, 32))
    assert resolve_budget(model, f"{(low + high) / 2e9:.6f}GF", (1, 3, 32, 32)) == pytest.approx((low + high) / 2, rel=1e-5)
    assert resolve_budget(model, "0.5", (1, 3, 32, 32)) == resolve_budget(model, 0.5, (1, 3, 32, 32))
    with pytest.raises(BudgetError, match=r"between .* GFLOPs .* and .* GFLOPs"):
        resolve_budget(model, 0.9, (1, 3, 32, 32))  # above all-open (T of the T+1 branches)
    with pytest.raises(BudgetError, match="infeasible"):
        resolve_budget(model, f"{low / 2e9}GF", (1, 3, 32, 32))
    for bad in (0, -0.5, 1.5, "0", "fast"):
        with pytest.raises(ValueError):
            resolve_budget(model, bad, (1, 3, 32, 32))


def test_sparsity_loss_closes_gates():
    model = gatedmtl.convert(timm.create_model("resnet18", pretrained=False), T, input_size=(3, 32, 32))
    target = resolve_budget(model, 0.4, (1, 3, 32, 32))
    opt = torch.optim.Adam([g.alpha for g in model.gates()], lr=0.1)
    start = gatedmtl.predict_flops(model, (1, 3, 32, 32))
    for _ in range(30):
        opt.zero_grad()
        gatedmtl.budget.sparsity_loss(model, target, (1, 3, 32, 32)).backward()
        opt.step()
    end = gatedmtl.predict_flops(model, (1, 3, 32, 32))
    assert end < start and end <= target * 1.05


@pytest.mark.parametrize("gate_group", [1, 8])
def test_train_logs_checkpoints_and_prunes(tmp_path, gate_group):
    out = tmp_path / "run"
    trainer = Trainer(TrainConfig(**TINY, gate_group=gate_group, out=str(out)))
    summary = trainer.fit()
    assert summary["steps"] == 6
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 7))
    assert set(lines[0]["loss"]) == set(T) and 0 < lines[-1]["density"] <= 1 and lines[-1]["gflops"] > 0
    tensors, meta = load_checkpoint(out / "last.safetensors")
    assert meta["step"] == 6 and meta["config"]["model"] == "resnet18"
    assert json.loads((out / "last.json").read_text())["step"] == 6
    report = prune_checkpoint(out / "last.safetensors", out / "lean.safetensors")
    assert abs(report["error"]) <= 0.01
    lean, lean_meta = load_network(out / "lean.safetensors")
    gated, _ = load_network(out / "last.safetensors")
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        # the lean network equals the gated network after projection
        resolve = resolve_budget(gated.encoder, "0.5", (1, 3, 32, 48))
        project_to_budget(gated.encoder, resolve, (1, 3, 32, 48))
        a, b = gated.eval()(x), lean(x)
    assert all(relative_error(b[t], a[t]) < 1e-4 for t in T)
    metrics = trainer.evaluate(lean)
    assert set(metrics) == set(T) and "miou" in metrics["seg"]
    assert all(g.group == gate_group for g in gated.encoder.gates())


def test_refuses_to_overwrite_and_checks_resume_settings(tmp_path):
    out = tmp_path / "run"
    Trainer(TrainConfig(**TINY, out=str(out))).fit()
    with pytest.raises(FileExistsError, match="--resume"):
        Trainer(TrainConfig(**TINY, out=str(out)))
    with pytest.raises(CheckpointError, match="tasks"):
        Trainer(TrainConfig(**(TINY | {"model": "resnet18"}), tasks=("seg", "depth"), out=str(out)), resume=True)


_KILLED_RUN = textwrap.dedent("""
    import os, signal, sys
    from gatedmtl.train import TrainConfig, Trainer
    cfg = TrainConfig(**{cfg}, out=sys.argv[1])
    trainer = Trainer(cfg)
    def kill(record):
        if record["step"] == 5:
            os.kill(os.getpid(), signal.SIGKILL)
    trainer.on_step = kill
    trainer.fit()
""")


@pytest.mark.parametrize("balance", ["ew", "go4align"])
def test_exact_resume_after_sigkill(tmp_path, balance):
    cfg = TINY | {"epochs": 3, "steps_per_epoch": 3, "save_every": 2, "balance": balance, "lr": 1e-2}
    ref = Trainer(TrainConfig(**cfg, out=str(tmp_path / "ref")))
    ref.fit()
    killed = tmp_path / "killed"
    script = _KILLED_RUN.replace("{cfg}", repr(cfg))
    proc = subprocess.run([sys.executable, "-c", script, str(killed)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert load_checkpoint(killed / "last.safetensors")[1]["step"] == 4  # mid-epoch (epoch 1, step 1 of 3)
    resumed = Trainer(TrainConfig(**cfg, out=str(killed)), resume=True)
    assert resumed.step == 4
    resumed.fit()
    a, b = ref.net.state_dict(), resumed.net.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


class _PoisonedScenes(Dataset):
    """Scenes whose depth targets become 3e38 from sample ``start`` on: valid, finite, and a loss that overflows
    to inf (NaN or inf targets would be masked out as invalid pixels)."""

    def __init__(self, base, start):
        self.base, self.start, self.tasks = base, start, base.tasks

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        item = dict(self.base[i])
        if self.start is not None:
            item["depth"] = torch.full_like(item["depth"], 3e38)
        return item


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    from gatedmtl.train import make_datasets

    cfg = TrainConfig(**TINY, out=str(tmp_path / "run"))
    train, val = make_datasets(cfg)
    Trainer(cfg, datasets=(train, val)).fit()
    before = (tmp_path / "run" / "last.safetensors").read_bytes()
    cfg.epochs = 4
    trainer = Trainer(cfg, resume=True, datasets=(_PoisonedScenes(train, 0), val))
    with pytest.raises(NonFiniteLossError, match="task 'depth'"):
        trainer.fit()
    assert (tmp_path / "run" / "last.safetensors").read_bytes() == before


def test_corrupted_truncated_and_pickled_checkpoints(tmp_path):
    out = tmp_path / "run"
    Trainer(TrainConfig(**(TINY | {"epochs": 1}), out=str(out))).fit()
    data = (out / "last.safetensors").read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        load_network(tmp_path / "trunc.safetensors")
    with pytest.raises(FileNotFoundError):
        load_network(tmp_path / "missing.safetensors")

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"weight": torch.zeros(1), "obj": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refuses"):
        load_weights(tmp_path / "evil.pt")
    torch.save(timm.create_model("resnet18", pretrained=False, features_only=True).state_dict(), tmp_path / "ok.pt")
    assert "conv1.weight" in load_weights(tmp_path / "ok.pt")


def test_backbone_checkpoint_is_loaded(tmp_path):
    backbone = timm.create_model("resnet18", pretrained=False, features_only=True)
    torch.save({"state_dict": backbone.state_dict()}, tmp_path / "bb.pt")
    trainer = Trainer(TrainConfig(**TINY, out=str(tmp_path / "run"), checkpoint=str(tmp_path / "bb.pt")))
    slot = trainer.net.encoder.backbone.conv1.slots[2]
    assert torch.equal(slot.weight, backbone.conv1.weight)
    torch.save({"other.weight": torch.zeros(3)}, tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match="holds no weights"):
        Trainer(TrainConfig(**TINY, out=str(tmp_path / "run2"), checkpoint=str(tmp_path / "wrong.pt")))


@pytest.mark.parametrize("change,match", [
    ({"model": "resnet_does_not_exist"}, "unknown model"),
    ({"tasks": ("seg", "flow")}, "flow"),
    ({"budget": "0"}, "budget"),
    ({"budget": "0.95"}, "infeasible"),
    ({"arch": "mixed"}, "arch"),
    ({"balance": "nope"}, "nope"),
    ({"data": "nyuv2", "data_root": "/nonexistent/nyu"}, "nyu"),
])
def test_bad_settings_are_clear(tmp_path, change, match):
    with pytest.raises((ValueError, TypeError, FileNotFoundError), match=match):
        Trainer(TrainConfig(**(TINY | change), out=str(tmp_path / "run")))
    assert not (tmp_path / "run" / "last.safetensors").exists()


def test_shared_arch_trains(tmp_path):
    trainer = Trainer(TrainConfig(**TINY, arch="shared", out=str(tmp_path / "run")))
    trainer.fit()
    assert not trainer.gated and (tmp_path / "run" / "last.safetensors").exists()


def test_cli_train_prune_export(tmp_path):
    out = tmp_path / "run"
    common = [sys.executable, "-m", "gatedmtl.cli"]
    run = subprocess.run(common + ["train", "--model", "resnet18", "--epochs", "1", "--steps-per-epoch", "2",
                                   "--batch-size", "2", "--image-size", "32x48", "--train-length", "8",
                                   "--out", str(out), "--no-progress"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "budget: requested" in run.stdout
    run = subprocess.run(common + ["prune", str(out / "last.safetensors"), "--out", str(out / "lean.safetensors")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "lean model" in run.stdout, run.stderr[-3000:]
    run = subprocess.run(common + ["export", str(out / "last.safetensors"), "--out", str(out / "m.onnx")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "prune" in (run.stdout + run.stderr)
    run = subprocess.run(common + ["export", str(out / "lean.safetensors"), "--out", str(out / "m.onnx")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (out / "m.onnx").exists()
    run = subprocess.run(common + ["train", "--balance", "list"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "db_mtl" in run.stdout and "go4align" in run.stdout


def test_gate_parameters_are_selected_by_type_not_by_name(tmp_path):
    from gatedmtl.gates import ChannelGate

    trainer = Trainer(TrainConfig(**(TINY | {"model": "resnet10t"}), out=str(tmp_path / "run")))
    head = next(iter(trainer.net.heads.values()))
    head.register_parameter("beta", torch.nn.Parameter(torch.zeros(3)))  # a backbone-style name
    head.register_parameter("alpha", torch.nn.Parameter(torch.zeros(3)))
    groups = trainer._make_optimizer().param_groups
    by_id = {id(p): g for g in groups for p in g["params"]}
    assert by_id[id(head.beta)]["lr"] == trainer.config.lr and by_id[id(head.alpha)]["lr"] == trainer.config.lr
    gates = [p for m in trainer.net.modules() if isinstance(m, ChannelGate) for p in m.parameters()]
    assert gates and all(by_id[id(p)]["lr"] == trainer.config.gate_lr for p in gates)
    assert sum(len(g["params"]) for g in groups) == len(list(trainer.net.parameters()))


@pytest.mark.parametrize("options,lr", [({}, 0.025), ({"lr": 0.1}, 0.1)])
def test_uw_log_variances_train_at_their_own_learning_rate(tmp_path, options, lr):
    cfg = TINY | {"model": "resnet10t", "arch": "shared", "budget": None, "balance": "uw",
                  "balance_options": options, "schedule": "constant"}
    trainer = Trainer(TrainConfig(**cfg, out=str(tmp_path / "run")))
    (log_vars,) = trainer.strategy.extra_parameters()
    group = next(g for g in trainer.optimizer.param_groups if any(p is log_vars for p in g["params"]))
    assert group["lr"] == lr and group["weight_decay"] == 0.0 and len(group["params"]) == 1
    before = log_vars.detach().clone()
    batch = next(iter(torch.utils.data.DataLoader(trainer.train_set, batch_size=2)))
    trainer.train_step(batch, epoch=0)
    # AdamW's first step moves every coordinate by lr (m / sqrt(v) = sign of the gradient)
    assert torch.allclose((log_vars.detach() - before).abs(), torch.full((3,), lr), rtol=1e-4)


def test_freeze_bn_keeps_running_statistics(tmp_path):
    trainer = Trainer(TrainConfig(**(TINY | {"model": "resnet10t", "freeze_bn": True}), out=str(tmp_path / "run")))
    buffers = {k: v.clone() for k, v in trainer.net.state_dict().items() if "running_" in k}
    batch = next(iter(torch.utils.data.DataLoader(trainer.train_set, batch_size=2)))
    trainer.train_step(batch, epoch=0)
    state = trainer.net.state_dict()
    assert buffers and all(torch.equal(v, state[k]) for k, v in buffers.items())
    moving = Trainer(TrainConfig(**(TINY | {"model": "resnet10t"}), out=str(tmp_path / "run2")))
    moving.train_step(batch, epoch=0)
    assert not all(torch.equal(v, moving.net.state_dict()[k]) for k, v in buffers.items())


def test_unreached_parameters_lists_what_ddp_must_look_for():
    from gatedmtl.parallel import unreached_parameters

    net = torch.nn.ModuleDict({"used": torch.nn.Linear(3, 2), "unused": torch.nn.Linear(3, 2)})

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.parts = net

        def forward(self, x):
            return {"out": self.parts["used"](x)}

    assert unreached_parameters(Net(), torch.zeros(1, 3)) == ["parts.unused.weight", "parts.unused.bias"]


# -------------------------------------------------------------------- data parallel
REPO = Path(__file__).resolve().parents[1]
DDP_BASE = dict(model="lcnet_035", arch="gated", epochs=1, steps_per_epoch=2, batch_size=2,
                train_length=8, val_length=2, image_size=[32, 48])
# the 1-process equivalence needs every per-sample computation to be the same: BatchNorm in
# eval mode (freeze_bn), plain SGD (Adam turns rounding noise in a near-zero gradient into a
# full step), every pixel valid (a masked mean weights each rank's batch equally)
EXACT = dict(freeze_bn=True, optimizer="sgd", lr=0.05)


def _torchrun(tmp_path: Path, runs: list[dict], nproc: int = 2, check: bool = True) -> subprocess.CompletedProcess:
    spec = tmp_path / "runs.json"
    spec.write_text(json.dumps({"root": str(tmp_path), "runs": runs}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           str(REPO / "tests" / "ddp_worker.py"), str(spec)]
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    if check:
        assert run.returncode == 0, run.stderr[-4000:]
    return run


def _fork_ranks(tmp_path: Path, runs: list[dict], nproc: int = 2) -> None:
    """The ranks as forked processes joined through a file store: no interpreter start-up
    (torchrun's processes import torch, timm and gatedmtl again, several seconds each)."""
    import multiprocessing

    sys.path.insert(0, str(REPO / "tests"))
    try:
        from ddp_worker import forked_rank
    finally:
        sys.path.remove(str(REPO / "tests"))
    ctx = multiprocessing.get_context("fork")
    spec = {"root": str(tmp_path), "runs": runs}
    procs = [ctx.Process(target=forked_rank, args=(r, nproc, str(tmp_path / "store"), spec)) for r in range(nproc)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive and all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]


def _rank_states(tmp_path: Path, name: str, nproc: int = 2) -> list[dict[str, torch.Tensor]]:
    return [load_file(tmp_path / name / f"rank{r}.safetensors") for r in range(nproc)]


def _assert_ranks_identical(states: list[dict[str, torch.Tensor]], name: str) -> None:
    ref = states[0]
    assert any(k.startswith("model.") and k.endswith("running_mean") for k in ref), "no buffers compared"
    for other in states[1:]:
        assert other.keys() == ref.keys(), name
        for k in ref:
            assert ref[k].dtype == other[k].dtype and torch.equal(ref[k], other[k]), f"{name}: {k} differs between ranks"


def _assert_equals_one_process(tmp_path: Path, run: dict, two: dict[str, torch.Tensor], nproc: int = 2,
                               rtol: float = 1e-5) -> None:
    """The same training in this process on the global batch (``nproc`` x the per-rank batch), to ``rtol``
    of each tensor's largest entry."""
    sys.path.insert(0, str(REPO / "tests"))
    try:
        from ddp_worker import datasets_for, rank_state
    finally:
        sys.path.remove(str(REPO / "tests"))
    config = TrainConfig(**(run["config"] | {"batch_size": run["config"]["batch_size"] * nproc, "progress": False,
                                             "out": str(tmp_path / f"{run['name']}-one")}))
    trainer = Trainer(config, datasets=datasets_for(config, run.get("valid_everywhere", False)))
    trainer.fit()
    one = rank_state(trainer)
    assert one.keys() == two.keys()
    moved = 0
    for k, a in one.items():
        b = two[k]
        if not a.is_floating_point():
            assert torch.equal(a, b), f"{run['name']}: {k}"
            continue
        scale = float(a.abs().max()) if a.numel() else 0.0
        diff = float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
        assert diff <= rtol * scale + 1e-9, f"{run['name']}: {k} is {diff:.3g} off (scale {scale:.3g})"
        moved += k.startswith("optim.")
    assert moved > 0  # the optimizer state was compared too


@pytest.mark.skipif(sys.platform != "linux", reason="forked ranks")
def test_two_process_ranks_are_bit_identical_and_equal_one_process(tmp_path):
    """2 ranks (gloo, CPU), BatchNorm training: EW through DDP (gated arch, with the sparsity
    hinge) and DB-MTL (gradient level, stateful: the EMA of the global Jacobian) end with every
    parameter, buffer, optimizer and strategy tensor bit-identical on both ranks; DB-MTL with
    the 1-process premises (EXACT) equals the 1-process run on the global batch."""
    shared = DDP_BASE | {"arch": "shared", "budget": None}
    runs = [
        {"name": "ew", "config": DDP_BASE | {"balance": "ew"}},
        {"name": "db_mtl-bn", "config": shared | {"balance": "db_mtl"}},
        {"name": "db_mtl", "config": shared | EXACT | {"balance": "db_mtl"}, "valid_everywhere": True},
    ]
    _fork_ranks(tmp_path, runs)
    for run in runs:
        _assert_ranks_identical(_rank_states(tmp_path, run["name"]), run["name"])
    first = _rank_states(tmp_path, "ew")[0]
    assert load_checkpoint(tmp_path / "ew" / "last.safetensors")[1]["world"] == 2
    initial = Trainer(TrainConfig(**(DDP_BASE | {"balance": "ew", "progress": False, "out": str(tmp_path / "init")})))
    bn = next(k for k in first if k.endswith("running_mean"))
    assert not torch.equal(first[bn], initial.net.state_dict()[bn[len("model."):]])  # the statistics moved
    assert "strategy.grad_buffer" in _rank_states(tmp_path, "db_mtl")[0]
    _assert_equals_one_process(tmp_path, runs[2], _rank_states(tmp_path, "db_mtl")[0])


STATEFUL_DDP = ["uw", "dwa", "famo", "go4align", "gradnorm", "rlw", "pcgrad", "nash_mtl", "mgda", "si", "imtl_g"]
# The all-reduced sum rounds differently from one process's sum (another summation order); after
# two SGD steps the runs differ by up to 2.7e-5 of a tensor's largest entry (EW on the shared arch,
# PCGrad, IMTL-G; the same with and without tied gates), and by up to 1e-3 where a solver stops at
# its own tolerance on gradients that differ in their last bits (Nash-MTL 3.1e-4, MGDA 9.8e-4).
# A wrong weight or a missed all-reduce would be off by percents.
ONE_PROCESS_RTOL = {"nash_mtl": 3e-3, "mgda": 3e-3}


@pytest.mark.slow
def test_two_process_every_strategy_state_and_one_process_equivalence(tmp_path):
    """Every strategy with state or loss-dependent weights: the ranks end bit-identical (with
    BatchNorm training), and, with the 1-process premises (EXACT), equal the 1-process run."""
    pytest.importorskip("cvxpy")
    runs = []
    for name in STATEFUL_DDP:
        schedule = {"epochs": 3} if name in ("dwa", "gradnorm") else {}
        runs.append({"name": f"{name}-bn", "config": DDP_BASE | schedule | {"balance": name}})
        runs.append({"name": name, "config": DDP_BASE | EXACT | schedule | {"balance": name},
                     "valid_everywhere": True})
    runs.append({"name": "ew-shared", "config": DDP_BASE | EXACT | {"balance": "ew", "arch": "shared", "budget": None},
                 "valid_everywhere": True})
    _torchrun(tmp_path, runs)
    for run in runs:
        states = _rank_states(tmp_path, run["name"])
        _assert_ranks_identical(states, run["name"])
        if run.get("valid_everywhere"):
            _assert_equals_one_process(tmp_path, run, states[0], rtol=ONE_PROCESS_RTOL.get(run["name"], 1e-4))
    # an existing run: every rank refuses (none is left waiting for the others)
    again = _torchrun(tmp_path, runs[:1], check=False)
    assert again.returncode != 0 and again.stderr.count("already holds a run") >= 2, again.stderr[-3000:]


@pytest.mark.slow
def test_two_process_cli_train(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "gatedmtl.cli", "train", "--model", "resnet18", "--epochs", "1", "--steps-per-epoch", "3",
           "--batch-size", "2", "--image-size", "32x48", "--train-length", "16", "--budget", "none",
           "--out", str(out), "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert load_checkpoint(out / "last.safetensors")[1]["world"] == 2
