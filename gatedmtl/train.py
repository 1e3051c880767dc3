"""Training at a FLOP budget: :class:`TrainConfig`, :class:`Trainer`, :func:`evaluate`.

Plain PyTorch loop: AdamW/SGD with a per-step cosine/step/constant schedule, loss balancing
through :mod:`gatedmtl.balancing`, the cost-aware sparsity hinge of :mod:`gatedmtl.budget`,
AMP on GPU, gradient clipping, tqdm progress, a JSON-lines log of every step, atomic
safetensors checkpoints and exact resume (data order, RNG, optimizer and strategy state).
Data parallel under ``torchrun`` (gloo on CPU, nccl on GPU), :mod:`gatedmtl.parallel`: every
rank takes its share of each global batch; the task losses carry the global (rank-mean) values;
loss-level strategies train through :class:`~torch.nn.parallel.DistributedDataParallel`,
gradient-level ones average each task's gradient of the shared parameters before aggregating
them, then the remaining gradients; BatchNorm running statistics are averaged after each step.
The ranks stay bit-identical (parameters, buffers, optimizer and strategy state).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from . import balancing
from .budget import project_to_budget, resolve_budget, sparsity_loss, task_targets_loss
from .checkpoint import CheckpointError, load_checkpoint, load_weights, read_meta, save_checkpoint
from .files import check_not_special, check_output, remove_stale_temps
from .cost import count_flops, expected_flops, predict_flops
from .data import create_dataset, dataset_tasks
from .network import MultiTaskNet, build_backbone, build_network, tasks_from_spec
from .gates import DEFAULT_GATE_GROUP, MIX_MODES, ChannelGate, check_group, check_mix, check_structure
from .parallel import all_reduce_mean_, average_running_stats, broadcast_state, global_losses, init_distributed
from .parallel import dist_info as _dist_info
from .parallel import unreached_parameters
from .surgery import GatedModel

__all__ = ["TrainConfig", "Trainer", "evaluate", "NonFiniteLossError", "load_network", "prune_checkpoint", "ProjectionWarning",
           "init_distributed", "finalize", "save_lean", "resume_config", "finetune_config", "RESUME_OVERRIDES", "FINETUNE_OPTIONS",
           "RUN_FILES", "dataset_task_spec", "dataset_image_size", "MixAnneal", "TRAIN_MIXES",
           "set_mix_state"]

RUN_FILES = ("last.safetensors", "prev.safetensors", "last.json", "log.jsonl", "summary.json")
"""Files a training run writes into its ``out`` folder."""

RESUME_OVERRIDES = ("epochs", "save_every", "progress", "device")
"""Settings that may change when a run is resumed (everything else must equal the saved run's)."""

FINETUNE_OPTIONS = ("epochs", "steps_per_epoch", "batch_size", "optimizer", "lr", "weight_decay", "schedule",
                    "grad_clip", "balance", "balance_options", "seed", "out", "save_every", "device", "progress",
                    "freeze_bn", "train_length", "val_length")
"""Settings a fine-tuning run may take other than the lean network's training run (the rest fix the network
and its data: model, tasks, data set, image size, gates)."""


class NonFiniteLossError(FloatingPointError):
    """A task loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class TrainConfig:
    """Everything a run needs; saved in every checkpoint so that it can be rebuilt and resumed."""

    model: str = "resnet18"
    tasks: tuple[str, ...] = ("seg", "depth", "normals")
    data: str = "scenes"
    data_root: str | None = None
    image_size: tuple[int, int] = (96, 128)  # scenes and fashion-scenes only; other data sets have their own
    train_length: int = 512  # scenes and fashion-scenes only
    val_length: int = 128
    arch: str = "gated"
    budget: str | None = "0.5"  # fraction of the full (T+1)-branch encoder, or "2.5GF"; None: no sparsity
    epochs: int = 20
    steps_per_epoch: int | None = None  # cap, for quick runs
    batch_size: int = 8
    optimizer: str = "adamw"
    lr: float = 1e-3
    gate_lr: float = 0.05
    weight_decay: float = 1e-4
    schedule: str = "cosine"
    grad_clip: float | None = 5.0
    lambda_s: float = 1.0
    budget_mode: str = "target"  # "target": |cost / budget - 1|; "max": hinge above the budget only
    sparsity_warmup: int = 0  # epochs without the sparsity term
    init_logit: float = 1.0
    gate_group: int = DEFAULT_GATE_GROUP  # channels per gate logit (lean widths become multiples of it)
    mix: str = "anneal"  # shared-slot mix: "anneal" (soft, its temperature lowered over mix_anneal, then hard: see
    # MixAnneal; the lean model's shared slot is a channel selection), "soft" (softmax of beta, the paper's) or "hard"
    # (straight-through one-hot argmax from the start)
    mix_anneal: tuple[float, float] = (0.5, 0.9)  # fractions of the training steps (mix="anneal")
    tie_depthwise: bool = True  # a depthwise conv fed by a gated layer uses that layer's gate (see convert; a
    # faster lean model: benchmarks/results/latency_annealmix_tied_depthwise.md, mix_comparison_mobilenetv3_large_100.md)
    tie_residual: bool = False  # the gated layers that write one residual stream use one gate (see convert)
    skip_depthwise_mix: bool | None = None  # no shared mix in front of the tied depthwise convs (see convert); None
    # (the default): the same as tie_depthwise, resolved at construction so that a saved config holds the choice
    # (benchmarks/results/latency_annealmix_tied_depthwise_skipmix.md, mix_comparison_mobilenetv3_large_100.md)
    gate_structure: str = "free"  # "free" (any open channels, the paper's gates) or "prefix" (a leading run of
    # channels per task, one task read by the shared slot per layer: a lean graph without channel gathers; see convert)
    tau: dict[str, float] = field(default_factory=dict)
    lambda_tau: float = 1.0
    balance: str = "ew"
    balance_options: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    out: str = "runs/exp"
    checkpoint: str | None = None
    partial_checkpoint: bool = False  # load only the matching weights of `checkpoint`
    pretrained: bool = False
    init_task_weights: dict[str, str] = field(default_factory=dict)
    save_every: int = 0  # steps; 0: at the end of every epoch
    device: str = "auto"
    amp: bool = True
    progress: bool = True
    freeze_bn: bool = False  # BatchNorm layers normalise with (and keep) their running statistics
    finetune: str | None = None  # a lean checkpoint: train that pruned network at its fixed architecture

    def validate(self) -> None:
        if self.arch not in ("gated", "shared"):
            raise ValueError(f"arch must be 'gated' or 'shared', got {self.arch!r}")
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}")
        if self.schedule not in ("cosine", "step", "constant"):
            raise ValueError(f"schedule must be 'cosine', 'step' or 'constant', got {self.schedule!r}")
        for name in ("epochs", "batch_size", "val_length", "train_length"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.steps_per_epoch is not None and int(self.steps_per_epoch) < 1:
            raise ValueError(f"steps_per_epoch must be >= 1 (or None for a whole pass over the data), "
                             f"got {self.steps_per_epoch}")
        if self.save_every < 0:
            raise ValueError(f"save_every must be >= 0 (0: at the end of every epoch), got {self.save_every}")
        _device(self.device)
        if self.lr <= 0 or self.gate_lr <= 0:
            raise ValueError("learning rates must be positive")
        if not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks must be non-empty and unique, got {list(self.tasks)}")
        if self.arch == "shared" and (self.tau or self.init_task_weights):
            raise ValueError("--tau and --init-task-weights need the gated arch")
        check_group(self.gate_group)
        check_mix(self.mix, TRAIN_MIXES)
        check_structure(self.gate_structure)
        MixAnneal(*self.mix_anneal, total_steps=1)  # validates the fractions
        if self.budget_mode not in ("max", "target"):
            raise ValueError(f"budget_mode must be 'max' or 'target', got {self.budget_mode!r}")

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def __post_init__(self) -> None:
        if self.skip_depthwise_mix is None:  # the default: skip the mix wherever depthwise convs are tied
            self.skip_depthwise_mix = bool(self.tie_depthwise)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        kwargs.setdefault("mix", "soft")  # saved before the field existed: those runs mixed softly
        kwargs.setdefault("tie_depthwise", False)  # saved before the field existed: converted untied
        kwargs.setdefault("skip_depthwise_mix", False)  # saved before the field existed: mixed before every layer
        for key in ("tasks", "image_size", "mix_anneal"):
            if key in kwargs and kwargs[key] is not None:
                kwargs[key] = tuple(kwargs[key])
        return cls(**kwargs)


def _device(spec: str) -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``; anything else is an error."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ValueError(f"unknown device {spec!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {spec!r} asked for, but this machine has no CUDA GPU that torch can use; "
                             "use --device cpu (or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {spec!r} does not exist: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    elif device.type != "cpu":
        raise ValueError(f"device {spec!r} is not supported; use auto, cpu, cuda or cuda:N")
    return device


def write_text(path: Path, text: str) -> None:
    """Write a small text file of a run (refusing to replace anything but a regular file)."""
    check_not_special(path)
    path.write_text(text)


def _truncate_log(path: Path, step: int) -> None:
    """Drop log records after ``step`` (written after the checkpoint that a resumed run restarts from)."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        write_text(path, "".join(kept))


def resume_config(out: str | Path, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """The saved configuration of the run in ``out`` (its ``last.safetensors``), with ``overrides``.

    Only the settings in :data:`RESUME_OVERRIDES` may differ from the saved run; any other
    override that differs raises a ``ValueError`` that names it.
    """
    path = Path(out) / "last.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"nothing to resume: {path} does not exist")
    saved = read_meta(path).get("config")
    if not isinstance(saved, Mapping):
        raise CheckpointError(f"{path} is not a gatedmtl training checkpoint")
    data = _override(dict(saved), overrides, RESUME_OVERRIDES,
                     lambda key, old, new: f"the run in {out} was trained with {key}={old!r}, not {new!r}: a resumed run "
                     f"keeps its settings (only {', '.join(RESUME_OVERRIDES)} may change); drop the flag or start a new "
                     "run with another --out")
    data["out"] = str(out)
    return TrainConfig.from_json(data)


def _override(data: dict[str, Any], overrides: Mapping[str, Any] | None, allowed: Sequence[str],
              refusal: Callable[[str, Any, Any], str]) -> dict[str, Any]:
    """``data`` with ``overrides`` of the ``allowed`` keys; any other override that differs raises
    ``ValueError(refusal(key, saved, given))`` (an override equal to the saved value is fine)."""
    for key, value in (overrides or {}).items():
        value = json.loads(json.dumps(value))
        if key in allowed:
            data[key] = value
        elif key in data and data[key] != value:
            raise ValueError(refusal(key, data[key], value))
    return data


def finetune_config(lean: str | Path, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """The configuration that fine-tunes the lean checkpoint ``lean``: its training run's, with ``overrides``.

    Only the settings in :data:`FINETUNE_OPTIONS` may differ from the run that trained the network; the
    learning rate defaults to a tenth of that run's. Raises ``ValueError`` naming any other setting.
    """
    path = Path(lean)
    meta = read_meta(path)
    if meta.get("kind") != "lean" or not isinstance(meta.get("config"), Mapping):
        raise ValueError(f"{path} is not a lean checkpoint; fine-tuning takes the output of gatedmtl prune "
                         "(or of an earlier fine-tuning)")
    data = dict(meta["config"])
    data["lr"] = float(data.get("lr", 1e-3)) * 0.1
    data["finetune"] = str(path)
    data = _override(data, overrides, FINETUNE_OPTIONS,
                     lambda key, old, new: f"{path} was trained with {key}={old!r}; fine-tuning keeps the network and "
                     f"its data (only {', '.join(FINETUNE_OPTIONS)} may change)")
    return TrainConfig.from_json(data)


def make_datasets(config: TrainConfig) -> tuple[Dataset, Dataset]:
    """Train and validation sets of ``config.data`` (the embedded scenes need no files; the
    Fashion-MNIST / MNIST sets have default roots, see :mod:`gatedmtl.data.items`)."""
    if config.data == "scenes":
        kw = dict(size=tuple(config.image_size), tasks=tuple(config.tasks))
        return (create_dataset("scenes", split="train", length=config.train_length, seed=config.seed, **kw),
                create_dataset("scenes", split="val", length=config.val_length, seed=config.seed, **kw))
    dataset_tasks(config.data)  # an unknown name: ValueError listing the known ones
    if config.data in ("multimnist", "multifashion", "fashion-mnist-mnist", "fashion-scenes"):  # default roots
        kw = dict(root=config.data_root, seed=config.seed, tasks=tuple(config.tasks))
        if config.data != "fashion-scenes":
            return create_dataset(config.data, split="train", **kw), create_dataset(config.data, split="val", **kw)
        kw["size"] = tuple(config.image_size)
        return (create_dataset(config.data, split="train", length=config.train_length, **kw),
                create_dataset(config.data, split="val", length=config.val_length, **kw))
    if config.data_root is None:
        raise ValueError(f"data set {config.data!r} needs --data-root PATH")
    kw = dict(root=config.data_root)
    if config.data in ("nyuv2", "cityscapes", "nyud-png"):
        kw["tasks"] = tuple(config.tasks)
    return create_dataset(config.data, split="train", **kw), create_dataset(config.data, split="val", **kw)


def dataset_task_spec(dataset: Dataset, tasks: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``{task: create_task kwargs}`` for ``tasks`` (in that order) from ``dataset.tasks``."""
    spec = getattr(dataset, "tasks", None)
    if not isinstance(spec, Mapping):
        raise TypeError("the data set must expose a .tasks mapping of task name -> create_task kwargs")
    missing = [t for t in tasks if t not in spec]
    if missing:
        raise ValueError(f"the data set provides tasks {sorted(spec)}, not {missing}")
    return {t: dict(spec[t]) for t in tasks}


def dataset_image_size(dataset: Dataset) -> tuple[int, int, int]:
    """``(C, H, W)`` of the data set's first image."""
    sample = dataset[0]
    return tuple(int(v) for v in sample["image"].shape)


def build_from_config(config: TrainConfig, task_spec: Mapping[str, Mapping[str, Any]],
                      input_size: tuple[int, int, int], *, load_pretrained: bool = True) -> MultiTaskNet:
    """The network a run trains: backbone (+ local checkpoint), encoder arch, heads."""
    backbone = build_backbone(config.model, pretrained=config.pretrained and load_pretrained,
                              checkpoint=config.checkpoint if load_pretrained else None,
                              partial=config.partial_checkpoint, in_chans=input_size[0])
    task_weights = None
    if config.init_task_weights and load_pretrained:
        task_weights = {t: load_weights(p) for t, p in config.init_task_weights.items()}
    return build_network(backbone, tasks_from_spec(task_spec), input_size, config.arch,
                         init_logit=config.init_logit, gate_group=config.gate_group, task_weights=task_weights,
                         mix="soft" if config.mix == "anneal" else config.mix, tie_depthwise=config.tie_depthwise,
                         tie_residual=config.tie_residual, skip_depthwise_mix=config.skip_depthwise_mix,
                         gate_structure=config.gate_structure)


TRAIN_MIXES = (*MIX_MODES, "anneal")
"""Shared-slot mixes a run can train with: the gate mixes, or ``"anneal"`` (:class:`MixAnneal`)."""


class MixAnneal:
    """The shared mix per step of a ``mix="anneal"`` run: ``(mode, temperature)`` of every gate.

    Soft at temperature 1 until the fraction ``start`` of the training steps, then the soft mix's
    temperature falls geometrically to ``final_temperature`` at the fraction ``end``, from where the
    gates use the hard mix (one-hot argmax, straight-through). The state after the last step is
    always the hard mix, so a finished run is pruned as a hard-mix network.
    """

    def __init__(self, start: float, end: float, total_steps: int, final_temperature: float = 0.01) -> None:
        start, end = float(start), float(end)
        if not 0.0 <= start < end <= 1.0:
            raise ValueError(f"mix_anneal must be two fractions of the training 0 <= start < end <= 1 "
                             f"(e.g. 0.5,0.9), got {start},{end}")
        if not 0.0 < final_temperature < 1.0:
            raise ValueError(f"final_temperature must be in (0, 1), got {final_temperature}")
        self.start, self.end, self.final_temperature = start, end, float(final_temperature)
        self.total = max(1, int(total_steps))

    def __call__(self, step: int) -> tuple[str, float]:
        p = min(step / self.total, 1.0)
        if p >= self.end:
            return "hard", 1.0
        if p <= self.start:
            return "soft", 1.0
        return "soft", self.final_temperature ** ((p - self.start) / (self.end - self.start))


def set_mix_state(net: MultiTaskNet, mode: str, temperature: float = 1.0) -> None:
    """Put every gate of ``net`` (a gated network) into one mix state (:meth:`ChannelGate.set_mix_state`)."""
    for gate in net.encoder.gates():
        gate.set_mix_state(mode, temperature)


class _Schedule:
    """Learning-rate factor per step: cosine to 0, step (x0.1 at 1/2 and 3/4), or constant."""

    def __init__(self, kind: str, total_steps: int) -> None:
        self.kind = kind
        self.total = max(1, total_steps)

    def __call__(self, step: int) -> float:
        p = min(step / self.total, 1.0)
        if self.kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * p))
        if self.kind == "step":
            return 0.1 ** ((p >= 0.5) + (p >= 0.75))
        return 1.0


class Trainer:
    """Trains a :class:`MultiTaskNet` from a :class:`TrainConfig`.

    ``Trainer(config).fit()`` runs (or resumes, with ``resume=True``) the whole schedule and
    returns a summary dict; ``out/last.safetensors`` is the checkpoint, ``out/log.jsonl`` the log.
    """

    def __init__(self, config: TrainConfig, *, resume: bool = False, force: bool = False,
                 datasets: tuple[Dataset, Dataset] | None = None) -> None:
        config.validate()
        self.config = config
        self.rank, self.world = _dist_info()
        self.device = _device(config.device)
        self.out = Path(config.out)
        self.ckpt_path = self.out / "last.safetensors"
        self.prev_path = self.out / "prev.safetensors"
        if self.out.exists() and not self.out.is_dir():
            raise NotADirectoryError(f"--out {self.out} is a file; give a folder for the run")
        if resume and not self.ckpt_path.is_file():
            raise FileNotFoundError(f"nothing to resume: {self.ckpt_path} does not exist")
        if not resume:
            existing = [n for n in RUN_FILES if (self.out / n).exists()] if self.rank == 0 else []
            if self.world > 1:  # every rank raises (or none does): a rank left alone would wait forever
                shared = [existing]
                dist.broadcast_object_list(shared, src=0)
                existing = shared[0]
            if existing and not force:
                raise FileExistsError(f"{self.out} already holds a run ({', '.join(existing)}): pass --resume "
                                      "(resume=True) to continue it, --force (force=True) to start over, "
                                      "or choose another --out")
        torch.manual_seed(config.seed)
        self.train_set, self.val_set = datasets or make_datasets(config)
        self.task_spec = dataset_task_spec(self.train_set, config.tasks)
        self.input_size = dataset_image_size(self.train_set)
        self.tasks = tasks_from_spec(self.task_spec)
        self.lean_tensors: dict[str, Tensor] = {}  # gate masks of a fine-tuned lean network
        self.lean_meta: dict[str, Any] = {}
        if config.finetune:
            self.net = self._load_lean(self.ckpt_path if resume else Path(config.finetune)).to(self.device)
        else:
            self.net = build_from_config(config, self.task_spec, self.input_size).to(self.device)
        self.strategy = balancing.create(config.balance, list(config.tasks), **config.balance_options)
        self.budget_flops: float | None = None
        if self.gated and config.budget is not None:
            self.budget_flops = resolve_budget(self.net.encoder, config.budget, (1, *self.input_size))
        self.optimizer = self._make_optimizer()
        self.steps_per_epoch = self._steps_per_epoch()
        self.total_steps = config.epochs * self.steps_per_epoch
        self.schedule = _Schedule(config.schedule, self.total_steps)
        self.mix_anneal = (MixAnneal(*config.mix_anneal, total_steps=self.total_steps)
                           if config.mix == "anneal" and self.gated else None)
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.on_step: Callable[[dict[str, Any]], None] | None = None  # called after every step
        self.model: nn.Module = self.net  # what the training forward runs: the net, or DDP around it
        if self.world > 1:
            self.model = self._data_parallel()
        if resume:
            self.load(self.ckpt_path)
        self._apply_mix_state()
        if not resume and force and self.rank == 0:
            for name in RUN_FILES:
                target = self.out / name
                if target.is_file():
                    target.unlink()

    @property
    def gated(self) -> bool:
        return isinstance(self.net.encoder, GatedModel)

    def mix_state(self) -> tuple[str, float] | None:
        """``(mode, temperature)`` of the gates at the current step of a ``mix="anneal"`` run, else ``None``."""
        return self.mix_anneal(self.step) if self.mix_anneal is not None else None

    def _apply_mix_state(self) -> None:
        state = self.mix_state()
        if state is not None:
            set_mix_state(self.net, *state)

    def _load_lean(self, path: Path) -> MultiTaskNet:
        """The lean network of ``path`` (``config.finetune``, or this run's own checkpoint on resume)."""
        tensors, meta = load_checkpoint(path)
        if meta.get("kind") != "lean":
            raise ValueError(f"{path} is a '{meta.get('kind')}' checkpoint; fine-tuning takes a lean one "
                             f"(gatedmtl prune {path} --out lean.safetensors)")
        net = _network_from_checkpoint(tensors, meta, path)
        if net.tasks != tuple(self.config.tasks):
            raise ValueError(f"{path} has tasks {list(net.tasks)}, this run {list(self.config.tasks)}")
        if tuple(meta["input_size"]) != tuple(self.input_size):
            raise ValueError(f"{path} was pruned for input {meta['input_size']}, the data set gives "
                             f"{list(self.input_size)}")
        self.lean_tensors = {k: v for k, v in tensors.items() if k.startswith(("mask.", "mix."))}
        self.lean_meta = {k: meta[k] for k in ("flops", "finetuned_from", "mix_state") if k in meta}
        self.lean_meta.setdefault("finetuned_from", str(path))
        return net

    def _data_parallel(self) -> nn.Module:
        """DDP around the net for loss-level strategies (one backward, averaged by DDP's reducer);
        gradient-level strategies run ``T`` backwards per forward, which DDP does not support:
        they get the plain net (rank 0's state broadcast) and :meth:`train_step` averages the
        Jacobian and the other gradients itself."""
        if self.strategy.needs_grads:
            broadcast_state(self.net)
            return self.net
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(
            self.net, device_ids=[self.device.index] if self.device.type == "cuda" else None,
            forward_sync_buffers=False,  # running statistics are averaged after each step instead
            find_unused_parameters=bool(unreached_parameters(self.net, torch.zeros(1, *self.input_size,
                                                                                   device=self.device))))

    def _make_optimizer(self) -> torch.optim.Optimizer:
        c = self.config
        # by type: a backbone parameter that happens to be called `alpha` or `beta` keeps the model lr
        gate_params = [p for m in self.net.modules() if isinstance(m, ChannelGate) for p in m.parameters(recurse=False)]
        gate_ids = {id(p) for p in gate_params}
        others = [p for p in self.net.parameters() if id(p) not in gate_ids]
        groups = [{"params": others, "lr": c.lr, "weight_decay": c.weight_decay, "base_lr": c.lr}]
        extra = list(self.strategy.extra_parameters())
        if extra:
            extra_lr = self.strategy.extra_lr or c.lr  # e.g. UW's log-variances: their own lr (0.025)
            groups.append({"params": extra, "lr": extra_lr, "weight_decay": 0.0, "base_lr": extra_lr})
        if gate_params:
            groups.append({"params": gate_params, "lr": c.gate_lr, "weight_decay": 0.0, "base_lr": c.gate_lr})
        if c.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=c.lr, momentum=0.9)
        return torch.optim.AdamW(groups, lr=c.lr)

    def _steps_per_epoch(self) -> int:
        n = len(self.train_set) // (self.config.batch_size * self.world)
        if n < 1:
            raise ValueError(f"the training set has {len(self.train_set)} samples, fewer than one batch of "
                             f"{self.config.batch_size} x {self.world} ranks")
        return min(n, self.config.steps_per_epoch) if self.config.steps_per_epoch else n

    def _epoch_indices(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.config.seed * 100_003 + epoch)
        perm = torch.randperm(len(self.train_set), generator=g).tolist()
        per_step = self.config.batch_size * self.world
        perm = perm[: self.steps_per_epoch * per_step]
        return [i for s in range(self.steps_per_epoch)
                for i in perm[s * per_step + self.rank * self.config.batch_size:
                              s * per_step + (self.rank + 1) * self.config.batch_size]]

    # ---------------------------------------------------------------- checkpoints
    def state_tensors(self) -> dict[str, Tensor]:
        tensors = {f"model.{k}": v for k, v in self.net.state_dict().items()}
        for i, state in self.optimizer.state_dict()["state"].items():
            for k, v in state.items():
                tensors[f"optim.{i}.{k}"] = v if isinstance(v, Tensor) else torch.tensor(v)
        tensors |= {f"strategy.{k}": v for k, v in self.strategy.state_dict().items()}
        tensors["rng.torch"] = torch.get_rng_state()
        if torch.cuda.is_available() and self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        return tensors | self.lean_tensors

    def meta(self) -> dict[str, Any]:
        # a fine-tuned network is saved as a lean checkpoint (eval / export / profile read it as one)
        kind = "lean" if self.config.finetune else "train"
        return {"kind": kind, "format": 2, "tasks": list(self.config.tasks), "config": self.config.to_json(),
                "task_spec": self.task_spec,
                "input_size": list(self.input_size), "step": self.step, "world": self.world,
                "history": self.history} | self.lean_meta | self._mix_meta()

    def _mix_meta(self) -> dict[str, Any]:
        state = self.mix_state()
        return {"mix_state": {"mode": state[0], "temperature": state[1]}} if state is not None else {}

    def save(self, path: Path | None = None) -> Path | None:
        if self.rank != 0:
            return None
        target = Path(path or self.ckpt_path)
        keep = self.prev_path if target == self.ckpt_path else None
        path = save_checkpoint(target, self.state_tensors(), self.meta(), keep_previous=keep)
        write_text(path.with_suffix(".json"), json.dumps(self.meta(), indent=2))
        return path

    def load(self, path: Path) -> None:
        tensors, meta = load_checkpoint(path)
        saved = meta.get("config", {})
        mine_all = self.config.to_json()
        for key, theirs in saved.items():
            if key in RESUME_OVERRIDES or key not in mine_all or mine_all[key] == theirs:
                continue
            raise CheckpointError(f"{path} is a checkpoint of {key}={theirs!r}, this run has {key}={mine_all[key]!r}; "
                                  f"resume with the saved settings (only {', '.join(RESUME_OVERRIDES)} may change) "
                                  "or choose another --out")
        model_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        try:
            self.net.load_state_dict(model_state, strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"{path} does not match this network: {e}") from e
        opt = self.optimizer.state_dict()
        state: dict[int, dict[str, Tensor]] = {}
        for k, v in tensors.items():
            if k.startswith("optim."):
                _, i, name = k.split(".", 2)
                state.setdefault(int(i), {})[name] = v
        opt["state"] = state
        self.optimizer.load_state_dict(opt)
        self.strategy.load_state_dict({k[len("strategy."):]: v for k, v in tensors.items() if k.startswith("strategy.")})
        torch.set_rng_state(tensors["rng.torch"])
        if "rng.cuda" in tensors and self.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)
        self.step = int(meta["step"])
        self.history = list(meta.get("history", []))
        if self.rank == 0:
            _truncate_log(self.out / "log.jsonl", self.step)

    # ---------------------------------------------------------------- training
    def _losses(self, batch: Mapping[str, Tensor], model: nn.Module | None = None) -> dict[str, Tensor]:
        x = batch["image"].to(self.device, non_blocking=True)
        amp = self.config.amp and self.device.type == "cuda"
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=amp):
            out = (model or self.net)(x)
        return {t: self.tasks[t].loss(out[t].float(), batch[t].to(self.device)) for t in self.config.tasks}

    def _sparsity(self, epoch: int) -> tuple[Tensor | None, float | None]:
        if not self.gated:
            return None, None
        enc = self.net.encoder
        reg: Tensor | None = None
        if self.budget_flops is not None and epoch >= self.config.sparsity_warmup:
            reg = self.config.lambda_s * sparsity_loss(enc, self.budget_flops, (1, *self.input_size),
                                                       two_sided=self.config.budget_mode == "target")
        if self.config.tau and epoch >= self.config.sparsity_warmup:
            t = self.config.lambda_tau * task_targets_loss(enc, self.config.tau, (1, *self.input_size))
            reg = t if reg is None else reg + t
        gflops = float(expected_flops(enc, (1, *self.input_size)).detach()) / 1e9
        return reg, gflops

    def _average_other_grads(self, shared: Sequence[nn.Parameter]) -> None:
        """Average over the ranks the gradients of every parameter outside ``shared`` (whose
        Jacobian the strategy averaged already). A parameter without a gradient on every rank
        keeps ``None`` (as in a 1-process run); one reached on some ranks only counts as 0 on
        the others."""
        ids = {id(p) for p in shared}
        params = [p for p in self.net.parameters() if p.requires_grad and id(p) not in ids]
        if not params:
            return
        reached = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=self.device)
        dist.all_reduce(reached, op=dist.ReduceOp.MAX)
        grads = []
        for p, r in zip(params, reached.tolist()):
            if r:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                grads.append(p.grad)
        all_reduce_mean_(grads)

    def _freeze_batch_norms(self) -> None:
        for m in self.net.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)):
                m.eval()

    def train_step(self, batch: Mapping[str, Tensor], epoch: int) -> dict[str, Any]:
        self.net.train()
        if self.config.freeze_bn:
            self._freeze_batch_norms()
        factor = self.schedule(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        losses = self._losses(batch, self.model)
        if self.world > 1:
            losses = global_losses(losses)  # the global values on every rank, the rank's own gradients
        for t, value in losses.items():
            if not torch.isfinite(value):
                if self.ckpt_path.is_file():
                    saved = read_meta(self.ckpt_path).get("step")
                    kept = (f"The last good checkpoint is {self.ckpt_path} (step {saved})"
                            + (f", the one before it {self.prev_path}" if self.prev_path.is_file() else "") + ".")
                else:
                    kept = ("No checkpoint was written yet (the first is saved at the end of epoch 1, or every "
                            "--save-every steps).")
                raise NonFiniteLossError(
                    f"the loss of task '{t}' is {value.item()} at step {self.step} (epoch {epoch}); training stopped. "
                    f"{kept} Lower --lr, check the labels of '{t}', or try --balance with a log-loss strategy.")
        self.optimizer.zero_grad(set_to_none=True)
        shared = self.net.encoder_parameters()
        parallel_grads = self.world > 1 and self.strategy.needs_grads
        extra = {"all_reduce": lambda t: all_reduce_mean_([t])} if parallel_grads else {}
        weights = self.strategy.backward(losses, shared, self.net.head_parameters(),
                                         step=self.step, epoch=epoch, **extra)
        if parallel_grads:
            self._average_other_grads(shared)
        reg, gflops = self._sparsity(epoch)
        if reg is not None and reg.requires_grad:
            # autograd.grad + add, not reg.backward(): the gates are DDP parameters, and a second
            # backward into them would re-trigger DDP's reducer (reg is the same on every rank)
            params = [p for p in self.net.parameters() if p.requires_grad]
            for p, g in zip(params, torch.autograd.grad(reg, params, allow_unused=True)):
                if g is not None:
                    p.grad = g if p.grad is None else p.grad + g
        # the norm of the whole gradient before clipping (logged; max_norm=inf measures without clipping)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.config.grad_clip or math.inf)
        self.optimizer.step()

        def recompute() -> dict[str, Tensor]:
            with torch.no_grad():
                again = self._losses(batch)
            return global_losses(again) if self.world > 1 else again

        self.strategy.after_optimizer_step(recompute)
        if self.world > 1 and not self.config.freeze_bn:
            average_running_stats(self.net)
        self.step += 1
        self._apply_mix_state()
        record = {"step": self.step, "epoch": epoch, "lr": self.optimizer.param_groups[0]["lr"],
                  "loss": {t: v.item() for t, v in losses.items()}, "weights": weights, "grad_norm": float(grad_norm)}
        if self.gated:
            masks = [g.open_mask() for g in self.net.encoder.gates()]
            record["density"] = float(sum(m.sum() for m in masks) / sum(m.numel() for m in masks))
            record["gflops"] = gflops
            record["sparsity"] = reg.item() if reg is not None else 0.0
        if self.on_step is not None:
            self.on_step(record)
        return record

    def replica_difference(self) -> float:
        """Largest difference between this rank's parameters and buffers and rank 0's (an integer
        buffer that differs counts 1; 0.0 when not distributed)."""
        if self.world == 1:
            return 0.0
        worst = torch.zeros((), device=self.device)
        for p in self.net.state_dict().values():
            ref = p.detach().clone()
            dist.broadcast(ref, 0)
            if p.numel() == 0:
                continue
            diff = (p.detach() - ref).abs().max() if p.is_floating_point() else (p != ref).any()
            worst = torch.maximum(worst, diff.to(worst.dtype))
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        return float(worst)

    def fit(self) -> dict[str, Any]:
        """Run the remaining epochs; returns ``{"steps", "val": metrics, "seconds"}``."""
        c = self.config
        self.out.mkdir(parents=True, exist_ok=True)
        log = open(self.out / "log.jsonl", "a") if self.rank == 0 else None
        start = time.perf_counter()
        total = self.total_steps
        remove_stale_temps(self.out)
        if self.step and self.rank == 0:
            print(f"resuming {self.out} from step {self.step} of {total}", flush=True)
        bar = tqdm(total=total, initial=self.step, disable=not c.progress or self.rank != 0, desc="train",
                   dynamic_ncols=True)
        try:
            while self.step < total:
                epoch, in_epoch = divmod(self.step, self.steps_per_epoch)
                indices = self._epoch_indices(epoch)[in_epoch * c.batch_size:]
                loader = DataLoader(self.train_set, batch_size=c.batch_size, sampler=indices, drop_last=True)
                sums = {t: 0.0 for t in c.tasks}
                count = 0
                for batch in loader:
                    record = self.train_step(batch, epoch)
                    count += 1
                    for t in c.tasks:
                        sums[t] += record["loss"][t]
                    if log:
                        log.write(json.dumps(record) + "\n")
                        log.flush()
                    post = {t: f"{v:.3f}" for t, v in record["loss"].items()}
                    if "gflops" in record:
                        post["GF"] = f"{record['gflops']:.3f}"
                    bar.set_postfix(post)
                    bar.update(1)
                    if c.save_every and self.step % c.save_every == 0 and self.step % self.steps_per_epoch:
                        self.save()
                means = {t: v / max(count, 1) for t, v in sums.items()}
                self.strategy.end_epoch(epoch, means)
                self.history.append({"epoch": epoch, "train_loss": means})
                self.save()
        finally:
            bar.close()
            if log:
                log.close()
        return {"steps": self.step, "seconds": time.perf_counter() - start}

    def evaluate(self, net: nn.Module | None = None, dataset: Dataset | None = None,
                 desc: str = "eval") -> dict[str, dict[str, float]]:
        return evaluate(net or self.net, dataset or self.val_set, self.tasks, self.config.batch_size, self.device,
                        progress=self.config.progress and self.rank == 0, desc=desc)

    def finalize(self) -> tuple[MultiTaskNet, dict[str, Any]]:
        """Project the gates onto the budget, prune, and measure the lean encoder with fvcore."""
        return finalize(self.net, self.budget_flops, self.input_size, progress=self.config.progress)


@torch.no_grad()
def evaluate(net: nn.Module, dataset: Dataset, tasks: Mapping[str, Any], batch_size: int = 8,
             device: torch.device | str = "cpu", progress: bool = False,
             desc: str = "eval") -> dict[str, dict[str, float]]:
    """Per-task metrics of ``net`` on ``dataset`` (eval mode)."""
    was = net.training
    net.eval()
    metrics = {t: task.metrics() for t, task in tasks.items()}
    for batch in tqdm(DataLoader(dataset, batch_size=batch_size), desc=desc, disable=not progress, leave=False):
        out = net(batch["image"].to(device))
        for t, m in metrics.items():
            m.update(out[t].float().cpu(), batch[t])
    net.train(was)
    return {t: m.compute() for t, m in metrics.items()}


PROJECTION_WARN = 0.05  # relative distance from the budget at the end of training that draws a warning


class ProjectionWarning(UserWarning):
    """Training ended far from the budget, so the projection before pruning changed many gates."""


def _stage(progress: bool, text: str) -> None:
    if progress:
        tqdm.write(text, file=sys.stderr)


def finalize(net: MultiTaskNet, budget_flops: float | None, input_size: Sequence[int],
             progress: bool = False) -> tuple[MultiTaskNet, dict[str, Any]]:
    """Project ``net``'s gates onto ``budget_flops`` (if given), prune, and report FLOPs."""
    if not isinstance(net.encoder, GatedModel):
        raise TypeError("only a gated network can be finalised")
    enc = net.encoder
    _stage(progress, "projecting the gates onto the budget ...")
    report: dict[str, Any] = {"before_projection": predict_flops(enc, (1, *input_size))}
    if budget_flops is not None:
        report["requested"] = budget_flops
        before = [g.group_logits().detach() > 0 for g in enc.unique_gates()]
        report["predicted"] = project_to_budget(enc, budget_flops, (1, *input_size))
        changed = sum(int((b != (g.group_logits().detach() > 0)).sum()) for b, g in zip(before, enc.unique_gates()))
        total = sum(b.numel() for b in before)
        report["changed_gates"], report["gates"] = changed, total
        off = report["before_projection"] / budget_flops - 1
        if abs(off) > PROJECTION_WARN:
            warnings.warn(
                f"training ended at {report['before_projection'] / 1e9:.4f} GFLOPs, {off:+.1%} from the budget "
                f"{budget_flops / 1e9:.4f} GFLOPs, so the projection changed {changed} of {total} gates "
                f"({changed / total:.1%}); the lean model can lose accuracy against the trained one. Train longer "
                "or raise --lambda-s (with --budget-mode target) so that training ends on the budget.",
                ProjectionWarning, stacklevel=2)
    _stage(progress, "pruning the closed gates away ...")
    lean = net.pruned().eval()
    _stage(progress, "counting the lean model's FLOPs (fvcore) ...")
    report["landed"] = count_flops(lean.encoder, (1, *input_size))
    if budget_flops is not None:
        report["error"] = report["landed"] / budget_flops - 1
    return lean, report


# -------------------------------------------------------------------- saved networks
def _ordered_task_spec(meta: Mapping[str, Any], path: str | Path) -> dict[str, dict[str, Any]]:
    """The task spec in the order of the run's tasks: slot ``t + 1`` of the encoder is task ``t``."""
    spec = meta["task_spec"]
    tasks = list(meta["config"].get("tasks") or [])
    if meta.get("tasks") is not None and list(meta["tasks"]) != tasks:
        raise CheckpointError(f"{path}: the task order {meta['tasks']} does not match its configuration {tasks}; "
                              "the file is inconsistent, its branches cannot be matched to tasks")
    if not isinstance(spec, Mapping) or sorted(spec) != sorted(tasks):
        raise CheckpointError(f"{path}: its tasks {tasks} do not match its task descriptions "
                              f"{sorted(spec) if isinstance(spec, Mapping) else spec!r}; its branches cannot be matched to tasks")
    return {t: dict(spec[t]) for t in tasks}


def _net_from_meta(meta: Mapping[str, Any], path: str | Path = "checkpoint") -> tuple[MultiTaskNet, TrainConfig, tuple[int, int, int]]:
    config = TrainConfig.from_json(meta["config"])
    size = tuple(meta["input_size"])
    net = build_from_config(config, _ordered_task_spec(meta, path), size, load_pretrained=False)
    if net.tasks != tuple(config.tasks):
        raise CheckpointError(f"{path}: rebuilt tasks {net.tasks} differ from the run's {config.tasks}")
    if config.mix == "anneal" and isinstance(net.encoder, GatedModel):  # the gates as they were at that step
        state = meta.get("mix_state")
        if not isinstance(state, Mapping) or "mode" not in state or "temperature" not in state:
            raise CheckpointError(f"{path} is a mix='anneal' run without its mix state (mode and temperature at "
                                  "the saved step); the file is incomplete")
        try:
            set_mix_state(net, state["mode"], state["temperature"])
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: its mix state {dict(state)} is invalid: {e}") from e
    return net, config, size


def load_network(path: str | Path) -> tuple[MultiTaskNet, dict[str, Any]]:
    """Rebuild a network from a training checkpoint (gated/shared) or a lean one (from :func:`prune_checkpoint`)."""
    tensors, meta = load_checkpoint(path)
    return _network_from_checkpoint(tensors, meta, path), meta


def _network_from_checkpoint(tensors: Mapping[str, Tensor], meta: Mapping[str, Any], path: str | Path) -> MultiTaskNet:
    """The network that a loaded checkpoint (``load_checkpoint(path)``) describes, in eval mode."""
    if "config" not in meta or "task_spec" not in meta:
        raise CheckpointError(f"{path} is not a gatedmtl training or lean checkpoint")
    net, _, _ = _net_from_meta(meta, path)
    if meta.get("kind") == "lean":
        enc = net.encoder
        with torch.no_grad():
            for gate in enc.gates():
                mask = tensors.get(f"mask.{gate.name}")
                if mask is None:
                    raise CheckpointError(f"{path} lacks the gate mask of {gate.name}")
                choice = tensors.get(f"mix.{gate.name}")
                if gate.mix_mode == "hard" and choice is None:
                    raise CheckpointError(f"{path} lacks the hard-mix choice of {gate.name}")
                try:
                    gate.set_open(mask.bool())
                    if gate.mix_mode == "hard":
                        gate.set_mix_choice(choice)
                except (ValueError, RuntimeError) as e:
                    raise CheckpointError(f"{path}: the gate mask or mix choice of {gate.name} does not fit the network: {e}") from e
        net = net.pruned()
    state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path} does not match the network it describes: {e}") from e
    return net.eval()


def prune_checkpoint(path: str | Path, out: str | Path, budget: str | None = None, *, force: bool = False,
                     progress: bool = False) -> dict[str, Any]:
    """Load a gated training checkpoint, project onto its budget (or ``budget``), prune, save lean.

    ``out`` must not be ``path`` and must not exist unless ``force``.
    """
    check_output(out, inputs=[path], force=force)
    net, meta = load_network(path)
    if meta.get("kind") == "lean":
        raise ValueError(f"{path} is already a lean checkpoint")
    if not isinstance(net.encoder, GatedModel):
        raise ValueError(f"{path} is a '{meta['config']['arch']}' network; only gated networks can be pruned")
    size = tuple(meta["input_size"])
    spec = budget if budget is not None else meta["config"].get("budget")
    budget_flops = resolve_budget(net.encoder, spec, (1, *size)) if spec is not None else None
    lean, report = finalize(net, budget_flops, size, progress=progress)
    save_lean(out, lean, net, meta, report)
    return report


def save_lean(path: str | Path, lean: MultiTaskNet, gated: MultiTaskNet, meta: Mapping[str, Any],
              report: Mapping[str, Any]) -> Path:
    """Write the lean checkpoint of ``lean`` = ``finalize(gated)``: its weights, the gate masks of ``gated``
    and the training run's ``meta`` (``Trainer.meta()`` or a training checkpoint's), ``report`` as ``flops``."""
    if not isinstance(gated.encoder, GatedModel):
        raise TypeError("gated must be the gated network that lean was pruned from")
    tensors = {f"model.{k}": v for k, v in lean.state_dict().items()}
    for gate in gated.encoder.gates():
        tensors[f"mask.{gate.name}"] = gate.open_mask().to(torch.uint8)
        if gate.mix_mode == "hard":  # the task the shared slot reads per channel (it fixes the lean layout)
            tensors[f"mix.{gate.name}"] = gate.mix_choice().to(torch.int32)
    lean_meta = dict(meta) | {"kind": "lean", "flops": dict(report)}
    lean_meta.pop("history", None)
    return save_checkpoint(path, tensors, lean_meta)
