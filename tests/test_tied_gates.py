"""Tied gates: ``convert(..., tie_depthwise=True)`` (a depthwise conv fed by a gated layer uses its gate) and
``tie_residual=True`` (the gated layers that write one residual stream use one gate)."""

from __future__ import annotations

import onnx
import pytest
import timm
import torch
from torch import nn

import gatedmtl
from gatedmtl.budget import project_to_budget
from gatedmtl.export import export_onnx
from gatedmtl.verify import set_gates
from lean_checks import assert_lean_matches, random_gates

TASKS = ("seg", "depth", "normals")


class InvertedResidual(nn.Module):
    """expand 1x1 -> BN -> ReLU6 -> depthwise 3x3 -> BN -> ReLU6 -> project 1x1 -> BN (+ x)."""

    def __init__(self, c: int, hidden: int) -> None:
        super().__init__()
        self.expand, self.bn1 = nn.Conv2d(c, hidden, 1, bias=False), nn.BatchNorm2d(hidden)
        self.dw, self.bn2 = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False), nn.BatchNorm2d(hidden)
        self.project, self.bn3 = nn.Conv2d(hidden, c, 1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.relu6(self.bn1(self.expand(x)))
        h = nn.functional.relu6(self.bn2(self.dw(h)))
        return x + self.bn3(self.project(h))


class DepthwiseAfterAdd(nn.Module):
    """A depthwise conv whose input is a residual sum, not one gated layer's output: never tied."""

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c)
        self.block = InvertedResidual(c, 32)
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        x = self.block(x)
        return self.dw(x + x)


def _tiny() -> nn.Module:
    return DepthwiseAfterAdd().eval()


def test_ties_exactly_the_depthwise_convs_fed_by_a_gated_layer():
    model = gatedmtl.convert(_tiny(), TASKS, input_size=(3, 16, 16), tie_depthwise=True)
    assert model.tied_gates == {"block.bn2": "block.bn1"}  # the dw after the residual sum keeps its own gate
    layer, owner = (model.backbone.get_submodule(n) for n in ("block.bn2", "block.bn1"))
    assert layer.gate is owner.gate
    assert len(model.gates()) == len(model.gate_names) == len(model.unique_gates()) + 1
    plain = gatedmtl.convert(_tiny(), TASKS, input_size=(3, 16, 16))
    assert plain.tied_gates == {} and len(plain.unique_gates()) == len(plain.gate_names)


def test_timm_inverted_residuals_tie_every_depthwise_conv():
    backbone = timm.create_model("mobilenetv3_small_050", pretrained=False, features_only=True).eval()
    model = gatedmtl.convert(backbone, TASKS, input_size=(3, 32, 32), tie_depthwise=True)
    depthwise = [n for n in model.gate_names
                 if (lambda c: c.groups == c.in_channels == c.out_channels > 1)(
                     model.backbone.get_submodule(model.backbone.get_submodule(n).producer).slots[0])]
    assert depthwise and sorted(model.tied_gates) == sorted(depthwise)


@pytest.mark.parametrize("mix", ["soft", "hard"])
def test_tied_lean_model_equals_the_gated_model_and_its_flop_prediction(mix, tmp_path):
    torch.manual_seed(0)
    model = gatedmtl.convert(_tiny(), TASKS, input_size=(3, 16, 16), tie_depthwise=True, mix=mix).eval()
    lean = gatedmtl.prune(random_gates(model)).eval()
    assert_lean_matches(model, lean, torch.randn(2, 3, 16, 16))
    report = export_onnx(lean, tmp_path / "lean.onnx", (1, 3, 16, 16))
    assert max(report.max_rel_error.values()) <= 1e-4


def _depthwise_inputs(path) -> list[str]:
    """The op type that produces the input of every depthwise Conv node of an ONNX graph."""
    graph = onnx.load(str(path)).graph
    producer = {o: n.op_type for n in graph.node for o in n.output}
    shapes = {i.name: i for i in graph.initializer}
    ops = []
    for node in graph.node:
        if node.op_type != "Conv":
            continue
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if group > 1 and shapes[node.input[1]].dims[1] == 1:
            ops.append(producer.get(node.input[0], "input"))
    return ops


def test_tied_depthwise_convs_read_their_task_input_without_a_gather(tmp_path):
    inputs = {}
    for tie in (False, True):
        model = gatedmtl.convert(_tiny(), TASKS, input_size=(3, 16, 16), tie_depthwise=tie, mix="hard").eval()
        lean = gatedmtl.prune(random_gates(model)).eval()
        export_onnx(lean, tmp_path / f"{tie}.onnx", (1, 3, 16, 16))
        inputs[tie] = _depthwise_inputs(tmp_path / f"{tie}.onnx")
    # block.dw per computed slot (+ the untied dw after the sum): untied, task branches select their input channels
    assert "Gather" in inputs[False]
    # tied: block.dw's task branches read their own expand branch (after its activation); only the shared slot's
    # input (the mix) and the untied dw may still be selections
    tied_gathers = inputs[True].count("Gather")
    assert tied_gathers < inputs[False].count("Gather")
    assert tied_gathers <= 2


@pytest.mark.parametrize("direction", ["close", "open"])
def test_projection_counts_a_tied_gate_once_for_both_layers(direction):
    shape = (1, 3, 16, 16)
    gen = torch.Generator().manual_seed(4)
    for fraction in (0.2, 0.4, 0.6, 0.8):
        model = gatedmtl.convert(_tiny(), TASKS, input_size=(3, 16, 16), tie_depthwise=True).eval()
        with torch.no_grad():  # every gate open (the projection closes some) or closed (it opens some)
            for gate in model.unique_gates():
                logits = torch.rand(gate.alpha.shape, generator=gen) + 0.1
                gate.alpha.copy_(logits if direction == "close" else -logits)
        low, high = gatedmtl.flop_bounds(model, shape)
        budget = low + fraction * (high - low)
        predicted = project_to_budget(model, budget, shape)
        # a (task, gate group) changes the cost of every layer that uses the gate: counted per layer, opening one
        # tied gate adds twice what the projection expects and the lean model lands above the budget
        step = max(float(g.to_groups(g.cost.double()).max()) for g in model.unique_gates())
        assert budget - step <= predicted <= budget, (fraction, budget, predicted)
        lean = gatedmtl.prune(model)
        assert predicted == gatedmtl.predict_flops(model, shape) == gatedmtl.count_flops(lean, shape)
    tied = model.backbone.get_submodule("block.bn2").gate
    assert tied is model.backbone.get_submodule("block.bn1").gate
    # the gate's cost is the sum over the two layers that it decides
    info = gatedmtl.analyze(model, shape)
    names = model.gate_names
    both = info.costs[names.index("block.bn1")] + info.costs[names.index("block.bn2")]
    assert torch.allclose(tied.cost.double(), both)


def test_checkpoint_of_tied_gates_round_trips(tmp_path):
    from gatedmtl.checkpoint import load_checkpoint, save_checkpoint

    model = gatedmtl.convert(_tiny(), TASKS, input_size=(3, 16, 16), tie_depthwise=True)
    set_gates(model, 0.5, torch.Generator().manual_seed(3))
    path = save_checkpoint(tmp_path / "m.safetensors", model.state_dict(), {"kind": "test"})
    tensors, _ = load_checkpoint(path)
    fresh = gatedmtl.convert(_tiny(), TASKS, input_size=(3, 16, 16), tie_depthwise=True)
    fresh.load_state_dict(tensors)
    for a, b in zip(model.gates(), fresh.gates()):
        assert torch.equal(a.alpha, b.alpha)
    assert fresh.backbone.get_submodule("block.bn2").gate is fresh.backbone.get_submodule("block.bn1").gate


class ResidualStage(nn.Module):
    """stem -> two residual blocks (conv-BN-ReLU-conv-BN + x) -> a downsampling block (1x1 shortcut)."""

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c)
        self.c1 = nn.ModuleList(nn.Conv2d(c, c, 3, padding=1) for _ in range(3))
        self.n1 = nn.ModuleList(nn.BatchNorm2d(c) for _ in range(3))
        self.c2 = nn.ModuleList(nn.Conv2d(c, c if i < 2 else 2 * c, 3, padding=1) for i in range(3))
        self.n2 = nn.ModuleList(nn.BatchNorm2d(c if i < 2 else 2 * c) for i in range(3))
        self.down, self.down_bn = nn.Conv2d(c, 2 * c, 1), nn.BatchNorm2d(2 * c)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = torch.relu(self.bn(self.stem(x)))
        for i in range(3):
            y = self.n2[i](self.c2[i](torch.relu(self.n1[i](self.c1[i](x)))))
            shortcut = x if i < 2 else self.down_bn(self.down(x))
            x = torch.relu(y + shortcut)
        return [x]


def test_tie_residual_gives_each_residual_stream_one_gate():
    model = gatedmtl.convert(ResidualStage().eval(), TASKS, input_size=(3, 16, 16), tie_residual=True)
    assert model.tied_gates == {"n2.0": "bn", "n2.1": "bn", "down_bn": "n2.2"}  # the first in forward order owns
    assert model.backbone.get_submodule("n2.1").gate is model.backbone.get_submodule("bn").gate
    assert model.backbone.get_submodule("n1.0").gate is not model.backbone.get_submodule("bn").gate
    timm_model = gatedmtl.convert(timm.create_model("resnet18", pretrained=False, features_only=True).eval(), TASKS,
                                  input_size=(3, 32, 32), tie_residual=True)
    assert len(set(timm_model.tied_gates.values())) == 4  # one stream per stage
    assert len(timm_model.unique_gates()) == len(timm_model.gate_names) - 8


@pytest.mark.parametrize("mix", ["soft", "hard"])
def test_tied_residual_lean_model_adds_the_streams_part_by_part(mix, tmp_path):
    shape = (1, 3, 16, 16)
    counts = {}
    for tie in (False, True):
        model = gatedmtl.convert(ResidualStage().eval(), TASKS, input_size=shape[1:], tie_residual=tie, mix=mix).eval()
        lean = gatedmtl.prune(random_gates(model)).eval()
        assert_lean_matches(model, lean, torch.randn(2, *shape[1:]))
        report = export_onnx(lean, tmp_path / f"{tie}.onnx", shape)
        assert max(report.max_rel_error.values()) <= 1e-4
        graph = onnx.load(str(tmp_path / f"{tie}.onnx")).graph
        producer = {o: n.op_type for n in graph.node for o in n.output}
        adds = [n for n in graph.node if n.op_type == "Add" and all(i in producer for i in n.input)]
        counts[tie] = sum(all(producer[i] == "Gather" for i in n.input) for n in adds)
    if mix == "hard":  # untied, the residual sums add two restored (gathered) tensors; tied, they add branch outputs
        assert counts[False] > 0 and counts[True] == 0


def test_training_ties_depthwise_by_default_and_old_configs_load_untied():
    from gatedmtl.cli import _parser
    from gatedmtl.train import TrainConfig

    assert TrainConfig().tie_depthwise and not TrainConfig().tie_residual
    saved = {k: v for k, v in TrainConfig().to_json().items() if k != "tie_depthwise"}
    assert TrainConfig.from_json(saved).tie_depthwise is False  # run saved before the option: converted untied
    assert TrainConfig.from_json(TrainConfig().to_json()).tie_depthwise is True
    parser, _ = _parser()
    assert parser.parse_args(["train"]).tie_depthwise is True
    assert parser.parse_args(["train", "--no-tie-depthwise"]).tie_depthwise is False
