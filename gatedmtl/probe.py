"""Instrumented forward passes of a plain backbone: which modules run, in what order, which
convolutions feed a channel-wise norm *exclusively* (so the gate can sit after the norm,
keeping conv+norm fusable in the lean model), which module's output reaches each module's input
through channel-wise ops, which modules' outputs are added (for tied gates), which modules' outputs
only other candidates read (``sole_readers``), and which modules
receive an input whose batch axis is not the model's batch (a second pass at another batch size tells)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .slots import _batch_dim_in, iter_tensors

__all__ = ["ProbeResult", "UnfoldableModuleError", "probe"]


class UnfoldableModuleError(ValueError):
    """A parameter-owning module that can be neither folded per slot nor shared exactly."""


@dataclass
class ProbeResult:
    """What one forward pass revealed about the candidate modules (by dotted name)."""

    order: list[str] = field(default_factory=list)  # first-call order
    calls: dict[str, int] = field(default_factory=dict)
    out_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # first call's output
    pairs: dict[str, str] = field(default_factory=dict)  # conv name -> norm name that consumes it exclusively
    # modules whose first input is not split along the model's batch on their batch axis -> why
    unfolded: dict[str, str] = field(default_factory=dict)
    batch_independent: set[str] = field(default_factory=set)  # of those: inputs that do not depend on the batch
    # candidate -> the candidate whose output, through channel-wise functions only (activations,
    # dropout, copies, pooling, resizing), is its first input on every call
    sources: dict[str, str] = field(default_factory=dict)
    # the same through elementwise sums as well (the source is then one of the summed candidates)
    stream_sources: dict[str, str] = field(default_factory=dict)
    # pairs of candidates whose outputs (through channel-wise functions and earlier such sums) are added
    # elementwise: a residual sum or a multi-branch fusion
    sums: list[tuple[str, str]] = field(default_factory=list)
    # candidate -> the candidates whose first input is its output (through channel-wise functions only),
    # for the candidates whose output (and what channel-wise functions make of it) nothing else reads
    sole_readers: dict[str, set[str]] = field(default_factory=dict)
    output: Any = None


# functions that keep every channel where it is (out[:, c] depends on in[:, c] only) and the shape
_CHANNEL_WISE: set = {
    F.relu, F.relu6, F.hardtanh, F.hardswish, F.hardsigmoid, F.silu, F.gelu, F.elu, F.selu, F.celu, F.leaky_relu,
    F.mish, F.softplus, F.sigmoid, F.tanh, F.dropout, torch.relu, torch.relu_, torch.sigmoid, torch.sigmoid_,
    torch.tanh, torch.tanh_, torch.clone, Tensor.relu, Tensor.relu_, Tensor.sigmoid, Tensor.sigmoid_, Tensor.tanh,
    Tensor.tanh_, Tensor.clone, Tensor.contiguous,
}
# channel-wise but spatial (the channel count stays, the spatial size may change)
_SPATIAL: set = {F.max_pool2d, F.avg_pool2d, F.interpolate}
# elementwise sums of two tensors
_ADDS: set = {torch.add, Tensor.add, Tensor.add_, Tensor.__add__, Tensor.__radd__, Tensor.__iadd__}


class _UseRecorder(TorchFunctionMode):
    """Marks a watched tensor as used when any torch function outside its consumer reads it, and
    follows every candidate's output through channel-wise functions and elementwise sums."""

    def __init__(self) -> None:
        super().__init__()
        self.watched: dict[int, str] = {}
        self.alive: list[Tensor] = []  # keeps watched tensors alive so that ids stay unique
        self.foreign: set[str] = set()
        self.consuming: list[int | None] = []
        self.paused = 0
        # id of a candidate's output (or a channel-wise function or sum of it) -> (candidate, through a sum)
        self.made_by: dict[int, tuple[str, bool]] = {}
        self.sums: list[tuple[str, str]] = []
        self.inside = 0  # candidate forwards running (what they do with their input is theirs)
        self.readers: dict[str, set[str]] = defaultdict(set)  # candidate -> candidates reading its output first
        self.other_uses: set[str] = set()  # candidates whose output something else reads

    def record_uses(self, tensors: Any, passed_on: Tensor | None = None) -> None:
        """Every candidate output among ``tensors`` (but ``passed_on``) is read by a non-candidate."""
        for t in iter_tensors(tensors):
            source = self.made_by.get(id(t))
            if source is not None and t is not passed_on:
                self.other_uses.add(source[0])

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if not self.paused and self.watched:
            current = self.consuming[-1] if self.consuming else None
            for t in iter_tensors((args, kwargs)):
                name = self.watched.get(id(t))
                if name is not None and id(t) != current:
                    self.foreign.add(name)
        out = func(*args, **kwargs)
        if not (args and isinstance(args[0], Tensor) and isinstance(out, Tensor)):
            if not self.paused and not self.inside and next(iter_tensors(out), None) is not None:
                self.record_uses((args, kwargs))
            return out
        x = args[0]
        source = self.made_by.get(id(x))
        channel_wise = (func in _CHANNEL_WISE and out.shape == x.shape) or (
            func in _SPATIAL and out.dim() == x.dim() > 2 and out.shape[:2] == x.shape[:2])
        if not self.paused and not self.inside:
            self.record_uses((args, kwargs), passed_on=x if channel_wise else None)
        if source is None:
            return out
        if channel_wise:
            self.made_by[id(out)] = source
            self.alive.append(out)
        elif func in _ADDS and len(args) == 2 and isinstance(args[1], Tensor) and out.shape == x.shape == args[1].shape:
            other = self.made_by.get(id(args[1]))
            if other is not None:
                self.sums.append((source[0], other[0]))
                self.made_by[id(out)] = (source[0], True)
                self.alive.append(out)
        return out


def _is_pair_candidate(conv: nn.Module, norm: nn.Module) -> bool:
    return (
        isinstance(conv, nn.modules.conv._ConvNd)
        and isinstance(norm, nn.modules.batchnorm._BatchNorm)
        and norm.num_features == conv.out_channels
    )


def _input_shape(args: tuple) -> tuple[int, ...] | None:
    return tuple(args[0].shape) if args and isinstance(args[0], Tensor) else None


@torch.no_grad()
def _input_shapes(model: nn.Module, candidates: dict[str, nn.Module], example: Tensor) -> dict[str, list]:
    """``model(example)``: the shape of each candidate's first argument, per call (``None``: not a tensor)."""
    by_id = {id(m): n for n, m in candidates.items()}
    shapes: dict[str, list] = defaultdict(list)
    handles = [m.register_forward_pre_hook(lambda m, args: shapes[by_id[id(m)]].append(_input_shape(args)))
               for m in candidates.values()]
    try:
        model(example)
    finally:
        for h in handles:
            h.remove()
    return shapes


def _classify_batch_axes(result: ProbeResult, candidates: dict[str, nn.Module], first: dict[str, list],
                         second: dict[str, list], batches: tuple[int, int]) -> None:
    """Fill ``result.unfolded`` from the candidates' input shapes at two batch sizes."""
    n1, n2 = batches
    for name, shapes in first.items():
        dim = _batch_dim_in(candidates[name], 0)
        kinds = set()
        for a, b in zip(shapes, second.get(name, [])):
            if a is None or b is None:
                kinds.add("its first argument is not a tensor")
            elif len(a) > dim and len(a) == len(b) and a[dim] * n2 == b[dim] * n1 and a[dim] > 0:
                kinds.add("folded")
            elif a == b:
                kinds.add("batch-independent")
            else:
                kinds.add(f"its input's batch is not on axis {dim}")
        if kinds == {"folded"} or not kinds:
            continue
        if "folded" in kinds and "batch-independent" in kinds:
            raise UnfoldableModuleError(
                f"module '{name}' ({type(candidates[name]).__name__}) is called both on the batch and on a "
                "batch-independent tensor: gatedmtl can give it neither per-slot copies (the batch-independent "
                "call has no slots) nor an exact FLOP count as one shared copy. Wrap the two uses in two modules.")
        if kinds == {"batch-independent"}:
            result.batch_independent.add(name)
            result.unfolded[name] = "its input does not depend on the batch"
        else:
            result.unfolded[name] = "; ".join(sorted(kinds - {"folded"}))


@torch.no_grad()
def probe(model: nn.Module, candidates: dict[str, nn.Module], example: Tensor) -> ProbeResult:
    """Run ``model(example)`` in eval mode and record the candidates' calls and pairings.

    A second pass on one more sample than ``example`` has (``example`` must have a batch of at
    least 1) finds the candidates whose input is not the batch folded on their batch axis
    (``unfolded``), e.g. a projection of a positional encoding computed from the image size.
    """
    result = ProbeResult()
    rec = _UseRecorder()
    by_id: dict[int, str] = {id(m): n for n, m in candidates.items()}
    consumed_by: dict[str, list[str | None]] = defaultdict(list)  # conv -> consumer norm per call
    norm_inputs: dict[str, list[str | None]] = defaultdict(list)  # norm -> producing conv per call
    sources: dict[str, list[str | None]] = defaultdict(list)  # candidate -> source of its first input per call
    handles = []

    first_shapes: dict[str, list] = defaultdict(list)

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        rec.paused += 1
        name = by_id[id(module)]
        first_shapes[name].append(_input_shape(args))
        sources[name].append(rec.made_by.get(id(args[0])) if args and isinstance(args[0], Tensor) else None)
        first = args[0] if args and isinstance(args[0], Tensor) else None
        made = rec.made_by.get(id(first)) if first is not None else None
        if made is not None and not made[1]:
            rec.readers[made[0]].add(name)
        if not rec.inside:  # a candidate called inside another is part of that one's forward
            rec.record_uses((args[1:], kwargs))
        rec.inside += 1
        producer = rec.watched.get(id(args[0])) if args and isinstance(args[0], Tensor) else None
        if producer is not None and (len(args) != 1 or not _is_pair_candidate(candidates[producer], module)):
            rec.foreign.add(producer)
            producer = None
        norm_inputs[name].append(producer)
        if producer is not None:
            consumed_by[producer].append(name)
        rec.consuming.append(id(args[0]) if producer is not None else None)
        rec.paused -= 1

    def post_hook(module: nn.Module, args: tuple, output: Any) -> None:
        rec.paused += 1
        rec.inside -= 1
        rec.consuming.pop()
        name = by_id[id(module)]
        if name not in result.calls:
            result.order.append(name)
            result.calls[name] = 0
            if isinstance(output, Tensor):
                result.out_shapes[name] = tuple(output.shape)
        result.calls[name] += 1
        if isinstance(output, Tensor):
            rec.made_by[id(output)] = (name, False)
            rec.alive.append(output)
            if isinstance(module, nn.modules.conv._ConvNd):
                rec.watched[id(output)] = name
        rec.paused -= 1

    for m in candidates.values():
        handles.append(m.register_forward_pre_hook(pre_hook, with_kwargs=True))
        handles.append(m.register_forward_hook(post_hook))
    try:
        with rec:
            result.output = model(example)
    finally:
        for h in handles:
            h.remove()
    for t in iter_tensors(result.output):  # a conv output returned as a model output is not exclusive
        if id(t) in rec.watched:
            rec.foreign.add(rec.watched[id(t)])
    rec.record_uses(result.output)
    result.sole_readers = {n: set(r) for n, r in rec.readers.items() if n not in rec.other_uses}
    for conv, norms in consumed_by.items():
        calls = result.calls.get(conv, 0)
        if conv in rec.foreign or len(norms) != calls or len(set(norms)) != 1:
            continue
        norm = norms[0]
        if all(p == conv for p in norm_inputs[norm]) and result.calls.get(norm) == calls:
            result.pairs[conv] = norm
    found = {n: s[0] for n, s in sources.items() if s[0] is not None and len(set(s)) == 1}
    result.sources = {n: name for n, (name, summed) in found.items() if not summed}
    result.stream_sources = {n: name for n, (name, _) in found.items()}
    result.sums = list(dict.fromkeys(rec.sums))
    bigger = torch.cat([example, example[:1]])
    second = _input_shapes(model, candidates, bigger)
    _classify_batch_axes(result, candidates, first_shapes, second, (example.shape[0], bigger.shape[0]))
    return result
