"""The step plan: a pure function of the spec that every rank, every restart and every worker count agrees on."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.training.data import StepPlan, permute


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4097])
def test_permute_is_a_bijection_and_keyed(n):
    out = permute(np.arange(n), n, key=99)
    assert sorted(out.tolist()) == list(range(n))
    if n > 16:
        assert not np.array_equal(out, np.arange(n))
        assert not np.array_equal(out, permute(np.arange(n), n, key=100))
    assert np.array_equal(permute(np.arange(n)[::-1], n, key=99), out[::-1])  # a function of the position alone


def test_epochs_visit_every_row_once_and_ranks_split_the_global_batch():
    plan = StepPlan(rows=103, batch_size=10, world=3, seed=5, total_steps=25)
    assert plan.steps_per_epoch == 10 and plan.local_sizes == [4, 3, 3]
    for epoch in (0, 1):
        rows = np.concatenate([plan.global_rows(s) for s in range(epoch * 10 + 1, epoch * 10 + 11)])
        assert len(set(rows.tolist())) == 100  # the epoch's last 3 rows are the dropped partial batch
    assert not np.array_equal(plan.global_rows(1), plan.global_rows(11))  # reshuffled per epoch
    for step in (1, 17, 25):
        shares = [plan.rank_rows(step, r) for r in range(3)]
        assert np.array_equal(np.concatenate(shares), plan.global_rows(step))
    one = StepPlan(rows=103, batch_size=10, world=1, seed=5, total_steps=25)
    assert np.array_equal(one.global_rows(17), plan.global_rows(17))  # any worker count: the same global batches
    with pytest.raises(IndexError):
        plan.global_rows(26)
