"""The README's Python examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_python_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # examples may write runs/...
    namespace: dict = {}
    exec(compile(BLOCKS[index], f"README.md python block {index + 1}", "exec"), namespace)
    assert capsys.readouterr().out.strip()  # every example prints its result


def test_documented_calls_resolve_after_a_plain_import():
    """Every ``gatedmtl.<module>.<name>(...)`` the README names is reachable after ``import gatedmtl``."""
    import subprocess
    import sys

    calls = sorted(set(re.findall(r"gatedmtl\.([a-z_]+)\.([A-Za-z_]+)\(", README.read_text())))
    assert ("export", "export_onnx") in calls and ("balancing", "create") in calls
    code = "import gatedmtl\n" + "".join(f"assert callable(gatedmtl.{m}.{n}), '{m}.{n}'\n" for m, n in calls)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
