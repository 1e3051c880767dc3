"""gatedmtl: gated multi-task networks for the edge.

Convert any backbone into a shared branch plus one branch per task, train straight-through
channel gates at a FLOP budget, prune every closed gate away, profile and export to ONNX.
"""

from .cost import (UncountedFlopsWarning, analyze, count_flops, count_params, expected_flops, flop_bounds,
                   measure_flops, predict_flops)
from .gates import ChannelGate
from .prune import LeanModel, prune
from .surgery import GatedModel, convert, gate_layers

# submodules of the documented API, reachable after a plain ``import gatedmtl``
from . import balancing, bench, export, profile, train, verify  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "ChannelGate", "GatedModel", "LeanModel", "UncountedFlopsWarning", "analyze", "convert", "count_flops",
    "count_params", "expected_flops", "flop_bounds", "gate_layers", "measure_flops", "predict_flops", "prune",
    "__version__", "balancing", "bench", "export", "profile", "train", "verify",
]
