"""Regenerate every results report from the result JSONs in the repo, and the README's Results section.

    python benchmarks/report.py [--no-readme]

For each experiment folder under ``benchmarks/results/bench/``: ``benchmarks/results/<experiment>.md``,
``.csv`` and the PNG plots; then the README block between ``<!-- bench:<experiment> -->`` markers
(only for experiments the README has a block for).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gatedmtl.bench import update_readme, write_report

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--no-readme", action="store_true", help="leave README.md as it is")
    args = p.parse_args()
    readme = ROOT / "README.md"
    for folder in sorted((RESULTS / "bench").glob("*/experiment.json")):
        print(f"wrote {write_report(folder.parent, RESULTS)}")
        name = folder.parent.name
        if not args.no_readme and f"<!-- bench:{name} -->" in readme.read_text():
            changed = update_readme(readme, folder.parent)
            print(f"README.md: {name} results {'updated' if changed else 'unchanged'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
