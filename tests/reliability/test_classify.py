"""How the CLI reports a failure: exit code and one line (pipelines.run.errors.classify), without Ray."""

import errno

import pytest

from pipelines.run.config import SpecError
from pipelines.run.errors import InputError, InputNotFound, RunFailed, StorageError, classify
from pipelines.run.failpoints import TransientFault

pytestmark = pytest.mark.faults


def wrapped(inner: BaseException, outer: BaseException) -> BaseException:
    try:
        try:
            raise inner
        except BaseException as exc:
            raise outer from exc
    except BaseException as exc:  # noqa: BLE001 - the chained exception, as the CLI catches it
        return exc


@pytest.mark.parametrize("exc, verdict", [
    (SpecError("s.yaml: stages[0]: stage: unknown stage 'x'"), (2, "s.yaml: stages[0]: stage: unknown stage 'x'")),
    (InputError("f.parquet: not a readable parquet file\nmore"), (2, "f.parquet: not a readable parquet file")),
    (InputNotFound("weights not found: /d/w.safetensors"), (2, "weights not found: /d/w.safetensors")),
    (StorageError("storage full: [Errno 28] No space left on device: 'file:///d/x'"),
     (1, "storage full: [Errno 28] No space left on device: 'file:///d/x'")),
    (OSError(errno.ENOSPC, "No space left on device", "/d/x"),
     (1, "storage full: [Errno 28] No space left on device: '/d/x'")),
    (PermissionError(errno.EACCES, "Permission denied", "/d/x"), (2, "permission denied: [Errno 13] Permission "
                                                                     "denied: '/d/x'")),
    (PermissionError("An error occurred (InvalidAccessKeyId) when calling PutObject"),
     (2, "storage: access denied (An error occurred (InvalidAccessKeyId) when calling PutObject): check the "
         "credentials")),
    (TransientFault("connection reset"), (1, "storage or cluster unreachable: connection reset")),
    (RunFailed("3 training steps in a row had a non-finite loss"), (1, "3 training steps in a row had a non-finite "
                                                                       "loss")),
    (RuntimeError("an unexpected bug"), None),  # keeps its traceback
    (ValueError("f.parquet: not a readable parquet file"), None),  # nobody judged the input: a bug, traceback
    (KeyError("no such column"), None),
    (TypeError("unsupported operand"), None),
    (FileNotFoundError(2, "No such file or directory", "/d/x"), None),
])
def test_each_failure_gets_its_exit_code_and_one_line(exc, verdict):
    assert classify(exc) == verdict


def test_the_most_specific_cause_wins_and_the_stage_is_named():
    exc = wrapped(InputError("x.tar: bad member"), RuntimeError("task failed"))
    exc.gradmimic_where = "s.yaml: stage 'pool' (ingest)"
    assert classify(exc) == (2, "s.yaml: stage 'pool' (ingest): x.tar: bad member")
    full = wrapped(OSError(errno.ENOSPC, "No space left on device"), ValueError("while writing"))
    assert classify(full)[0] == 1  # a full disk is not the input's fault, whatever wraps it


def test_an_unexpected_key_error_in_a_task_is_a_bug_and_keeps_its_traceback():
    exc = wrapped(KeyError("uid_hi"), RuntimeError("task failed"))
    exc.gradmimic_where = "s.yaml: stage 'u' (aggregate)"
    assert classify(exc) is None
