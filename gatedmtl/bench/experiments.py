"""Benchmark experiments: which rows a results table has and the schedule each row trains with.

An :class:`Experiment` names a data set, its tasks, the backbones and the rows: single-task
networks (STL), hard sharing with every balancing method, and GatedMTL at several budgets
with EW and with the best balancing method of the hard-sharing rows; every GatedMTL row is
also reported after a short fine-tuning of its lean network. :data:`EXPERIMENTS` holds the
registered ones; :meth:`Experiment.quick` gives the few-minute variant of any of them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Experiment", "EXPERIMENTS", "HARD_SHARING_METHODS", "get_experiment"]

HARD_SHARING_METHODS = ("ew", "dwa", "uw", "rlw", "famo", "db_mtl", "go4align", "pcgrad", "cagrad", "mgda",
                        "imtl_g", "nash_mtl")
"""The loss-balancing rows of a table (GatedMTL's tables plus DB-MTL, GO4Align, FAMO, IMTL-G, Nash-MTL)."""


@dataclass(frozen=True)
class Experiment:
    """One results table per backbone. Every training row runs ``steps`` optimizer steps.

    ``budgets`` are fractions of the full (T+1)-branch encoder (``1/(T+1)``: everything shared,
    ``T/(T+1)``: every task keeps every channel, the FLOPs of the T single-task networks).
    ``gated_balances``: ``"best"`` stands for the hard-sharing method with the highest ΔMTL.
    """

    name: str
    description: str
    data: str
    tasks: tuple[str, ...]
    models: tuple[str, ...]
    steps: int
    batch_size: int
    lr: float = 2e-3
    image_size: tuple[int, int] | None = None  # scenes / fashion-scenes only
    train_length: int | None = None
    val_length: int | None = None
    methods: tuple[str, ...] = HARD_SHARING_METHODS
    budgets: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7)
    gated_balances: tuple[str, ...] = ("ew", "best")
    finetune_steps: int = 0
    seeds: tuple[int, ...] = (0,)
    latency_size: tuple[int, int] = (224, 224)  # ORT latency of each row's encoder at this input size
    needs_root: bool = False
    train_options: dict[str, Any] = field(default_factory=dict)  # further TrainConfig fields

    def quick(self) -> Experiment:
        """A few-minute variant with every row (for CI): 2 steps, tiny images, 2 budgets, 1 seed."""
        return dataclasses.replace(
            self, name=f"{self.name}-quick", steps=2, batch_size=2, image_size=(32, 32) if self.image_size else None,
            train_length=8 if self.train_length else None, val_length=4 if self.val_length else None,
            budgets=self.budgets[:: max(1, len(self.budgets) - 1)][:2], finetune_steps=min(self.finetune_steps, 1),
            seeds=self.seeds[:1], latency_size=(64, 64))

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


EXPERIMENTS: dict[str, Experiment] = {
    "scenes": Experiment(
        name="scenes",
        description="Embedded procedural scenes (no files): semantic segmentation, depth and surface normals. "
                    "A reduced schedule (32x64 images: HRNet needs sides divisible by 32) that runs on 2 CPU cores "
                    "in about an hour per backbone.",
        data="scenes", tasks=("seg", "depth", "normals"), models=("resnet18", "hrnet_w18_small_v2"),
        steps=100, batch_size=4, image_size=(32, 64), train_length=160, val_length=64, finetune_steps=25),
    "nyuv2": Experiment(
        name="nyuv2",
        description="NYUv2 in the MTAN/LibMTL layout (288x384, 13 classes, 795 train / 654 val; --data-root). "
                    "Schedule of Nash-MTL/FAMO/LibMTL on NYUv2: Adam, lr 1e-4, batch 8, 200 epochs "
                    "(795 // 8 = 99 steps each: 19,800 steps), StepLR halving at epoch 100 (here: cosine).",
        data="nyuv2", tasks=("seg", "depth", "normals"), models=("hrnet_w18_small_v2", "resnet50"),
        steps=19_800, batch_size=8, lr=1e-4, finetune_steps=990, seeds=(0, 1, 2), needs_root=True),
    "cityscapes": Experiment(
        name="cityscapes",
        description="Cityscapes (--data-root): segmentation and depth; Nash-MTL's schedule (Adam, lr 1e-4, batch 8, "
                    "200 epochs over 2,975 images: 74,200 steps).",
        data="cityscapes", tasks=("seg", "depth"), models=("resnet50",), steps=74_200, batch_size=8, lr=1e-4,
        budgets=(0.4, 0.5, 0.6), finetune_steps=3_700, seeds=(0, 1, 2), needs_root=True),
    "celeba": Experiment(
        name="celeba",
        description="CelebA attributes (--data-root): Nash-MTL/FAMO's schedule (Adam, lr 3e-4, batch 256, 15 epochs "
                    "over 162,770 images: 9,525 steps).",
        data="celeba", tasks=("attributes",), models=("resnet18",), steps=9_525, batch_size=256, lr=3e-4,
        budgets=(0.5,), finetune_steps=600, seeds=(0, 1, 2), needs_root=True),
}
"""The registered experiments by name."""


def get_experiment(name: str, *, quick: bool = False) -> Experiment:
    """The experiment ``name`` (its ``quick()`` variant with ``quick=True``); unknown names list the known ones."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; known: {', '.join(EXPERIMENTS)}")
    exp = EXPERIMENTS[name]
    return exp.quick() if quick else exp
