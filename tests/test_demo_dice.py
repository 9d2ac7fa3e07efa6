"""Issue 3's phantom requirement with the committed demo models, end to end on the input grid.

Held-out phantoms (serve.phantoms.HELDOUT_SEEDS: geometries and contrast
mappings never drawn in training) go through serve.pipeline.Segmenter
(canonical reorientation, order-3 resampling, nnU-Net sliding window, merge,
order-0 back to the input grid). Requirement: mean Dice >= 0.85 over the
structures present, and no structure of 1000+ truth voxels below 0.6.
"""

from __future__ import annotations

import pytest

from serve.demo import ensure_demo_models
from serve.phantoms import HELDOUT_SEEDS
from serve.training import evaluate_heldout, requirement_failures

N_CASES = 2


@pytest.fixture(scope="module")
def report():
    # the committed demo models (serve/demo_models), else serve.demo's random-init fallback
    return evaluate_heldout(ensure_demo_models(), HELDOUT_SEEDS[:N_CASES], threads=2)


def test_report_covers_all_80_structures(report):
    assert len(report) == 80, sorted(report)


def test_heldout_dice_meets_requirement(report):
    assert requirement_failures(report) == []
