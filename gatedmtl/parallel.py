"""Data-parallel helpers for :class:`gatedmtl.train.Trainer` (``torch.distributed``).

The trainer runs one process per device under ``torchrun`` (gloo on CPU, nccl on GPU); every
rank takes its own share of each global batch. What keeps a 2-process run the computation of
a 1-process run on the global batch, and every rank bit-identical:

* **Loss values are global.** :func:`global_losses` gives every task loss the value of the
  mean over the ranks while keeping the gradient of the rank's own loss. A strategy computes
  its weights and state (FAMO's logits, GO4Align's ``p``, DWA's epoch means, UW's and
  GradNorm's parameter gradients) from identical numbers on every rank, and
  ``w(L_global) * grad L_rank`` averaged over the ranks is ``w(L_global) * grad L_global``.
* **Gradients are averaged**, by :class:`torch.nn.parallel.DistributedDataParallel` for
  loss-level strategies (one backward) and, for gradient-level strategies (``T`` backwards,
  which DDP's reducer does not support), by :func:`all_reduce_mean_`: each task's gradient of
  the shared parameters (the Jacobian ``J``) is averaged *before* the strategy aggregates it,
  so the strategy combines the global per-task gradients, then the other gradients (heads).
* **BatchNorm running statistics are averaged** after every step
  (:func:`average_running_stats`); see its docstring for what that equals.

Collectives return the same bits on every rank, so identical inputs give identical states:
strategy state needs no communication of its own (``tests/test_train.py`` compares every
parameter, buffer, optimizer and strategy tensor of the ranks bit for bit).

A run on ``N`` ranks is the 1-process run on the ``N``-times larger batch (up to rounding) when
every per-sample computation is the same, i.e. BatchNorm frozen (``TrainConfig.freeze_bn``) or
absent, and every task loss is a mean over the same number of elements per sample: a masked
mean (depth or normals with invalid pixels) is averaged per rank and the rank means are then
weighted equally, as in any DDP training.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["init_distributed", "dist_info", "all_reduce_mean_", "global_losses", "average_running_stats",
           "broadcast_state", "running_stat_buffers", "unreached_parameters"]


def init_distributed() -> tuple[int, int]:
    """Join the process group that ``torchrun`` describes (gloo on CPU, nccl on GPU); ``(rank, world)``."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return dist_info()


def dist_info() -> tuple[int, int]:
    """``(rank, world size)``; ``(0, 1)`` outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_mean_(tensors: Iterable[Tensor]) -> None:
    """Replace every tensor by its mean over the ranks, in place, with one collective per dtype
    and device (the tensors are flattened into one buffer)."""
    world = dist.get_world_size()
    groups: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    for group in groups.values():
        if len(group) == 1 and group[0].is_contiguous():
            dist.all_reduce(group[0])
            group[0].div_(world)
            continue
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat)
        flat.div_(world)
        offset = 0
        for t in group:
            n = t.numel()
            t.copy_(flat[offset: offset + n].view_as(t))
            offset += n


def global_losses(losses: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Each loss with the value of its mean over the ranks and the gradient of the rank's own.

    ``L_rank - L_rank.detach() + mean_r(L_r)``: the first two terms cancel exactly (their value is
    0.0), so the value is the same bits on every rank. One collective for all tasks, in float64.
    """
    names = list(losses)
    values = torch.stack([losses[t].detach().reshape(()).to(torch.float64) for t in names])
    all_reduce_mean_([values])
    out = {}
    for t, v in zip(names, values):
        loss = losses[t]
        const = v.to(loss.dtype)
        out[t] = (loss - loss.detach()) + const if loss.requires_grad else const.reshape(loss.shape)
    return out


def running_stat_buffers(module: nn.Module) -> list[Tensor]:
    """The ``running_mean`` / ``running_var`` buffers of every normalisation layer that tracks them."""
    out = []
    for m in module.modules():
        for name in ("running_mean", "running_var"):
            buf = getattr(m, name, None)
            if isinstance(buf, Tensor) and buf.is_floating_point():
                out.append(buf)
    return out


@torch.no_grad()
def average_running_stats(module: nn.Module) -> None:
    """Average the BatchNorm running statistics over the ranks (after each optimizer step).

    ``torch.nn.SyncBatchNorm`` does not run on CPU (gloo), so one scheme serves both backends:
    every rank normalises with its own batch statistics (plain DDP), then the running buffers
    are averaged, which keeps them identical on every rank. The running *mean* then equals the
    1-process running mean on the global batch (its update is linear in the batch mean, and the
    global batch mean is the mean of equal-sized rank batches); the running *variance* is the
    mean of the per-rank unbiased variances, which leaves out the spread of the rank means and
    uses ``n_rank - 1`` in the correction, so it is close to, not equal to, the 1-process one.
    With ``TrainConfig.freeze_bn`` (or a network without BatchNorm) a data-parallel run is the
    1-process computation on the global batch.
    """
    buffers = running_stat_buffers(module)
    if buffers:
        all_reduce_mean_(buffers)


@torch.no_grad()
def broadcast_state(module: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers to every rank."""
    for t in module.state_dict().values():
        dist.broadcast(t, src)


def unreached_parameters(module: nn.Module, example: Tensor) -> list[str]:
    """Names of the trainable parameters that the autograd graph of ``module(example)`` does not
    reach (run in eval mode, so no running statistics change). DDP needs
    ``find_unused_parameters=True`` exactly when this is not empty."""
    was = module.training
    module.eval()
    try:
        with torch.enable_grad():
            out = module(example)
    finally:
        module.train(was)
    roots = [t.grad_fn for t in _tensors(out) if t.grad_fn is not None]
    seen, reached = set(), set()
    while roots:
        fn = roots.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        variable = getattr(fn, "variable", None)
        if variable is not None:
            reached.add(id(variable))
        roots.extend(next_fn for next_fn, _ in fn.next_functions)
    return [n for n, p in module.named_parameters() if p.requires_grad and id(p) not in reached]


def _tensors(out: object) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in _tensors(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _tensors(v)]
    return []
