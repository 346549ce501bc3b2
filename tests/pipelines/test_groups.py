"""Worker groups that outlive a train stage: the slot that hands the workers one job at a time (a (re)started worker
takes the job in flight), and when the driver keeps or releases an idle group."""

from __future__ import annotations

import asyncio

import pytest

from pipelines.training import groups
from pipelines.training.groups import JobSlot


def test_the_slot_hands_each_job_once_and_a_restarted_worker_the_one_in_flight():
    async def scenario():
        slot = JobSlot()

        async def soon(coro):
            return await asyncio.wait_for(coro, 5)

        first = asyncio.ensure_future(slot.next(0))  # a worker waits before any job
        await asyncio.sleep(0.05)
        assert not first.done()
        assert await slot.put("job-a") == 1
        assert await soon(first) == (1, "job-a")
        assert await soon(slot.next(0)) == (1, "job-a")  # a restarted worker: the job in flight again
        after_a = asyncio.ensure_future(slot.next(1))  # done with job 1: waits for the next
        waiting = asyncio.ensure_future(slot.wait(1))
        await asyncio.sleep(0.05)
        assert not after_a.done() and not waiting.done()
        await slot.finish(2)  # not the job in flight: nothing happens
        await asyncio.sleep(0.05)
        assert not waiting.done()
        await slot.finish(1)
        await soon(waiting)
        restarted = asyncio.ensure_future(slot.next(0))  # after job 1 is done, a restart waits too
        await asyncio.sleep(0.05)
        assert not after_a.done() and not restarted.done()
        assert await slot.put("job-b") == 2
        assert await soon(after_a) == (2, "job-b") and await soon(restarted) == (2, "job-b")
        await slot.stop()
        assert await soon(slot.next(2)) is None

    asyncio.run(scenario())


class FakeGroup:
    def __init__(self, key, alive=True):
        self.key, self.stopped = key, False
        self.thread = type("T", (), {"is_alive": staticmethod(lambda: alive)})()

    def stop(self, wait: float = 0.0) -> None:
        self.stopped = True


@pytest.fixture()
def registry(monkeypatch):
    monkeypatch.setattr(groups, "_IDLE", {})
    monkeypatch.setattr(groups, "_BUSY", [])
    monkeypatch.setattr(groups, "_RESERVED", {})
    monkeypatch.setattr(groups, "Group", lambda key, factory: FakeGroup(key))
    return groups


ONE, TWO, GPU = (1, 2.0, False, 0), (2, 1.0, False, 0), (1, 1.0, True, 0)  # (workers, CPUs each, GPU, failures)


def test_a_stage_takes_an_idle_group_of_its_key_and_a_restarted_group_is_not_kept(registry):
    a = registry.take(ONE, None)
    registry.give_back(a, reusable=True)
    assert registry.take(TWO, None) is not a  # another key: a new group
    assert registry.take(ONE, None) is a and not a.stopped
    registry.give_back(a, reusable=False)  # it restarted during the stage
    assert a.stopped and registry.take(ONE, None) is not a
    dead = FakeGroup(GPU, alive=False)
    registry.give_back(dead, reusable=True)
    assert dead.stopped and not any(registry._IDLE.values())


def test_before_a_stage_starts_idle_groups_keep_only_what_it_leaves_free(registry):
    assert registry.held(ONE) == (2.0, 0.0) and registry.held(TWO) == (2.0, 0.0) and registry.held(GPU) == (1.0, 1.0)
    made = [registry.take(k, None) for k in (ONE, ONE, TWO, GPU)]
    busy = registry.take(ONE, None)
    for g in made:
        registry.give_back(g, reusable=True)
    registry.release_idle("s1", keep=ONE, room=(2.5, 1.0))  # one ONE for s1; the newest others while they fit
    assert [g.stopped for g in made] == [True, False, True, False]  # GPU (1 CPU, 1 GPU) fits, then TWO does not
    registry.release_idle("s2", keep=None, room=(0.5, 1.0))  # a stage that takes no group and leaves half a CPU
    assert [g.stopped for g in made] == [True, False, True, True]  # s1's reserved group stays
    assert registry.take(ONE, None, "s3") is not made[1]  # another stage of the key: not s1's
    assert registry.take(ONE, None, "s1") is made[1]
    registry.close_all(wait=0)
    assert busy.stopped and made[1].stopped and not registry._IDLE and not registry._BUSY


def test_a_group_reserved_for_a_stage_that_failed_before_taking_it_is_idle_again(registry):
    group = registry.take(ONE, None)
    registry.give_back(group, reusable=True)
    registry.release_idle("s1", keep=ONE)
    assert not any(registry._IDLE.values()) and not group.stopped
    registry.unreserve("s1")
    assert registry._IDLE[ONE] == [group]
    registry.release_idle("s2", keep=TWO, room=(1.0, 0.0))  # it holds 2 CPUs: more than s2 leaves free
    assert group.stopped
