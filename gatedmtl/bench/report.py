"""Turn the result JSONs of an experiment into Markdown/CSV tables and PNG plots.

For each backbone: the results table (per-task primary metric, ΔMTL vs STL, GFLOPs, params,
Mean Rank, training time per step, ONNX Runtime latency; mean ± std over seeds), the budget
fidelity table of every GatedMTL row, a Pareto plot (ΔMTL vs GFLOPs), the gate maps and the
training dynamics. :func:`write_report` writes ``<out>/<experiment>.md`` (+ ``.csv``, PNGs);
:func:`update_readme` copies the summary between the ``<!-- bench:<experiment> -->`` markers.
"""

from __future__ import annotations

import csv
import json
import re
import statistics
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..tasks import delta_mtl, mean_rank

__all__ = ["load_rows", "build_tables", "write_report", "update_readme", "METHOD_NAMES"]

METHOD_NAMES = {"ew": "EW", "dwa": "DWA", "uw": "UW", "rlw": "RLW", "famo": "FAMO", "db_mtl": "DB-MTL",
                "go4align": "GO4Align", "pcgrad": "PCGrad", "cagrad": "CAGrad", "mgda": "MGDA", "imtl_g": "IMTL-G",
                "nash_mtl": "Nash-MTL", "gradnorm": "GradNorm", "si": "SI", "upgrad": "UPGrad"}
"""Display names of the balancing methods, in the order of the tables."""

_METRIC_NAMES = {"miou": "mIoU %", "rmse": "RMSE", "mean_angle": "mean °", "acc": "acc %", "ods_f": "ODS F %"}


def load_rows(folder: str | Path) -> list[dict[str, Any]]:
    """Every row JSON under ``folder`` (``results/<experiment>``), sorted by model, seed, row."""
    rows = []
    for path in sorted(Path(folder).glob("*/seed*/*.json")):
        if not path.name.startswith("_"):
            rows.append(json.loads(path.read_text()))
    return rows


def _task_info(rows: Sequence[Mapping[str, Any]]) -> tuple[dict[str, dict[str, bool]], dict[str, str]]:
    """Metric directions and primary metric per task, as the rows recorded them."""
    directions: dict[str, dict[str, bool]] = {}
    primary: dict[str, str] = {}
    for r in rows:
        directions |= r["higher_is_better"]
        primary |= r["primary"]
    return directions, primary


def _label(row: Mapping[str, Any]) -> str:
    if row["family"] == "mtl":
        return f"MTL + {METHOD_NAMES.get(row['balance'], row['balance'])}"
    if row["family"].startswith("gated"):
        text = f"GatedMTL + {METHOD_NAMES.get(row['balance'], row['balance'])}, budget {row['budget']:g}"
        return text + (" + fine-tune" if row["family"] == "gated-ft" else "")
    return row["method"]


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def build_tables(rows: Sequence[Mapping[str, Any]], tasks: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
    """Per model: the table rows (dicts with ``method``, ``metrics`` (mean over seeds), ``delta`` and
    ``delta_std`` (ΔMTL % vs that seed's STL), ``gflops``, ``params_m``, ``step_ms``, ``latency_ms``,
    ``mean_rank``, ``seeds``, ``family``, ``budget``, ``budget_report``)."""
    directions, primary = _task_info(rows)
    by_model: dict[str, dict[int, dict[str, Mapping[str, Any]]]] = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        by_model[r["model"]][r["seed"]][r["row"]] = r
    tables: dict[str, list[dict[str, Any]]] = {}
    for model, seeds in by_model.items():
        entries: dict[str, dict[str, Any]] = {}
        order: list[str] = []
        for seed, seed_rows in sorted(seeds.items()):
            stl_rows = [seed_rows.get(f"stl-{t}") for t in tasks]
            if any(r is None for r in stl_rows):
                continue  # no baseline for this seed yet
            stl = {t: r["metrics"][t] for t, r in zip(tasks, stl_rows)}
            combined = {"row": "stl", "family": "stl", "method": f"STL ({len(tasks)} networks)", "metrics": stl,
                        "gflops": sum(r["gflops"] for r in stl_rows), "params_m": sum(r["params_m"] for r in stl_rows),
                        "step_ms": sum(r["step_ms"] for r in stl_rows),
                        "latency_ms": sum(r["latency_ms"] for r in stl_rows), "budget": None}
            candidates = [combined] + [r for k, r in seed_rows.items() if not k.startswith("stl-")]
            for r in candidates:
                key = r["row"]
                if key not in entries:
                    entries[key] = {"row": key, "family": r["family"], "method": _label(r), "budget": r.get("budget"),
                                    "runs": [], "budget_report": r.get("budget_report")}
                    order.append(key)
                e = entries[key]
                e["runs"].append({"metrics": r["metrics"], "delta": delta_mtl(r["metrics"], stl, directions, primary),
                                  "gflops": r["gflops"], "params_m": r["params_m"], "step_ms": r["step_ms"],
                                  "latency_ms": r["latency_ms"]})
        out = []
        for key in order:
            e = entries[key]
            runs = e.pop("runs")
            e["seeds"] = len(runs)
            e["metrics"] = {t: {primary[t]: statistics.fmean(x["metrics"][t][primary[t]] for x in runs)} for t in tasks}
            e["delta"], e["delta_std"] = _mean_std([x["delta"] for x in runs])
            for name in ("gflops", "params_m", "step_ms", "latency_ms"):
                e[name] = statistics.fmean(x[name] for x in runs)
            out.append(e)
        if out:
            ranks = mean_rank({e["row"]: e["metrics"] for e in out}, directions, primary)
            for e in out:
                e["mean_rank"] = ranks[e["row"]]
            family_order = {"stl": 0, "mtl": 1, "gated": 2, "gated-ft": 2}
            methods = list(METHOD_NAMES)  # mtl rows in the order of the experiments' method list
            out.sort(key=lambda e: (family_order[e["family"]],
                                    methods.index(e["row"][4:]) if e["row"][4:] in methods else len(methods),
                                    e["method"].split(", budget")[0], e["budget"] or 0, e["family"]))
        tables[model] = out
    return tables


def _fmt_metric(metric: str, v: float) -> str:
    return f"{v:.3f}" if metric in ("rmse",) else f"{v:.2f}"


def _markdown_table(entries: Sequence[Mapping[str, Any]], tasks: Sequence[str], primary: Mapping[str, str]) -> list[str]:
    cols = ["method"] + [f"{t} {_METRIC_NAMES.get(primary[t], primary[t])}" for t in tasks] + [
        "ΔMTL % ↑", "GFLOPs", "params M", "MR ↓", "train ms/step", "ORT ms"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    best = max(entries, key=lambda e: e["delta"] if e["family"] != "stl" else float("-inf"))
    for e in entries:
        delta = f"{e['delta']:+.2f}" + (f" ± {e['delta_std']:.2f}" if e["seeds"] > 1 else "")
        if e is best:
            delta = f"**{delta}**"
        cells = [e["method"]] + [_fmt_metric(primary[t], e["metrics"][t][primary[t]]) for t in tasks] + [
            delta, f"{e['gflops']:.4f}", f"{e['params_m']:.2f}", f"{e['mean_rank']:.2f}", f"{e['step_ms']:.0f}",
            f"{e['latency_ms']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _fidelity_table(entries: Sequence[Mapping[str, Any]]) -> list[str]:
    lines = ["| GatedMTL row | requested GF | end of training GF | landed GF (fvcore, lean) | landed vs requested | "
             "gates changed by the projection |", "|---|---|---|---|---|---|"]
    for e in entries:
        rep = e.get("budget_report")
        if e["family"] != "gated" or not rep:
            continue
        lines.append(f"| {e['method']} | {rep['requested'] / 1e9:.4f} | {rep['before_projection'] / 1e9:.4f} | "
                     f"{rep['landed'] / 1e9:.4f} | {rep['error']:+.2%} | {rep['changed_gates'] / rep['gates']:.1%} |")
    return lines


def _reading(entries: Sequence[Mapping[str, Any]]) -> str:
    """What the table says, from its own numbers (the README's summary sentence)."""
    mtl = [e for e in entries if e["family"] == "mtl"]
    gated = [e for e in entries if e["family"] in ("gated", "gated-ft")]
    stl = next(e for e in entries if e["family"] == "stl")
    parts = []
    if mtl:
        best_mtl = max(mtl, key=lambda e: e["delta"])
        parts.append(f"best hard-sharing row: {best_mtl['method']} at ΔMTL {best_mtl['delta']:+.2f} % "
                     f"({best_mtl['gflops']:.4f} GF, {best_mtl['gflops'] / stl['gflops']:.0%} of STL's)")
    if gated:
        best_g = max(gated, key=lambda e: e["delta"])
        parts.append(f"best GatedMTL row: {best_g['method']} at ΔMTL {best_g['delta']:+.2f} % ({best_g['gflops']:.4f} GF, "
                     f"{best_g['gflops'] / stl['gflops']:.0%} of STL's)")
        above = [e for e in gated if mtl and e["delta"] > max(m["delta"] for m in mtl)]
        parts.append(f"{len(above)} of {len(gated)} GatedMTL rows beat every hard-sharing row")
        per_flop = stl["latency_ms"] / stl["gflops"]  # the backbone's time per FLOP (STL runs T backbones)
        lean = [e for e in gated if e["family"] == "gated"]
        ratios = [e["latency_ms"] / e["gflops"] / per_flop for e in lean]
        slower = sum(e["latency_ms"] >= stl["latency_ms"] for e in lean)
        parts.append(f"lean encoders take {min(ratios):.2f}-{max(ratios):.2f}x the backbone's ORT time per FLOP, and "
                     f"{slower} of {len(lean)} are as slow as or slower than the {len(stl['metrics'])} separate networks")
        ft = {e["method"].replace(" + fine-tune", ""): e for e in gated if e["family"] == "gated-ft"}
        gains = [ft[e["method"]]["delta"] - e["delta"] for e in gated if e["family"] == "gated" and e["method"] in ft]
        if gains:
            parts.append(f"fine-tuning the lean network changes ΔMTL by {statistics.fmean(gains):+.2f} points on "
                         f"average ({min(gains):+.2f} to {max(gains):+.2f})")
    return "; ".join(parts) + "."


def _plots(entries: Sequence[Mapping[str, Any]], rows: Sequence[Mapping[str, Any]], model: str, tasks: Sequence[str],
           stem: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    # Pareto: ΔMTL vs GFLOPs
    fig, ax = plt.subplots(figsize=(7, 4.5))
    stl = next(e for e in entries if e["family"] == "stl")
    ax.scatter([stl["gflops"]], [0.0], marker="*", s=140, color="black", label=stl["method"], zorder=3)
    mtl = [e for e in entries if e["family"] == "mtl"]
    if mtl:
        ax.scatter([e["gflops"] for e in mtl], [e["delta"] for e in mtl], marker="x", color="gray", label="hard-sharing MTL")
        for e in mtl:
            ax.annotate(e["method"].replace("MTL + ", ""), (e["gflops"], e["delta"]), fontsize=6,
                        xytext=(3, 0), textcoords="offset points")
    curves: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for e in entries:
        if e["family"] in ("gated", "gated-ft"):
            curves[e["method"].split(", budget")[0] + (" + fine-tune" if e["family"] == "gated-ft" else "")].append(e)
    for name, pts in curves.items():
        pts = sorted(pts, key=lambda e: e["gflops"])
        ax.plot([e["gflops"] for e in pts], [e["delta"] for e in pts], marker="o", linestyle="--" if "fine" in name else "-",
                label=name)
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_xlabel("encoder GFLOPs per image (fvcore multiply-adds, lean model)")
    ax.set_ylabel("ΔMTL % vs STL (higher is better)")
    ax.set_title(f"{model}: accuracy vs compute")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(stem.with_name(stem.name + "_pareto.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    gated_rows = sorted((r for r in rows if r["model"] == model and r["family"] == "gated" and r.get("gate_map")),
                        key=lambda r: (r["balance"] != "ew", r["budget"]))
    ew_rows = [r for r in gated_rows if r["balance"] == gated_rows[0]["balance"]] if gated_rows else []
    seed0 = min((r["seed"] for r in ew_rows), default=0)
    ew_rows = [r for r in ew_rows if r["seed"] == seed0]
    if ew_rows:
        layers = list(ew_rows[0]["gate_map"])
        fig, axes = plt.subplots(len(tasks), 1, figsize=(9, 1.3 + 1.1 * len(tasks)), squeeze=False)
        for ax, t in zip(axes[:, 0], tasks):
            grid = [[r["gate_map"][layer][t] for layer in layers] for r in ew_rows]
            im = ax.imshow(grid, aspect="auto", vmin=0, vmax=1, cmap="viridis")
            ax.set_yticks(range(len(ew_rows)), [f"b {r['budget']:g}" for r in ew_rows], fontsize=7)
            ax.set_ylabel(t, fontsize=8)
            ax.set_xticks([])
        axes[-1, 0].set_xlabel(f"gated layers, input to output ({len(layers)})")
        fig.colorbar(im, ax=axes[:, 0].tolist(), label="task-specific channels")
        fig.suptitle(f"{model}: gate maps of GatedMTL + {METHOD_NAMES.get(ew_rows[0]['balance'], ew_rows[0]['balance'])} "
                     "per budget (fraction of channels a task keeps for itself)", fontsize=9)
        paths.append(stem.with_name(stem.name + "_gates.png"))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

        mid = ew_rows[len(ew_rows) // 2]
        base = next((r for r in rows if r["model"] == model and r["seed"] == seed0 and r["row"] == f"mtl-{mid['balance']}"), None)
        fig, axes = plt.subplots(1, 4, figsize=(13, 3.2))
        dyn = mid["dynamics"]
        for t in tasks:
            line, = axes[0].plot(dyn["step"], dyn["loss"][t], label=f"{t} (GatedMTL)")
            if base:
                axes[0].plot(base["dynamics"]["step"], base["dynamics"]["loss"][t], linestyle=":", color=line.get_color(),
                             label=f"{t} (hard sharing)")
        axes[0].set_title("task losses", fontsize=9)
        axes[0].legend(fontsize=6)
        axes[1].plot(dyn["step"], dyn["grad_norm"], label="GatedMTL")
        if base:
            axes[1].plot(base["dynamics"]["step"], base["dynamics"]["grad_norm"], linestyle=":", label="hard sharing")
        axes[1].set_title("gradient norm (before clipping)", fontsize=9)
        axes[1].legend(fontsize=6)
        axes[2].plot(dyn["step"], dyn["density"])
        axes[2].set_title("open gates (fraction)", fontsize=9)
        axes[3].plot(dyn["step"], dyn["gflops"], label="expected")
        axes[3].axhline(mid["budget_report"]["requested"] / 1e9, color="red", linestyle="--", label="budget")
        axes[3].set_title("predicted GFLOPs", fontsize=9)
        axes[3].legend(fontsize=6)
        for ax in axes:
            ax.set_xlabel("step", fontsize=8)
        fig.suptitle(f"{model}: training dynamics of {_label(mid)}", fontsize=9)
        fig.tight_layout()
        paths.append(stem.with_name(stem.name + "_dynamics.png"))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def _missing_rows(exp: Mapping[str, Any], entries: Sequence[Mapping[str, Any]]) -> list[str]:
    """The experiment's rows that have no result (GatedMTL rows of the best method only when it was chosen)."""
    have = {e["row"] for e in entries}
    missing = [f"MTL + {METHOD_NAMES.get(m, m)}" for m in exp["methods"] if f"mtl-{m}" not in have]
    for balance in exp["gated_balances"]:
        if balance == "best":
            chosen = {e["row"].split("-")[1] for e in entries if e["family"] == "gated"} - {
                b for b in exp["gated_balances"] if b != "best"}
            if not chosen:
                missing.append("GatedMTL + the best balancing method (every budget)")
            continue
        for b in exp["budgets"]:
            for suffix, what in (("", ""), ("-ft", " + fine-tune")):
                if (suffix and not exp["finetune_steps"]) or f"gated-{balance}-b{b:g}{suffix}" in have:
                    continue
                missing.append(f"GatedMTL + {METHOD_NAMES.get(balance, balance)}, budget {b:g}{what}")
    return missing


def _summary_lines(exp: Mapping[str, Any], tables: Mapping[str, Sequence[Mapping[str, Any]]], primary: Mapping[str, str],
                   tasks: Sequence[str], image_prefix: str, with_fidelity: bool) -> list[str]:
    lines = []
    models = [m for m in exp["models"] if m in tables] + [m for m in tables if m not in exp["models"]]
    for model in models:
        entries = tables[model]
        if not entries:
            continue
        seeds = max(e["seeds"] for e in entries)
        lines += [f"### {model}", "", f"{exp['name']}: {seeds} seed(s); latency: ONNX Runtime CPU, 1 thread, encoder at "
                  f"{'x'.join(map(str, exp['latency_size']))}, sum of per-node minimum kernel times.", ""]
        lines += _markdown_table(entries, tasks, primary)
        lines += ["", "Reading: " + _reading(entries), ""]
        missing = _missing_rows(exp, entries)
        if missing:
            lines += [f"Not run for {model} (time): " + ", ".join(missing) + ".", ""]
        if with_fidelity:
            lines += ["Budget fidelity (every GatedMTL row):", ""] + _fidelity_table(entries) + [""]
        plots = [("pareto", "Pareto front")]
        if any(e["family"] == "gated" for e in entries):  # the gate maps and dynamics are of GatedMTL rows
            plots += [("gates", "gate maps"), ("dynamics", "training dynamics")]
        for kind, what in plots:
            lines.append(f"![{model} {what}]({image_prefix}{exp['name']}_{model}_{kind}.png)")
        lines.append("")
    return lines


def write_report(folder: str | Path, out: str | Path) -> Path:
    """Write ``out/<experiment>.md``, ``.csv`` and the PNGs from the results in ``folder``; returns the .md."""
    folder, out = Path(folder), Path(out)
    meta = json.loads((folder / "experiment.json").read_text())
    exp = meta["experiment"]
    tasks = list(exp["tasks"])
    rows = load_rows(folder)
    if not rows:
        raise ValueError(f"{folder} holds no results; run gatedmtl bench {exp['name']} first")
    tables = build_tables(rows, tasks)
    _, primary = _task_info(rows)
    out.mkdir(parents=True, exist_ok=True)
    for model, entries in tables.items():
        if entries:
            _plots(entries, rows, model, tasks, out / f"{exp['name']}_{model}")
    with open(out / f"{exp['name']}.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "method", "family", "budget", "seeds"] + [f"{t}_{primary[t]}" for t in tasks]
                        + ["delta_mtl_pct", "delta_mtl_std", "gflops", "params_m", "mean_rank", "step_ms", "latency_ms"])
        for model, entries in tables.items():
            for e in entries:
                writer.writerow([model, e["method"], e["family"], e["budget"], e["seeds"]]
                                + [e["metrics"][t][primary[t]] for t in tasks]
                                + [e["delta"], e["delta_std"], e["gflops"], e["params_m"], e["mean_rank"], e["step_ms"],
                                   e["latency_ms"]])
    schedule = (f"{exp['steps']} steps of batch {exp['batch_size']}, AdamW lr {exp['lr']:g} cosine"
                + (f", {exp['image_size'][0]}x{exp['image_size'][1]} images, {exp['train_length']} training / "
                   f"{exp['val_length']} validation samples" if exp.get("image_size") else "")
                + (f"; fine-tuning: {exp['finetune_steps']} step(s) at a tenth of the lr" if exp["finetune_steps"] else ""))
    lines = [f"# Results: {exp['name']}", "", exp["description"], "",
             f"Reproduce: `gatedmtl bench {exp['name'].removesuffix('-quick')}{' --quick' if exp['name'].endswith('-quick') else ''}` "
             f"(then `python benchmarks/report.py`). Every row trains from scratch (timm, pretrained=False) with "
             f"{schedule}; torch {meta['torch']}, {meta['threads']} thread(s), {meta['machine']}.",
             "",
             "Columns: the primary metric of each task; ΔMTL = mean over tasks of the relative change of that metric "
             "vs STL (sign so that positive is better; Vandenhende et al.); GFLOPs and params of the encoder that runs "
             "at inference (fvcore multiply-adds per image at the training size; GatedMTL: the lean model after "
             "projection and pruning; STL: the sum of its networks); MR: Mean Rank over the task metrics among all "
             "rows; train ms/step: thread CPU time of one optimizer step; ORT ms: the exported encoder's latency.",
             ""]
    lines += _summary_lines(exp, tables, primary, tasks, "", with_fidelity=True)
    path = out / f"{exp['name']}.md"
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path


def readme_block(folder: str | Path, image_prefix: str) -> str:
    """The README summary of the results in ``folder`` (the tables and plot links, no fidelity table)."""
    folder = Path(folder)
    exp = json.loads((folder / "experiment.json").read_text())["experiment"]
    tasks = list(exp["tasks"])
    rows = load_rows(folder)
    _, primary = _task_info(rows)
    return "\n".join(_summary_lines(exp, build_tables(rows, tasks), primary, tasks, image_prefix,
                                    with_fidelity=False)).rstrip()


def update_readme(readme: str | Path, folder: str | Path, image_prefix: str = "benchmarks/results/") -> bool:
    """Replace the text between ``<!-- bench:<experiment> -->`` and ``<!-- /bench:<experiment> -->`` in
    ``readme`` with :func:`readme_block`; returns whether the file changed. The markers must exist."""
    readme = Path(readme)
    name = json.loads((Path(folder) / "experiment.json").read_text())["experiment"]["name"]
    text = readme.read_text()
    pattern = re.compile(rf"(<!-- bench:{re.escape(name)} -->\n)(?:.*?\n)?(<!-- /bench:{re.escape(name)} -->)", re.S)
    if not pattern.search(text):
        raise ValueError(f"{readme} has no <!-- bench:{name} --> ... <!-- /bench:{name} --> block")
    new = pattern.sub(lambda m: m.group(1) + readme_block(folder, image_prefix) + "\n" + m.group(2), text)
    if new != text:
        readme.write_text(new)
    return new != text
