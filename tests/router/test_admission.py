"""Router admission by memory: estimates from the decoded shape, waiting, and refusal of what never fits."""

import asyncio

import numpy as np
import pytest

from serve.router.admission import (BYTES_PER_GRID_VOXEL, BYTES_PER_INPUT_VOXEL, MemoryBudget, job_bytes,
                                     max_admissible_voxels)
from serve.errors import VolumeTooLargeError


def test_job_bytes_counts_the_input_and_each_resampled_grid():
    # 100 x 100 x 50 voxels of 3 mm: a 1.5 mm grid has 8x the voxels, a 3 mm grid as many
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    n = 100 * 100 * 50
    assert job_bytes((100, 100, 50), affine, [1.5]) == n * BYTES_PER_INPUT_VOXEL + 8 * n * BYTES_PER_GRID_VOXEL
    assert job_bytes((100, 100, 50), affine, [1.5, 3.0]) == \
        n * BYTES_PER_INPUT_VOXEL + 9 * n * BYTES_PER_GRID_VOXEL


def test_max_admissible_voxels_is_what_the_input_alone_may_cost():
    assert max_admissible_voxels(180 << 20) == (180 << 20) // BYTES_PER_INPUT_VOXEL


def test_a_job_over_the_whole_budget_is_refused_at_once():
    async def go():
        budget = MemoryBudget(1000)
        with pytest.raises(VolumeTooLargeError) as e:
            async with budget.reserve(1001):
                pass
        assert e.value.status == 413 and "router.memory_budget_bytes" in e.value.message
        assert budget.used == 0
    asyncio.run(go())


def test_jobs_wait_until_their_bytes_fit_and_release_them():
    async def go():
        budget, order = MemoryBudget(1000), []

        async def job(name, nbytes, hold):
            async with budget.reserve(nbytes):
                order.append((name, "in", budget.used))
                await asyncio.sleep(hold)
            order.append((name, "out"))

        await asyncio.gather(job("a", 700, 0.05), job("b", 600, 0.0), job("c", 300, 0.0))
        assert budget.used == 0
        # b (600) cannot run beside a (700) and waits for it; c (300) fits beside a at once
        assert order.index(("a", "out")) < order.index(("b", "in", 600))
        assert ("c", "in", 1000) in order
    asyncio.run(go())
