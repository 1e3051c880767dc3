"""Every loss-balancing strategy in a real (tiny) training run, on the gated and the shared arch.

The unit tests of the strategies themselves are in ``tests/test_balancing.py``; this file checks
that each one works inside :class:`gatedmtl.train.Trainer` on the embedded ``scenes`` data: no
NaN, per-task losses and weights written to ``out/log.jsonl``, finite parameters afterwards. It
also pins down which parameters the trainer hands to a strategy as *shared* on the gated arch
(the whole encoder: every slot and the gates) and why (see ``gatedmtl.balancing``'s docstring).

Sizes: the fast set runs ``resnet10t`` (shared arch) and ``mobilenetv3_small_050`` (gated arch)
at 32x48 so that all 30 runs take about a minute on 2 CPU cores: a gradient-level strategy on
the gated arch takes per-task gradients of all ``T + 1`` encoder copies (resnet18: 45 M
parameters, several seconds a step on 2 CPU cores). The same runs on resnet18, both archs,
are marked ``slow`` (``make test-all``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from gatedmtl import balancing
from gatedmtl.train import TrainConfig, Trainer

TASKS = ("seg", "depth", "normals")
MODEL = {"shared": "resnet10t", "gated": "mobilenetv3_small_050"}
SLOW_MODEL = "resnet18"
# optional solver modules per strategy (torchjd imports them when the strategy is created)
SOLVERS = {"cagrad": ("cvxpy",), "nash_mtl": ("cvxpy", "ecos"), "upgrad": ("qpsolvers", "quadprog")}
# (epochs, steps per epoch): 2 steps let FAMO update its logits after a step. DWA's weights leave
# w = 1 once two epoch means are known; GradNorm is EW until the first epoch's mean losses are
# known, then learns its logits (the optimizer steps them): 3 epochs of 1 step reach both.
SCHEDULE = {"dwa": (3, 1), "gradnorm": (3, 1)}
DEFAULT_SCHEDULE = (1, 2)


def _close(a: float, b: float, tol: float = 1e-6) -> bool:
    return abs(a - b) <= tol * max(1.0, abs(b))


def _w(record: dict) -> list[float]:
    return [record["weights"][t] for t in TASKS]


# What each strategy's weights must satisfy (its docstring; gatedmtl.balancing's scale table).
WEIGHTS_OBEY = {
    "ew": lambda r, T: _w(r) == [1.0] * T,
    "si": lambda r, T: all(_close(r["weights"][t], 1.0 / r["loss"][t]) for t in TASKS),  # 1 / L_t
    "dwa": lambda r, T: _close(sum(_w(r)), T) and min(_w(r)) > 0,  # T softmax
    "gradnorm": lambda r, T: _close(sum(_w(r)), T) and min(_w(r)) > 0,  # T softmax
    "mgda": lambda r, T: _close(sum(_w(r)), T) and min(_w(r)) >= 0,  # T x simplex
    "rlw": lambda r, T: _close(sum(_w(r)), 1.0) and min(_w(r)) > 0,  # softmax
    "famo": lambda r, T: _close(sum(_w(r)), 1.0) and min(_w(r)) > 0,  # z / (c D), sums to 1
    "imtl_g": lambda r, T: _close(sum(_w(r)), 1.0),  # affine weights
    "go4align": lambda r, T: len(set(_w(r))) == 1 and _w(r)[0] > 0,  # K = 1: one centroid
    "db_mtl": lambda r, T: _close(min(_w(r)), 1.0, 1e-5) and min(_w(r)) > 0,  # max norm / norm_t
    "uw": lambda r, T: all(0 < w for w in _w(r)) and (r["step"] > 1 or _w(r) == [0.5] * T),  # e^-s / 2, s = 0
    "nash_mtl": lambda r, T: min(_w(r)) > 0,  # alpha > 0
    "upgrad": lambda r, T: min(_w(r)) >= 0 and sum(_w(r)) >= 1 - 1e-6,  # sum of v >= u = 1/T each
    "pcgrad": lambda r, T: sum(_w(r)) >= T - 1e-6,  # projections only add positive multiples
    "cagrad": lambda r, T: min(_w(r)) >= 0 and sum(_w(r)) >= T / (1 + 0.4**2) - 1e-6,  # T/(1+c^2)(1/T + lam w)
}


def _need_solvers(name: str) -> None:
    for module in SOLVERS.get(name, ()):
        pytest.importorskip(
            module,
            reason=f"balancing strategy {name!r} needs the optional solver {module!r} "
            "(pip install 'gatedmtl[solvers]')",
        )


def _config(name: str, arch: str, model: str, out: Path, **kw) -> TrainConfig:
    epochs, steps_per_epoch = SCHEDULE.get(name, DEFAULT_SCHEDULE)
    base = dict(model=model, tasks=TASKS, arch=arch, epochs=epochs, steps_per_epoch=steps_per_epoch,
                batch_size=2, train_length=8, val_length=4, image_size=(32, 48), progress=False,
                balance=name, out=str(out), seed=0)
    return TrainConfig(**(base | kw))


def _read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]


def _train_and_check(name: str, arch: str, model: str, tmp_path: Path) -> None:
    _need_solvers(name)
    out = tmp_path / f"{arch}-{name}"
    config = _config(name, arch, model, out)
    trainer = Trainer(config)
    assert trainer.gated == (arch == "gated")
    summary = trainer.fit()
    steps = config.epochs * config.steps_per_epoch
    assert summary["steps"] == steps

    records = _read_log(out)
    assert [r["step"] for r in records] == list(range(1, steps + 1)), "one log record per step"
    for r in records:
        assert set(r["loss"]) == set(TASKS), r
        assert set(r["weights"]) == set(TASKS), r
        for t in TASKS:
            assert isinstance(r["loss"][t], float) and math.isfinite(r["loss"][t]), (name, arch, r)
            assert math.isfinite(r["weights"][t]), (name, arch, r)
        if arch == "gated":
            assert math.isfinite(r["gflops"]) and 0.0 <= r["density"] <= 1.0
    # the logged weights obey the strategy's own definition at every step
    for r in records:
        assert WEIGHTS_OBEY[name](r, len(TASKS)), (name, arch, r)
    if name in SCHEDULE:  # past their warm-up, DWA / GradNorm weights move away from 1 (and sum to T)
        assert sum(records[-1]["weights"].values()) == pytest.approx(len(TASKS))
        assert records[-1]["weights"] != {t: 1.0 for t in TASKS}
    for n, p in trainer.net.named_parameters():
        assert torch.isfinite(p).all(), f"{name}/{arch}: parameter {n} is not finite"
    for p in trainer.strategy.extra_parameters():
        assert torch.isfinite(p).all()
    assert (out / "last.safetensors").exists()


@pytest.mark.parametrize("arch", ["shared", "gated"])
@pytest.mark.parametrize("name", balancing.available())
def test_short_training_every_strategy(name, arch, tmp_path):
    _train_and_check(name, arch, MODEL[arch], tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["shared", "gated"])
@pytest.mark.parametrize("name", balancing.available())
def test_short_training_every_strategy_resnet18(name, arch, tmp_path):
    _train_and_check(name, arch, SLOW_MODEL, tmp_path)


def test_every_strategy_has_a_weight_check():
    assert set(WEIGHTS_OBEY) == set(balancing.available())


def test_available_strategies_are_the_documented_ones():
    # if a strategy is added, it is trained above automatically; keep the docs in step
    doc = balancing.__doc__
    for name in balancing.available():
        assert f"``{name}``" in doc, f"{name} is not listed in gatedmtl.balancing's docstring"


# ---------------------------------------------------------------------------------------------
# the gated arch: what the trainer passes as shared parameters, and why


def _spy_on_backward(trainer: Trainer) -> list[tuple[list, list]]:
    calls: list[tuple[list, list]] = []
    real = trainer.strategy.backward

    def spy(losses, shared_params, task_params=(), **kw):
        shared_params, task_params = list(shared_params), list(task_params)
        calls.append((shared_params, task_params))
        return real(losses, shared_params, task_params, **kw)

    trainer.strategy.backward = spy
    return calls


@pytest.mark.parametrize("arch", ["gated", "shared"])
def test_trainer_passes_the_whole_encoder_as_shared_params(arch, tmp_path):
    trainer = Trainer(_config("mgda", arch, MODEL["gated"], tmp_path / arch))
    calls = _spy_on_backward(trainer)
    batch = next(iter(DataLoader(trainer.train_set, batch_size=2)))
    trainer.train_step(batch, epoch=0)
    assert len(calls) == 1
    shared, heads = calls[0]
    shared_ids, head_ids = {id(p) for p in shared}, {id(p) for p in heads}
    net = trainer.net
    assert shared_ids == {id(p) for p in net.encoder.parameters() if p.requires_grad}
    assert head_ids == {id(p) for p in net.heads.parameters()}
    assert not shared_ids & head_ids
    assert shared_ids | head_ids == {id(p) for p in net.parameters() if p.requires_grad}
    if arch == "gated":
        names = {n for n, p in net.encoder.named_parameters() if id(p) in shared_ids}
        for s in range(len(TASKS) + 1):  # the shared slot 0 and every task slot
            assert any(f".slots.{s}." in n for n in names), f"slot {s} missing from shared params"
        assert any(n.endswith(".alpha") for n in names) and any(n.endswith(".beta") for n in names)


def test_every_encoder_slot_influences_every_task(tmp_path):
    """Why the whole gated encoder counts as shared: with some gates closed, task ``u``'s branch
    feeds the shared branch through the beta mix, and the shared branch feeds task ``t`` through
    its closed gates, so ``L_t`` has a gradient in every slot (and in the gates)."""
    trainer = Trainer(_config("ew", "gated", MODEL["gated"], tmp_path))
    net = trainer.net
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for gate in net.encoder.gates():
            gate.alpha.copy_(torch.randn(gate.alpha.shape, generator=g))  # about half of them closed
            gate.beta.copy_(torch.randn(gate.beta.shape, generator=g))
    batch = next(iter(DataLoader(trainer.train_set, batch_size=2)))
    for i, task in enumerate(TASKS):
        net.zero_grad(set_to_none=True)
        losses = trainer._losses(batch)
        losses[task].backward()
        reached = {s: False for s in range(len(TASKS) + 1)}
        for n, p in net.encoder.named_parameters():
            if p.grad is None or not p.grad.abs().sum() > 0:
                continue
            for s in reached:
                if f".slots.{s}." in n:
                    reached[s] = True
        assert all(reached.values()), f"loss of {task!r} reaches only slots {reached}"
        gates = net.encoder.gates()
        assert any(gt.beta.grad is not None and gt.beta.grad.abs().sum() > 0 for gt in gates)
        other_heads = [h for t, h in net.heads.items() if t != task]
        assert all(p.grad is None or not p.grad.any() for h in other_heads for p in h.parameters())
