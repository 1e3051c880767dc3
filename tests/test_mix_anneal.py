"""mix="anneal": the soft mix's temperature falls over training, then the gates use the hard mix."""

from __future__ import annotations

import math

import pytest
import torch

from gatedmtl.train import MixAnneal, TrainConfig, Trainer, load_network

TINY = dict(model="resnet18", tasks=("normals", "seg", "depth"), epochs=1, steps_per_epoch=4, batch_size=2,
            train_length=8, val_length=4, image_size=(32, 48), progress=False, mix="anneal")


def test_schedule_is_soft_then_cooler_then_hard():
    anneal = MixAnneal(0.5, 0.9, total_steps=10, final_temperature=0.01)
    assert [anneal(s) for s in range(6)] == [("soft", 1.0)] * 6
    mode, t = anneal(7)  # 0.7 is half-way from 0.5 to 0.9: 0.01 ** 0.5
    assert mode == "soft" and math.isclose(t, 0.1)
    mode, t = anneal(8)
    assert mode == "soft" and math.isclose(t, 0.01 ** 0.75)
    assert anneal(9) == ("hard", 1.0) and anneal(10) == ("hard", 1.0) and anneal(12) == ("hard", 1.0)
    assert MixAnneal(0.0, 1.0, total_steps=4)(4) == ("hard", 1.0)  # after the last step: always hard


@pytest.mark.parametrize("fractions", [(0.9, 0.5), (0.5, 0.5), (-0.1, 0.5), (0.5, 1.5)])
def test_schedule_rejects_fractions_out_of_order(fractions):
    with pytest.raises(ValueError, match="0 <= start < end <= 1"):
        MixAnneal(*fractions, total_steps=10)
    with pytest.raises(ValueError, match="0 <= start < end <= 1"):
        TrainConfig(mix="anneal", mix_anneal=fractions).validate()


def test_unknown_mix_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="soft, hard, anneal"):
        TrainConfig(mix="cold").validate()


def test_trainer_follows_the_schedule_and_a_checkpoint_reloads_its_step(tmp_path):
    trainer = Trainer(TrainConfig(**TINY, mix_anneal=(0.25, 1.0), out=str(tmp_path / "run")))
    gates = list(trainer.net.encoder.gates())
    assert {(g.mix_mode, g.temperature) for g in gates} == {("soft", 1.0)}
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # partly open gates and uneven mixing logits: the tasks read the shared mix
        for gate in gates:
            gate.alpha.copy_(torch.where(torch.rand(gate.alpha.shape, generator=g) < 0.5, 1.0, -1.0))
            gate.beta.copy_(torch.randn(gate.beta.shape, generator=g))
    seen, mid = [], tmp_path / "mid.safetensors"
    x = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(3))

    def on_step(record):
        seen.append((trainer.step, gates[0].mix_mode, gates[0].temperature))
        if trainer.step == 2:  # mid-anneal: soft at 0.01 ** (1 / 3)
            trainer.save(mid)
            trainer.net.eval()
            with torch.no_grad():
                seen.append({t: v.clone() for t, v in trainer.net(x).items()})

    trainer.on_step = on_step
    trainer.fit()
    cold = 0.01 ** (1 / 3)
    assert [s[:2] for s in seen if isinstance(s, tuple)] == [(1, "soft"), (2, "soft"), (3, "soft"), (4, "hard")]
    assert seen[0][2] == 1.0 and math.isclose(seen[1][2], cold) and math.isclose(seen[3][2], 0.01 ** (2 / 3))
    assert {g.mix_mode for g in gates} == {"hard"}

    net, meta = load_network(mid)
    assert meta["mix_state"]["mode"] == "soft" and math.isclose(meta["mix_state"]["temperature"], cold)
    assert {(g.mix_mode, g.temperature) for g in net.encoder.gates()} == {("soft", meta["mix_state"]["temperature"])}
    ref = seen[2]
    with torch.no_grad():
        got = net(x)
        assert all(torch.allclose(got[t], ref[t], rtol=1e-5, atol=1e-6) for t in ref)
        lean = net.pruned().eval()(x)  # pruned mid-anneal: the lean mix holds softmax(beta / T)
        assert all(float((lean[t] - ref[t]).abs().max()) <= 1e-4 * float(ref[t].abs().max()) for t in ref)
        for gate in net.encoder.gates():  # the temperature matters: at 1 the same weights give another model
            gate.set_mix_state("soft", 1.0)
        warm = net(x)
    assert not all(torch.allclose(warm[t], ref[t], rtol=1e-5, atol=1e-6) for t in ref)

    final, meta = load_network(tmp_path / "run" / "last.safetensors")
    assert meta["mix_state"] == {"mode": "hard", "temperature": 1.0}
    assert {g.mix_mode for g in final.encoder.gates()} == {"hard"}


class _Stop(Exception):
    pass


def test_resume_continues_the_anneal_exactly(tmp_path):
    config = dict(TINY, save_every=2, mix_anneal=(0.0, 1.0), lr=1e-2)
    whole = Trainer(TrainConfig(**config, out=str(tmp_path / "whole")))
    whole.fit()
    cut = Trainer(TrainConfig(**config, out=str(tmp_path / "cut")))

    def stop(record):
        if record["step"] == 3:  # the checkpoint holds step 2, mid-anneal
            raise _Stop

    cut.on_step = stop
    with pytest.raises(_Stop):
        cut.fit()
    resumed = Trainer(TrainConfig(**config, out=str(tmp_path / "cut")), resume=True)
    assert resumed.step == 2
    states = {(g.mix_mode, g.temperature) for g in resumed.net.encoder.gates()}
    assert len(states) == 1 and all(m == "soft" and math.isclose(t, 0.1) for m, t in states)
    resumed.fit()
    a, b = whole.net.state_dict(), resumed.net.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_without_its_mix_state_is_refused(tmp_path):
    from gatedmtl.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

    trainer = Trainer(TrainConfig(**(TINY | {"steps_per_epoch": 1}), out=str(tmp_path / "run")))
    trainer.fit()
    tensors, meta = load_checkpoint(tmp_path / "run" / "last.safetensors")
    meta.pop("mix_state")
    save_checkpoint(tmp_path / "broken.safetensors", tensors, meta)
    with pytest.raises(CheckpointError, match="without its mix state"):
        load_network(tmp_path / "broken.safetensors")


def test_anneal_is_the_default_and_configs_saved_without_a_mix_load_as_soft():
    assert TrainConfig().mix == "anneal"
    saved = {k: v for k, v in TrainConfig(mix="hard").to_json().items() if k != "mix"}
    assert TrainConfig.from_json(saved).mix == "soft"
    assert TrainConfig.from_json(TrainConfig(mix="hard").to_json()).mix == "hard"
