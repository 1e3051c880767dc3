"""``gatedmtl bench``: the quick variant end to end, the report's arithmetic, the README's numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gatedmtl.bench import EXPERIMENTS, HARD_SHARING_METHODS, build_tables, get_experiment, row_ids
from gatedmtl.bench.report import METHOD_NAMES, readme_block
from gatedmtl.cli import main

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _row(row: str, family: str, metrics: dict, *, seed: int = 0, balance: str = "ew", budget: float | None = None,
         gflops: float = 1.0) -> dict:
    return {"model": "m", "seed": seed, "row": row, "family": family, "method": row, "balance": balance,
            "budget": budget, "metrics": metrics, "gflops": gflops, "params_m": 1.0, "step_ms": 10.0,
            "latency_ms": 2.0, "primary": {"seg": "miou", "depth": "rmse"},
            "higher_is_better": {"seg": {"miou": True}, "depth": {"rmse": False}}}


def test_tables_combine_stl_and_compute_delta_mtl_per_seed():
    rows = []
    for seed, (miou, rmse) in enumerate([(50.0, 1.0), (40.0, 2.0)]):
        rows += [_row("stl-seg", "stl", {"seg": {"miou": miou}}, seed=seed, gflops=1.0),
                 _row("stl-depth", "stl", {"depth": {"rmse": rmse}}, seed=seed, gflops=1.0)]
    # seed 0: seg +10 %, depth -10 % (worse): ΔMTL 0; seed 1: seg +10 %, depth +10 % (better): ΔMTL +10
    rows.append(_row("mtl-ew", "mtl", {"seg": {"miou": 55.0}, "depth": {"rmse": 1.1}}, seed=0, gflops=0.5))
    rows.append(_row("mtl-ew", "mtl", {"seg": {"miou": 44.0}, "depth": {"rmse": 1.8}}, seed=1, gflops=0.5))
    table = build_tables(rows, ["seg", "depth"])["m"]
    stl, mtl = table
    assert stl["family"] == "stl" and stl["gflops"] == 2.0 and stl["latency_ms"] == 4.0 and stl["delta"] == 0.0
    assert mtl["delta"] == pytest.approx(5.0) and mtl["delta_std"] == pytest.approx(7.0710678, rel=1e-6)
    assert mtl["seeds"] == 2 and mtl["metrics"]["seg"]["miou"] == pytest.approx(49.5)
    # mean rank over the seed means (STL 45 / 1.5, MTL 49.5 / 1.45): MTL ranks first in both metrics
    assert (mtl["mean_rank"], stl["mean_rank"]) == (1.0, 2.0)


def test_row_ids_cover_every_method_budget_and_finetune():
    exp = EXPERIMENTS["scenes"]
    ids = row_ids(exp, best="cagrad")
    assert ids[:3] == [f"stl-{t}" for t in exp.tasks]
    assert [r for r in ids if r.startswith("mtl-")] == [f"mtl-{m}" for m in HARD_SHARING_METHODS]
    gated = [r for r in ids if r.startswith("gated-")]
    assert len(gated) == 2 * 2 * len(exp.budgets) and len(exp.budgets) >= 5
    assert "gated-cagrad-b0.5-ft" in gated and "gated-ew-b0.3" in gated
    with pytest.raises(ValueError, match="known: scenes"):
        get_experiment("imagenet")


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_quick_variant_end_to_end(tmp_path, capsys):
    import torch

    threads = torch.get_num_threads()
    rc = main(["bench", "scenes", "--quick", "--models", "resnet18", "--results", str(tmp_path / "res"),
               "--report-dir", str(tmp_path / "rep"), "--work", str(tmp_path / "work"), "--no-progress"])
    assert rc == 0, capsys.readouterr().err[-2000:]
    assert torch.get_num_threads() == threads, "the bench must give the caller's thread count back"
    report = (tmp_path / "rep" / "scenes-quick.md").read_text()
    for m in HARD_SHARING_METHODS:
        assert f"| MTL + {METHOD_NAMES[m]} |" in report, m
    assert "| STL (3 networks) |" in report
    for b in get_experiment("scenes", quick=True).budgets:
        assert f"| GatedMTL + EW, budget {b:g} |" in report and f"| GatedMTL + EW, budget {b:g} + fine-tune |" in report
    best = [line for line in capsys.readouterr().err.splitlines() if "best hard-sharing method" in line]
    assert best, "the best balancing method was not chosen"
    assert report.count("GatedMTL + ") >= 4 * 2
    for kind in ("pareto", "gates", "dynamics"):
        assert (tmp_path / "rep" / f"scenes-quick_resnet18_{kind}.png").stat().st_size > 1000
    assert not any((tmp_path / "work").rglob("*.safetensors")), "training runs are removed once their row is saved"
    fidelity = [line for line in report.splitlines() if line.startswith("| GatedMTL") and "%" in line.split("|")[-2]]
    assert len(fidelity) == 4
    # a second call skips every finished row and rewrites the same report
    before = {p.name: p.read_text() for p in (tmp_path / "res").rglob("*.json")}
    assert main(["bench", "scenes", "--quick", "--models", "resnet18", "--results", str(tmp_path / "res"),
                 "--report-dir", str(tmp_path / "rep2"), "--work", str(tmp_path / "work"), "--no-progress"]) == 0
    after = {p.name: p.read_text() for p in (tmp_path / "res").rglob("*.json") if p.name != "experiment.json"}
    assert all(before[k] == v for k, v in after.items())
    assert (tmp_path / "rep2" / "scenes-quick.md").read_text() == report


def test_readme_results_come_from_the_result_files():
    folder = RESULTS / "bench" / "scenes"
    if not (folder / "experiment.json").is_file():
        pytest.fail("benchmarks/results/bench/scenes holds no results: run gatedmtl bench scenes")
    block = readme_block(folder, "benchmarks/results/")
    readme = (ROOT / "README.md").read_text()
    start, end = readme.index("<!-- bench:scenes -->\n") + len("<!-- bench:scenes -->\n"), readme.index("\n<!-- /bench:scenes -->")
    assert readme[start:end] == block, "README's results differ from the result files: run python benchmarks/report.py"
    for line in block.splitlines():
        if line.startswith("!["):
            assert (ROOT / line[line.index("(") + 1:-1]).is_file(), line
    assert json.loads((folder / "experiment.json").read_text())["experiment"]["name"] == "scenes"
