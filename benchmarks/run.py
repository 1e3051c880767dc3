"""Run a results experiment: ``python benchmarks/run.py scenes [--quick] [--models resnet18]``.

The same as ``gatedmtl bench``: every row's result JSON goes to ``benchmarks/results/bench/<experiment>/``
(finished rows are skipped, so an interrupted run continues), then the report is written
(``benchmarks/results/<experiment>.md`` + plots). See ``gatedmtl bench --help`` for the options.
"""

from __future__ import annotations

import sys

from gatedmtl.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
