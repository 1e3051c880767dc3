"""``convert(..., skip_depthwise_mix=True)``: no shared mix in front of the depthwise convs that use their input layer's gate."""

from __future__ import annotations

import onnx
import pytest
import timm
import torch
from torch import nn

import gatedmtl
from gatedmtl.export import export_onnx
from gatedmtl.gates import ChannelGate
from lean_checks import assert_lean_matches, random_gates

TASKS = ("seg", "depth", "normals")
SIZE = (3, 16, 16)


class Block(nn.Module):
    """stem -> inverted residual (expand, depthwise, project, + x) -> a depthwise conv after a sum.

    ``expansion_read_twice``: the expansion's output is also added to the depthwise output, so
    something besides the depthwise conv reads it.
    """

    def __init__(self, c: int = 16, hidden: int = 32, expansion_read_twice: bool = False) -> None:
        super().__init__()
        self.twice = expansion_read_twice
        self.stem, self.bn = nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c)
        self.expand, self.bn1 = nn.Conv2d(c, hidden, 1, bias=False), nn.BatchNorm2d(hidden)
        self.dw, self.bn2 = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False), nn.BatchNorm2d(hidden)
        self.project, self.bn3 = nn.Conv2d(hidden, c, 1, bias=False), nn.BatchNorm2d(c)
        self.tail = nn.Conv2d(c, c, 3, padding=1, groups=c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        h = torch.relu(self.bn1(self.expand(x)))
        d = torch.relu(self.bn2(self.dw(h)))
        if self.twice:
            d = d + h
        x = x + self.bn3(self.project(d))
        return self.tail(x + x)


def _model(mix: str = "hard", skip: bool = True, **kwargs) -> gatedmtl.GatedModel:
    torch.manual_seed(0)
    model = gatedmtl.convert(Block(**kwargs).eval(), TASKS, input_size=SIZE, tie_depthwise=True, mix=mix,
                             skip_depthwise_mix=skip).eval()
    return random_gates(model)


def test_skips_the_mix_exactly_where_only_tied_depthwise_convs_read_the_layer():
    model = _model()
    assert model.unmixed_layers == ("bn1",)  # the stem feeds a residual sum, bn2 the projection
    assert model.backbone.get_submodule("bn1").unmixed and not model.backbone.get_submodule("bn2").unmixed
    assert _model(expansion_read_twice=True).unmixed_layers == ()  # the sum reads the expansion too
    assert _model(skip=False).unmixed_layers == ()


def test_skipping_needs_tied_depthwise_convs():
    with pytest.raises(ValueError, match="needs tie_depthwise=True"):
        gatedmtl.convert(Block(), TASKS, input_size=SIZE, skip_depthwise_mix=True)


@pytest.mark.parametrize("hard", [False, True])
def test_unmixed_shared_slot_is_its_own_output_with_the_tasks_gated_as_always(hard):
    torch.manual_seed(0)
    gate = ChannelGate(3, 8, 1, group=2, mix="hard" if hard else "soft")
    with torch.no_grad():
        gate.alpha.copy_(torch.randn_like(gate.alpha))
        gate.beta.copy_(torch.randn_like(gate.beta))
    slots = [torch.randn(2, 8, 3, 3, requires_grad=True) for _ in range(4)]
    mixed = gate.mix(slots).chunk(4)
    unmixed = gate.mix(slots, shared_mix=False).chunk(4)
    assert torch.equal(unmixed[0], slots[0]) and not torch.allclose(mixed[0], slots[0])
    for t in range(1, 4):
        assert torch.equal(unmixed[t], mixed[t])
    # gradients: those of phi'_t = m_t * phi_t + (1 - m_t) * psi with m_t = sigmoid(alpha) straight-through
    grad = torch.randn(8, 8, 3, 3)
    torch.autograd.backward(torch.cat(unmixed), grad)
    got = [gate.alpha.grad.clone()] + [s.grad.clone() for s in slots]
    assert gate.beta.grad is None or not gate.beta.grad.any()  # nothing reads the mix
    gate.alpha.grad = None
    for s in slots:
        s.grad = None
    soft = torch.sigmoid(gate.channel_logits())
    m = (gate.channel_logits() > 0).float() + soft - soft.detach()
    outs = [slots[0]] + [m[t].view(1, 8, 1, 1) * slots[t + 1] + (1 - m[t].view(1, 8, 1, 1)) * slots[0]
                         for t in range(3)]
    torch.autograd.backward(torch.cat(outs), grad)
    want = [gate.alpha.grad] + [s.grad for s in slots]
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


@pytest.mark.parametrize("mix", ["soft", "hard"])
def test_unmixed_lean_model_equals_the_gated_model_and_its_flop_prediction(mix, tmp_path):
    model = _model(mix)
    x = torch.randn(2, *SIZE)
    with torch.no_grad():
        ref = model(x)
        lean = gatedmtl.prune(model).eval()
        got = lean(x)
    for t in TASKS:
        assert (got[t] - ref[t]).abs().max() <= 1e-4 * ref[t].abs().max()
    assert gatedmtl.predict_flops(model, (1, *SIZE)) == gatedmtl.count_flops(lean, (1, *SIZE))
    report = export_onnx(lean, tmp_path / "lean.onnx", (1, *SIZE))
    assert max(report.max_rel_error.values()) <= 1e-4


def test_skipping_the_mix_is_another_model():
    model = _model("soft")
    mixed = gatedmtl.convert(Block().eval(), TASKS, input_size=SIZE, tie_depthwise=True, mix="soft").eval()
    mixed.load_state_dict(model.state_dict())
    x = torch.randn(2, *SIZE)
    with torch.no_grad():
        a, b = model(x), mixed(x)
    assert any(not torch.allclose(a[t], b[t]) for t in TASKS)


def _gathers_into_tied_depthwise(path) -> int:
    """Gather nodes whose output a depthwise Conv of the tied ``dw`` layer reads (by node name)."""
    graph = onnx.load(str(path)).graph
    producer = {o: n for n in graph.node for o in n.output}
    count = 0
    for node in graph.node:
        if node.op_type == "Conv" and "/dw/" in node.name:
            src = producer.get(node.input[0])
            while src is not None and src.op_type in ("Relu", "Identity"):
                src = producer.get(src.input[0])
            count += src is not None and src.op_type == "Gather"
    return count


def test_the_shared_depthwise_branch_reads_the_shared_expansion_without_a_gather(tmp_path):
    counts = {}
    for skip in (False, True):
        lean = gatedmtl.prune(_model("hard", skip)).eval()
        export_onnx(lean, tmp_path / f"{skip}.onnx", (1, *SIZE))
        counts[skip] = _gathers_into_tied_depthwise(tmp_path / f"{skip}.onnx")
    assert counts == {False: 1, True: 0}  # the shared slot's mix was the one selection left


def test_timm_mobilenetv3_unmixed_lean_parity():
    backbone = timm.create_model("mobilenetv3_small_050", pretrained=False, features_only=True).eval()
    model = gatedmtl.convert(backbone, TASKS, input_size=(3, 32, 32), tie_depthwise=True, tie_residual=True,
                             skip_depthwise_mix=True, mix="hard").eval()
    # every expansion conv of an inverted residual (its output feeds only the depthwise conv)
    expansions = [n for n in model.gate_names if n.endswith(".bn1") and ".conv_pw" in model.backbone.get_submodule(n).producer]
    assert expansions and set(expansions) <= set(model.unmixed_layers)
    lean = gatedmtl.prune(random_gates(model)).eval()
    assert_lean_matches(model, lean, torch.randn(2, 3, 32, 32))


def test_training_option_and_old_configs():
    from gatedmtl.cli import _parser
    from gatedmtl.train import TrainConfig

    # the default follows tie_depthwise, and a saved config holds the resolved choice
    assert TrainConfig().skip_depthwise_mix is True and TrainConfig().to_json()["skip_depthwise_mix"] is True
    assert TrainConfig(tie_depthwise=False).skip_depthwise_mix is False
    assert TrainConfig(skip_depthwise_mix=False).skip_depthwise_mix is False
    saved = {k: v for k, v in TrainConfig().to_json().items() if k != "skip_depthwise_mix"}
    assert TrainConfig.from_json(saved).skip_depthwise_mix is False  # saved before the option: mixed everywhere
    for value in (False, True):
        assert TrainConfig.from_json(TrainConfig(skip_depthwise_mix=value).to_json()).skip_depthwise_mix is value
    parser, _ = _parser()
    assert parser.parse_args(["train"]).skip_depthwise_mix is None  # -> TrainConfig's default
    assert parser.parse_args(["train", "--skip-depthwise-mix"]).skip_depthwise_mix is True
    assert parser.parse_args(["train", "--no-skip-depthwise-mix"]).skip_depthwise_mix is False
