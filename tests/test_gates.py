"""ChannelGate and the cost model against hand-computed cases."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gatedmtl
from gatedmtl.cost import _live, expected_flops
from gatedmtl.gates import ChannelGate, straight_through


def test_straight_through_value_and_gradient():
    alpha = torch.tensor([-2.0, 0.0, 0.5, 3.0], requires_grad=True)
    m = straight_through(alpha)
    assert m.tolist() == [0.0, 0.0, 1.0, 1.0]
    m.sum().backward()
    s = torch.sigmoid(alpha.detach())
    assert torch.allclose(alpha.grad, s * (1 - s))


def test_mixing_matches_formula_for_conv_and_linear_layouts():
    torch.manual_seed(0)
    gate = ChannelGate(num_tasks=2, channels=3, channel_dim=1)
    with torch.no_grad():
        gate.alpha.copy_(torch.tensor([[1.0, -1.0, 1.0], [-1.0, -1.0, 1.0]]))
        gate.beta.copy_(torch.tensor([[0.0, 1.0, 2.0], [0.0, 0.0, -1.0]]))
    y = torch.randn(3 * 2, 3, 2, 2)  # S=3 slots, b=2
    out = gate(y).reshape(3, 2, 3, 2, 2)
    psi, phi = y.reshape(3, 2, 3, 2, 2)[0], y.reshape(3, 2, 3, 2, 2)[1:]
    m = torch.tensor([[1.0, 0, 1], [0, 0, 1]])
    w = torch.softmax(gate.beta.detach(), 0)
    for t in range(2):
        for c in range(3):
            expect = phi[t, :, c] if m[t, c] else psi[:, c]
            assert torch.equal(out[t + 1, :, c], expect)
    for c in range(3):
        mixed = sum(w[t, c] * out[t + 1, :, c] for t in range(2))
        assert torch.allclose(out[0, :, c], mixed)
    linear = ChannelGate(num_tasks=2, channels=3, channel_dim=-1)
    linear.load_state_dict(gate.state_dict())
    z = y.permute(0, 2, 3, 1).contiguous()  # channels last
    assert torch.allclose(linear(z).permute(0, 3, 1, 2), gate(y))


def test_gate_rejects_wrong_shapes():
    gate = ChannelGate(2, 4, 1)
    with pytest.raises(ValueError, match="multiple of 3 slots"):
        gate(torch.randn(4, 4, 2, 2))
    with pytest.raises(ValueError, match="expected 4 channels"):
        gate(torch.randn(3, 5, 2, 2))
    with pytest.raises(ValueError):
        ChannelGate(2, 4, 2)


def test_live_slots_per_channel():
    # T=3: all open -> 3 task filters, shared dead; all closed -> shared only; mixed -> own + shared
    m = torch.tensor([[1.0, 0, 1, 0], [1, 0, 0, 0], [1, 0, 1, 1]])
    assert _live(m).tolist() == [3.0, 1.0, 3.0, 2.0]


def test_cost_of_a_two_layer_net_by_hand():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.ReLU(), nn.Conv2d(4, 2, 1, bias=False))
    model = gatedmtl.convert(net, ["a", "b"], input_size=(3, 5, 5), gate_group=1)
    info = gatedmtl.analyze(model, (1, 3, 5, 5))
    assert info.full == 3 * (4 * 3 * 9 * 25 + 2 * 4 * 25)
    assert info.costs[0].tolist() == [3 * 9 * 25] * 4 and info.costs[1].tolist() == [4 * 25] * 2
    with torch.no_grad():
        model.gates()[0].alpha.copy_(torch.tensor([[1.0, 1, -1, -1], [1, -1, -1, -1]]))
        model.gates()[1].alpha.fill_(-1.0)
    # layer 1: live = [2, 2, 1, 1] filters of 675 FLOPs; layer 2: shared only, 2 filters of 100
    expect = (2 + 2 + 1 + 1) * 675 + 2 * 100
    assert gatedmtl.predict_flops(model, (1, 3, 5, 5)) == expect
    assert gatedmtl.count_flops(gatedmtl.prune(model.eval()), (1, 3, 5, 5)) == expect
    assert expected_flops(model, (1, 3, 5, 5)).item() == pytest.approx(expect)
    assert gatedmtl.flop_bounds(model, (1, 3, 5, 5)) == (4 * 675 + 2 * 100, 2 * (4 * 675 + 2 * 100))


@pytest.mark.parametrize("mix,temperature", [("soft", 1.0), ("hard", 1.0), ("soft", 0.3)],
                         ids=["soft", "hard", "soft-cold"])
@pytest.mark.parametrize("channel_dim,shape", [(1, (2, 3, 4, 5)), (-1, (2, 5, 3)), (-1, (4, 3))])
def test_fused_mixing_matches_the_unfused_formula_and_its_gradients(channel_dim, shape, mix, temperature):
    torch.manual_seed(0)
    c = shape[channel_dim]
    gate = ChannelGate(num_tasks=3, channels=c, channel_dim=channel_dim, mix=mix).double()
    gate.set_mix_state(mix, temperature)
    with torch.no_grad():
        gate.alpha.copy_(torch.randn(3, c))
        gate.beta.copy_(torch.randn(3, c))
    slots = [torch.randn(shape, dtype=torch.float64, requires_grad=True) for _ in range(4)]
    weights = torch.randn(4 * shape[0], *shape[1:], dtype=torch.float64)

    def reference():
        y = torch.cat(slots, 0).reshape(4, *shape)
        bshape = [3] + [1] * len(shape)
        bshape[1 + channel_dim % len(shape)] = c
        m = straight_through(gate.alpha).reshape(bshape)
        w = torch.softmax(gate.beta / temperature, 0)
        if mix == "hard":  # one-hot argmax forward, softmax gradient
            w = nn.functional.one_hot(gate.beta.argmax(0), 3).T.to(w) + (w - w.detach())
        w = w.reshape(bshape)
        phi = m * y[1:] + (1 - m) * y[0:1]
        return torch.cat([(w * phi).sum(0, keepdim=True), phi], 0).reshape(4 * shape[0], *shape[1:])

    ref = reference()
    ref_grads = torch.autograd.grad((ref * weights).sum(), [gate.alpha, gate.beta, *slots])
    out = gate.mix(slots)
    grads = torch.autograd.grad((out * weights).sum(), [gate.alpha, gate.beta, *slots])
    assert torch.allclose(out, ref)
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a, b, atol=1e-10)


def test_grouped_gate_repeats_logits_and_sums_their_gradients():
    gate = ChannelGate(2, 10, 1, group=4)  # groups of 4, 4 and 2 channels
    assert gate.alpha.shape == (2, 3) and gate.beta.shape == (2, 10)
    with torch.no_grad():
        gate.alpha.copy_(torch.tensor([[1.0, -2.0, 0.5], [-1.0, 3.0, -0.5]]))
    expected = gate.alpha.detach().repeat_interleave(4, 1)[:, :10]
    assert torch.equal(gate.channel_logits(), expected)
    assert gate.open_mask().tolist()[0] == [True] * 4 + [False] * 4 + [True] * 2
    gate.mask().sum().backward()
    s = torch.sigmoid(gate.alpha.detach())
    assert torch.allclose(gate.alpha.grad, s * (1 - s) * torch.tensor([4.0, 4.0, 2.0]))
    assert gate.to_groups(torch.arange(10.0)).tolist() == [6.0, 22.0, 17.0]


def test_grouped_gate_mixes_like_its_per_channel_equivalent():
    torch.manual_seed(0)
    grouped, single = ChannelGate(3, 6, 1, group=3), ChannelGate(3, 6, 1)
    with torch.no_grad():
        grouped.alpha.copy_(torch.randn(3, 2))
        single.alpha.copy_(grouped.channel_logits())
        single.beta.copy_(torch.randn(3, 6))
        grouped.beta.copy_(single.beta)
    y = torch.randn(8, 6, 5, 5)
    assert torch.equal(grouped(y), single(y))


def test_grouped_gate_set_open_and_bad_groups():
    gate = ChannelGate(2, 6, 1, group=3)
    gate.name = "layer"
    gate.set_open(torch.tensor([[1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1]]))
    assert gate.alpha.tolist() == [[1.0, -1.0], [-1.0, 1.0]]
    with pytest.raises(ValueError, match="not constant within groups of 3"):
        gate.set_open(torch.tensor([[1, 0, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1]]))
    for bad in (0, -8, 2.5, True):
        with pytest.raises(ValueError, match="positive integer"):
            ChannelGate(2, 6, 1, group=bad)


def test_hard_mix_is_one_hot_with_the_softmax_gradient():
    gate = ChannelGate(3, 4, 1, mix="hard")
    with torch.no_grad():
        gate.beta.copy_(torch.tensor([[0.0, 2.0, -1.0, 0.0], [1.0, 0.0, -1.0, 0.0], [0.5, 0.0, 3.0, 0.0]]))
    w = gate.mixing_weights()
    assert w.tolist() == [[0.0, 1.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]]  # ties: first task
    assert gate.mix_choice().tolist() == [1, 0, 2, 0]
    g = torch.randn(3, 4)
    (w * g).sum().backward()
    soft = torch.softmax(gate.beta.detach(), 0)
    assert torch.allclose(gate.beta.grad, soft * (g - (soft * g).sum(0, keepdim=True)))
    gate.set_mix_choice(torch.tensor([2, 2, 0, 1]))
    assert gate.mix_choice().tolist() == [2, 2, 0, 1]
    y = torch.randn(4 * 2, 4, 3, 3)
    gate.alpha.data.fill_(1.0)  # every gate open: the shared slot is a copy of the chosen tasks' channels
    out, slots = gate(y).reshape(4, 2, 4, 3, 3), y.reshape(4, 2, 4, 3, 3)
    for c, t in enumerate([2, 2, 0, 1]):
        assert torch.equal(out[0, :, c], slots[t + 1, :, c])
    gate.alpha.data[2] = -1.0  # the chosen task's gate closed: the shared slot keeps its own channel
    out = gate(y).reshape(4, 2, 4, 3, 3)
    assert torch.equal(out[0, :, :2], slots[0, :, :2])
    assert torch.equal(out[0, :, 2], slots[1, :, 2]) and torch.equal(out[0, :, 3], slots[2, :, 3])
    with pytest.raises(ValueError, match="task indices"):
        gate.set_mix_choice(torch.tensor([3, 0, 0, 0]))
    with pytest.raises(ValueError, match="mix must be one of soft, hard"):
        ChannelGate(3, 4, 1, mix="argmax")


def test_mix_temperature_sharpens_the_soft_mix_and_is_validated():
    gate = ChannelGate(3, 2, 1)
    with torch.no_grad():
        gate.beta.copy_(torch.tensor([[0.0, 1.0], [0.2, 0.0], [0.1, 0.0]]))
    assert torch.allclose(gate.mixing_weights(), torch.softmax(gate.beta.detach(), 0))
    gate.set_mix_state("soft", 0.01)
    assert gate.mix_logits() is not gate.beta
    assert torch.allclose(gate.mixing_weights(), torch.softmax(gate.beta.detach() / 0.01, 0))
    assert gate.mixing_weights()[1, 0] > 0.99  # near the argmax of column 0
    assert "temperature=0.01" in repr(gate)
    gate.set_mix_state("hard")  # the hard mix ignores the temperature: one-hot argmax
    assert gate.mixing_weights().tolist() == [[0.0, 1.0], [1.0, 0.0], [0.0, 0.0]]
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature must be positive"):
            gate.set_mix_state("soft", bad)
    with pytest.raises(ValueError, match="mix must be one of"):
        gate.set_mix_state("anneal")
