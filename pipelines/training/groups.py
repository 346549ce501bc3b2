"""Worker groups that outlive a train stage: one Ray Train run serves the train stages of one run that ask for the
same workers, one stage after another.

Ray starts fresh processes for every ``TorchTrainer.fit`` (its controller and helpers, each training worker, which
then imports torch, Ray Train and open_clip): 13-18 s on 2 cores, whatever the stage does.  A group pays that once.
Its workers run :func:`pipelines.training.loop.group_worker`: they take a stage's :class:`~pipelines.training.config.
Job` from the group's :class:`JobSlot` actor, train it (into the stage's own attempt, checkpoints included: nothing
of a stage is in Ray Train's run), tell the slot it is done and wait for the next.  Ray Train is still the engine:
it places the workers, sets up DDP and restarts the group when a worker dies (``max_failures``); a restarted group
takes the job in flight again and resumes it from the stage's registered checkpoint, as a rerun would.

A group is keyed by what its workers are (:func:`group_key`: workers, CPUs and GPUs each, ``max_failures``) and runs
one stage at a time; a stage takes an idle group of its key (reserved for it when it started) or starts one.  A
group that restarted during a stage is not reused (so a stage gets the restarts it asks for, never fewer).  The
runner counts a stage's CPUs only while it runs, so before it starts one it releases the idle groups that hold what
it gave that stage, keeping one the stage can take (:func:`release_idle`).  :func:`close_all` ends them when the
run ends.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from typing import Any, Dict, Hashable, List, Optional, Tuple

_LOCK = threading.Lock()
_IDLE: Dict[Hashable, List["Group"]] = {}  # idle groups by key
_RESERVED: Dict[str, "Group"] = {}  # idle groups kept for a stage that has started and not taken it yet, by name
_BUSY: List["Group"] = []


def group_key(cfg) -> Tuple:
    """What a group's workers are: a train stage can use a group of its key."""
    r = cfg.resources
    return (r.num_workers, float(r.cpus_per_worker), bool(r.use_gpu), int(cfg.max_failures))


class JobSlot:
    """The group's one job in flight (a Ray async actor, no CPU): the driver puts a job, the workers take it, rank 0
    says when it is done; a (re)started worker asks for the job after the last one it finished (0: the one in
    flight, if any)."""

    def __init__(self) -> None:
        self.current: Optional[Tuple[int, Any]] = None
        self.last, self.stopping = 0, False
        self.changed = asyncio.Condition()

    async def put(self, job: Any) -> int:
        async with self.changed:
            self.last += 1
            self.current = (self.last, job)
            self.changed.notify_all()
            return self.last

    async def next(self, after: int) -> Optional[Tuple[int, Any]]:
        """The job in flight once it is newer than ``after``; ``None``: the group stops."""
        async with self.changed:
            await self.changed.wait_for(lambda: self.stopping or (self.current is not None
                                                                  and self.current[0] > after))
            return None if self.stopping else self.current

    async def finish(self, number: int) -> None:
        async with self.changed:
            if self.current is not None and self.current[0] == number:
                self.current = None
                self.changed.notify_all()

    async def wait(self, number: int) -> None:
        """Returns once job ``number`` is done."""
        async with self.changed:
            await self.changed.wait_for(lambda: self.current is None or self.current[0] != number)

    async def stop(self) -> None:
        async with self.changed:
            self.stopping = True
            self.changed.notify_all()


class Group:
    """One Ray Train run (a ``TorchTrainer.fit`` on a thread of the driver) whose workers serve the slot's jobs."""

    def __init__(self, key: Hashable, trainer_factory) -> None:
        import ray

        self.key, self.error, self.name = key, None, uuid.uuid4().hex[:12]
        self.slot = ray.remote(JobSlot).options(num_cpus=0).remote()
        trainer, ended = trainer_factory(self.slot, self.name)
        self.thread = threading.Thread(target=self._fit, args=(trainer, ended), name=f"train group {key}",
                                       daemon=True)
        self.thread.start()

    def _fit(self, trainer, ended) -> None:
        try:
            trainer.fit()
            self.error = RuntimeError("the training worker group ended before its stage was done")
        except BaseException as exc:  # noqa: BLE001 - raised by the stage whose job it ran
            self.error = exc
        finally:
            ended()

    def run(self, job: Any) -> None:
        """Run ``job`` on the group's workers; returns once they are done with it, raises what ended the group."""
        import ray

        number = ray.get(self.slot.put.remote(job))
        done = self.slot.wait.remote(number)
        while not ray.wait([done], timeout=0.5)[0]:
            if not self.thread.is_alive():
                raise self.error
        ray.get(done)

    def stop(self, wait: float = 0.0) -> None:
        try:
            self.slot.stop.remote()
        except Exception:  # noqa: BLE001 - Ray is going down with it
            pass
        if wait:
            self.thread.join(timeout=wait)


def take(key: Hashable, trainer_factory, stage: str = "") -> Group:
    """The group reserved for ``stage``, an idle group of ``key``, or a new one: ``trainer_factory(slot, name)``
    gives its ``TorchTrainer`` (``name``: its Ray Train run's) and what to call when that run has ended."""
    with _LOCK:
        group = _RESERVED.pop(stage, None)
        idle = _IDLE.get(key) or []
        if group is None and idle:
            group = idle.pop()
    if group is None or not group.thread.is_alive():
        group = Group(key, trainer_factory)
    with _LOCK:
        _BUSY.append(group)
    return group


def give_back(group: Group, reusable: bool) -> None:
    """The stage is done with ``group``: idle for the next stage of its key, or (it restarted, failed) stopped."""
    with _LOCK:
        if group in _BUSY:
            _BUSY.remove(group)
        if reusable and group.thread.is_alive():
            _IDLE.setdefault(group.key, []).append(group)
            return
    group.stop()


def held(key: Tuple) -> Tuple[float, float]:
    """The (CPUs, GPUs) a group of ``key`` holds, idle or not: its workers'."""
    workers, cpus, gpu = key[:3]
    return workers * cpus, float(workers) if gpu else 0.0


def release_idle(stage: str, keep: Optional[Hashable] = None, room: Tuple[float, float] = (0.0, 0.0)) -> None:
    """Before ``stage`` starts: reserve it an idle group of key ``keep`` (it takes that one: :func:`take`), keep
    other idle groups, newest first, while what they hold fits in ``room`` (the CPUs and GPUs that neither the
    running stages nor this one were counted for), and stop the rest.  So idle groups never hold what the runner
    gave a stage (a reserved one holds what ``stage`` was given)."""
    with _LOCK:
        idle = [g for gs in _IDLE.values() for g in gs]
        reserved = _IDLE[keep][-1] if keep is not None and _IDLE.get(keep) else None
        if reserved is not None:
            _RESERVED[stage] = reserved
        kept, going, (cpus, gpus) = [], [], room
        for group in reversed(idle):
            c, g = held(group.key)
            if group is reserved:
                continue
            if c <= cpus + 1e-9 and g <= gpus + 1e-9:
                kept.append(group)
                cpus, gpus = cpus - c, gpus - g
            else:
                going.append(group)
        _IDLE.clear()
        for group in reversed(kept):
            _IDLE.setdefault(group.key, []).append(group)
    for group in going:
        group.stop()


def unreserve(stage: str) -> None:
    """``stage`` has ended: a group still reserved for it (it failed before taking one) is idle again."""
    with _LOCK:
        group = _RESERVED.pop(stage, None)
        if group is not None:
            _IDLE.setdefault(group.key, []).append(group)


def close_all(wait: float = 60.0) -> None:
    """Stop every group (the run is over) and wait up to ``wait`` seconds each for its Ray Train run to end."""
    with _LOCK:
        going = [g for gs in _IDLE.values() for g in gs] + list(_RESERVED.values()) + list(_BUSY)
        _IDLE.clear()
        _RESERVED.clear()
        _BUSY.clear()
    for group in going:
        group.stop(wait)
