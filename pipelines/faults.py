"""Failures: how the CLI reports them (one line, an exit code), which ones a task retries, and failpoints.

**Exit codes.**  2: the input is wrong (a spec, a flag, a data or weights file, credentials, an address): fixing
it is the user's move.  1: the run failed for another reason (storage unreachable or full mid-run, a job that
failed): rerunning once the cause is gone completes it, and every committed stage is kept.  Both print one line
(``--debug`` shows the traceback); an unexpected exception (a bug) keeps its traceback.

**Retries.**  A task that dies (its worker process killed, its node lost) is rerun by Ray; a task that raises a
transient error (:data:`TRANSIENT`: a dropped connection, a timeout) is retried up to :data:`TASK_RETRIES` times.
Anything else (bad data) fails the stage at once, with the file or sample named.

**Failpoints** (tests only).  ``GRADMIMIC_FAILPOINTS="point=action[@n];..."`` with ``GRADMIMIC_FAILPOINTS_DIR``
set to a directory shared by every process: at the ``n``-th hit of ``point`` (default the first, counted over
all processes), ``kill`` sends SIGKILL to the process, ``transient`` raises :class:`TransientFault`, and
``pause`` creates ``<dir>/<point>.paused`` and waits (at most 120 s) for ``<dir>/<point>.resume``, ``flag``
makes :func:`hit` return True.  Points: ``task:<function>`` in every stage task, ``stage:<name>`` in the driver
each time a task of stage ``name`` finishes (or a training step passes), ``commit:<name>`` just before stage
``name`` commits, ``nonfinite:step<k>`` (flag) in a training step: its loss becomes NaN.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from typing import Optional, Tuple

ENV, DIR_ENV = "GRADMIMIC_FAILPOINTS", "GRADMIMIC_FAILPOINTS_DIR"
TASK_RETRIES = 3


class TransientFault(ConnectionError):
    """What the ``transient`` failpoint raises: a connection dropped mid-task."""


TRANSIENT = (ConnectionError, TimeoutError)  # TransientFault included


class RunFailed(RuntimeError):
    """A stage that stopped for a reason it states (non-finite training steps, say): one line, exit 1."""


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
        raise ValueError(f"{ENV}: unknown action {action!r} for {point}")
    return False


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


def run_task(point: str, fn, *args):
    """A stage task's body: the failpoint, then the function (what :meth:`StageContext.map` runs remotely)."""
    hit(point)
    return fn(*args)


# ------------------------------------------------------------------------------------------------ reporting


def _chain(exc: BaseException):
    """The exception and what it wraps (a Ray task's cause, a training worker's failure, explicit causes and
    contexts), without Ray's own wrappers, whose text is a remote traceback."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if not type(exc).__module__.startswith("ray."):
            yield exc
        failures = getattr(exc, "worker_failures", None)
        cause = getattr(exc, "cause", None)
        if isinstance(failures, dict) and failures:
            exc = next(iter(failures.values()))
        elif isinstance(cause, BaseException):
            exc = cause
        else:
            exc = exc.__cause__ or exc.__context__


def _first_line(exc: BaseException) -> str:
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return (lines[0] if lines else type(exc).__name__)[:500]


def classify(exc: BaseException) -> Optional[Tuple[int, str]]:
    """``(exit code, one line)`` for a failure the CLI reports without a traceback, else ``None`` (a bug).  The
    line starts with the stage it happened in, where the runner recorded it."""
    verdict = _classify(exc)
    where = getattr(exc, "gradmimic_where", None)
    if verdict is None or not where or verdict[1].startswith(where):
        return verdict
    return verdict[0], f"{where}: {verdict[1]}"


def _classify(exc: BaseException) -> Optional[Tuple[int, str]]:
    from .config import SpecError

    chain = list(_chain(exc))
    for e in chain:  # the most specific verdict wins, wherever it sits in the chain
        if isinstance(e, SpecError):
            return 2, _first_line(e)
    for e in chain:
        if isinstance(e, RunFailed):
            return 1, _first_line(e)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return 1, f"storage full: {_first_line(e)}"
        if isinstance(e, PermissionError) and getattr(e, "filename", None):  # a local file this user may not use
            return 2, f"permission denied: {_first_line(e)}"
        refused = any(s in str(e) for s in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden"))
        if isinstance(e, PermissionError) or type(e).__name__ == "NoCredentialsError" or \
                (refused and type(e).__name__ == "ClientError"):  # object storage refused the request
            return 2, f"storage: access denied ({_first_line(e)}): check the credentials"
    for e in chain:
        if isinstance(e, TRANSIENT) or type(e).__name__ in ("EndpointConnectionError", "ConnectTimeoutError"):
            return 1, f"storage or cluster unreachable: {_first_line(e)}"
    for e in chain:
        if isinstance(e, (ValueError, KeyError, TypeError, FileNotFoundError)):
            return 2, _first_line(e)
    return None
