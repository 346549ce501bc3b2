"""Failpoints: faults injected at named points, for the reliability tests; a no-op unless armed.

**Failpoints** (tests only).  ``GRADMIMIC_FAILPOINTS="point=action[@n];..."`` with ``GRADMIMIC_FAILPOINTS_DIR``
set to a directory shared by every process: at the ``n``-th hit of ``point`` (default the first, counted over
all processes), ``kill`` sends SIGKILL to the process, ``transient`` raises :class:`TransientFault`, and
``pause`` creates ``<dir>/<point>.paused`` and waits (at most 120 s) for ``<dir>/<point>.resume``, ``flag``
makes :func:`hit` return True.  Points: ``task:<function>`` in every stage task, ``stage:<name>`` in the driver
each time a task of stage ``name`` finishes (or a training step passes), ``commit:<name>`` just before stage
``name`` commits, ``nonfinite:step<k>`` (flag) in a training step: its loss becomes NaN (through
:func:`flag_hook`, which costs nothing when no such point is armed).
"""

from __future__ import annotations

import os
import signal
import time
from typing import Callable, Optional

from pipelines.run.errors import InputError

ENV, DIR_ENV = "GRADMIMIC_FAILPOINTS", "GRADMIMIC_FAILPOINTS_DIR"


class TransientFault(ConnectionError):
    """What the ``transient`` failpoint raises: a connection dropped mid-task."""


def hit(point: str) -> bool:
    """Act if a failpoint is armed at ``point`` (a no-op otherwise: one dictionary lookup); ``flag`` returns True
    (the caller injects the fault itself: a non-finite loss, say)."""
    spec = os.environ.get(ENV)
    if not spec:
        return False
    armed = dict(item.split("=", 1) for item in spec.split(";") if "=" in item)
    action = armed.get(point)
    if action is None:
        return False
    action, _, nth = action.partition("@")
    stem = _stem(point)
    if _count(stem) != int(nth or 1):
        return False
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "transient":
        raise TransientFault(f"failpoint {point}: connection reset")
    elif action == "flag":
        return True
    elif action == "pause":
        open(stem + ".paused", "w").close()
        deadline = time.monotonic() + 120
        while not os.path.exists(stem + ".resume") and time.monotonic() < deadline:
            time.sleep(0.05)
    else:
        raise InputError(f"{ENV}: unknown action {action!r} for {point}")
    return False


def flag_hook(prefix: str) -> Optional[Callable[[object], bool]]:
    """For a hot path (a training step): ``None`` unless some point ``<prefix><k>`` is armed, else
    ``hook(k) == hit(f"{prefix}{k}")``.  Decided once, from the environment the process started with, so a
    caller that holds ``None`` pays one ``is None`` per step."""
    spec = os.environ.get(ENV)
    if not spec or not any(item.split("=", 1)[0].startswith(prefix) for item in spec.split(";") if "=" in item):
        return None
    return lambda k: hit(f"{prefix}{k}")


def _stem(point: str) -> str:
    """Where a point's files live: ``<dir>/<point with '/' and ':' as '_'>``."""
    return os.path.join(os.environ[DIR_ENV], point.replace("/", "_").replace(":", "_"))


def _count(stem: str) -> int:
    """This hit's number, counted over every process (one file created per hit, exclusively)."""
    n = 1
    while True:
        try:
            os.close(os.open(f"{stem}.hit{n}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return n
        except FileExistsError:
            n += 1


def run_task(point: str, fn, *args, **kwargs):
    """A stage task's body: the failpoint, then the function (what :class:`~pipelines.run.context.StageContext`
    runs remotely)."""
    hit(point)
    return fn(*args, **kwargs)


