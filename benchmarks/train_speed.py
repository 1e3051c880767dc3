"""Training step time of the folded gated model vs the summed steps of T+1 plain backbones.

Writes ``benchmarks/results/train_speed.md`` and ``.csv``. Usage::

    python benchmarks/train_speed.py [--models resnet18,hrnet_w18_small_v2] [--batch 8] [--size 128]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import timm
import torch

import gatedmtl
from _report import write_table
from gatedmtl.slots import SlotModule
from gatedmtl.verify import set_gates

TASKS = ("seg", "depth", "normals")


def _loss(out) -> torch.Tensor:
    feats = out if isinstance(out, (list, tuple)) else [out]
    return sum(f.float().square().mean() for f in feats)


def step_time(model: torch.nn.Module, x: torch.Tensor, gated: bool, runs: int, warmup: int = 2) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    times = []
    for i in range(warmup + runs):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        out = model(x)
        loss = sum(_loss(o) for o in out.values()) if gated else _loss(out)
        loss.backward()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--models", default="resnet18,hrnet_w18_small_v2,mobilenetv3_large_100")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    a = p.parse_args()
    torch.manual_seed(0)
    rows = []
    for name in a.models.split(","):
        backbone = timm.create_model(name, pretrained=False, features_only=True).train()
        x = torch.randn(a.batch, 3, a.size, a.size)
        plain = step_time(backbone, x, False, a.runs)
        model = gatedmtl.convert(backbone, TASKS, input_size=(3, a.size, a.size)).train()
        set_gates(model, 0.5)
        gated = step_time(model, x, True, a.runs)
        # the same folded model with its gates taken out: what the folding alone costs
        gates = {}
        for m in model.modules():
            if isinstance(m, SlotModule) and m.gate is not None:
                gates[m] = m.gate
                m.gate = None
        folded = step_time(model, x, True, a.runs)
        for m, g in gates.items():
            m.gate = g
        summed = (len(TASKS) + 1) * plain
        rows.append({"model": name, "batch": a.batch, "size": a.size, "plain_step_s": f"{plain:.3f}",
                     "folded, no gates_step_s": f"{folded:.3f}", "gated_step_s": f"{gated:.3f}",
                     "folded / (T+1) plain": f"{folded / summed:.2f}",
                     "gated / (T+1) plain": f"{gated / summed:.2f}"})
        print(rows[-1], flush=True)
    notes = (f"T = {len(TASKS)}, SGD step (forward + backward + update), median of {a.runs} after warm-up, "
             f"{torch.get_num_threads()} CPU threads, torch {torch.__version__}. Target: gated / (T+1) plain ≤ 1.10. "
             "'folded, no gates' is the same folded model with every gate taken out (per-slot modules, "
             "concatenated outputs, no mixing): the difference to 'gated' is the cost of the gate mixing.")
    print(write_table("train_speed", "Training step: folded gated model vs T+1 plain backbones", notes, rows, out=a.out))

if __name__ == "__main__":
    main()
