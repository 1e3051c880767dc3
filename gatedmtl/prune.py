"""``prune``: gated model -> lean model with every closed gate cut away.

Per gated layer and slot, only the filters that slot really computes are kept (torch-pruning's
single-layer functions do the cut; no dependency graph, since the full width is restored):
a task keeps its open channels, the shared slot keeps the channels that some task borrows.
The full width is rebuilt per task by one gather from one concat of the layer's branch outputs
(nothing at all where a task keeps every channel or none), and the shared slot's next input is
the same convex mix of task features as in the gated model.

The lean graph is laid out for ONNX Runtime. Normally the computed slots run as per-slot streams
(:mod:`gatedmtl.streams`: the backbone's code once per slot, no slot split or concat): per gated
layer the branch convs (conv+BN pairs stay adjacent, so they fold), one Concat of the branch
outputs, and per partly open task one Gather, left deferred (:mod:`gatedmtl.deferred`) until an
op needs the full tensor, so that activations after the layer fuse into the branch convs and a
depthwise layer's input selection composes into the same gather (none at all where the depthwise
layer's gate is its input layer's: ``convert(..., tie_depthwise=True)``, the task reads its own
branch output as it is), and a residual sum of two layers with one gate (``tie_residual=True``)
adds their branch outputs part by part instead of two gathered tensors. The shared slot reads a Mul/Add
mix of the tasks (soft mix; skipped where the shared slot is dead or every task borrows every
channel) or one more Gather (hard mix). Where the streams cannot run a backbone, the slots are
folded on the batch axis (one Reshape + Gathers to split them per layer, one Concat to join them).
Slots that are provably not needed are not computed at all (see :func:`computed_slots`): with
every gate closed the lean model *is* the plain backbone.

With prefix gates (``convert(..., gate_structure="prefix")``) a task borrows every channel after
its own, so the shared branch is cut into at most T pieces (:class:`SplitBranch`, where every
piece is a whole NCHWc block wide: :data:`NCHWC_BLOCK`) and every restore is a Concat of whole
branch outputs, which ONNX Runtime keeps in its blocked layout; the hard mix then reads one
task's restore as it is.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch_pruning as tp
from torch import Tensor, nn

from .deferred import Deferred, materialize
from .export import relative_error
from .slots import SlotModule, _batch_dim_in, _merge, iter_tensors
from .streams import Streams, StreamsError, distinct, keep_alive_list, merge_streams, split_streams
from .streams import _count as _count_streams
from .streams import _pick as _pick_stream
from .surgery import GatedModel, _parents, conv_group_size

__all__ = ["prune", "LeanModel", "LeanGatedLayer", "LeanSlotModule", "SplitBranch", "prune_out_channels",
           "computed_slots", "shared_pieces"]


def prune_out_channels(module: nn.Module, keep: Tensor) -> nn.Module:
    """Keep only output channels ``keep`` (sorted indices) of a conv, linear or batch norm, in place."""
    if isinstance(module, nn.Linear):
        width = module.out_features
    elif isinstance(module, nn.modules.conv._ConvNd):
        width = module.out_channels
    elif isinstance(module, nn.modules.batchnorm._BatchNorm):
        width = module.num_features
    else:
        raise TypeError(f"cannot prune output channels of {type(module).__name__}")
    kept = set(keep.tolist())
    remove = [i for i in range(width) if i not in kept]
    if not remove:
        return module
    if isinstance(module, nn.Linear):
        tp.prune_linear_out_channels(module, remove)
    elif isinstance(module, nn.modules.conv._ConvNd):
        if module.groups > 1 and conv_group_size(module) == 1:
            tp.prune_depthwise_conv_out_channels(module, remove)
        elif module.groups > 1:
            _keep_conv_groups(module, keep)
            return module
        else:
            tp.prune_conv_out_channels(module, remove)
    else:
        tp.prune_batchnorm_out_channels(module, remove)
    # per-output-channel tensors that torch-pruning does not know (e.g. ScaledStdConv2d's gain)
    for name, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
        if t.dim() and t.shape[0] == width:
            sliced = t.detach()[keep.to(t.device)].clone()
            if isinstance(t, nn.Parameter):
                setattr(module, name, nn.Parameter(sliced, requires_grad=t.requires_grad))
            else:
                setattr(module, name, sliced)
    return module


def _keep_conv_groups(conv: nn.modules.conv._ConvNd, keep: Tensor) -> None:
    """Keep the filters ``keep`` (whole groups) of a grouped convolution: a grouped conv over the kept groups."""
    per = conv_group_size(conv)
    groups = keep.view(-1, per)[:, 0] // per
    if keep.numel() % per or not torch.equal(keep, (groups[:, None] * per + torch.arange(per)).flatten()):
        raise ValueError(f"a grouped convolution keeps whole groups of {per} filters, not {keep.tolist()[:8]}...")
    conv.weight = nn.Parameter(conv.weight.detach()[keep].clone(), requires_grad=conv.weight.requires_grad)
    if conv.bias is not None:
        conv.bias = nn.Parameter(conv.bias.detach()[keep].clone(), requires_grad=conv.bias.requires_grad)
    conv.in_channels = conv.in_channels // conv.groups * groups.numel()
    conv.out_channels = keep.numel()
    conv.groups = groups.numel()


def conv_input_channels(conv: nn.Module, keep: Tensor) -> Tensor | None:
    """Input channels that the kept filters ``keep`` of a grouped/depthwise conv read (``None``: all)."""
    if not isinstance(conv, nn.modules.conv._ConvNd) or conv.groups == 1:
        return None
    per_out = conv.out_channels // conv.groups
    per_in = conv.in_channels // conv.groups
    groups = torch.unique(keep // per_out)
    if groups.numel() == conv.groups:
        return None
    return (groups[:, None] * per_in + torch.arange(per_in)).flatten()


def _static_dims(x: Tensor) -> tuple[int, ...]:
    """The per-sample dims of ``x`` as Python ints (constants in a traced graph; batch stays dynamic)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return tuple(int(d) for d in x.shape[1:])


def _slot_view(x: Tensor, num_slots: int) -> Tensor:
    """``[S*b, ...] -> [S, b, ...]``; the per-sample dims become constants (one ONNX Reshape)."""
    return x.reshape((num_slots, -1) + _static_dims(x))


class _SplitSlots(torch.autograd.Function):
    """``x[S*b, ...]`` -> its ``S`` batch chunks; exported as ONE ONNX ``Split``.

    Used only while exporting: per-chunk Gathers (or Slices) become Split + Squeeze in ONNX
    Runtime, and that Squeeze copies every chunk a second time.
    """

    @staticmethod
    def forward(ctx, x: Tensor, num_slots: int) -> tuple[Tensor, ...]:  # noqa: ANN001
        return tuple(c.clone() for c in x.chunk(num_slots, 0))

    @staticmethod
    def symbolic(g, x, num_slots: int):  # noqa: ANN001, ANN205
        if g.opset >= 18:  # equal split of the (dynamic) batch axis
            return g.op("Split", x, axis_i=0, num_outputs_i=num_slots, outputs=num_slots)
        batch = g.op("Gather", g.op("Shape", x), g.op("Constant", value_t=torch.tensor([0])), axis_i=0)
        size = g.op("Div", batch, g.op("Constant", value_t=torch.tensor([num_slots])))
        sizes = g.op("Tile", size, g.op("Constant", value_t=torch.tensor([num_slots])))
        return g.op("Split", x, sizes, axis_i=0, outputs=num_slots)


def _slot_chunks(x: Tensor, num_slots: int, wanted: Sequence[int]) -> dict[int, Tensor]:
    """Chunks ``wanted`` of ``x[S*b, ...]`` along the batch axis.

    In ONNX: one Split of the batch axis when several chunks are wanted (see
    :class:`_SplitSlots`), a Reshape to ``[S, b, ...]`` (no copy) + one Gather for one chunk.
    """
    if len(wanted) > 1 and torch.onnx.is_in_onnx_export() and x.dim() >= 1:
        chunks = _SplitSlots.apply(x, num_slots)
        return {i: chunks[i] for i in wanted}
    view = _slot_view(x, num_slots)
    return {i: view[i] for i in wanted}


class SplitBranch(nn.Module):
    """A lean layer's shared branch computed as pieces: ``forward(x) -> [y_0, y_1, ...]``.

    Piece ``i`` holds consecutive kept filters of the shared branch (``cat(pieces)`` is the whole
    branch's output, in its order) and reads input channels ``in_index_i`` of ``x`` (``None``:
    all of them; a depthwise piece reads its own channels). Used where every task borrows a
    whole number of pieces (gates with the prefix structure: a task borrows the channels after
    its own, so the pieces end where some task's own channels end): each task's restore is then
    a concat of whole branch outputs and no channel gather.
    """

    def __init__(self, pieces: Sequence[nn.Module], in_index: Sequence[Tensor | None]) -> None:
        super().__init__()
        if len(pieces) != len(in_index) or not pieces:
            raise ValueError("a split branch needs one input index (or None) per piece, and at least one piece")
        self.pieces = nn.ModuleList(pieces)
        for i, idx in enumerate(in_index):
            self.register_buffer(f"in_index_{i}", idx)

    def forward(self, x: Tensor | Deferred) -> list[Tensor]:
        outs = []
        for i, piece in enumerate(self.pieces):
            idx = getattr(self, f"in_index_{i}")
            outs.append(piece(materialize(x.index_select(1, idx) if idx is not None else x)))
        return outs

    def first_layer(self) -> nn.Module:
        """The first piece's filter layer (for attributes that backbone code reads)."""
        piece = self.pieces[0]
        return piece[0] if isinstance(piece, nn.Sequential) else piece


def shared_pieces(keep: Tensor, open_: Tensor) -> list[Tensor]:
    """``keep`` (the shared branch's kept channels, sorted) cut where the set of tasks borrowing a channel changes.

    ``open_``: ``[T, C]`` gate mask. Every task then borrows whole pieces. With the prefix
    structure a task borrows every channel after its own, so there is at most one piece per task.
    """
    if keep.numel() == 0:
        return []
    borrowers = (~open_[:, keep]).T  # [K, T]
    change = (borrowers[1:] != borrowers[:-1]).any(1) | (keep[1:] != keep[:-1] + 1)
    cuts = [0, *(change.nonzero().flatten() + 1).tolist(), int(keep.numel())]
    return [keep[a:b] for a, b in zip(cuts[:-1], cuts[1:])]


class LeanGatedLayer(nn.Module):
    """One gated layer after pruning: ``forward(x[S*b, ...]) -> y[S*b, ...]``.

    Slot ``s`` runs ``branches[s]`` (its kept filters, plus the fused norm when the layer was
    gated after conv+norm) on its input chunk; depthwise branches first gather their input
    channels. Each task's full width comes from one of three sources fixed at prune time:

    * ``"own"``: every channel open, the task branch's output as it is;
    * ``"shared"``: every channel closed, the shared branch's output as it is;
    * ``"pool"``: one gather from ``pool = cat([shared, own_t, ...])`` (one concat per layer).

    The shared slot's output is ``sum_t weights[t] * full_t`` (``mix="mix"``), the shared
    branch's output when every task is closed everywhere (``mix="shared"``: the weights sum to
    one), or, when no later layer reads the shared slot (``mix="dead"``, set by :func:`prune`),
    a copy of the first task's output that nothing uses. With a hard mix (``choice``: the task
    read per channel) it is one gather ``pool[mix_index]`` (``mix="select"``), a task branch's
    output as it is where that task is chosen and open everywhere (``"copy"``), or the shared
    branch's output where every chosen channel is closed (``"shared"``). With ``direct``
    (``convert(..., skip_depthwise_mix=True)``: only depthwise layers with this gate read the
    shared slot, and only at the channels that the shared branch computes) the shared slot's
    output is the shared branch's output as it is (``"direct"``: in the full width its other
    channels are undefined).

    ``slots`` are the slots folded on the batch axis (:attr:`LeanModel.slots`); with a single
    one, ``forward`` is that slot's branch alone.
    """

    def __init__(self, branches: Sequence[nn.Module | None], in_index: Sequence[Tensor | None],
                 keep: Sequence[Tensor], open_: Tensor, weights: Tensor | None, channel_dim: int,
                 choice: Tensor | None = None, direct: bool = False) -> None:
        super().__init__()
        num_tasks, width = open_.shape
        self.branches = nn.ModuleList(b if b is not None else nn.Identity() for b in branches)
        self.present = [b is not None for b in branches]
        self.num_slots = len(branches)
        self.slots: tuple[int, ...] = tuple(range(self.num_slots))  # slots on the batch axis, see LeanModel
        self.defer = False  # as per-slot streams: leave outputs as deferred restores (see forward_deferred)
        self.alive_redundant: frozenset[int] = frozenset()  # absent slots whose input the output reads anyway
        self.channel_dim = channel_dim
        self.channels = width
        for s, idx in enumerate(in_index):
            self.register_buffer(f"in_index_{s}", idx)
        self.hard = choice is not None
        if not self.hard and weights is None:
            raise ValueError("a soft-mix layer needs its mixing weights (or give the hard mix's choice)")
        self.register_buffer("weights", None if self.hard else weights)
        self.kept = [int(k.numel()) for k in keep]
        self._keep = [k.cpu() for k in keep]  # build-time layout inputs (see _layout)
        self._open = open_.cpu()
        self.sources: list[str] = []
        for t in range(num_tasks):
            n = self.kept[t + 1]
            self.sources.append("own" if n == width else "shared" if n == 0 else "pool")

        self.mix_copy: int | None = None
        self._mix_src: Tensor | None = None
        if self.hard:  # slot whose channel the shared slot reads: the chosen task where it is open, else shared
            choice = choice.cpu().to(torch.long)
            self._mix_src = torch.where(self._open[choice, torch.arange(width)], choice + 1, 0)
            read = sorted(set(self._mix_src.tolist()))
            self.mix = "shared" if read == [0] else "copy" if len(read) == 1 else "select"
            if self.mix == "copy":  # one task everywhere, open everywhere: its branch output as it is
                self.mix_copy = read[0]
        else:
            self.mix = "shared" if all(src == "shared" for src in self.sources) else "mix"
        if direct and self.mix != "shared":  # the readers take the shared branch's kept channels only
            self.mix = "direct" if self.kept[0] else "dead"
            self.mix_copy = None
        closed_tasks = [t for t, src in enumerate(self.sources) if src == "shared"]
        self.register_buffer("mix_shared", weights[closed_tasks].sum(0) if closed_tasks and not self.hard else None)
        self._layout()

    def _layout(self) -> None:
        """The pool's slots and the gather indices into it, for the current ``mix``.

        The pool holds the shared slot and the partly open tasks (whose full width is gathered
        from it), plus, with a hard ``"select"`` mix, every task that the shared slot reads.
        """
        width = self.channels
        device = next(iter(self.branches.parameters()), torch.empty(0)).device
        pool_tasks = [t for t, src in enumerate(self.sources) if src == "pool"]
        pooled = {0, *(t + 1 for t in pool_tasks)} if pool_tasks else set()
        if self.mix == "select":
            pooled |= set(self._mix_src.tolist())
        self.pool_slots = sorted(pooled)
        pos: dict[int, Tensor] = {}
        offset = 0
        for s in self.pool_slots:
            pos[s] = _positions(self._keep[s], width) + offset
            offset += self.kept[s]
        for t in range(len(self.sources)):
            idx = torch.where(self._open[t], pos[t + 1], pos[0]) if self.sources[t] == "pool" else None
            self.register_buffer(f"restore_{t}", idx.to(device) if idx is not None else None)
        direct_index = None
        if self.mix == "direct":  # channels that the shared branch does not compute read its first one
            direct_index = _positions(self._keep[0], width).clamp(min=0)
        self.register_buffer("direct_index", direct_index.to(device) if direct_index is not None else None)
        mix_index = None
        if self.mix == "select":
            table = torch.stack([pos.get(s, torch.full((width,), -1)) for s in range(self.num_slots)])
            mix_index = table[self._mix_src, torch.arange(width)]
        self.register_buffer("mix_index", mix_index.to(device) if mix_index is not None else None)
        # the task whose restore the hard mix reads as it is (one task chosen at every channel)
        self.mix_same = None
        for t, src in enumerate(self.sources):
            if mix_index is not None and src == "pool" and torch.equal(mix_index, getattr(self, f"restore_{t}")):
                self.mix_same = t
                break

    def set_dead(self) -> None:
        """No later layer reads this layer's shared-slot output: stop computing its mix."""
        self.mix = "dead"
        self.mix_copy = None
        self._layout()

    def __getattr__(self, name: str) -> Any:
        # Backbone code may read attributes of the layer it called (``.weight.dtype``,
        # ``.kernel_size``): answer them from the first computed branch's layer.
        try:
            return super().__getattr__(name)
        except AttributeError:
            branches = self.__dict__.get("_modules", {}).get("branches")
            if branches is None or name.startswith("__"):
                raise
            for present, branch in zip(self.__dict__.get("present", ()), branches):
                if present:
                    if isinstance(branch, SplitBranch):
                        branch = branch.first_layer()
                    layer = branch[0] if isinstance(branch, nn.Sequential) else branch
                    return getattr(layer, name)
            raise

    def _weight(self, w: Tensor, like: Tensor) -> Tensor:
        if self.channel_dim == 1 and like.dim() > 2:
            w = w.reshape((-1,) + (1,) * (like.dim() - 2))
        return w.to(like.dtype)

    def _branch(self, s: int, x: Tensor | Deferred) -> Tensor | list[Tensor]:
        if isinstance(self.branches[s], SplitBranch):  # its pieces select their own input channels
            return self.branches[s](x)
        idx = getattr(self, f"in_index_{s}")
        if idx is not None:  # a deferred input composes this selection with its own gather
            x = x.index_select(1, idx)
        return self.branches[s](materialize(x))

    def forward(self, x: Tensor | Streams) -> Tensor | Streams:
        if isinstance(x, Streams):  # per-slot streams: no split, no concat of the slots
            outs = self.forward_deferred(x.tensors) if self.defer else self.forward_slots(materialize(x.tensors))
            for i, s in enumerate(self.slots):
                if not self.present[s] and len(self.slots) > 1:
                    # Slot s computes nothing here and reads another slot's output. Keep its input
                    # stream an ancestor of the model's output (an empty slice summed: 0), so that the
                    # exported graph computes what the folded model and the FLOP prediction count,
                    # unless the output reads that stream anyway (see _drop_redundant_keep_alives).
                    if isinstance(x.alive, _KeepAliveProbe):
                        x.alive.sources.append((self, s, x.tensors[i]))
                    elif s not in self.alive_redundant:
                        x.alive.append(_empty_sum(x.tensors[i], self.channel_dim))
            return Streams(distinct(outs), x.alive)
        if len(self.slots) == 1:  # one slot computed: its branch has every channel
            return self._branch(self.slots[0], x)
        computed = [i for i, s in enumerate(self.slots) if self.present[s]]
        chunks = _slot_chunks(x, len(self.slots), computed)
        return torch.cat(self.forward_slots([chunks.get(i) for i in range(len(self.slots))]), 0)

    def forward_slots(self, inputs: Sequence[Tensor | None]) -> list[Tensor]:
        """``inputs[i]``: the input of slot ``slots[i]`` (``None`` where that slot's branch is absent).

        Returns the layer's output for each slot in ``slots``, in the same order.
        """
        if len(self.slots) == 1:
            return [self._branch(self.slots[0], inputs[0])]
        outs: list[Tensor | None] = [None] * self.num_slots
        for i, s in enumerate(self.slots):
            if self.present[s]:
                outs[s] = self._branch(s, inputs[i])
        dim = self.channel_dim
        if isinstance(outs[0], list):  # a split shared branch: its pieces joined
            outs[0] = torch.cat(outs[0], dim)
        shared = outs[0]
        pool = torch.cat([outs[s] for s in self.pool_slots], dim=dim) if self.pool_slots else None
        full: list[Tensor] = []
        for t, src in enumerate(self.sources):
            if src == "own":
                full.append(outs[t + 1])
            elif src == "shared":
                full.append(shared)
            else:
                full.append(pool.index_select(dim, getattr(self, f"restore_{t}")))
        return [self._mixed(outs, pool, full) if s == 0 else full[s - 1] for s in self.slots]

    def forward_deferred(self, inputs: Sequence[Tensor | Deferred]) -> list[Deferred]:
        """:meth:`forward_slots` with each slot's output left as a :class:`~gatedmtl.deferred.Deferred` restore.

        A task's full width stays "this gather of the branch outputs" until an op needs the
        tensor itself; channel-wise ops after the layer run on the branch outputs (once each) and
        a later channel selection composes with the gather. A soft mix reads every task's full
        width, so a layer with one restores the tasks at once (as :meth:`forward_slots`).
        """
        if len(self.slots) == 1:
            return [Deferred([self._branch(self.slots[0], inputs[0])], None, self.channel_dim)]
        if self.mix == "mix":
            return [Deferred([o], None, self.channel_dim) for o in self.forward_slots(materialize(list(inputs)))]
        outs: list[Tensor | None] = [None] * self.num_slots
        for i, s in enumerate(self.slots):
            if self.present[s]:
                outs[s] = self._branch(s, inputs[i])
        memo: dict = {}
        dim = self.channel_dim
        # a split shared branch (SplitBranch) gives its pieces: every restore reads them as parts
        shared = outs[0] if isinstance(outs[0], list) else [outs[0]]
        pool = [part for s in self.pool_slots for part in (shared if s == 0 else [outs[s]])]

        def whole_shared(index: Tensor | None = None) -> Deferred:
            if index is None and len(shared) > 1:
                index = torch.arange(sum(int(p.shape[dim]) for p in shared), device=shared[0].device)
            return Deferred(shared, index, dim, memo)

        full: list[Deferred] = []
        for t, src in enumerate(self.sources):
            if src == "pool":
                full.append(Deferred(pool, getattr(self, f"restore_{t}"), dim, memo))
            else:
                full.append(Deferred([outs[t + 1]], None, dim, memo) if src == "own" else whole_shared())
        result = []
        for s in self.slots:
            if s:
                result.append(full[s - 1])
            elif self.mix == "shared":
                result.append(whole_shared())
            elif self.mix == "direct":
                result.append(whole_shared(self.direct_index))
            elif self.mix == "dead":
                result.append(full[0])
            elif self.mix == "copy":
                result.append(Deferred([outs[self.mix_copy]], None, dim, memo))
            elif self.mix_same is not None:  # the hard mix reads one task's restore as it is
                result.append(full[self.mix_same])
            else:  # hard mix: one channel selection from the pool
                result.append(Deferred(pool, self.mix_index, dim, memo))
        return result

    def _mixed(self, outs: list[Tensor | None], pool: Tensor | None, full: list[Tensor]) -> Tensor:
        shared = outs[0]
        if self.mix == "shared":
            return shared
        if self.mix == "direct":
            return shared.index_select(self.channel_dim, self.direct_index)
        if self.mix == "dead":
            return full[0]
        if self.mix == "copy":
            return outs[self.mix_copy]
        if self.mix == "select":  # hard mix: one channel selection from the pool
            return pool.index_select(self.channel_dim, self.mix_index)
        mixed = None
        if self.mix_shared is not None:
            mixed = shared * self._weight(self.mix_shared, shared)
        for t, src in enumerate(self.sources):
            if src != "shared":
                term = full[t] * self._weight(self.weights[t], full[t])
                mixed = term if mixed is None else mixed + term
        return mixed

    def extra_repr(self) -> str:
        hard = ", hard" if self.hard else ""
        return f"kept={self.kept}/{self.channels}, sources={self.sources}, mix={self.mix!r}{hard}, slots={self.slots}"


class LeanSlotModule(SlotModule):
    """An ungated per-slot module of a lean model (grouped conv, norm not fused with a conv, ...).

    Same weights and FLOPs as :class:`~gatedmtl.slots.SlotModule`; a single batch-first tensor
    input is split with :func:`_slot_chunks` (one Reshape + Gathers in ONNX instead of shape
    arithmetic and Slices per slot). Anything else takes the generic path.
    """

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        n = _count_streams((args, kwargs))
        if n is not None:  # per-slot streams: stream i runs copy ``stream_slots[i]``
            slots = getattr(self, "stream_slots", None) or tuple(range(self.num_slots))
            per_slot = [self.slots[s](*_pick_stream(args, i), **_pick_stream(kwargs, i)) for i, s in enumerate(slots)]
            return merge_streams(per_slot, keep_alive_list((args, kwargs)))
        x = args[0] if len(args) == 1 and not kwargs else None
        if not isinstance(x, Tensor) or x.dim() < 2 or _batch_dim_in(self.slots[0], 0) != 0:
            return super().forward(*args, **kwargs)
        num_slots = self.num_slots
        if not torch.jit.is_tracing() and x.shape[0] % num_slots:
            return super().forward(*args, **kwargs)  # raises its explanatory error
        chunks = _slot_chunks(x, num_slots, range(num_slots))
        outs = [self.slots[s](chunks[s]) for s in range(num_slots)]
        if all(isinstance(o, Tensor) for o in outs):
            return torch.cat(outs, 0)
        return _merge(outs, self.slots[0])


class LeanModel(nn.Module):
    """A pruned multi-task model: ``forward(x[B, C, H, W]) -> {task: output}``. No gates, no logits.

    The backbone runs on ``[K*B, ...]`` with the ``K`` slots in ``slots`` folded on the batch
    axis: normally every slot (shared + tasks), fewer where the others are provably not
    needed (see :func:`computed_slots`): ``(0,)`` when every gate is closed (every task equals
    the shared branch, the model is the plain backbone), ``(1, ..., T)`` when every gate is
    open (no task reads the shared branch).

    In the second case the task slots never meet, and ``task_networks`` holds one plain network
    per task (each gated layer replaced by that task's branch, every other tensor shared with
    ``backbone``) that the forward pass runs one after the other instead of folding them: the
    same FLOPs and weights, without per-layer slot splits and concats in the exported graph.
    """

    def __init__(self, backbone: nn.Module, tasks: Sequence[str], input_size: tuple[int, ...],
                 slots: Sequence[int] | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.tasks = tuple(tasks)
        self.input_size = tuple(input_size)
        self.slots = tuple(slots) if slots is not None else tuple(range(len(self.tasks) + 1))
        self.task_networks: nn.ModuleList | None = None
        self.streams = False  # run the computed slots as per-slot streams instead of folding them
        self.folded_reason: str | None = None  # why the streams could not run this backbone
        self.deferred_reason: str | None = None  # why the streams run without deferred restores
        self._alive_probe: list | None = None  # set while _drop_redundant_keep_alives probes the streams

    @property
    def num_slots(self) -> int:
        return len(self.tasks) + 1

    def set_task_networks(self, networks: nn.ModuleList) -> None:
        """Run ``networks`` (one per task, tensors shared with ``backbone``) instead of the folded backbone.

        They hold no tensor of their own, so they are left out of ``state_dict()`` (safetensors
        refuses shared tensors) and loading ``backbone``'s entries fills them too.
        """
        self.task_networks = networks
        self.register_state_dict_post_hook(_drop_task_network_keys)
        self.register_load_state_dict_post_hook(_ignore_task_network_keys)

    def lean_layers(self) -> list[tuple[str, LeanGatedLayer]]:
        """``(name, layer)`` of every pruned gated layer, in module order."""
        return [(n, m) for n, m in self.backbone.named_modules() if isinstance(m, LeanGatedLayer)]

    def forward(self, x: Tensor) -> dict[str, Any]:
        if not isinstance(x, Tensor) or x.dim() != len(self.input_size) + 1 or x.shape[1] != self.input_size[0]:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"input {got} does not fit: expected [B, {self.input_size[0]}, ...] "
                             f"with {len(self.input_size) + 1} dims")
        k = len(self.slots)
        try:
            if self.streams and k > 1:
                alive: list[Tensor] = self._alive_probe if self._alive_probe is not None else []
                out = self.backbone(Streams([x.clone() for _ in range(k)], alive))
                per_slot = [materialize(o) for o in split_streams(out, k)]
                result = {t: per_slot[self.slots.index(i + 1)] for i, t in enumerate(self.tasks)}
                if 0 in self.slots:  # the shared stream's own output reaches no task: keep it computed (a 0)
                    alive += [o.flatten()[:0].sum() for o in iter_tensors(per_slot[self.slots.index(0)])]
                if alive:  # (as 0-d tensors: ONNX may keep the reduced dims of an empty sum)
                    zero = sum(z.reshape(()) for z in alive)
                    result[self.tasks[0]] = _add_to_first(result[self.tasks[0]], zero)
                return result
            if self.task_networks is not None:
                return {t: net(x) for t, net in zip(self.tasks, self.task_networks)}
            out = self.backbone(torch.cat([x] * k, 0) if k > 1 else x)
        except (RuntimeError, AssertionError) as e:
            if tuple(x.shape[1:]) == tuple(self.input_size):
                raise
            raise ValueError(
                f"the backbone rejected an input of shape {tuple(x.shape)} (it was built for {self.input_size}): {e}"
            ) from e
        if k == 1:  # every task reads the one folded slot; containers are copied, tensors shared
            return {t: _copy_containers(out) for t in self.tasks}
        return {t: _unfold(out, self.slots.index(i + 1), k) for i, t in enumerate(self.tasks)}


def _drop_task_network_keys(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + "task_networks.")]:
        del state_dict[key]


def _ignore_task_network_keys(module: nn.Module, incompatible_keys: Any) -> None:
    missing = incompatible_keys.missing_keys
    missing[:] = [k for k in missing if not k.split(".").count("task_networks")]


def _copy_containers(output: Any) -> Any:
    if isinstance(output, list):
        return [_copy_containers(o) for o in output]
    if isinstance(output, tuple):
        return tuple(_copy_containers(o) for o in output)
    if isinstance(output, dict):
        return {k: _copy_containers(v) for k, v in output.items()}
    return output


def _unfold(output: Any, slot: int, num_slots: int) -> Any:
    """Slot ``slot`` of every tensor in a (nested) output of the folded backbone."""
    if isinstance(output, Tensor):
        if not torch.jit.is_tracing() and output.shape[0] % num_slots:
            raise ValueError(
                f"Output of shape {tuple(output.shape)} has a first dimension that is not a multiple of "
                f"the {num_slots} slots: the backbone moved the batch axis away from dim 0."
            )
        return _slot_view(output, num_slots)[slot]
    if isinstance(output, (list, tuple)):
        items = [_unfold(o, slot, num_slots) for o in output]
        return type(output)(items) if isinstance(output, list) else tuple(items)
    if isinstance(output, dict):
        return {k: _unfold(v, slot, num_slots) for k, v in output.items()}
    return output


def _empty_sum(x: Tensor | Deferred, dim: int) -> Tensor:
    """A zero scalar computed from ``x``.

    For a deferred restore: an empty gather from its parts' concat (which the other restores of
    that layer read anyway), so no part needs a layout change of its own in ONNX Runtime.
    """
    if isinstance(x, Deferred):
        if x.index is None:
            return x.parts[0].narrow(x.axis, 0, 0).sum()
        return x.select(torch.zeros(0, dtype=torch.long, device=x.device)).full().sum()
    return x.narrow(dim, 0, 0).sum()


def _positions(keep: Tensor, width: int) -> Tensor:
    pos = torch.full((width,), -1, dtype=torch.long)
    pos[keep] = torch.arange(keep.numel())
    return pos


NCHWC_BLOCK = 16
"""Channels per block of ONNX Runtime's blocked (NCHWc) CPU layout on AVX-512 (8 on AVX2): a Concat
stays in that layout only when every input's channels are a multiple of it, and a convolution
narrower than a block is padded up to one."""


def _aligned(pieces: list[Tensor]) -> list[Tensor]:
    """``pieces``, or the one piece they make up when some piece is not a multiple of :data:`NCHWC_BLOCK` wide.

    The shared branch is split only where the split pays: with a ragged piece (a layer whose width
    is not a multiple of the block) every restore's Concat leaves the blocked layout anyway, and
    the ragged piece's convolution would compute a whole block.
    """
    if len(pieces) > 1 and any(p.numel() % NCHWC_BLOCK for p in pieces):
        return [torch.cat(pieces)]
    return pieces


def _pruned_branch(layer: nn.Module, norm: nn.Module | None, keep: Tensor) -> nn.Module:
    """A copy of ``layer`` (and of the ``norm`` after it, if any) with output channels ``keep`` only."""
    pruned = prune_out_channels(copy.deepcopy(layer), keep)
    return pruned if norm is None else nn.Sequential(pruned, prune_out_channels(copy.deepcopy(norm), keep))


def _call_order(lean: LeanModel) -> list[LeanGatedLayer]:
    """Every call of a :class:`LeanGatedLayer` during one eval forward pass, in order."""
    calls: list[LeanGatedLayer] = []
    hooks = [m.register_forward_pre_hook(lambda m, args: calls.append(m))
             for m in lean.modules() if isinstance(m, LeanGatedLayer)]
    was_training = lean.training
    lean.eval()
    try:
        x = torch.randn((1, *lean.input_size), generator=torch.Generator().manual_seed(0))
        device = next(iter(lean.parameters()), torch.empty(0)).device
        lean(x.to(device))
    finally:
        for h in hooks:
            h.remove()
        lean.train(was_training)
    return calls


def _mark_dead_shared(lean: LeanModel, layers: Sequence[LeanGatedLayer]) -> None:
    """``mix="dead"`` on layers whose shared-slot output no later layer reads.

    Only a gated layer's shared branch reads the shared slot (slot 0 never reaches a task
    output otherwise: the ops between layers work per sample), so the shared output of a
    layer is dead when every call of it comes after the last call of any layer that has a
    shared branch. ``layers`` are in first-call order: when the last one has a shared branch,
    nothing is dead and no forward pass is needed to find out.
    """
    if not layers or layers[-1].present[0] or all(m.mix not in ("mix", "select") for m in layers):
        return
    calls = _call_order(lean)
    last_reader = max((i for i, m in enumerate(calls) if m.present[0]), default=-1)
    first_call: dict[int, int] = {}
    for i, m in enumerate(calls):
        first_call.setdefault(id(m), i)
    for m in layers:
        if m.mix in ("mix", "select") and first_call.get(id(m), -1) > last_reader:
            m.set_dead()


def computed_slots(model: GatedModel) -> tuple[int, ...]:
    """The slots that ``prune(model)`` folds on the batch axis (0 = shared, t = task t).

    Normally all ``S = T + 1``. When the model has no per-slot module other than its gated
    layers (and their norms), two cases need fewer, exactly:

    * every gate closed: ``(0,)`` -- every slot computes the same thing, the lean model is the
      plain backbone and every task reads its output;
    * every gate open: ``(1, ..., T)`` -- no layer has a shared branch, the shared slot is dead.

    fvcore then counts the parameter-free ops that it counts (pooling, upsampling, matmuls)
    ``K = len(slots)`` times instead of ``S`` times: with ``U`` = full folded FLOPs minus ``S``
    times the gated layers' cost, the lean FLOPs are ``sum cost * live + U * K / S``.
    """
    if not isinstance(model, GatedModel):
        raise TypeError(f"expected a GatedModel, got {type(model).__name__}")
    everything = tuple(range(model.num_slots))
    gated = set(model.gate_names)
    gated |= {model.backbone.get_submodule(n).producer for n in model.gate_names}
    if any(isinstance(m, SlotModule) and n not in gated for n, m in model.backbone.named_modules()):
        return everything
    masks = [g.open_mask() for g in model.gates()]
    if not any(bool(m.any()) for m in masks):
        return (0,)
    if all(bool(m.all()) for m in masks):
        return everything[1:]
    return everything


def _task_networks(backbone: nn.Module, layers: Sequence[LeanGatedLayer], num_tasks: int) -> nn.ModuleList:
    """One plain copy of ``backbone`` per task with every lean layer replaced by that task's branch.

    Every parameter and buffer outside the lean layers (and every branch) is shared with
    ``backbone``, not copied.
    """
    shared = {id(t): t for t in list(backbone.parameters()) + list(backbone.buffers())}
    nets = []
    for t in range(num_tasks):
        memo = dict(shared)
        memo.update({id(layer): layer.branches[t + 1] for layer in layers})
        nets.append(copy.deepcopy(backbone, memo))
    return nn.ModuleList(nets)


@torch.no_grad()
def prune(model: GatedModel, *, streams: bool = True) -> LeanModel:
    """Build the lean model of ``model`` from its current gates (see module docstring).

    With ``streams`` (default) the computed slots run as per-slot streams (see
    :mod:`gatedmtl.streams`) where the backbone's code allows it; otherwise, or with
    ``streams=False``, they are folded on the batch axis (:attr:`LeanModel.folded_reason` says why).
    In eval mode ``prune(model)(x)`` equals ``model(x)`` up to float rounding.
    """
    if not isinstance(model, GatedModel):
        raise TypeError(f"prune expects a GatedModel from gatedmtl.convert, got {type(model).__name__}")
    backbone = copy.deepcopy(model.backbone)
    where = _parents(backbone)
    num_tasks = len(model.tasks)
    layers: list[LeanGatedLayer] = []
    for name in model.gate_names:
        unit = backbone.get_submodule(name)
        gate = unit.gate
        producer = backbone.get_submodule(unit.producer)
        paired = producer is not unit
        open_ = gate.open_mask().cpu()
        width = gate.channels
        keep = [(~open_.all(0)).nonzero().flatten()] + [open_[t].nonzero().flatten() for t in range(num_tasks)]
        template = producer.slots[0]
        branches: list[nn.Module | None] = []
        in_index: list[Tensor | None] = []
        for s in range(num_tasks + 1):
            if keep[s].numel() == 0:
                branches.append(None)
                in_index.append(None)
                continue
            pieces = [keep[s]]
            if s == 0 and gate.structure == "prefix":
                pieces = _aligned(shared_pieces(keep[0], open_))
            cut = [_pruned_branch(producer.slots[s], unit.slots[s] if paired else None, k) for k in pieces]
            inputs = [conv_input_channels(template, k) for k in pieces]
            if len(pieces) > 1:  # every task's restore: its own output and whole pieces (no gather)
                branches.append(SplitBranch(cut, inputs))
                in_index.append(None)
            else:
                branches.append(cut[0])
                in_index.append(inputs[0])
        hard = gate.mix_mode == "hard"
        weights = None if hard else gate.mixing_weights().detach().cpu().to(template.weight.dtype)
        choice = gate.mix_choice().cpu() if hard else None
        lean = LeanGatedLayer(branches, in_index, keep, open_, weights, gate.channel_dim,
                              choice, direct=getattr(unit, "unmixed", False)).to(template.weight.device)
        lean.train(model.training)
        layers.append(lean)
        for parent, attr in where[id(producer)]:
            parent._modules[attr] = lean
        if paired:
            for parent, attr in where[id(unit)]:
                parent._modules[attr] = nn.Identity()
    slots = computed_slots(model)
    for layer in layers:
        layer.slots = slots
    for module in backbone.modules():
        if type(module) is SlotModule:  # ungated: the same module with a leaner ONNX split
            module.__class__ = LeanSlotModule
        if isinstance(module, LeanSlotModule):
            module.stream_slots = slots
    lean_model = LeanModel(backbone, model.tasks, model.input_size, slots)
    lean_model.train(model.training)
    if len(slots) > 1 and streams:
        lean_model.folded_reason = _try_streams(lean_model, layers)
        lean_model.streams = lean_model.folded_reason is None
    if len(slots) > 1 and 0 not in slots and not lean_model.streams:  # every gate open: the tasks never meet
        lean_model.set_task_networks(_task_networks(backbone, layers, num_tasks))
    if 0 in slots:
        _mark_dead_shared(lean_model, layers)
    else:  # the shared slot is not computed: no layer's mix is read
        for layer in layers:
            if layer.mix in ("mix", "select"):
                layer.set_dead()
    if lean_model.streams:
        _drop_redundant_keep_alives(lean_model)
    return lean_model


class _KeepAliveProbe(list):
    """A keep-alive list that records ``(layer, slot, input stream)`` where a layer would add a keep-alive."""

    def __init__(self) -> None:
        super().__init__()
        self.sources: list[tuple[LeanGatedLayer, int, Tensor | Deferred]] = []


def _probe_input(lean: LeanModel, batch: int) -> Tensor:
    """A fixed random input ``[batch, *input_size]`` on the lean model's device, for checks at prune time."""
    device = next(iter(lean.parameters()), torch.empty(0)).device
    return torch.randn((batch, *lean.input_size), generator=torch.Generator().manual_seed(0)).to(device)


def _drop_redundant_keep_alives(lean: LeanModel) -> None:
    """Set each layer's ``alive_redundant``: absent slots whose input stream the outputs read anyway.

    One eval forward pass with autograd records every input stream that would get a keep-alive;
    where the computation that made it (its ``grad_fn``, or every part's for a deferred restore) is
    an ancestor of the outputs without keep-alives, the keep-alive changes nothing that runs, so it
    is left out of the graph (an empty slice, a sum and an add each: hundreds of ONNX nodes on
    hrnet). Anything autograd cannot see (no ``grad_fn``) keeps its keep-alive.
    """
    was_training = lean.training
    lean.eval()
    x = _probe_input(lean, 1)
    probe = _KeepAliveProbe()
    lean._alive_probe = probe
    try:
        with torch.enable_grad():
            out = lean(x.requires_grad_(True))
    finally:
        lean._alive_probe = None
        lean.train(was_training)
    reached: set = set()
    todo = [t.grad_fn for t in iter_tensors(out) if t.grad_fn is not None]
    while todo:
        fn = todo.pop()
        if fn not in reached:
            reached.add(fn)
            todo.extend(f for f, _ in fn.next_functions if f is not None)
    asked: dict[LeanGatedLayer, set[int]] = {}
    needed: dict[LeanGatedLayer, set[int]] = {}
    for layer, slot, source in probe.sources:
        asked.setdefault(layer, set()).add(slot)
        parts = source.parts if isinstance(source, Deferred) else [source]
        if not all(p.grad_fn is not None and p.grad_fn in reached for p in parts):
            needed.setdefault(layer, set()).add(slot)
    for layer, slots in asked.items():
        layer.alive_redundant = frozenset(slots - needed.get(layer, set()))


def _try_streams(lean: LeanModel, layers: Sequence[LeanGatedLayer]) -> str | None:
    """Run ``lean`` as per-slot streams, with deferred restores if it can; ``None`` when streams work, else why not.

    Both are checked against the folded model on a random input (relative error <= 1e-5): a
    backbone whose code the streams or the deferred restores cannot map (an ``isinstance``
    branch, an in-place op whose result is not rebound, ...) runs the slower way that works.
    The lean layers' ``defer`` flags and :attr:`LeanModel.deferred_reason` record the outcome.
    """
    was_training = lean.training
    lean.eval()
    x = _probe_input(lean, 2)
    try:
        with torch.no_grad():
            reference = list(iter_tensors(lean(x)))  # folded
        reason = None
        for defer in (True, False):
            for layer in layers:
                layer.defer = defer
            lean.streams = True
            try:
                with torch.no_grad():
                    out = lean(x)
                if _count_streams(out) is not None:
                    raise StreamsError("the backbone returns streams inside an unsupported container")
                got = list(iter_tensors(out))
                if len(got) != len(reference) or any(relative_error(a.cpu().numpy(), b.cpu().numpy()) > 1e-5
                                                     for a, b in zip(got, reference)):
                    raise StreamsError("its outputs differ from the folded model's")
                if not defer:
                    lean.deferred_reason = reason
                return None
            except (StreamsError, TypeError, AttributeError, RuntimeError, ValueError, IndexError) as e:
                reason = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            finally:
                lean.streams = False
        for layer in layers:
            layer.defer = False
        return reason
    finally:
        lean.train(was_training)


def _add_to_first(obj: Any, value: Tensor) -> Any:
    """``obj`` with ``value`` added to its first tensor (containers rebuilt, other tensors shared)."""
    if isinstance(obj, Tensor):
        return obj + value
    if isinstance(obj, (list, tuple, dict)):
        keys = list(obj) if isinstance(obj, dict) else range(len(obj))
        first = next((k for k in keys if next(iter_tensors(obj[k]), None) is not None), None)
        if first is None:
            return obj
        if isinstance(obj, dict):
            return {k: _add_to_first(o, value) if k == first else o for k, o in obj.items()}
        items = [_add_to_first(o, value) if i == first else o for i, o in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    return obj
