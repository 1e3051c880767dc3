"""A multi-task network: an encoder (plain, gated or lean) plus one head per task."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import timm
import torch
from torch import Tensor, nn

from .checkpoint import load_weights
from .gates import DEFAULT_GATE_GROUP
from .prune import LeanModel, prune
from .surgery import GatedModel, convert
from .tasks import Task, create_task

__all__ = ["MultiTaskNet", "build_backbone", "build_network", "ARCHS"]

ARCHS = ("gated", "shared")


class MultiTaskNet(nn.Module):
    """``forward(x[B, C, H, W]) -> {task: prediction}``.

    ``encoder`` is a :class:`GatedModel` / :class:`LeanModel` (returns ``{task: features}``) or a
    plain backbone shared by every task (hard parameter sharing).
    """

    def __init__(self, encoder: nn.Module, heads: Mapping[str, nn.Module]) -> None:
        super().__init__()
        self.encoder = encoder
        self.heads = nn.ModuleDict(dict(heads))

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.heads.keys())

    @property
    def gated(self) -> bool:
        return isinstance(self.encoder, GatedModel)

    def features(self, x: Tensor) -> dict[str, Any]:
        if isinstance(self.encoder, (GatedModel, LeanModel)):
            return self.encoder(x)
        shared = self.encoder(x)
        return {t: shared for t in self.heads}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        feats = self.features(x)
        return {t: head(feats[t]) for t, head in self.heads.items()}

    def encoder_parameters(self) -> list[nn.Parameter]:
        """Parameters of the encoder that feed several tasks (all of it, gates included)."""
        return [p for p in self.encoder.parameters() if p.requires_grad]

    def head_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.heads.parameters() if p.requires_grad]

    def pruned(self) -> MultiTaskNet:
        """The same network with a lean encoder (``prune`` of the gated one)."""
        if not isinstance(self.encoder, GatedModel):
            raise TypeError("only a gated network can be pruned")
        net = MultiTaskNet(prune(self.encoder), {t: h for t, h in self.heads.items()})
        return net.train(self.training)


def build_backbone(name: str, *, pretrained: bool = False, checkpoint: str | Path | None = None,
                   partial: bool = False, in_chans: int = 3) -> nn.Module:
    """A timm ``features_only`` backbone for ``in_chans``-channel input (1: grey, e.g. MultiMNIST);
    weights from timm's hub (``pretrained``; timm adapts the stem to ``in_chans``) or a local file.

    A local ``checkpoint`` must hold exactly the backbone's weights (same names and shapes; keys
    of a classifier head that ``features_only`` drops are allowed). With ``partial=True`` the
    matching weights are loaded and the rest keep their initialisation (the skipped keys are
    printed); a file with no matching weight is refused either way.
    """
    if int(in_chans) < 1:
        raise ValueError(f"in_chans must be >= 1, got {in_chans}")
    if name not in timm.list_models():
        close = timm.list_models(f"*{name}*")[:8]
        raise ValueError(f"unknown model {name!r}" + (f"; did you mean one of {close}?" if close else "; see timm.list_models()"))
    try:
        backbone = timm.create_model(name, pretrained=pretrained, features_only=True, in_chans=int(in_chans))
    except RuntimeError as e:
        if "features_only" in str(e) or "feature" in str(e):
            raise ValueError(f"model {name!r} cannot return feature maps (features_only): {e}") from e
        raise
    if checkpoint is not None:
        state = load_weights(checkpoint)
        own = backbone.state_dict()
        if not set(state) & set(own):
            raise ValueError(f"{checkpoint} holds no weights for {name} (first keys: {list(state)[:3]})")
        head = ("fc.", "head.", "classifier.", "head_drop.", "pre_logits.", "conv_head.", "global_pool.")
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own and not k.startswith(head)]
        wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
                 if k in state and tuple(state[k].shape) != tuple(v.shape)]
        problems = []
        if missing:
            problems.append(f"{len(missing)} weights of {name} are missing (e.g. {missing[:3]})")
        if unexpected:
            problems.append(f"{len(unexpected)} keys are not in {name} (e.g. {unexpected[:3]})")
        if wrong:
            problems.append(f"{len(wrong)} shapes differ (e.g. {wrong[:2]})")
        if problems and not partial:
            raise ValueError(f"{checkpoint} does not match {name}: " + "; ".join(problems)
                             + ". Give weights of the same architecture, or --partial-checkpoint to load the matching ones")
        if problems:
            print(f"partial checkpoint: {'; '.join(problems)}; loading the {len(own) - len(missing) - len(wrong)} "
                  "matching weights", flush=True)
        skip = {k.split(" ")[0] for k in wrong}
        backbone.load_state_dict({k: v for k, v in state.items() if k in own and k not in skip}, strict=False)
    return backbone


def _feature_channels(encoder_out: Any) -> list[int]:
    items = encoder_out if isinstance(encoder_out, (list, tuple)) else [encoder_out]
    return [int(f.shape[1] if f.dim() == 4 else f.shape[-1]) for f in items]


def build_network(backbone: nn.Module, tasks: Mapping[str, Task] | Sequence[Task], input_size: tuple[int, int, int],
                  arch: str = "gated", *, init_logit: float = 1.0, gate_group: int = DEFAULT_GATE_GROUP,
                  task_weights: Mapping[str, Mapping[str, Tensor]] | None = None, mix: str = "soft",
                  tie_depthwise: bool = False, tie_residual: bool = False,
                  skip_depthwise_mix: bool = False, gate_structure: str = "free") -> MultiTaskNet:
    """Encoder (``arch``: ``gated`` or ``shared``) + one head per task, sized by a probe pass.

    ``mix``, ``tie_depthwise``, ``tie_residual``, ``skip_depthwise_mix``, ``gate_structure``: the
    gated encoder's shared-slot mix (``"soft"`` or ``"hard"``), gate tying and mixing, and the open
    sets its gates may learn (see :func:`gatedmtl.convert`).
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose from {ARCHS}")
    task_list = list(tasks.values()) if isinstance(tasks, Mapping) else list(tasks)
    with torch.no_grad():
        was = backbone.training
        probe_out = backbone.eval()(torch.zeros(1, *input_size))
        backbone.train(was)
    channels = _feature_channels(probe_out)
    heads = {t.name: t.make_head(channels, tuple(input_size[1:])) for t in task_list}
    if arch == "gated":
        encoder: nn.Module = convert(backbone, [t.name for t in task_list], input_size=input_size,
                                     init_logit=init_logit, gate_group=gate_group, task_weights=task_weights,
                                     mix=mix, tie_depthwise=tie_depthwise, tie_residual=tie_residual,
                                     skip_depthwise_mix=skip_depthwise_mix, gate_structure=gate_structure)
    else:
        if task_weights:
            raise ValueError("task_weights only apply to the gated arch")
        encoder = backbone
    return MultiTaskNet(encoder, heads)


def tasks_from_spec(spec: Mapping[str, Mapping[str, Any]]) -> dict[str, Task]:
    """``{"seg": {"num_classes": 7}, "depth": {}}`` -> task objects.

    A ``"task"`` entry names the registered type of a task keyed otherwise:
    ``{"left": {"task": "classify", "num_classes": 10}}`` is a classification task called ``left``.
    """
    tasks = {}
    for name, kwargs in spec.items():
        kw = dict(kwargs)
        kind = kw.pop("task", name)
        task = create_task(kind, **kw)
        tasks[name] = task if kind == name else task.renamed(name)
    return tasks
