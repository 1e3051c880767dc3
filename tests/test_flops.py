"""FLOP counting: the handles gatedmtl adds to fvcore against hand-computed counts, fused vs explicit
attention, uncounted compute made visible, the shape convention, and models whose modules see an
input without the folded batch (counted once)."""

from __future__ import annotations

import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import gatedmtl
from gatedmtl.budget import resolve_budget
from gatedmtl.cost import UncountedFlopsWarning, measure_flops
from gatedmtl.flop_ops import NOT_COUNTED, sdpa_flops
from gatedmtl.profile import profile
from gatedmtl.verify import relative_error, set_gates, verify

T = ("a", "b", "c")


class _Fn(nn.Module):
    """``forward(x) = fn(x)``: one op under test."""

    def __init__(self, fn, *modules: nn.Module) -> None:  # noqa: ANN001
        super().__init__()
        self.fn = fn
        self.parts = nn.ModuleList(modules)  # modules that fn calls: parameters, not traced constants

    def forward(self, x):  # noqa: ANN001, ANN201
        return self.fn(x)


def _count(fn, shape, *modules: nn.Module) -> int:  # noqa: ANN001
    return gatedmtl.count_flops(_Fn(fn, *modules), shape)


def test_sdpa_counts_both_products():
    # x[2, 3, 7, 10]: Q = 5 queries of width 4, K = 7 keys of width 4, V = 7 values of width 6
    def attn(x):  # noqa: ANN001, ANN202
        return F.scaled_dot_product_attention(x[:, :, :5, :4], x[:, :, :, :4], x[:, :, :, 4:])

    qk, av = 2 * 3 * 5 * 7 * 4, 2 * 3 * 5 * 7 * 6
    assert _count(attn, (2, 3, 7, 10)) == qk + av == 2100
    explicit = _count(lambda x: (x[:, :, :5, :4] @ x[:, :, :, :4].transpose(-2, -1)).softmax(-1) @ x[:, :, :, 4:],
                      (2, 3, 7, 10))
    assert explicit == 2100  # fvcore's matmul handle: the same two products


def test_sdpa_flops_of_grouped_query_and_broadcast_heads():
    # 8 query heads share 2 key/value heads: every query head attends
    assert sdpa_flops((2, 8, 5, 4), (2, 2, 7, 4), (2, 2, 7, 6)) == 2 * 8 * 5 * 7 * (4 + 6)
    assert sdpa_flops((1, 3, 5, 4), (4, 3, 7, 4), (4, 3, 7, 4)) == 4 * 3 * 5 * 7 * 8
    assert sdpa_flops((5, 4), (7, 4), (7, 4)) == 5 * 7 * 8


def test_vit_counts_the_same_with_fused_and_explicit_attention():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    counts = []
    for fused in (True, False):
        for m in model.modules():
            if hasattr(m, "fused_attn"):
                m.fused_attn = fused
        counted = measure_flops(model, (1, 3, 224, 224))
        assert counted.uncounted_compute == {}
        assert ("aten::scaled_dot_product_attention" in counted.uncounted) is False
        counts.append(counted)
    fused, explicit = counts
    assert abs(fused.total - explicit.total) <= 0.005 * explicit.total
    # one block by hand: 3 heads, 197 tokens, 64 channels per head; Q K^T and attn V
    by = fused.by_module
    attention = by["blocks.0.attn"] - by["blocks.0.attn.qkv"] - by["blocks.0.attn.proj"]
    assert attention == 2 * 3 * 197 * 197 * 64
    assert fused.total == explicit.total


def test_convolution_with_string_padding():
    conv = nn.Conv2d(3, 4, 3, padding="same", bias=False)
    assert _count(conv, (2, 3, 8, 8), conv) == 2 * 4 * 3 * 9 * 64
    grouped = nn.Conv1d(4, 8, 3, padding="valid", groups=2)
    assert _count(grouped, (1, 4, 10), grouped) == 8 * 2 * 3 * 8


def test_baddbmm_and_mv_handles():
    a, b = torch.randn(2, 3, 4), torch.randn(2, 4, 5)
    assert _count(lambda x: torch.baddbmm(x, a, b), (2, 3, 5)) == 2 * 3 * 4 * 5
    assert _count(lambda x: torch.mv(x, torch.ones(6)), (5, 6)) == 30


@pytest.mark.parametrize("cell,gates", [(nn.LSTM, 4), (nn.GRU, 3), (nn.RNN, 1)])
def test_recurrent_layers(cell, gates):
    rnn = cell(8, 6, batch_first=True)
    assert _count(lambda x: rnn(x)[0], (2, 5, 8), rnn) == 2 * 5 * gates * 6 * (8 + 6)
    deep = cell(8, 6, num_layers=2, bidirectional=True)  # sequence first; layer 2 reads both directions
    per_step = 2 * gates * 6 * (8 + 6) + 2 * gates * 6 * (12 + 6)
    assert _count(lambda x: deep(x)[0], (5, 3, 8), deep) == 5 * 3 * per_step
    projected = nn.LSTM(8, 6, proj_size=2, batch_first=True) if cell is nn.LSTM else None
    if projected is not None:  # w_ih [24, 8], w_hh [24, 2], w_hr [2, 6]
        assert _count(lambda x: projected(x)[0], (2, 5, 8), projected) == 2 * 5 * (24 * 8 + 24 * 2 + 2 * 6)


def test_uncounted_compute_warns_and_elementwise_is_listed():
    fft = _Fn(lambda x: torch.fft.rfft(F.gelu(x), dim=-1).abs())
    counted = measure_flops(fft, (1, 3, 8, 8))
    assert counted.total == 0
    assert counted.uncounted_compute == {"aten::fft_rfft": 1}
    assert counted.uncounted["aten::gelu"] == 1 and "aten::gelu" in NOT_COUNTED
    with pytest.warns(UncountedFlopsWarning, match="aten::fft_rfft x1"):
        gatedmtl.count_flops(fft, (1, 3, 8, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UncountedFlopsWarning)  # elementwise only: silent
        gatedmtl.count_flops(_Fn(lambda x: F.gelu(x) + 1), (1, 3, 8, 8))


class _SpectralBackbone(nn.Module):
    """conv -> |rfft| along W -> conv: the FFT is compute that fvcore does not count."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):  # noqa: ANN001, ANN201
        return self.head(torch.fft.rfft(self.stem(x), dim=-1).abs())


def test_verify_fails_on_uncounted_compute_and_profile_lists_it():
    with pytest.warns(UncountedFlopsWarning):
        report = verify(_SpectralBackbone(), T, input_size=(3, 8, 8), patterns=("open", 0.5))
    assert report.convert_error <= 1e-5 and report.worst_prune_error <= 1e-4 and report.worst_flop_error == 0
    assert set(report.uncounted_compute) == {"aten::fft_rfft"}
    assert not report.ok and any("aten::fft_rfft" in p for p in report.problems())
    with pytest.warns(UncountedFlopsWarning):
        prof = profile(_SpectralBackbone(), (1, 3, 8, 8), latency=False)
    assert prof.uncounted_compute == {"aten::fft_rfft": 1}
    table = prof.table()
    assert "not counted (real compute)" in table and "| aten::fft_rfft | 1 | **no FLOP handle" in table


def test_shape_convention_is_batch_first_everywhere():
    model = gatedmtl.convert(timm.create_model("resnet18", pretrained=False), T, input_size=(3, 32, 32))
    set_gates(model, 0.5, torch.Generator().manual_seed(0))
    for fn in (gatedmtl.predict_flops, gatedmtl.analyze, gatedmtl.expected_flops, gatedmtl.flop_bounds):
        with pytest.raises(ValueError, match=r"add the batch axis, e\.g\. \(1, 3, 32, 32\)"):
            fn(model, (3, 32, 32))
    with pytest.raises(ValueError, match="does not fit|input_shape"):
        resolve_budget(model, 0.5, (3, 32, 32))
    lean = gatedmtl.prune(model.eval())
    with pytest.raises(ValueError, match="add the batch axis"):
        gatedmtl.count_flops(lean, (3, 32, 32))
    one, two = gatedmtl.predict_flops(model, (1, 3, 32, 32)), gatedmtl.predict_flops(model, (2, 3, 32, 32))
    assert two == 2 * one == gatedmtl.count_flops(lean, (2, 3, 32, 32))
    assert gatedmtl.expected_flops(model, (2, 3, 32, 32)).item() == pytest.approx(two)
    assert gatedmtl.expected_flops(model).item() == pytest.approx(one)  # default: batch 1 at input_size


@pytest.mark.parametrize("name,kw,size", [
    ("resnet18", {}, (1, 3, 32, 32)),  # no ungated per-slot module: all closed / open fold 1 / T slots
    ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 2}, (1, 3, 32, 32)),  # LayerNorms: all S
])
def test_flop_bounds_equal_the_lean_models(name, kw, size):
    model = gatedmtl.convert(timm.create_model(name, pretrained=False, **kw), T, input_size=size[1:]).eval()
    low, high = gatedmtl.flop_bounds(model, size)
    for pattern, bound in (("closed", low), ("open", high)):
        set_gates(model, pattern)
        lean = gatedmtl.prune(model)
        assert gatedmtl.predict_flops(model, size) == gatedmtl.count_flops(lean, size) == bound, pattern


class _PositionalBackbone(nn.Module):
    """XCiT-like: a conv projects a coordinate grid built from the image size (no batch axis)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.proj = nn.Conv2d(2, 8, 1, bias=False)
        self.head = nn.Conv2d(8, 4, 1, bias=False)

    def forward(self, x):  # noqa: ANN001, ANN201
        h, w = x.shape[-2:]
        grid = torch.stack(torch.meshgrid(torch.arange(h, dtype=x.dtype), torch.arange(w, dtype=x.dtype),
                                          indexing="ij"))[None]
        return self.head(self.stem(x) + self.proj(grid))


def test_batch_independent_module_is_shared_and_counted_once():
    backbone = _PositionalBackbone().eval()
    model = gatedmtl.convert(backbone, T, input_size=(3, 6, 6)).eval()
    assert model.shared_modules == {"proj": "its input does not depend on the batch"}
    assert model.batch_independent == ("proj",)
    assert type(model.backbone.proj) is nn.Conv2d and model.gate_names == ["stem", "head"]
    pixels, s = 36, len(T) + 1
    stem, proj, head = 8 * 3 * 9 * pixels, 8 * 2 * pixels, 4 * 8 * pixels
    info = gatedmtl.analyze(model)
    assert info.constant == proj and info.full == s * (stem + head) + proj
    assert gatedmtl.count_flops(model, (2, 3, 6, 6)) == 2 * s * (stem + head) + proj
    set_gates(model, 0.5, torch.Generator().manual_seed(0))
    lean = gatedmtl.prune(model)
    for batch in (1, 3):
        shape = (batch, 3, 6, 6)
        assert gatedmtl.predict_flops(model, shape) == gatedmtl.count_flops(lean, shape)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        ref, gated, pruned = backbone(x), model(x), lean(x)
    assert all(relative_error(gated[t], ref) <= 1e-5 and relative_error(pruned[t], gated[t]) <= 1e-5 for t in T)
    prof = profile(model, (1, 3, 6, 6), latency=False)
    assert [(m.name, m.flops) for m in prof.shared] == [("proj", proj)]
    assert "### shared modules" in prof.table()
    assert [m.name for m in profile(lean, (1, 3, 6, 6), latency=False).shared] == ["proj"]


class _MixedUse(nn.Module):
    """One conv applied to the batch and to a batch-independent tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.head = nn.Conv2d(3, 4, 1)

    def forward(self, x):  # noqa: ANN001, ANN201
        return self.head(self.conv(x) + self.conv(torch.ones(1, *x.shape[1:])))


def test_module_on_batch_and_on_batch_independent_input_is_a_clear_error():
    with pytest.raises(ValueError, match="called both on the batch and on a batch-independent tensor"):
        gatedmtl.convert(_MixedUse(), T, input_size=(3, 4, 4))


def test_xcit_converts_and_prunes_exactly():
    backbone = timm.create_model("xcit_nano_12_p16_224", pretrained=False, img_size=32, depth=2)
    report = verify(backbone, T, input_size=(3, 32, 32), patterns=("open", "closed", 0.5), batch=2)
    assert report.shared_modules == {"pos_embed.token_projection": "its input does not depend on the batch"}
    assert report.convert_error <= 1e-5 and report.worst_prune_error <= 1e-4, report
    assert report.flops_predicted == report.flops_lean, report
    assert report.ok, report.problems()


def test_cli_help_states_the_flop_convention(capsys):
    from gatedmtl.cli import main

    for argv in (["train", "--help"], ["profile", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
        assert "multiply-add" in " ".join(capsys.readouterr().out.split()), argv


def test_cli_verify_exits_nonzero_and_names_the_problem(monkeypatch, capsys):
    import gatedmtl.verify
    from gatedmtl.cli import main

    assert main(["verify", "--model", "resnet10t", "--input", "3,32,32"]) == 0
    assert capsys.readouterr().out.rstrip().endswith("exact")
    failing = gatedmtl.verify.VerifyReport(gates=1, convert_error=0.0, uncounted_compute={"aten::fft_rfft": 2})
    monkeypatch.setattr(gatedmtl.verify, "verify", lambda *a, **k: failing)
    assert main(["verify", "--model", "resnet10t"]) == 1
    captured = capsys.readouterr()
    assert "MISMATCH: fvcore did not count real compute: aten::fft_rfft x2" in captured.err
    assert captured.out.rstrip().endswith("MISMATCH")
