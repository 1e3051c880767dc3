"""One rank of the data-parallel tests: ``torchrun --nproc-per-node N tests/ddp_worker.py RUNS.json``,
or :func:`forked_rank` as the target of forked processes (no interpreter start-up).

``RUNS.json`` holds ``{"root": folder, "runs": [{"name": ..., "config": {TrainConfig kwargs},
"valid_everywhere": bool}, ...]}``. Every run trains in ``root/name`` and each rank writes all
its state (model parameters and buffers, optimizer and strategy state, as in a checkpoint,
without the RNG) to ``root/name/rank{R}.safetensors``, for the test to compare as tensors.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.utils.data import Dataset

from gatedmtl.train import TrainConfig, Trainer, init_distributed, make_datasets


class ValidEverywhere(Dataset):
    """Scenes whose invalid depth / normal pixels are filled in: every task loss is then a mean
    over the same number of pixels per sample, so the mean of equal rank batches' losses is the
    loss of the global batch (masked means weight each rank's batch equally)."""

    def __init__(self, base: Dataset) -> None:
        self.base, self.tasks = base, base.tasks

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict:
        item = dict(self.base[i])
        if "depth" in item:
            item["depth"] = torch.where(item["depth"] == 0, torch.ones_like(item["depth"]), item["depth"])
        if "normals" in item:
            n = item["normals"]
            hole = (n == 0).all(dim=0, keepdim=True)
            item["normals"] = torch.where(hole, torch.tensor([0.0, 0.0, 1.0]).view(3, 1, 1), n)
        return item


def datasets_for(config: TrainConfig, valid_everywhere: bool):
    train, val = make_datasets(config)
    return (ValidEverywhere(train), ValidEverywhere(val)) if valid_everywhere else (train, val)


def rank_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Every state tensor as its own copy (a tied gate's logits appear under each layer that uses the gate)."""
    return {k: v.detach().cpu().clone() for k, v in trainer.state_tensors().items() if not k.startswith("rng.")}


def run_all(spec: dict) -> None:
    """Train every run of ``spec`` on this rank (the process group is already joined)."""
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    for run in spec["runs"]:
        out = Path(spec["root"]) / run["name"]
        config = TrainConfig(**(run["config"] | {"out": str(out), "progress": False}))
        trainer = Trainer(config, datasets=datasets_for(config, run.get("valid_everywhere", False)))
        trainer.fit()
        save_file(rank_state(trainer), str(out / f"rank{rank}.safetensors"))
        if rank == 0:
            print(f"{run['name']}: {trainer.step} steps on {world} ranks", flush=True)


def forked_rank(rank: int, world: int, store: str, spec: dict) -> None:
    """Target of a forked rank (``multiprocessing`` fork start: no new interpreter to import)."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        run_all(spec)
    finally:
        torch.distributed.destroy_process_group()


def main() -> int:
    init_distributed()
    run_all(json.loads(Path(sys.argv[1]).read_text()))
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
