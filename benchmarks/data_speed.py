"""Time to render one embedded scene (``gatedmtl.data.render_scene``), against a 5 ms goal.

The procedural scenes are generated on the fly by the data loader, so rendering must stay far
below a training step. Writes ``benchmarks/results/data_speed.md`` and ``.csv``. Usage::

    OMP_NUM_THREADS=1 python benchmarks/data_speed.py [--sizes 96x128,32x48] [--samples 50] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

from _report import write_table
from gatedmtl.data import render_scene

GOAL_MS = 5.0  # per sample at 96x128


def time_render(size: tuple[int, int], samples: int, repeats: int) -> list[float]:
    """Seconds per sample of ``repeats`` batches of ``samples`` renders (seeds 0..samples-1)."""
    render_scene(0, size)  # warm-up
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        for i in range(samples):
            render_scene(i, size)
        out.append((time.perf_counter() - t) / samples)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="96x128,32x48", help="HxW list")
    p.add_argument("--samples", type=int, default=50)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    rows, sentences = [], []
    for spec in args.sizes.split(","):
        h, w = (int(v) for v in spec.lower().split("x"))
        per = time_render((h, w), args.samples, args.repeats)
        best, median = min(per) * 1e3, statistics.median(per) * 1e3
        rows.append({"size": f"{h}x{w}", "best_ms": f"{best:.2f}", "median_ms": f"{median:.2f}",
                     "worst_ms": f"{max(per) * 1e3:.2f}"})
        if (h, w) == (96, 128):
            verdict = "meets" if best <= GOAL_MS else "misses"
            sentences.append(f"At 96x128 the best batch took {best:.2f} ms a sample (median {median:.2f} ms): "
                             f"it {verdict} the {GOAL_MS:g} ms goal.")
    notes = (f"`OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')} python benchmarks/data_speed.py "
             f"--sizes {args.sizes} --samples {args.samples} --repeats {args.repeats}` on {platform.machine()}, "
             f"{os.cpu_count()} CPUs, Python {platform.python_version()}: {args.repeats} batches of {args.samples} "
             "renders (seeds 0 onwards) after one warm-up render, wall time per sample. "
             + " ".join(sentences))
    path = write_table("data_speed", "Rendering the embedded scenes", notes, rows)
    print(path.read_text())


if __name__ == "__main__":
    main()
