"""Convert/prune parity and FLOP prediction over the smallest model of every timm family.

A family is a timm model module (``timm.list_modules()``); its model is the architecture with
the fewest parameters (counted on the meta device, so nothing is allocated), timm's
``test_*`` models excluded. Each model runs :func:`gatedmtl.verify.verify` in its own
subprocess under a memory limit (``resource.setrlimit(RLIMIT_DATA)``) and a timeout, smallest family first;
the table is rewritten after every model, and families the wall-time budget did not reach are
listed as such. Writes ``benchmarks/results/coverage.md`` and ``coverage.csv``. Usage::

    nice -n 19 env OMP_NUM_THREADS=1 python benchmarks/coverage.py [--families N] [--models a,b]
        [--size 96] [--timeout 240] [--memory-gb 6] [--budget-minutes 60]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
COLUMNS = ["family", "model", "params_M", "status", "input", "gates", "convert_err", "prune_err", "flop_err",
           "closed/backbone", "open/backbone", "shared", "seconds", "reason"]


def smallest_per_family(families: int | None = None) -> list[dict]:
    """``{family, model, params}`` for every timm family (``model`` None with ``reason`` when none builds)."""
    import timm

    rows = []
    for family in sorted(timm.list_modules())[:families]:
        best, errors = None, []
        for name in timm.list_models(module=family):
            if name.startswith("test_"):
                continue
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    model = timm.create_model(name, pretrained=False, device="meta")
            except Exception as e:  # noqa: BLE001 - a model that does not build is reported
                errors.append(f"{name}: {type(e).__name__}")
                continue
            params = sum(p.numel() for p in model.parameters())
            if best is None or (params, name) < best:
                best = (params, name)
        if best is None:
            rows.append({"family": family, "model": None, "params": None,
                         "reason": "no model builds: " + "; ".join(errors[:2])})
        else:
            rows.append({"family": family, "model": best[1], "params": best[0]})
    return rows


# ----------------------------------------------------------------------------------------------
# one model, in a subprocess
# ----------------------------------------------------------------------------------------------


def _build(name: str, size: int):  # noqa: ANN202
    import timm

    try:
        return timm.create_model(name, pretrained=False, img_size=size), (3, size, size)
    except TypeError:  # the family takes no img_size: its own input size when fixed, else ours
        model = timm.create_model(name, pretrained=False)
        cfg = model.pretrained_cfg
        fixed = cfg.get("fixed_input_size", False)
        return model, tuple(cfg.get("input_size", (3, 224, 224))) if fixed else (3, size, size)


def worker(name: str, size: int) -> dict:
    """Verify one model; the row of the table (status exact / mismatch / failed)."""
    import timm
    import torch

    from gatedmtl.verify import LIMITS, verify

    torch.set_num_threads(1)
    torch.manual_seed(0)
    patterns = ("open", "closed", 0.5)
    backbone, shape = _build(name, size)
    try:
        report = verify(backbone, input_size=shape, patterns=patterns)
    except ValueError as e:  # the family wants its own input size: use its default
        if "probe input" not in str(e):
            raise
        backbone = timm.create_model(name, pretrained=False)
        shape = tuple(backbone.pretrained_cfg.get("input_size", (3, 224, 224)))
        report = verify(backbone, input_size=shape, patterns=patterns)
    problems = report.problems()
    if report.convert_error > LIMITS["convert"]:  # float32 rounding or a real difference? float64 tells
        problems.append(f"in float64 the convert error is {_float64_convert_error(backbone, shape):.1e}")
    lean, base = report.flops_lean, report.flops_backbone
    return {"status": "exact" if not problems else "mismatch", "input": "x".join(map(str, shape[1:])),
            "gates": report.gates, "convert_err": f"{report.convert_error:.1e}",
            "prune_err": f"{report.worst_prune_error:.1e}", "flop_err": f"{report.worst_flop_error:.2%}",
            "closed/backbone": f"{lean['closed'] / base:.3f}", "open/backbone": f"{lean['open'] / base:.3f}",
            "shared": _shared(report.shared_modules), "reason": "; ".join(problems)}


def _shared(modules: dict[str, str]) -> str:
    """``"reason: name, name; reason: name"`` of the modules kept as one copy for every slot."""
    by_reason: dict[str, list[str]] = {}
    for name, why in modules.items():
        by_reason.setdefault(why, []).append(name)
    return "; ".join(f"{why}: {', '.join(names)}" for why, names in by_reason.items())


def _float64_convert_error(backbone, shape: tuple[int, ...]) -> float:  # noqa: ANN001
    """Convert error (gated vs backbone, random gates) with every tensor in float64."""
    import torch

    import gatedmtl
    from gatedmtl.verify import relative_error, set_gates

    gen = torch.Generator().manual_seed(0)
    model = gatedmtl.convert(backbone.eval(), ("a", "b", "c"), input_size=shape).eval().double()
    set_gates(model, 0.5, gen)
    x = torch.randn((2, *shape), generator=gen, dtype=torch.float64)
    with torch.no_grad():
        ref, out = backbone.double()(x), model(x)
    return max(relative_error(out[t], ref) for t in model.tasks)


def _limit_memory(gib: float) -> None:
    # RLIMIT_DATA bounds heap and anonymous mappings (where tensors live) and, unlike RLIMIT_AS,
    # not the ~3 GiB of address space that torch's shared libraries map without using it
    limit = int(gib * (1 << 30))
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    os.nice(19)


def run_one(name: str, size: int, timeout: float, memory_gb: float) -> dict:
    """:func:`worker` in a subprocess; a timeout or the memory limit turns into a skipped row."""
    cmd = [sys.executable, __file__, "--worker", name, "--size", str(size)]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                              preexec_fn=lambda: _limit_memory(memory_gb))
    except subprocess.TimeoutExpired:
        return {"status": "skipped", "reason": f"did not finish within the {timeout:.0f} s timeout"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode == 0 and lines:
        return json.loads(lines[-1])
    err = done.stderr.strip().splitlines()
    last = next((line for line in reversed(err) if line and not line.startswith(" ")), f"exit code {done.returncode}")
    memory = ("MemoryError" in done.stderr or "can't allocate memory" in done.stderr
              or "Cannot allocate memory" in done.stderr or done.returncode in (-9, 137))
    if memory:
        return {"status": "skipped", "reason": f"needs more than the {memory_gb:g} GiB memory limit"}
    return {"status": "failed", "reason": last}


# ----------------------------------------------------------------------------------------------
# the table
# ----------------------------------------------------------------------------------------------


def _cell(value: object) -> str:
    return str(value).replace("|", "/").replace("\n", " ")[:240]


def write(rows: list[dict], meta: dict, out: Path) -> Path:
    import gatedmtl

    sys.path.insert(0, str(Path(__file__).parent))
    from _report import write_table

    counts = {s: sum(r.get("status") == s for r in rows) for s in ("exact", "mismatch", "failed", "skipped", "not reached")}
    notes = (
        f"gatedmtl {gatedmtl.__version__}, timm {meta['timm']}, torch {meta['torch']}; T=3 tasks; "
        f"{len(rows)} timm families (every family of `timm.list_modules()`), each with its smallest model by "
        "parameter count (timm's `test_*` models excluded). "
        + ", ".join(f"{n} {s}" for s, n in counts.items() if n) + ". "
        f"Each model ran in its own process under a {meta['memory_gb']:g} GiB memory limit (RLIMIT_DATA) and a "
        f"{meta['timeout']:.0f} s timeout, one thread, smallest family first, within a {meta['budget_minutes']:g} "
        f"minute wall-time budget ({meta['elapsed_minutes']:.1f} minutes used); rows in family order; input {meta['size']}x{meta['size']} "
        "unless the family fixes its own. Limits (gatedmtl.verify.LIMITS): convert error (gated vs backbone) "
        "1e-5, prune error (lean vs gated, perturbed slots, all-open / all-closed / 50 % gates) 1e-4, flop_err "
        "(predict_flops vs fvcore on the lean model) 0.5 %, and every op that does real compute counted by fvcore "
        "(gatedmtl.flop_ops). FLOPs are fvcore's: one multiply-add = one FLOP. closed/open: fvcore FLOPs of the "
        "lean model with every gate closed / open, relative to the plain backbone (ungated per-slot layers — "
        "grouped convs, norms not fused with a conv — and parameter-free ops such as attention matmuls run once "
        "per folded slot). shared: parameter-owning modules kept as one copy for every slot (not gated), with "
        "the reason convert found (their input does not depend on the batch, or the forward pass never calls them, "
        "e.g. when the backbone reads their weights directly); cut at 240 characters."
    )
    if meta.get("rerun"):
        notes += f" Re-run afterwards with the same limits: {', '.join(meta['rerun'])}."
    table = [{c: _cell(r.get(c, "")) for c in COLUMNS} for r in sorted(rows, key=lambda r: (r["family"], r["model"]))]
    title = f"Conversion coverage ({counts['exact']}/{len(rows)} families exact)"
    path = write_table("coverage", title, notes, table, COLUMNS, out=out)
    (out / "coverage_meta.json").write_text(json.dumps(meta, indent=2) + "\n")  # limits, for --rerun
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", type=int, default=None, help="only the first N families (alphabetical)")
    parser.add_argument("--models", default="", help="comma-separated model names instead of one per family")
    parser.add_argument("--size", type=int, default=96, help="input height and width where the family allows")
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds per model")
    parser.add_argument("--memory-gb", type=float, default=6.0, help="memory (data segment) limit per model, GiB")
    parser.add_argument("--budget-minutes", type=float, default=60.0, help="wall time for the whole sweep")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--rerun", default="", help="comma-separated models of the existing table to run again")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.size)), flush=True)
        return 0
    if args.rerun:
        return rerun(args.rerun.split(","), Path(args.out))

    import timm
    import torch

    start = time.monotonic()
    if args.models:
        plan = [{"family": "", "model": m, "params": None} for m in args.models.split(",")]
    else:
        plan = smallest_per_family(args.families)
    print(f"picked {len(plan)} models in {time.monotonic() - start:.0f} s", flush=True)
    rows = [{"family": p["family"], "model": p["model"] or "", "status": "failed", "reason": p.get("reason", "")}
            for p in plan if p["model"] is None]
    todo = sorted((p for p in plan if p["model"]), key=lambda p: (p["params"] or 0, p["model"]))
    meta = {"timm": timm.__version__, "torch": torch.__version__, "memory_gb": args.memory_gb, "timeout": args.timeout,
            "budget_minutes": args.budget_minutes, "size": args.size}
    pending = [{"family": p["family"], "model": p["model"],
                "params_M": f"{p['params'] / 1e6:.2f}" if p["params"] else "", "status": "not reached",
                "reason": "the sweep's wall-time budget ran out first"} for p in todo]
    out = Path(args.out)
    for i, row in enumerate(pending):
        if time.monotonic() - start > args.budget_minutes * 60:
            break
        t0 = time.monotonic()
        row.update({"reason": ""} | run_one(row["model"], args.size, args.timeout, args.memory_gb))
        row["seconds"] = f"{time.monotonic() - t0:.0f}"
        print(f"[{i + 1}/{len(pending)}] {row}", flush=True)
        meta["elapsed_minutes"] = (time.monotonic() - start) / 60
        path = write(rows + pending, meta, out)  # after every model: a cut-off run still leaves its table
    meta["elapsed_minutes"] = (time.monotonic() - start) / 60
    path = write(rows + pending, meta, out)
    exact = sum(r["status"] == "exact" for r in rows + pending)
    print(f"{exact}/{len(rows) + len(pending)} families exact; wrote {path}")
    return 0


def rerun(models: list[str], out: Path) -> int:
    """Run ``models`` again with the limits of the sweep that wrote ``out``'s table; rewrite the table."""
    import csv

    meta = json.loads((out / "coverage_meta.json").read_text())
    with open(out / "coverage.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for name in models:
        row = next((r for r in rows if r["model"] == name), None)
        if row is None:
            raise SystemExit(f"error: {name} is not in {out / 'coverage.csv'}")
        t0 = time.monotonic()
        for c in COLUMNS[3:]:
            row[c] = ""
        row.update(run_one(name, meta["size"], meta["timeout"], meta["memory_gb"]))
        row["seconds"] = f"{time.monotonic() - t0:.0f}"
        print(row, flush=True)
        meta["rerun"] = sorted(set(meta.get("rerun", [])) | {name})
    print(f"wrote {write(rows, meta, out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
