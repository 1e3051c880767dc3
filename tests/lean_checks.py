"""Checks shared by the lean-model tests: random gates, and the lean model against the gated one."""

from __future__ import annotations

import torch

import gatedmtl
from gatedmtl.verify import perturb_slots, relative_error, set_gates


def random_gates(model: gatedmtl.GatedModel, density: float = 0.5) -> gatedmtl.GatedModel:
    """Distinct slot weights (seed 1) and a fraction ``density`` of open gates (seed 2), in place."""
    perturb_slots(model, generator=torch.Generator().manual_seed(1))
    set_gates(model, density, torch.Generator().manual_seed(2))
    return model


def assert_lean_matches(model: gatedmtl.GatedModel, lean: gatedmtl.LeanModel, x: torch.Tensor) -> None:
    """Every task output of ``lean(x)`` within 1e-4 (relative) of ``model(x)``, and ``predict_flops``
    of the gated model equal to fvcore's count of the lean one at ``x``'s shape (batch 1)."""
    with torch.no_grad():
        ref, got = model(x), lean(x)
    for task in model.tasks:
        assert relative_error(got[task], ref[task]) <= 1e-4, task
    shape = (1, *x.shape[1:])
    assert gatedmtl.predict_flops(model, shape) == gatedmtl.count_flops(lean, shape)
