"""``convert``: any backbone -> one shared branch + one branch per task, with channel gates."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .gates import DEFAULT_GATE_GROUP, ChannelGate, check_group, check_mix, check_structure
from .probe import UnfoldableModuleError, probe
from .slots import SlotModule, fold, is_slot_unit, unfold_slot

__all__ = ["GatedModel", "convert", "gate_layers", "default_input_size", "gateable", "conv_group_size",
           "layer_gate_group"]

_DEFAULT_INPUT_SIZE = (3, 224, 224)


def default_input_size(backbone: nn.Module) -> tuple[int, ...]:
    """``(C, H, W)`` from timm's ``pretrained_cfg`` when present, else ``(3, 224, 224)``."""
    for attr in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(backbone, attr, None)
        if isinstance(cfg, Mapping) and cfg.get("input_size"):
            return tuple(int(v) for v in cfg["input_size"])
    return _DEFAULT_INPUT_SIZE


def gateable(module: nn.Module) -> str | None:
    """Why ``module``'s output channels cannot be gated, or ``None`` when they can."""
    if isinstance(module, nn.Linear):
        return None
    if isinstance(module, nn.modules.conv._ConvNd):
        if module.transposed:
            return "transposed convolution"
        return None  # grouped convolutions are gated per group of filters (see conv_group_size)
    return "not a convolution or linear layer"


def conv_group_size(module: nn.Module) -> int:
    """Output channels of one convolution group (1 for plain and depthwise convs, linear layers)."""
    if isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1:
        depthwise = module.groups == module.in_channels == module.out_channels
        return 1 if depthwise else module.out_channels // module.groups
    return 1


def layer_gate_group(module: nn.Module, gate_group: int) -> int:
    """Channels per gate of ``module``: ``gate_group``, rounded to whole convolution groups.

    A grouped convolution keeps whole groups of filters (its lean copy is again a grouped
    convolution), so its gate group is a multiple of its filters per group.
    """
    per = conv_group_size(module)
    return gate_group if per == 1 else per * max(1, gate_group // per)


def _validate_tasks(tasks: Sequence[str]) -> tuple[str, ...]:
    if isinstance(tasks, str) or not isinstance(tasks, Sequence):
        raise TypeError(f"tasks must be a list of task names, got {tasks!r}")
    names = tuple(tasks)
    if not names:
        raise ValueError("tasks is empty: give at least one task name, e.g. ['seg', 'depth']")
    for t in names:
        if not isinstance(t, str) or not t or not t.isidentifier():
            raise ValueError(f"task name {t!r} is not a valid identifier (letters, digits, '_')")
    dupes = sorted({t for t in names if names.count(t) > 1})
    if dupes:
        raise ValueError(f"duplicate task names: {dupes}")
    return names


class GatedModel(nn.Module):
    """A backbone whose parameter-owning modules hold one copy per slot (shared + tasks).

    ``forward(x[B, C, H, W]) -> {task: output}`` where each output has the structure of
    ``backbone(x)`` (a tensor, or a list of feature maps for ``features_only`` models).

    Attributes:
        shared_modules: ``{name: reason}`` of the parameter-owning modules kept as one copy
            for every slot (not gated): their input is not the folded batch (e.g. XCiT's
            positional-encoding projection, applied to a tensor built from the image size),
            or they never ran in the probe.
        batch_independent: those of ``shared_modules`` whose input does not depend on the
            batch: they run once per forward pass, whatever the batch and the number of slots.
        tied_gates: ``{gated layer: gated layer whose gate it uses}`` (``convert(...,
            tie_depthwise=True, tie_residual=True)``); :meth:`gates` lists such a gate once per
            layer that uses it, :meth:`unique_gates` once.
        unmixed_layers: gated layers whose shared slot passes its own output on instead of the
            tasks' mix (``convert(..., skip_depthwise_mix=True)``), in forward order.
    """

    def __init__(self, backbone: nn.Module, tasks: Sequence[str], gate_names: Sequence[str],
                 input_size: tuple[int, ...], shared_modules: Mapping[str, str] | None = None,
                 batch_independent: Sequence[str] = (), tied_gates: Mapping[str, str] | None = None,
                 unmixed_layers: Sequence[str] = ()) -> None:
        super().__init__()
        self.backbone = backbone
        self.tasks = tuple(tasks)
        self.gate_names = list(gate_names)
        self.input_size = tuple(input_size)
        self.shared_modules = dict(shared_modules or {})
        self.batch_independent = tuple(batch_independent)
        self.tied_gates = dict(tied_gates or {})
        self.unmixed_layers = tuple(unmixed_layers)
        for name in self.unmixed_layers:
            self.backbone.get_submodule(name).unmixed = True
        self._analysis_cache: dict[tuple[int, ...], Any] = {}

    @property
    def num_slots(self) -> int:
        return len(self.tasks) + 1

    def gates(self) -> list[ChannelGate]:
        """The gate of every gated layer, in forward order (a tied gate once per layer that uses it)."""
        return [self.backbone.get_submodule(n).gate for n in self.gate_names]

    def unique_gates(self) -> list[ChannelGate]:
        """Every gate module once, in forward order of its first layer."""
        seen: set[int] = set()
        return [g for g in self.gates() if not (id(g) in seen or seen.add(id(g)))]

    def check_input(self, x: Any) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"expected an image tensor [B, {self.input_size[0]}, H, W], got {type(x).__name__}")
        if x.dim() != len(self.input_size) + 1 or x.shape[1] != self.input_size[0]:
            raise ValueError(
                f"input of shape {tuple(x.shape)} does not fit this backbone: expected "
                f"[B, {self.input_size[0]}, ...] with {len(self.input_size) + 1} dims, e.g. (1, {', '.join(map(str, self.input_size))})"
            )
        if not x.is_floating_point():
            raise TypeError(f"input must be a floating-point tensor, got {x.dtype}")

    def forward(self, x: Tensor) -> dict[str, Any]:
        self.check_input(x)
        return run_folded(self.backbone, x, self.tasks, self.input_size)

    def extra_repr(self) -> str:
        tied = f", tied={len(self.tied_gates)}" if self.tied_gates else ""
        tied += f", unmixed={len(self.unmixed_layers)}" if self.unmixed_layers else ""
        return f"tasks={self.tasks}, gates={len(self.gate_names)}{tied}"


def run_folded(backbone: nn.Module, x: Tensor, tasks: Sequence[str], input_size: tuple[int, ...]) -> dict[str, Any]:
    """Fold ``x`` over the slots, run the backbone once and split its output per task."""
    num_slots = len(tasks) + 1
    try:
        out = backbone(fold(x, num_slots))
    except (RuntimeError, AssertionError) as e:
        if tuple(x.shape[1:]) == tuple(input_size):
            raise
        raise ValueError(
            f"the backbone rejected an input of shape {tuple(x.shape)} (it was built for {tuple(input_size)}): {e}"
        ) from e
    return {t: unfold_slot(out, i + 1, num_slots) for i, t in enumerate(tasks)}


def _parents(root: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """Every (parent, attribute) under which each module object is registered."""
    where: dict[int, list[tuple[nn.Module, str]]] = {}
    for parent in root.modules():
        for attr, child in parent._modules.items():
            if child is not None:
                where.setdefault(id(child), []).append((parent, attr))
    return where


def _load_task_weights(model: nn.Module, slot: int, task: str, state: Mapping[str, Tensor]) -> None:
    missing = []
    for name, module in model.named_modules():
        if not isinstance(module, SlotModule):
            continue
        target = module.slots[slot]
        for key, value in target.state_dict().items():
            src = state.get(f"{name}.{key}")
            if src is None:
                missing.append(f"{name}.{key}")
            elif src.shape != value.shape:
                raise ValueError(f"task '{task}' weights: {name}.{key} has shape {tuple(src.shape)}, expected {tuple(value.shape)}")
        if not missing:
            target.load_state_dict({k: state[f"{name}.{k}"] for k in target.state_dict()})
    if missing:
        raise ValueError(f"task '{task}' weights lack {len(missing)} backbone keys, e.g. {missing[:3]}: "
                         "give a state dict of the same backbone architecture")


def convert(
    backbone: nn.Module,
    tasks: Sequence[str],
    *,
    input_size: tuple[int, ...] | None = None,
    init_logit: float = 1.0,
    gate_group: int = DEFAULT_GATE_GROUP,
    task_weights: Mapping[str, Mapping[str, Tensor]] | None = None,
    mix: str = "soft",
    tie_depthwise: bool = False,
    tie_residual: bool = False,
    skip_depthwise_mix: bool = False,
    gate_structure: str = "free",
) -> GatedModel:
    """Turn ``backbone`` into a :class:`GatedModel` with a shared slot and one slot per task.

    Args:
        backbone: any ``nn.Module`` (timm model, ``features_only`` model, torchvision ResNet, ...).
            It is copied; the original is left untouched.
        tasks: unique task names (identifiers).
        input_size: ``(C, H, W)`` used to probe the backbone once; defaults to timm's
            ``pretrained_cfg['input_size']`` or ``(3, 224, 224)``.
        init_logit: initial gate logit for every task channel (> 0: open, < 0: closed).
        gate_group: channels decided by one gate logit (consecutive channels; default 16). Every
            lean layer keeps a multiple of it per slot, which CPU kernels (ONNX Runtime's NCHWc
            convolutions) run without padding; 1 gates every channel on its own (the paper's gates).
        task_weights: optional ``{task: backbone state dict}`` (e.g. single-task checkpoints)
            that initialise task branches instead of the backbone's own weights.
        mix: how the shared slot reads the task features: ``"soft"`` (``softmax(beta)``, the
            paper's mix) or ``"hard"`` (its one-hot argmax, straight-through; the lean model's
            shared slot then takes one channel selection instead of a weighted sum, see
            :mod:`gatedmtl.gates`).
        tie_depthwise: a depthwise convolution whose input is a gated layer's output (through
            channel-wise ops only, e.g. the expansion conv + norm + activation of an inverted
            residual block) uses that layer's gate instead of its own: a channel is then the
            task's own through both layers or shared through both, as one dependency group of
            channel pruning. Its lean copy reads the task's own channels as they come (no channel
            selection in front of it); see :attr:`GatedModel.tied_gates`.
        tie_residual: gated layers whose outputs are added elementwise (the layers that write one
            residual stream, the branches of a multi-branch fusion) use one gate, the gate of the
            first of them: as channel pruning's dependency groups, a channel of the stream is then
            the task's own in every layer that writes it or shared in all of them, and the lean
            model adds the streams' branch outputs part by part (no channel gather per sum).
        skip_depthwise_mix: with ``tie_depthwise``, a gated layer whose output only depthwise
            convolutions with its gate read (the expansion layer of an inverted residual block)
            passes its shared branch's output on to them as it is, instead of the tasks' mix: the
            mix happens once per expansion + depthwise pair, at the depthwise layer's output. Its
            lean shared depthwise branch then reads the shared expansion branch directly (no
            channel selection, where the mix took one from every branch's output); see
            :attr:`GatedModel.unmixed_layers`.
        gate_structure: ``"free"`` (default: a task may keep any of a layer's channel groups, as in
            the paper) or ``"prefix"`` (a task keeps a leading run of the layer's channels and the
            shared slot reads one task per layer; the lean model then restores every task's width
            with concats of whole branch outputs, no channel gathers; see :mod:`gatedmtl.gates`).

    Every slot starts as a copy of the backbone, so before training every task's output
    equals ``backbone(x)`` for any gate pattern.
    """
    names = _validate_tasks(tasks)
    check_group(gate_group)
    check_mix(mix)
    check_structure(gate_structure)
    if skip_depthwise_mix and not tie_depthwise:
        raise ValueError("skip_depthwise_mix=True needs tie_depthwise=True: it skips the shared mix in front of "
                         "depthwise convolutions that use their input layer's gate")
    if not isinstance(backbone, nn.Module):
        raise TypeError(f"backbone must be an nn.Module, got {type(backbone).__name__}")
    if isinstance(backbone, GatedModel):
        raise TypeError("backbone is already a GatedModel")
    size = tuple(input_size) if input_size is not None else default_input_size(backbone)
    num_slots = len(names) + 1
    model = copy.deepcopy(backbone)
    was_training = backbone.training
    model.eval()

    units = {n: m for n, m in model.named_modules() if n and is_slot_unit(m)}
    if not units and is_slot_unit(model):
        raise ValueError("the backbone is a single layer; wrap it in a container module")
    example = torch.randn(2, *size)
    try:
        found = probe(model, units, example)
    except UnfoldableModuleError:
        raise
    except Exception as e:  # the user's backbone failed on its own input: say what was tried
        raise ValueError(f"the backbone failed on a probe input of shape {tuple(example.shape)}: {e}. "
                         "Pass input_size=(C, H, W) that the backbone accepts.") from e

    gated_output: dict[str, str] = {}  # unit whose output is mixed -> producer conv/linear
    for name in found.order:
        if name in found.pairs.values() or name in found.unfolded:
            continue
        module = units[name]
        if gateable(module) is not None:
            continue
        shape = found.out_shapes.get(name)
        channels = module.out_features if isinstance(module, nn.Linear) else module.out_channels
        dim = -1 if isinstance(module, nn.Linear) else 1
        if shape is None or len(shape) < 2 or shape[dim] != channels:
            continue
        gated_output[found.pairs.get(name, name)] = name
    if not gated_output:
        raise ValueError(f"{type(backbone).__name__} has no convolution or linear layer that gatedmtl can gate")

    streams = _sum_groups(found.sums, gated_output.keys(), found.order) if tie_residual else {}
    where = _parents(model)
    order: list[str] = []
    gates: dict[str, ChannelGate] = {}  # gated unit -> its gate
    tied: dict[str, str] = {}  # gated unit -> the gated unit whose gate it uses
    shared = {n: "not called in the forward pass" for n in units if n not in found.calls}
    for name in found.order:  # units never called in the probe stay shared (plain modules)
        module = units[name]
        if name in found.unfolded:  # one copy for every slot: correct whatever its input
            shared[name] = found.unfolded[name]
            continue
        gate = None
        if name in gated_output.keys():
            producer = units[gated_output[name]]
            linear = isinstance(producer, nn.Linear)
            channels = producer.out_features if linear else producer.out_channels
            group = layer_gate_group(producer, gate_group)
            # through a residual sum only when its layers are tied: the sum then has the gate's layout
            inputs = found.stream_sources if tie_residual else found.sources
            owner = _depthwise_input_gate(gated_output[name], producer, inputs, gates) if tie_depthwise else None
            if owner is None and tie_residual:
                first = next((n for n in streams.get(name, ()) if n in gates), None)
                owner = gates[first] if first is not None else None
            if (owner is not None and owner.channels == channels and owner.group == group
                    and owner.channel_dim == (-1 if linear else 1)):
                gate = owner
                tied[name] = owner.name
            else:
                gate = ChannelGate(len(names), channels, -1 if linear else 1, init_logit, group=group, mix=mix,
                                   structure=gate_structure)
                gate.name = name
            gates[name] = gate
            order.append(name)
        slotted = SlotModule(module, num_slots, gate)
        slotted.name = name
        slotted.producer = gated_output.get(name)
        for parent, attr in where[id(module)]:
            parent._modules[attr] = slotted
    unmixed = _unmixed_layers(order, gated_output, gates, found) if skip_depthwise_mix else []
    model = GatedModel(model, names, order, size, shared, sorted(found.batch_independent), tied, unmixed)
    if task_weights:
        unknown = set(task_weights) - set(names)
        if unknown:
            raise ValueError(f"task_weights for unknown tasks {sorted(unknown)}; tasks are {list(names)}")
        for i, task in enumerate(names):
            if task in task_weights:
                _load_task_weights(model.backbone, i + 1, task, task_weights[task])
    model.train(was_training)
    return model


def _sum_groups(sums: Sequence[tuple[str, str]], gated: Any, order: Sequence[str]) -> dict[str, list[str]]:
    """``{gated unit: the gated units of its group, in forward order}`` for the groups that ``sums`` join."""
    parent: dict[str, str] = {}

    def root(n: str) -> str:
        while parent.setdefault(n, n) != n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for a, b in sums:
        parent[root(a)] = root(b)
    rank = {n: i for i, n in enumerate(order)}
    members: dict[str, list[str]] = {}
    for n in sorted((n for n in parent if n in gated), key=lambda n: rank.get(n, len(rank))):
        members.setdefault(root(n), []).append(n)
    return {n: group for group in members.values() if len(group) > 1 for n in group}


def _unmixed_layers(order: Sequence[str], gated_output: Mapping[str, str], gates: Mapping[str, ChannelGate],
                    found: Any) -> list[str]:
    """The gated units whose output (called once) only depthwise convs with the same gate read, each once."""
    unit_of = {producer: unit for unit, producer in gated_output.items()}
    unmixed = []
    for name in order:
        readers = found.sole_readers.get(name)
        if not readers or found.calls.get(name) != 1:
            continue
        units = [unit_of.get(r) for r in readers]
        if all(u is not None and u != name and gates.get(u) is gates[name] and found.calls.get(r) == 1
               for u, r in zip(units, readers)):
            unmixed.append(name)
    return unmixed


def _depthwise_input_gate(conv_name: str, conv: nn.Module, sources: Mapping[str, str],
                          gates: Mapping[str, ChannelGate]) -> ChannelGate | None:
    """The gate of the gated unit whose output is the input of the depthwise ``conv`` (``None``: none)."""
    if not isinstance(conv, nn.modules.conv._ConvNd) or not (conv.groups == conv.in_channels == conv.out_channels > 1):
        return None
    source = sources.get(conv_name)
    return gates.get(source) if source is not None else None


def gate_layers(model: GatedModel) -> list[ChannelGate]:
    """The :class:`ChannelGate` modules of a converted model, in forward order."""
    if not isinstance(model, GatedModel):
        raise TypeError(f"expected a GatedModel from gatedmtl.convert, got {type(model).__name__}")
    return model.gates()
