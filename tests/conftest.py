import importlib.util
from pathlib import Path

import pytest
import torch

RUN_PY = Path(__file__).resolve().parents[1] / "export" / "run.py"
"""The stand-alone edge runner (no torch, no gatedmtl)."""


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def edge_runner():
    """``export/run.py`` loaded as a module: how a deployment reads an exported file."""
    spec = importlib.util.spec_from_file_location("gatedmtl_edge_run", RUN_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
