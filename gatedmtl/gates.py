"""Straight-through binary channel gates and cross-slot mixing (GatedMTL).

For one gated layer with ``C`` output channels and ``T`` tasks:

* gate ``m_t = 1[alpha_t > 0]`` in the forward pass, gradient of ``sigmoid(alpha_t)`` in the
  backward pass (straight-through estimator);
* task features ``phi'_t = m_t * phi_t + (1 - m_t) * psi`` (``psi`` = shared slot output);
* shared features ``psi' = sum_t w_t * phi'_t`` with mixing weights ``w`` per channel:
  ``softmax_t(beta)`` (``mix="soft"``, the paper's convex mix) or its one-hot argmax
  (``mix="hard"``, see below).

A closed gate makes the task reuse the shared channel exactly (its own filter is dead); a
channel open for every task makes the shared filter dead (``psi'`` never reads it).

**Hard mix.** ``w = onehot(argmax_t beta)`` in the forward pass, the gradient of
``softmax_t(beta)`` in the backward pass (straight-through, like the gates). The weights are
exactly one-hot at every step, so there is no temperature to anneal and nothing to project at
the end: the trained model is the model that is pruned, and after pruning the shared slot's next
input is a pure channel selection (one gather, no multiply-add), channel ``c`` taken from task
``argmax beta[:, c]`` where that task's gate is open and from the shared slot where it is closed.
Ties (``beta`` starts at zero) go to the first task.

**Temperature.** The soft mix reads ``softmax_t(beta / temperature)``; ``temperature`` is a plain
attribute (1 by default, not saved with the weights). Training with ``mix="anneal"``
(:class:`gatedmtl.train.MixAnneal`) lowers it towards zero and then switches the gate to the hard
mix, so that the shared slot first learns from a convex mix and ends on a channel selection.

With ``group > 1`` one gate logit decides ``group`` consecutive channels, so every lean layer
keeps a multiple of ``group`` filters per slot (widths that vectorised CPU kernels such as ONNX
Runtime's NCHWc convolutions run without padding).

**Prefix structure** (``structure="prefix"``). Each task keeps a leading run of the layer's
channels and borrows the rest: the effective gate logits of a task are its ``alpha`` sorted in
decreasing order, so group ``g`` is open when more than ``g`` of the task's logits are positive
(the open groups are ``0 .. k_t - 1``, ``k_t`` = the number of positive logits), and the gradient
of position ``g`` reaches the logit sorted there (one logit per position, as with free gates: the
number of open groups moves as it would with free gates). The shared slot reads one task per
layer (the mixing logits are ``beta`` averaged over the channels). A task learns how many
channels it keeps, not which. In the lean model every task's full width is then its own branch
output followed by the shared branch's last channels, which the lean layer computes as separate
pieces, so that each restore is a concat of whole branch outputs (no channel gather, which ONNX
Runtime's blocked CPU layout cannot keep), and the shared slot's next input is one task's
restore as it is. ``"free"`` (default) is the paper's gates.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["ChannelGate", "straight_through", "check_group", "check_mix", "check_structure", "DEFAULT_GATE_GROUP",
           "MIX_MODES", "GATE_STRUCTURES"]

MIX_MODES = ("soft", "hard")
"""How the shared slot reads the task features: ``softmax(beta)`` or its straight-through one-hot argmax."""

GATE_STRUCTURES = ("free", "prefix")
"""Which open sets a gate may learn: any (the paper's gates) or a leading run of channels per task (module docstring)."""

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
        beta: ``[T, C]`` mixing logits; the shared slot reads ``softmax(beta, dim=0)``
            (``mix_mode="soft"``) or its one-hot argmax (``"hard"``), see :meth:`mixing_weights`.
        mix_mode: ``"soft"`` or ``"hard"`` (module docstring).
        structure: ``"free"`` or ``"prefix"`` (module docstring).
        temperature: divides ``beta`` in the soft mix (module docstring); positive, 1 by default.
        cost: ``[C]`` MACs of one channel of one slot for one sample (filter + fused norm; summed
            over the layers that use the gate when it is tied), filled by
            :func:`gatedmtl.cost.analyze` at a given input size.
    """

    _gatedmtl_gate = True

    def __init__(self, num_tasks: int, channels: int, channel_dim: int, init_logit: float = 1.0,
                 group: int = 1, mix: str = "soft", structure: str = "free") -> None:
        super().__init__()
        if channel_dim not in (1, -1):
            raise ValueError(f"channel_dim must be 1 or -1, got {channel_dim}")
        check_group(group)
        self.mix_mode = check_mix(mix)
        self.structure = check_structure(structure)
        self.temperature = 1.0
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

    def group_logits(self) -> Tensor:
        """``[T, G]`` effective gate logit of every group: ``alpha``, or each task's sorted in decreasing order with
        the prefix structure."""
        if self.structure == "prefix":
            return torch.sort(self.alpha, dim=1, descending=True).values
        return self.alpha

    def channel_logits(self) -> Tensor:
        """``[T, C]`` gate logit of every channel (:meth:`group_logits` repeated over each group)."""
        return self.to_channels(self.group_logits())

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
        if self.structure == "prefix" and bool((groups[:, 1:] & ~groups[:, :-1]).any()):
            raise ValueError(f"gate '{self.name}' has the prefix structure: every task's open channels must be a "
                             "leading run of the layer's channels")
        with torch.no_grad():
            self.alpha.copy_(torch.where(groups.to(self.alpha.device), 1.0, -1.0))

    def mask(self) -> Tensor:
        """``[T, C]`` gate values: hard 0/1 forward, sigmoid gradient (STE)."""
        return straight_through(self.channel_logits())

    def open_mask(self) -> Tensor:
        """``[T, C]`` boolean: channels each task computes with its own filter."""
        return (self.channel_logits() > 0).detach()

    def mixing_weights(self) -> Tensor:
        """``[T, C]`` convex weights with which the shared slot reads the task features.

        ``softmax(beta / temperature)`` (soft mix) or ``onehot(argmax beta)`` with the softmax's
        gradient (hard mix).
        """
        if self.mix_mode == "soft":
            return torch.softmax(self.mix_logits(), dim=0)
        beta = self.mix_logits()
        soft = torch.softmax(beta, dim=0)
        return _one_hot(beta).to(soft.dtype) + (soft - soft.detach())

    def mix_logits(self) -> Tensor:
        """``[T, C]`` the logits the mix reads: ``beta / temperature`` (soft mix), ``beta`` (hard mix);
        with the prefix structure ``beta`` averaged over the channels (one task per layer)."""
        beta = self.beta
        if self.structure == "prefix":
            beta = beta.mean(dim=1, keepdim=True).expand_as(beta)
        if self.mix_mode == "hard" or self.temperature == 1.0:
            return beta
        return beta / self.temperature

    def set_mix_state(self, mode: str, temperature: float = 1.0) -> None:
        """Switch the mix (``"soft"`` / ``"hard"``) and the soft mix's temperature (> 0)."""
        mode = check_mix(mode)
        temperature = float(temperature)
        if not temperature > 0 or temperature == float("inf"):
            raise ValueError(f"gate '{self.name}': the mix temperature must be positive and finite, got {temperature}")
        self.mix_mode, self.temperature = mode, temperature

    def mix_choice(self) -> Tensor:
        """``[C]`` the task that the hard mix reads per channel (``argmax`` of :meth:`mix_logits`, ties: the first)."""
        return self.mix_logits().detach().argmax(0)

    def set_mix_choice(self, choice: Tensor) -> None:
        """Set ``beta`` so that the hard mix reads task ``choice[c]`` at channel ``c`` (``[C]`` integers)."""
        choice = torch.as_tensor(choice).to(torch.long).flatten()
        if choice.numel() != self.channels or (choice.numel() and (choice.min() < 0 or choice.max() >= self.num_tasks)):
            raise ValueError(f"gate '{self.name}': a mix choice holds {self.channels} task indices in "
                             f"[0, {self.num_tasks}), got {choice.numel()} values")
        if self.structure == "prefix" and choice.numel() and bool((choice != choice[0]).any()):
            raise ValueError(f"gate '{self.name}' has the prefix structure: the shared slot reads one task per layer, "
                             "so a mix choice must name the same task at every channel")
        with torch.no_grad():
            self.beta.zero_()
            self.beta.scatter_(0, choice.to(self.beta.device)[None], 1.0)

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

    def mix(self, slots: list[Tensor], shared_mix: bool = True) -> Tensor:
        """Mix the per-slot outputs ``slots[s][b, ...]`` into one folded tensor ``[S*b, ...]``.

        ``shared_mix=False``: the shared slot passes its own output on instead of the mix of the
        tasks (a layer whose only readers are depthwise convs with this gate, see
        ``convert(..., skip_depthwise_mix=True)``); the tasks are gated as always.
        """
        if len(slots) != self.num_slots:
            raise ValueError(f"gate '{self.name}': expected {self.num_slots} slot outputs, got {len(slots)}")
        if slots[0].shape[self.channel_dim] != self.channels:
            raise ValueError(f"gate '{self.name}': expected {self.channels} channels on dim {self.channel_dim}, "
                             f"got {tuple(slots[0].shape)}")
        return _GateMix.apply(self.channel_logits(), self.mix_logits(), self.channel_dim, self.mix_mode == "hard",
                              shared_mix, *slots)

    def extra_repr(self) -> str:
        group = f", group={self.group}" if self.group != 1 else ""
        group += f", structure={self.structure!r}" if self.structure != "free" else ""
        mix = f", mix={self.mix_mode!r}" if self.mix_mode != "soft" else ""
        if self.mix_mode == "soft" and self.temperature != 1.0:
            mix += f", temperature={self.temperature:g}"
        return f"tasks={self.num_tasks}, channels={self.channels}, channel_dim={self.channel_dim}{group}{mix}"


def check_group(group: int) -> int:
    """Validate a gate group size (channels per gate logit)."""
    if isinstance(group, bool) or not isinstance(group, int) or group < 1:
        raise ValueError(f"gate group must be a positive integer (channels per gate), got {group!r}")
    return group


def check_mix(mix: str, allowed: tuple[str, ...] = MIX_MODES) -> str:
    """Validate a mix mode: one of ``allowed`` (the gates' :data:`MIX_MODES` by default)."""
    if mix not in allowed:
        raise ValueError(f"mix must be one of {', '.join(allowed)} (how the shared slot reads the task features), "
                         f"got {mix!r}")
    return mix


def check_structure(structure: str) -> str:
    """Validate a gate structure: one of :data:`GATE_STRUCTURES`."""
    if structure not in GATE_STRUCTURES:
        raise ValueError(f"gate structure must be one of {', '.join(GATE_STRUCTURES)} (free: any open channels, as "
                         f"in the paper; prefix: a leading run of channels per task), got {structure!r}")
    return structure


def _one_hot(beta: Tensor) -> Tensor:
    """``[T, C]`` boolean: ``True`` at ``argmax_t beta[:, c]`` (ties: the first task)."""
    choice = beta.detach().argmax(0)
    return torch.arange(beta.shape[0], device=beta.device)[:, None] == choice[None]


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

    Forward: ``phi'_t = where(alpha_t > 0, phi_t, psi)``, ``psi' = sum_t w_t phi'_t`` with
    ``w = softmax(beta)`` (or its one-hot argmax with ``hard_mix``), written straight into the
    folded output. Backward: the gradients of that formula with the hard gate replaced by
    ``sigmoid(alpha)`` for ``alpha`` and the one-hot weights by ``softmax(beta)`` for ``beta``
    (straight-through), as the unfused ``m * phi + (1 - m) * psi`` would give. With
    ``shared_mix=False`` the shared slot is ``psi`` itself (no mix, no gradient for ``beta``).
    """

    @staticmethod
    def forward(ctx, alpha: Tensor, beta: Tensor, channel_dim: int, hard_mix: bool, shared_mix: bool,  # noqa: ANN001
                *slots: Tensor) -> Tensor:
        psi = slots[0]
        num_tasks = len(slots) - 1
        out = psi.new_empty((num_tasks + 1) * psi.shape[0], *psi.shape[1:])
        views = out.view(num_tasks + 1, *psi.shape)
        hard = alpha > 0
        soft = torch.softmax(beta, dim=0)
        w = (_one_hot(beta) if hard_mix else soft).to(psi.dtype)
        shared = views[0]
        if shared_mix:
            shared.zero_()
        else:
            shared.copy_(psi)
        for t in range(num_tasks):
            torch.where(_per_channel(hard[t], psi, channel_dim), slots[t + 1], psi, out=views[t + 1])
            if shared_mix:
                shared.addcmul_(views[t + 1], _per_channel(w[t], psi, channel_dim))
        ctx.channel_dim = channel_dim
        ctx.shared_mix = shared_mix
        ctx.save_for_backward(alpha, w, soft, *slots)  # not ``out``: the backbone may modify it in place
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: ANN001, ANN205
        alpha, w, soft_w, *slots = ctx.saved_tensors
        cd = ctx.channel_dim
        psi = slots[0]
        num_tasks = len(slots) - 1
        grads = grad.reshape(num_tasks + 1, *psi.shape)
        g_shared = grads[0]
        hard = alpha > 0
        soft = torch.sigmoid(alpha)
        need_alpha, need_beta = ctx.needs_input_grad[0], ctx.needs_input_grad[1] and ctx.shared_mix
        grad_alpha = torch.zeros_like(alpha) if need_alpha else None
        grad_w = torch.zeros_like(w) if need_beta else None
        grad_slots: list[Tensor | None] = [None] * (num_tasks + 1)
        first = 5  # index of the first slot among forward's inputs
        grad_psi = None
        if ctx.needs_input_grad[first]:  # without the mix the shared slot's gradient reaches psi directly
            grad_psi = torch.zeros_like(psi) if ctx.shared_mix else g_shared.clone()
        for t in range(num_tasks):
            g_t = torch.addcmul(grads[t + 1], g_shared, _per_channel(w[t], psi, cd)) if ctx.shared_mix else grads[t + 1]
            m_t = _per_channel(hard[t], psi, cd)
            if ctx.needs_input_grad[first + 1 + t]:
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
        if need_beta:  # through softmax(beta) (the hard mix's straight-through gradient too)
            sw = soft_w.to(grad_w.dtype)
            grad_beta = (sw * (grad_w - (sw * grad_w).sum(0, keepdim=True))).to(alpha.dtype)
        grad_slots[0] = grad_psi
        return (grad_alpha, grad_beta, None, None, None, *grad_slots)
