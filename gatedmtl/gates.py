"""Straight-through binary channel gates and cross-slot mixing (GatedMTL).

For one gated layer with ``C`` output channels and ``T`` tasks:

* gate ``m_t = 1[alpha_t > 0]`` in the forward pass, gradient of ``sigmoid(alpha_t)`` in the
  backward pass (straight-through estimator);
* task features ``phi'_t = m_t * phi_t + (1 - m_t) * psi`` (``psi`` = shared slot output);
* shared features ``psi' = sum_t softmax_t(beta)_t * phi'_t``.

A closed gate makes the task reuse the shared channel exactly (its own filter is dead); a
channel open for every task makes the shared filter dead (``psi'`` never reads it).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["ChannelGate", "straight_through"]


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
        alpha: ``[T, C]`` gate logits (open where ``alpha > 0``).
        beta: ``[T, C]`` mixing logits; the shared slot reads ``softmax(beta, dim=0)``.
        cost: ``[C]`` MACs of one channel of one slot for one sample (filter + fused norm),
            filled by :func:`gatedmtl.cost.analyze` at a given input size.
    """

    _gatedmtl_gate = True

    def __init__(self, num_tasks: int, channels: int, channel_dim: int, init_logit: float = 1.0) -> None:
        super().__init__()
        if channel_dim not in (1, -1):
            raise ValueError(f"channel_dim must be 1 or -1, got {channel_dim}")
        self.num_tasks = num_tasks
        self.channels = channels
        self.channel_dim = channel_dim
        self.alpha = nn.Parameter(torch.full((num_tasks, channels), float(init_logit)))
        self.beta = nn.Parameter(torch.zeros(num_tasks, channels))
        self.register_buffer("cost", torch.zeros(channels), persistent=False)
        self.name = ""  # dotted path of the module whose output is gated, set by convert()

    @property
    def num_slots(self) -> int:
        return self.num_tasks + 1

    def mask(self) -> Tensor:
        """``[T, C]`` gate values: hard 0/1 forward, sigmoid gradient (STE)."""
        return straight_through(self.alpha)

    def open_mask(self) -> Tensor:
        """``[T, C]`` boolean: channels each task computes with its own filter."""
        return (self.alpha > 0).detach()

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
        s = self.num_slots
        if y.shape[0] % s:
            raise ValueError(f"gate '{self.name}': batch {y.shape[0]} is not a multiple of {s} slots")
        if y.shape[self.channel_dim] != self.channels:
            raise ValueError(f"gate '{self.name}': expected {self.channels} channels on dim {self.channel_dim}, got {tuple(y.shape)}")
        view = y.reshape(s, y.shape[0] // s, *y.shape[1:])
        psi, phi = view[0], view[1:]
        m = self._shape(self.mask().to(y.dtype), y.dim() - 1)
        w = self._shape(self.mixing_weights().to(y.dtype), y.dim() - 1)
        phi = m * phi + (1 - m) * psi.unsqueeze(0)
        shared = (w * phi).sum(0, keepdim=True)
        return torch.cat([shared, phi], dim=0).reshape(y.shape)

    def extra_repr(self) -> str:
        return f"tasks={self.num_tasks}, channels={self.channels}, channel_dim={self.channel_dim}"
