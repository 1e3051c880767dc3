"""Straight-through binary channel gates and cross-slot mixing (GatedMTL).

For one gated layer with ``C`` output channels and ``T`` tasks:

* gate ``m_t = 1[alpha_t > 0]`` in the forward pass, gradient of ``sigmoid(alpha_t)`` in the
  backward pass (straight-through estimator);
* task features ``phi'_t = m_t * phi_t + (1 - m_t) * psi`` (``psi`` = shared slot output);
* shared features ``psi' = sum_t softmax_t(beta)_t * phi'_t``.

A closed gate makes the task reuse the shared channel exactly (its own filter is dead); a
channel open for every task makes the shared filter dead (``psi'`` never reads it).

With ``group > 1`` one gate logit decides ``group`` consecutive channels, so every lean layer
keeps a multiple of ``group`` filters per slot (widths that vectorised CPU kernels such as ONNX
Runtime's NCHWc convolutions run without padding).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["ChannelGate", "straight_through", "check_group", "DEFAULT_GATE_GROUP"]

DEFAULT_GATE_GROUP = 16
"""Channels per gate of a new conversion: ONNX Runtime's blocked (NCHWc) CPU convolutions run
widths in multiples of 16 without padding, and the lean graph then runs at its FLOP speed
(benchmarks/results/latency*.md); 1 gates every channel on its own, as in the GatedMTL paper."""


def straight_through(alpha: Tensor) -> Tensor:
    """Hard 0/1 gate ``1[alpha > 0]`` whose gradient is that of ``sigmoid(alpha)``."""
    soft = torch.sigmoid(alpha)
    hard = (alpha > 0).to(alpha.dtype)
    return hard + (soft - soft.detach())


class ChannelGate(nn.Module):
    """Per-task binary gates and shared-mixing logits for the ``C`` channels of one layer.

    ``forward(y[S*b, ...]) -> y'[S*b, ...]`` where slot 0 is the shared branch and the channel
    axis of each per-sample tensor is ``channel_dim`` (1 for conv/norm outputs, -1 for linear).

    Attributes:
        alpha: ``[T, G]`` gate logits, one per group of ``group`` channels (``G = ceil(C / group)``;
            open where ``alpha > 0``); :meth:`channel_logits` gives them per channel.
        beta: ``[T, C]`` mixing logits; the shared slot reads ``softmax(beta, dim=0)``.
        cost: ``[C]`` MACs of one channel of one slot for one sample (filter + fused norm),
            filled by :func:`gatedmtl.cost.analyze` at a given input size.
    """

    _gatedmtl_gate = True

    def __init__(self, num_tasks: int, channels: int, channel_dim: int, init_logit: float = 1.0,
                 group: int = 1) -> None:
        super().__init__()
        if channel_dim not in (1, -1):
            raise ValueError(f"channel_dim must be 1 or -1, got {channel_dim}")
        check_group(group)
        self.num_tasks = num_tasks
        self.channels = channels
        self.channel_dim = channel_dim
        self.group = group
        self.alpha = nn.Parameter(torch.full((num_tasks, -(-channels // group)), float(init_logit)))
        self.beta = nn.Parameter(torch.zeros(num_tasks, channels))
        self.register_buffer("cost", torch.zeros(channels), persistent=False)
        self.name = ""  # dotted path of the module whose output is gated, set by convert()

    @property
    def num_slots(self) -> int:
        return self.num_tasks + 1

    def channel_logits(self) -> Tensor:
        """``[T, C]`` gate logit of every channel (``alpha`` repeated over each group)."""
        return self.to_channels(self.alpha)

    def to_channels(self, per_group: Tensor) -> Tensor:
        """``[..., G]`` -> ``[..., C]``: each group's value repeated over its channels."""
        if self.group == 1:
            return per_group
        return per_group.repeat_interleave(self.group, dim=-1)[..., : self.channels]

    def to_groups(self, per_channel: Tensor) -> Tensor:
        """``[..., C]`` -> ``[..., G]``: the sum over each group's channels (e.g. filter costs)."""
        if self.group == 1:
            return per_channel
        pad = (-per_channel.shape[-1]) % self.group
        padded = torch.nn.functional.pad(per_channel, (0, pad))
        return padded.reshape(*per_channel.shape[:-1], -1, self.group).sum(-1)

    def set_open(self, open_: Tensor) -> None:
        """Set ``alpha`` to +-1 from a ``[T, C]`` boolean mask that is constant within every group."""
        open_ = open_.to(torch.bool).reshape(self.num_tasks, self.channels)
        groups = open_[:, :: self.group]
        if not torch.equal(self.to_channels(groups), open_):
            raise ValueError(f"gate '{self.name}': the mask is not constant within groups of {self.group} channels")
        with torch.no_grad():
            self.alpha.copy_(torch.where(groups.to(self.alpha.device), 1.0, -1.0))

    def mask(self) -> Tensor:
        """``[T, C]`` gate values: hard 0/1 forward, sigmoid gradient (STE)."""
        return straight_through(self.channel_logits())

    def open_mask(self) -> Tensor:
        """``[T, C]`` boolean: channels each task computes with its own filter."""
        return (self.channel_logits() > 0).detach()

    def mixing_weights(self) -> Tensor:
        """``[T, C]`` convex weights with which the shared slot reads the task features."""
        return torch.softmax(self.beta, dim=0)

    def _shape(self, per_task: Tensor, ndim: int) -> Tensor:
        """Broadcast ``[T, C]`` against a ``[T, b, ...]`` view with ``ndim`` dims per sample."""
        t, c = per_task.shape
        shape = [t, 1] + [1] * ndim
        shape[2 if self.channel_dim == 1 else -1] = c
        return per_task.reshape(shape)

    def forward(self, y: Tensor) -> Tensor:
        """Mix a folded tensor ``y[S*b, ...]`` (slot-major) across slots."""
        s = self.num_slots
        if y.shape[0] % s:
            raise ValueError(f"gate '{self.name}': batch {y.shape[0]} is not a multiple of {s} slots")
        return self.mix(list(y.chunk(s, dim=0)))

    def mix(self, slots: list[Tensor]) -> Tensor:
        """Mix the per-slot outputs ``slots[s][b, ...]`` into one folded tensor ``[S*b, ...]``."""
        if len(slots) != self.num_slots:
            raise ValueError(f"gate '{self.name}': expected {self.num_slots} slot outputs, got {len(slots)}")
        if slots[0].shape[self.channel_dim] != self.channels:
            raise ValueError(f"gate '{self.name}': expected {self.channels} channels on dim {self.channel_dim}, "
                             f"got {tuple(slots[0].shape)}")
        return _GateMix.apply(self.channel_logits(), self.beta, self.channel_dim, *slots)

    def extra_repr(self) -> str:
        group = f", group={self.group}" if self.group != 1 else ""
        return f"tasks={self.num_tasks}, channels={self.channels}, channel_dim={self.channel_dim}{group}"


def check_group(group: int) -> int:
    """Validate a gate group size (channels per gate logit)."""
    if isinstance(group, bool) or not isinstance(group, int) or group < 1:
        raise ValueError(f"gate group must be a positive integer (channels per gate), got {group!r}")
    return group


def _per_channel(v: Tensor, ref: Tensor, channel_dim: int) -> Tensor:
    """``[C]`` -> a view broadcastable against a per-slot tensor ``ref[b, ...]``."""
    shape = [1] * ref.dim()
    shape[channel_dim] = v.shape[0]
    return v.reshape(shape)


def _channel_sum(x: Tensor, channel_dim: int) -> Tensor:
    """Sum over every axis but the channel axis: ``[b, ...] -> [C]``."""
    dims = [d for d in range(x.dim()) if d != channel_dim % x.dim()]
    return x.sum(dims) if dims else x


class _GateMix(torch.autograd.Function):
    """Fused straight-through mixing (one pass per task forward, a few backward).

    Forward: ``phi'_t = where(alpha_t > 0, phi_t, psi)``, ``psi' = sum_t softmax(beta)_t phi'_t``,
    written straight into the folded output. Backward: the gradients of that formula with the
    hard gate replaced by ``sigmoid(alpha)`` for ``alpha`` (straight-through), as the
    unfused ``m * phi + (1 - m) * psi`` would give.
    """

    @staticmethod
    def forward(ctx, alpha: Tensor, beta: Tensor, channel_dim: int, *slots: Tensor) -> Tensor:  # noqa: ANN001
        psi = slots[0]
        num_tasks = len(slots) - 1
        out = psi.new_empty((num_tasks + 1) * psi.shape[0], *psi.shape[1:])
        views = out.view(num_tasks + 1, *psi.shape)
        hard = alpha > 0
        w = torch.softmax(beta, dim=0).to(psi.dtype)
        shared = views[0]
        shared.zero_()
        for t in range(num_tasks):
            torch.where(_per_channel(hard[t], psi, channel_dim), slots[t + 1], psi, out=views[t + 1])
            shared.addcmul_(views[t + 1], _per_channel(w[t], psi, channel_dim))
        ctx.channel_dim = channel_dim
        ctx.save_for_backward(alpha, w, *slots)  # not ``out``: the backbone may modify it in place
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: ANN001, ANN205
        alpha, w, *slots = ctx.saved_tensors
        cd = ctx.channel_dim
        psi = slots[0]
        num_tasks = len(slots) - 1
        grads = grad.reshape(num_tasks + 1, *psi.shape)
        g_shared = grads[0]
        hard = alpha > 0
        soft = torch.sigmoid(alpha)
        need_alpha, need_beta = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_alpha = torch.zeros_like(alpha) if need_alpha else None
        grad_w = torch.zeros_like(w) if need_beta else None
        grad_slots: list[Tensor | None] = [None] * (num_tasks + 1)
        grad_psi = torch.zeros_like(psi) if ctx.needs_input_grad[3] else None
        for t in range(num_tasks):
            g_t = torch.addcmul(grads[t + 1], g_shared, _per_channel(w[t], psi, cd))  # dL/dphi'_t
            m_t = _per_channel(hard[t], psi, cd)
            if ctx.needs_input_grad[4 + t]:
                grad_slots[t + 1] = torch.where(m_t, g_t, torch.zeros((), dtype=g_t.dtype))
            if grad_psi is not None:
                grad_psi += torch.where(m_t, torch.zeros((), dtype=g_t.dtype), g_t)
            if need_alpha:
                diff = _channel_sum((slots[t + 1] - psi) * g_t, cd)
                grad_alpha[t] = (soft[t] * (1 - soft[t])) * diff.to(alpha.dtype)
            if need_beta:
                phi_t = torch.where(m_t, slots[t + 1], psi)
                grad_w[t] = _channel_sum(phi_t * g_shared, cd).to(w.dtype)
        grad_beta = None
        if need_beta:
            grad_beta = (w * (grad_w - (w * grad_w).sum(0, keepdim=True))).to(alpha.dtype)
        grad_slots[0] = grad_psi
        return (grad_alpha, grad_beta, None, *grad_slots)
