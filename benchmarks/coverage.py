"""Convert/prune parity and FLOP prediction over one small model of every timm family.

Writes ``benchmarks/results/coverage.md`` and ``coverage.csv``. Usage::

    python benchmarks/coverage.py [--families N] [--models a,b,c] [--size 96]
"""

from __future__ import annotations

import argparse
import re
import sys
import time
import traceback
from pathlib import Path

import timm
import torch

import gatedmtl
from _report import write_table
from gatedmtl.verify import verify

PREFERRED = re.compile(r"(atto|femto|pico|nano|tiny|xxs|xs\b|_xs|small|_050|_035|_100|b0|18|_s\b|_t\b|s12|_12)")
SKIP_FAMILIES = {"_builder", "_registry", "_hub", "_helpers", "_features", "_manipulate", "_efficientnet_blocks",
                 "_efficientnet_builder", "_features_fx", "_factory", "_pretrained", "_prune", "_layers"}


def pick_models(limit: int | None) -> list[str]:
    names = []
    for module in sorted(timm.list_modules()):
        if module in SKIP_FAMILIES:
            continue
        models = sorted(timm.list_models(module=module))
        if not models:
            continue
        preferred = [m for m in models if PREFERRED.search(m)]
        names.append(sorted(preferred or models, key=len)[0])
    return names[:limit] if limit else names


def build(name: str, size: int) -> tuple[torch.nn.Module, tuple[int, int, int]]:
    try:
        model = timm.create_model(name, pretrained=False, img_size=size)
        return model, (3, size, size)
    except TypeError:
        model = timm.create_model(name, pretrained=False)
        cfg_size = tuple(model.pretrained_cfg.get("input_size", (3, 224, 224)))
        fixed = getattr(model.pretrained_cfg, "fixed_input_size", False) or model.pretrained_cfg.get("fixed_input_size")
        return model, cfg_size if fixed else (3, size, size)


def _write(rows: list[dict], planned: int, out_dir: str) -> Path:
    cols = ["model", "status", "input", "gates", "convert_err", "prune_err", "flop_err", "closed/backbone",
            "open/backbone", "seconds", "error"]
    ok = sum(r["status"] == "ok" for r in rows)
    notes = (f"gatedmtl {gatedmtl.__version__}, timm {timm.__version__}, torch {torch.__version__}; T=3 tasks; "
             f"{len(rows)} of {planned} families checked. "
             "Errors are scale-aware relative (convert: gated vs backbone, limit 1e-5; prune: lean vs gated with "
             "perturbed slots over all-open / all-closed / 50 % gates, limit 1e-4); flop_err: predict_flops vs fvcore "
             "on the lean model (limit 0.5 %). closed/open: fvcore FLOPs of the lean model with every gate closed / "
             "open, relative to the plain backbone (ungated per-slot layers — grouped convs, norms not fused with a "
             "conv, attention matmuls — run once per slot).")
    return write_table("coverage", f"Conversion coverage ({ok}/{len(rows)} exact)", notes, rows, cols, out=out_dir)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--families", type=int, default=None, help="only the first N families")
    parser.add_argument("--models", default="", help="comma-separated model names instead of one per family")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    torch.manual_seed(0)
    names = args.models.split(",") if args.models else pick_models(args.families)
    rows = []
    for i, name in enumerate(names):
        start = time.perf_counter()
        row = {"model": name}
        try:
            backbone, size = build(name, args.size)
            try:
                r = verify(backbone, input_size=size, patterns=("open", "closed", 0.5))
            except ValueError as e:  # the family wants its own input size: use its default
                if "probe input" not in str(e):
                    raise
                backbone = timm.create_model(name, pretrained=False)
                size = tuple(backbone.pretrained_cfg.get("input_size", (3, 224, 224)))
                r = verify(backbone, input_size=size, patterns=("open", "closed", 0.5))
            row |= {"status": "ok", "input": "x".join(map(str, size[1:])), "gates": r.gates,
                    "convert_err": f"{r.convert_error:.1e}", "prune_err": f"{r.worst_prune_error:.1e}",
                    "flop_err": f"{r.worst_flop_error:.2%}",
                    "closed/backbone": f"{r.flops_lean['closed'] / r.flops_backbone:.3f}",
                    "open/backbone": f"{r.flops_lean['open'] / r.flops_backbone:.3f}"}
            if r.convert_error > 1e-5 or r.worst_prune_error > 1e-4 or r.worst_flop_error > 0.005:
                row["status"] = "MISMATCH"
        except Exception as e:  # noqa: BLE001 - the table records every failure
            row |= {"status": "error", "error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
            traceback.print_exc(limit=3)
        row["seconds"] = f"{time.perf_counter() - start:.1f}"
        rows.append(row)
        print(f"[{i + 1}/{len(names)}] {row}", flush=True)
        out = _write(rows, len(names), args.out)  # after every model: a cut-off run still leaves its table
    print(f"{sum(r['status'] == 'ok' for r in rows)}/{len(rows)} exact; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
