"""Credentials for a submitted job, passed by name (``gradmimic submit --env NAME``) and kept out of its metadata.

Ray shows a job's runtime environment (``env_vars`` included) to anyone who can list jobs, so values never go
there.  ``submit`` writes them to :data:`FILE` (mode 600) in the job's working directory, which Ray ships as a
package and unpacks on each node.  The job's entrypoint runs through this module (``python -m pipelines.ops.jobenv
CMD...``: the variables are set, then CMD is executed in place), and :func:`load` is the job's
``worker_process_setup_hook``, run in every Ray worker process before it runs any task or actor.  Stdlib only:
every worker imports it.
"""

from __future__ import annotations

import json
import os
import sys

FILE = ".gradmimic-job-env.json"
HOOK = "pipelines.ops.jobenv.load"


def write(directory: str, values: dict) -> None:
    path = os.path.join(directory, FILE)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(values, f)


def load() -> None:
    """Set the job's variables in this process, if its working directory has them (a no-op elsewhere)."""
    path = os.path.join(os.getcwd(), FILE)
    if os.path.exists(path):
        with open(path) as f:
            os.environ.update({str(k): str(v) for k, v in json.load(f).items()})


if __name__ == "__main__":
    load()
    os.execvp(sys.argv[1], sys.argv[1:])
