"""Failures: how the CLI reports them (one line, an exit code), and which ones a task retries.

**Exit codes.**  2: the input is wrong (a spec, a flag, a data or weights file, credentials, an address): fixing
it is the user's move.  1: the run failed for another reason (storage unreachable or full mid-run, a job that
failed): rerunning once the cause is gone completes it, and every committed stage is kept.  Both print one line
(``--debug`` shows the traceback); an unexpected exception (a bug) keeps its traceback.

**By intent.**  Code that judges its input raises :class:`InputError` (exit 2; a spec's
:class:`~pipelines.run.config.SpecError` and a missing :class:`InputNotFound` are ones), code that judges its
storage :class:`StorageError` (exit 1), a stage that stops for a reason it states :class:`RunFailed` (exit 1).
Besides those, only what the operating system or the object store says is classified (permission or access
denied: 2; a full disk, a dropped connection: 1): a ``KeyError``, ``ValueError`` or ``TypeError`` that nobody
raised on purpose is a bug, and keeps its traceback.

**Retries.**  A task that dies (its worker process killed, its node lost) is rerun by Ray; a task that raises a
transient error (:data:`TRANSIENT`: a dropped connection, a timeout) is retried up to :data:`TASK_RETRIES` times.
Anything else (bad data) fails the stage at once, with the file or sample named.
"""

from __future__ import annotations

import errno
from typing import Optional, Tuple

TASK_RETRIES = 3

TRANSIENT = (ConnectionError, TimeoutError)  # TransientFault (a failpoint's) included


class InputError(ValueError):
    """The input is wrong (a spec, a flag, a data, weights or model-config file), phrased as one line naming it:
    exit 2.  A ``ValueError``, so code that checks its input through a library still catches it as one."""


class InputNotFound(InputError, FileNotFoundError):
    """An input the user named (a source folder, a weights or model-config file, a run directory) is not there:
    exit 2, and still a ``FileNotFoundError`` to code that looks for one."""


class StorageError(OSError):
    """Storage that cannot take the run's files (full, say), phrased as one line naming the file: exit 1 (a rerun
    once there is room completes the run)."""


class RunFailed(RuntimeError):
    """A stage that stopped for a reason it states (non-finite training steps, say): one line, exit 1."""


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
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
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
    chain = list(_chain(exc))
    for e in chain:  # the most specific verdict wins, wherever it sits in the chain
        if isinstance(e, InputError):
            return 2, _first_line(e)
    for e in chain:
        if isinstance(e, (RunFailed, StorageError)):
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
    return None
