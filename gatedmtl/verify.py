"""Check that a backbone converts and prunes exactly: ``gatedmtl verify --model NAME``."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .cost import measure_flops, predict_flops
from .prune import prune
from .slots import SlotModule, iter_tensors
from .surgery import GatedModel, convert

__all__ = ["relative_error", "set_gates", "perturb_slots", "verify", "VerifyReport", "GATE_PATTERNS", "LIMITS"]

GATE_PATTERNS: tuple[str | float, ...] = ("open", "closed", 0.1, 0.5, 0.9)
LIMITS = {"convert": 1e-5, "prune": 1e-4, "flops": 0.005}
"""Largest relative errors that :attr:`VerifyReport.ok` accepts (convert / prune parity, FLOP prediction)."""


def relative_error(a: Any, b: Any) -> float:
    """Largest scale-aware error ``max|a-b| / max|b|`` over matching tensors of two outputs."""
    ta, tb = list(iter_tensors(a)), list(iter_tensors(b))
    if len(ta) != len(tb):
        raise ValueError(f"outputs differ in structure: {len(ta)} vs {len(tb)} tensors")
    worst = 0.0
    for x, y in zip(ta, tb):
        if x.shape != y.shape:
            raise ValueError(f"output shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
        scale = y.detach().abs().max().clamp_min(1e-6)
        worst = max(worst, float((x.detach() - y.detach()).abs().max() / scale))
    return worst


@torch.no_grad()
def set_gates(model: GatedModel, pattern: str | float, generator: torch.Generator | None = None) -> None:
    """Set every gate: ``"open"``, ``"closed"`` or a fraction of open channels (random), with random ``beta``.

    A fraction opens each group with that probability; with the prefix structure each task
    keeps a leading run of ``Binomial(groups, fraction)`` groups instead (the same expected share).
    """
    for gate in model.gates():
        if pattern == "open":
            gate.alpha.fill_(1.0)
        elif pattern == "closed":
            gate.alpha.fill_(-1.0)
        elif gate.structure == "prefix":
            tasks, groups = gate.alpha.shape
            kept = torch.binomial(torch.full((tasks, 1), float(groups)), torch.full((tasks, 1), float(pattern)),
                                  generator=generator)
            gate.alpha.copy_(torch.where(torch.arange(groups)[None] < kept, 1.0, -1.0))
        else:
            u = torch.rand(gate.alpha.shape, generator=generator)
            gate.alpha.copy_(torch.where(u < float(pattern), 1.0, -1.0))
        gate.beta.copy_(torch.randn(gate.beta.shape, generator=generator))


@torch.no_grad()
def perturb_slots(model: nn.Module, scale: float = 0.05, generator: torch.Generator | None = None) -> None:
    """Make the slots differ: add relative noise to every floating parameter and running stat."""
    for module in model.modules():
        if isinstance(module, SlotModule):
            for slot in module.slots:
                for t in list(slot.parameters()) + [b for b in slot.buffers() if b.is_floating_point()]:
                    noise = torch.randn(t.shape, generator=generator).to(t)
                    t.add_(scale * noise * t.abs().mean().clamp_min(1e-3))


@dataclass
class VerifyReport:
    """Worst errors found by :func:`verify` (all relative, scale-aware)."""

    gates: int
    convert_error: float
    prune_error: dict[str, float] = field(default_factory=dict)
    flops_backbone: int = 0
    flops_predicted: dict[str, int] = field(default_factory=dict)
    flops_lean: dict[str, int] = field(default_factory=dict)
    uncounted: dict[str, int] = field(default_factory=dict)  # aten op -> most calls fvcore did not count in one model
    uncounted_compute: dict[str, int] = field(default_factory=dict)  # of those: real compute (not NOT_COUNTED)
    shared_modules: dict[str, str] = field(default_factory=dict)  # kept as one copy for every slot -> why
    seconds: float = 0.0

    @property
    def worst_prune_error(self) -> float:
        return max(self.prune_error.values(), default=0.0)

    @property
    def worst_flop_error(self) -> float:
        return max((abs(self.flops_predicted[k] - v) / max(v, 1) for k, v in self.flops_lean.items()), default=0.0)

    def problems(self) -> list[str]:
        """Why the check failed, one line each (empty when it passed)."""
        out = []
        if self.convert_error > LIMITS["convert"]:
            out.append(f"convert error {self.convert_error:.2e} > {LIMITS['convert']:g}")
        if self.worst_prune_error > LIMITS["prune"]:
            out.append(f"prune error {self.worst_prune_error:.2e} > {LIMITS['prune']:g}")
        if self.worst_flop_error > LIMITS["flops"]:
            out.append(f"FLOP prediction off by {self.worst_flop_error:.2%} > {LIMITS['flops']:.1%}")
        if self.uncounted_compute:
            ops = ", ".join(f"{op} x{n}" for op, n in self.uncounted_compute.items())
            out.append(f"fvcore did not count real compute: {ops} (FLOPs are incomplete)")
        return out

    @property
    def ok(self) -> bool:
        """Exact conversion, exact pruning, exact FLOP prediction, and every compute op counted."""
        return not self.problems()

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"worst_prune_error": self.worst_prune_error, "worst_flop_error": self.worst_flop_error,
                               "ok": self.ok, "problems": self.problems()}

    def table(self, name: str = "model") -> str:
        """Markdown: one row per gate pattern (prune parity, predicted vs fvcore FLOPs of the lean model)."""
        lines = [f"## verify {name}: {self.gates} gated layers, convert error {self.convert_error:.2e} "
                 f"({self.seconds:.1f} s)", "",
                 "FLOPs: fvcore multiply-adds per image.", "",
                 "| gate pattern | lean vs gated rel. error | predicted GFLOPs | lean GFLOPs (fvcore) | FLOP error |",
                 "|---|---:|---:|---:|---:|"]
        for key, err in self.prune_error.items():
            pred, lean = self.flops_predicted.get(key), self.flops_lean.get(key)
            flop = (f"{pred / 1e9:.4f} | {lean / 1e9:.4f} | {abs(pred - lean) / max(lean, 1):.2%}"
                    if pred is not None and lean is not None else "- | - | -")
            lines.append(f"| {key} | {err:.2e} | {flop} |")
        if self.flops_backbone:
            lines += ["", f"plain backbone: {self.flops_backbone / 1e9:.4f} GFLOPs"]
        return "\n".join(lines)


def verify(backbone: nn.Module, tasks: Sequence[str] = ("a", "b", "c"), input_size: tuple[int, ...] | None = None,
           patterns: Sequence[str | float] = GATE_PATTERNS, batch: int = 2, seed: int = 0,
           flops: bool = True, mix: str = "soft", tie_depthwise: bool = False,
           tie_residual: bool = False, skip_depthwise_mix: bool = False,
           gate_structure: str = "free") -> VerifyReport:
    """Convert ``backbone``, then measure convert parity, prune parity and FLOP prediction.

    Convert parity: every task output vs ``backbone(x)`` with random gates. Prune parity and
    FLOPs: with perturbed slots, for each gate pattern, ``prune(model)(x)`` vs ``model(x)``
    and ``predict_flops`` vs fvcore on the lean model. ``uncounted_compute`` collects the ops
    that do real compute and that fvcore did not count, in the backbone and the lean models;
    any makes :attr:`VerifyReport.ok` false.

    ``input_size`` is the backbone's per-sample ``(C, H, W)`` as :func:`gatedmtl.convert` takes it,
    ``mix`` its shared-slot mix (``"soft"`` or ``"hard"``), ``tie_depthwise``, ``tie_residual``,
    ``skip_depthwise_mix`` and ``gate_structure`` as in :func:`gatedmtl.convert`.
    """
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    backbone = backbone.eval()
    model = convert(backbone, tasks, input_size=input_size, mix=mix, tie_depthwise=tie_depthwise,
                    tie_residual=tie_residual, skip_depthwise_mix=skip_depthwise_mix,
                    gate_structure=gate_structure).eval()
    size = model.input_size
    x = torch.randn((batch, *size), generator=gen)
    set_gates(model, 0.5, gen)
    with torch.no_grad():
        ref = backbone(x)
        out = model(x)
    report = VerifyReport(gates=len(model.gate_names),
                          convert_error=max(relative_error(out[t], ref) for t in model.tasks),
                          shared_modules=dict(model.shared_modules))

    def count(m: nn.Module) -> int:
        measured = measure_flops(m, (1, *size))
        for op, n in measured.uncounted.items():
            report.uncounted[op] = max(report.uncounted.get(op, 0), n)
        for op, n in measured.uncounted_compute.items():
            report.uncounted_compute[op] = max(report.uncounted_compute.get(op, 0), n)
        return measured.total

    if flops:
        report.flops_backbone = count(backbone)
    perturb_slots(model, generator=gen)
    for pattern in patterns:
        set_gates(model, pattern, gen)
        lean = prune(model).eval()
        with torch.no_grad():
            a, b = model(x), lean(x)
        key = str(pattern)
        report.prune_error[key] = max(relative_error(b[t], a[t]) for t in model.tasks)
        if flops:
            report.flops_predicted[key] = predict_flops(model, (1, *size))
            report.flops_lean[key] = count(lean)
    report.seconds = time.perf_counter() - start
    return report

