"""``convert(..., gate_structure="prefix")``: every task keeps a leading run of each layer's channels.

The gate math (running-minimum logits, one mixed task per layer), the errors, the budget
projection, and the lean graph: parity with the gated model, FLOPs, and restores that are concats
of whole branch outputs (no channel Gather in the exported graph).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import timm
import torch

import gatedmtl
from gatedmtl.budget import project_to_budget
from gatedmtl.export import export_onnx
from gatedmtl.gates import ChannelGate
from gatedmtl.prune import NCHWC_BLOCK, SplitBranch, shared_pieces
from gatedmtl.verify import set_gates, verify
from lean_checks import assert_lean_matches, random_gates

TASKS = ("seg", "depth", "normals")


def _gate(alpha: list[list[float]], structure: str = "prefix", group: int = 1, mix: str = "soft") -> ChannelGate:
    a = torch.tensor(alpha)
    gate = ChannelGate(a.shape[0], a.shape[1] * group, 1, group=group, mix=mix, structure=structure)
    with torch.no_grad():
        gate.alpha.copy_(a)
    return gate


def _leading_runs(mask: torch.Tensor) -> bool:
    """Every row of a ``[T, C]`` boolean mask is ``True`` on a leading run of channels and ``False`` after it."""
    return not bool((mask[:, 1:] & ~mask[:, :-1]).any())


# -- gates ---------------------------------------------------------------------------------------

def test_effective_logits_are_each_tasks_logits_sorted():
    alpha = [[2.0, -1.0, 3.0], [1.0, 2.0, 0.5], [-1.0, 4.0, -5.0]]
    gate = _gate(alpha, group=2)
    expected = torch.tensor([[3.0, 2.0, -1.0], [2.0, 1.0, 0.5], [4.0, -1.0, -5.0]])
    assert torch.equal(gate.group_logits(), expected)
    assert torch.equal(gate.channel_logits(), expected.repeat_interleave(2, dim=1))
    # a task keeps as many groups as it has positive logits, the leading ones
    assert gate.open_mask().tolist() == [[True] * 4 + [False] * 2, [True] * 6, [True] * 2 + [False] * 4]
    free = _gate(alpha, structure="free")
    assert torch.equal(free.group_logits(), free.alpha)  # the paper's gates: each logit on its own


def test_each_logit_gets_the_gradient_of_the_position_it_is_sorted_to():
    gate = _gate([[2.0, -1.0, 3.0]])
    weights = torch.tensor([[1.0, 10.0, 100.0]])  # the channels' costs, as in the budget term
    (gate.mask() * weights).sum().backward()
    d = lambda v: float(torch.sigmoid(torch.tensor(v)) * (1 - torch.sigmoid(torch.tensor(v))))  # noqa: E731
    # 3.0 sits at position 0, 2.0 at position 1, -1.0 at position 2
    assert gate.alpha.grad.tolist()[0] == pytest.approx([10 * d(2.0), 100 * d(-1.0), 1 * d(3.0)])


def test_the_shared_slot_reads_one_task_per_layer():
    gate = _gate([[1.0] * 4] * 3, mix="soft")
    with torch.no_grad():
        gate.beta.copy_(torch.tensor([[3.0, -2.0, 0.0, 0.0], [0.0, 0.0, 0.0, 4.0], [1.0, 1.0, 1.0, 1.0]]))
    w = gate.mixing_weights()
    assert torch.allclose(w, torch.softmax(torch.tensor([0.25, 1.0, 1.0]), 0)[:, None].expand(3, 4))
    gate.set_mix_state("hard")
    assert gate.mix_choice().tolist() == [1, 1, 1, 1]  # the first of the tied means, as argmax
    assert torch.equal(gate.mixing_weights().detach(), torch.tensor([[0.0] * 4, [1.0] * 4, [0.0] * 4]))


def test_masks_and_mix_choices_outside_the_structure_are_refused():
    gate = _gate([[1.0, 1.0, -1.0], [-1.0, -1.0, -1.0]], mix="hard")
    gate.set_open(torch.tensor([[True, False, False], [True, True, True]]))
    assert gate.open_mask().tolist() == [[True, False, False], [True, True, True]]
    with pytest.raises(ValueError, match="leading run"):
        gate.set_open(torch.tensor([[False, True, False], [True, True, True]]))
    gate.set_mix_choice(torch.tensor([1, 1, 1]))
    assert gate.mix_choice().tolist() == [1, 1, 1]
    with pytest.raises(ValueError, match="same task at every channel"):
        gate.set_mix_choice(torch.tensor([0, 1, 1]))
    free = _gate([[1.0, 1.0, -1.0], [-1.0, -1.0, -1.0]], structure="free", mix="hard")
    free.set_open(torch.tensor([[False, True, False], [True, False, True]]))  # any pattern
    free.set_mix_choice(torch.tensor([0, 1, 0]))


def test_an_unknown_structure_is_refused_everywhere():
    with pytest.raises(ValueError, match="free.*prefix"):
        ChannelGate(2, 4, 1, structure="nested")
    with pytest.raises(ValueError, match="gate structure"):
        gatedmtl.convert(timm.create_model("resnet18", pretrained=False, features_only=True), TASKS,
                         input_size=(3, 32, 32), gate_structure="sorted")
    from gatedmtl.train import TrainConfig

    with pytest.raises(ValueError, match="gate structure"):
        TrainConfig(model="resnet18", gate_structure="sorted").validate()


def test_random_prefix_gates_keep_leading_runs_at_the_asked_density():
    model = gatedmtl.convert(timm.create_model("resnet18", pretrained=False, features_only=True), TASKS,
                             input_size=(3, 32, 32), gate_structure="prefix")
    set_gates(model, 0.5, torch.Generator().manual_seed(0))
    masks = [g.open_mask() for g in model.gates()]
    assert all(_leading_runs(m) for m in masks)
    density = sum(float(m.sum()) for m in masks) / sum(m.numel() for m in masks)
    assert 0.4 < density < 0.6, density
    assert len({tuple(m.sum(1).tolist()) for m in masks}) > 5  # the tasks' widths differ between layers


# -- budget projection ---------------------------------------------------------------------------

@pytest.mark.parametrize("fraction, offset", [(0.3, 2.5), (0.8, 0.3)])
def test_budget_projection_keeps_the_prefix_structure(fraction, offset):
    """From random raw logits (a positive one after a negative one is common), both directions."""
    model = gatedmtl.convert(timm.create_model("resnet18", pretrained=False, features_only=True), TASKS,
                             input_size=(3, 32, 32), gate_structure="prefix").eval()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for gate in model.gates():
            gate.alpha.copy_(torch.randn(gate.alpha.shape, generator=gen) + offset)
    shape = (1, 3, 32, 32)
    before = gatedmtl.predict_flops(model, shape)
    low, high = gatedmtl.flop_bounds(model, shape)
    budget = low + fraction * (high - low)
    assert (before > budget) == (fraction == 0.3)  # one case closes groups, the other opens them
    predicted = project_to_budget(model, budget, shape, tolerance=0.05)
    assert predicted == gatedmtl.predict_flops(model, shape)
    assert 0.95 * budget <= predicted <= budget
    assert all(_leading_runs(g.open_mask()) for g in model.gates())


# -- lean graph ----------------------------------------------------------------------------------

def test_shared_pieces_end_where_the_borrowers_change():
    open_ = torch.zeros(3, 8, dtype=torch.bool)
    open_[0, :2], open_[1, :5], open_[2, :2] = True, True, True  # tasks keep 2, 5 and 2 channels
    keep = (~open_.all(0)).nonzero().flatten()
    assert [p.tolist() for p in shared_pieces(keep, open_)] == [[2, 3, 4], [5, 6, 7]]
    open_[1] = True  # one task keeps everything: it borrows nothing, the others borrow 2..7 alike
    assert [p.tolist() for p in shared_pieces((~open_.all(0)).nonzero().flatten(), open_)] == [[2, 3, 4, 5, 6, 7]]
    free = torch.tensor([[True, False, True, False], [False, False, True, True]])  # borrowers 1 / 0,1 / 0 / 0
    assert [p.tolist() for p in shared_pieces(torch.tensor([0, 1, 3]), free)] == [[0], [1], [3]]
    assert shared_pieces(torch.zeros(0, dtype=torch.long), open_) == []


def _gathers(path) -> list[str]:
    """Names of the Gather nodes of an ONNX file that select at least one entry (keep-alives select none)."""
    graph = onnx.load(str(path)).graph
    sizes = {i.name: int(np.prod(i.dims)) for i in graph.initializer}
    sizes |= {n.output[0]: int(np.prod(n.attribute[0].t.dims)) for n in graph.node
              if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"}
    identity = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity"}

    def size(name: str) -> int:
        while name in identity:
            name = identity[name]
        return sizes.get(name, 1)

    return [n.name for n in graph.node if n.op_type == "Gather" and size(n.input[1]) > 0 and "Shape" not in n.input[0]]


CASES = {
    "resnet18-hard": ("resnet18", "hard", {}),
    "resnet18-soft": ("resnet18", "soft", {}),
    "mobilenetv3-hard-tied": ("mobilenetv3_small_050", "hard", dict(tie_depthwise=True, skip_depthwise_mix=True)),
    "efficientnet-hard-tied": ("efficientnet_b0", "hard", dict(tie_depthwise=True, skip_depthwise_mix=True)),
    "hrnet-hard": pytest.param(("hrnet_w18_small_v2", "hard", {}), marks=pytest.mark.slow),
}


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_lean_prefix_model_matches_and_restores_without_gathers(case, tmp_path):
    name, mix, ties = case
    size = (3, 64, 64)
    torch.manual_seed(0)
    backbone = timm.create_model(name, pretrained=False, features_only=True).eval()
    model = random_gates(gatedmtl.convert(backbone, TASKS, input_size=size, mix=mix, gate_structure="prefix",
                                          **ties).eval())
    lean = gatedmtl.prune(model).eval()
    assert lean.streams and all(layer.defer for _, layer in lean.lean_layers())
    for _, layer in lean.lean_layers():  # split exactly where the pieces are whole NCHWc blocks
        pieces = shared_pieces(layer._keep[0], layer._open)
        aligned = len(pieces) > 1 and all(p.numel() % NCHWC_BLOCK == 0 for p in pieces)
        assert isinstance(layer.branches[0], SplitBranch) == aligned
        if aligned:
            assert len(layer.branches[0].pieces) == len(pieces)
    assert_lean_matches(model, lean, torch.randn(2, *size, generator=torch.Generator().manual_seed(4)))
    report = export_onnx(lean, tmp_path / "lean.onnx", (1, *size))  # ORT vs torch <= 1e-4 (raises otherwise)
    assert max(report.max_rel_error.values()) <= 1e-4
    if mix == "hard" and name == "resnet18":  # every width a multiple of the block: no restore needs a Gather
        assert sum(isinstance(layer.branches[0], SplitBranch) for _, layer in lean.lean_layers()) >= 10
        free = random_gates(gatedmtl.convert(backbone, TASKS, input_size=size, mix=mix, **ties).eval())
        export_onnx(gatedmtl.prune(free).eval(), tmp_path / "free.onnx", (1, *size), check=False)
        gathers, free_gathers = _gathers(tmp_path / "lean.onnx"), _gathers(tmp_path / "free.onnx")
        assert len(free_gathers) >= 40 and gathers == [], gathers  # (free gates: one per partly open task and layer)


def test_verify_passes_with_the_prefix_structure():
    backbone = timm.create_model("mobilenetv3_small_050", pretrained=False, features_only=True)
    report = verify(backbone, input_size=(3, 32, 32), mix="hard", tie_depthwise=True, skip_depthwise_mix=True,
                             gate_structure="prefix")
    assert report.ok, report.as_dict()
