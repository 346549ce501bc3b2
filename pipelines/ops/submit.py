"""``gradmimic submit``, ``status`` and ``logs``: a spec as a Ray job on a cluster (Ray's job submission API).

The spec is checked here first (a wrong spec never reaches the cluster), then travels with the job: its resolved
form (overrides applied, every default filled in) is the only file of the job's working directory, and the
entrypoint is ``python -m pipelines run spec.yaml`` (through :mod:`pipelines.ops.jobenv`) with ``ray.address`` set to ``auto`` (the job's driver
joins the cluster it runs on).  The package itself is either installed on the cluster's image (the default) or
shipped with ``--ship-package`` (the local ``gradmimic`` and ``pipelines`` sources as ``py_modules``; their
dependencies must still be on the image).  ``--runtime-env FILE`` merges a runtime-env YAML (``pip``,
``env_vars``, ...).  ``--env NAME`` passes an environment variable of this shell to the job by name: its value
travels in a private file of the job's working directory (:mod:`pipelines.ops.jobenv`), and is never printed, written
to the spec, a manifest or the job's metadata.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Any, Dict, Optional

from pipelines.run.config import SpecError

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
SPEC_FILE = "spec.yaml"


def add_arguments(sub) -> None:
    p = sub.add_parser("submit", help="run a spec as a Ray job on a cluster and follow it")
    p.add_argument("spec")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    _address(p)
    p.add_argument("--no-wait", action="store_true", help="print the submission id and return")
    p.add_argument("--env", action="append", default=[], metavar="NAME",
                   help="pass this environment variable to the job (e.g. AWS_SECRET_ACCESS_KEY); repeatable")
    p.add_argument("--runtime-env", metavar="FILE", help="a runtime-env YAML merged into the job's")
    p.add_argument("--ship-package", action="store_true",
                   help="upload the local gradmimic and pipelines sources (else they must be installed there)")
    p.add_argument("--force", action="append", default=[], metavar="STAGE", help="passed to gradmimic run")
    p.add_argument("--max-parallel", type=int, metavar="N", help="passed to gradmimic run")
    p.set_defaults(func=submit)
    p = sub.add_parser("status", help="a submitted job's status")
    p.add_argument("job_id")
    _address(p)
    p.set_defaults(func=status)
    p = sub.add_parser("logs", help="a submitted job's logs (--follow: until it ends)")
    p.add_argument("job_id")
    _address(p)
    p.add_argument("--follow", action="store_true")
    p.set_defaults(func=logs)


def _address(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                   help="the cluster's job server, e.g. http://HEAD:8265 (default: $RAY_ADDRESS)")


def client(address: Optional[str]):
    from ray.job_submission import JobSubmissionClient

    if not address:
        raise SpecError("--address: give the cluster's job server (http://HEAD:8265) or set RAY_ADDRESS")
    try:
        return JobSubmissionClient(address)
    except Exception as exc:  # noqa: BLE001 - connection errors of several kinds: one line
        raise SpecError(f"--address {address}: no Ray job server answers ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''})") from None


def job_runtime_env(args: argparse.Namespace, working_dir: str) -> Dict[str, Any]:
    from pipelines.run.yaml_text import load_yaml, read_local

    env: Dict[str, Any] = {}
    if args.runtime_env:
        label = f"--runtime-env {args.runtime_env}"
        try:
            raw = read_local(args.runtime_env)
        except OSError as exc:
            raise SpecError(f"{label}: {exc.strerror or exc}") from None
        env = load_yaml(raw, label, label) or {}
        if not isinstance(env, dict):
            raise SpecError(f"--runtime-env {args.runtime_env}: expected a mapping")
    env["working_dir"] = working_dir
    if args.ship_package:
        import gradmimic
        import pipelines

        env["py_modules"] = list(env.get("py_modules") or []) + [os.path.dirname(gradmimic.__file__),
                                                                 os.path.dirname(pipelines.__file__)]
        # the nodes run the source, not an installed distribution: they learn its version from here
        env["env_vars"] = {**(env.get("env_vars") or {}), gradmimic.VERSION_ENV: gradmimic.__version__}
    missing = [name for name in args.env if name not in os.environ]
    if missing:
        raise SpecError(f"--env {missing[0]}: not set in this environment")
    if args.env:  # values in a private file of the working dir, never in the job's (visible) runtime env
        from pipelines.ops.jobenv import HOOK, write

        write(working_dir, {name: os.environ[name] for name in args.env})
        if env.get("worker_process_setup_hook"):
            raise SpecError(f"--runtime-env {args.runtime_env}: worker_process_setup_hook is taken by --env")
        env["worker_process_setup_hook"] = HOOK
    return env


def submit(args: argparse.Namespace) -> None:
    import dataclasses

    from pipelines.run.spec import check_spec, dump_spec, load_spec

    spec = load_spec(args.spec, args.overrides)
    check_spec(spec)
    if spec.ray.address == "local":  # on the cluster, the job's driver joins the cluster it runs on
        spec = dataclasses.replace(spec, ray=dataclasses.replace(spec.ray, address="auto", num_cpus=None))
    jobs = client(args.address)
    with tempfile.TemporaryDirectory(prefix="gradmimic-job-") as tmp:
        with open(os.path.join(tmp, SPEC_FILE), "w", encoding="utf-8") as f:
            f.write(dump_spec(spec))
        force = "".join(f" --force {name}" for name in args.force)
        if args.max_parallel is not None:
            force += f" --max-parallel {int(args.max_parallel)}"
        job_id = jobs.submit_job(entrypoint=f"python -m pipelines.ops.jobenv python -m pipelines run {SPEC_FILE}{force}",
                                 runtime_env=job_runtime_env(args, tmp),
                                 metadata={"gradmimic_spec": spec.name, "gradmimic_source": os.path.basename(args.spec)})
    print(f"submitted {job_id} ({spec.name}) to {args.address}", file=sys.stderr)
    if args.no_wait:
        print(job_id)
        return
    _follow(jobs, job_id)
    _exit_with(jobs, job_id)


def _follow(jobs, job_id: str) -> None:
    import asyncio

    async def tail() -> None:
        async for chunk in jobs.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    asyncio.run(tail())


def _final_status(jobs, job_id: str, timeout: float = 60.0) -> str:
    """The job's status once terminal (the log stream can end a moment before the status is recorded)."""
    deadline = time.monotonic() + timeout
    while True:
        state = str(jobs.get_job_status(job_id).value)
        if state in TERMINAL or time.monotonic() > deadline:
            return state
        time.sleep(0.5)


def _exit_with(jobs, job_id: str) -> None:
    state = _final_status(jobs, job_id)
    if state != "SUCCEEDED":
        message = (jobs.get_job_info(job_id).message or "").strip().splitlines()
        print(f"gradmimic: job {job_id} {state}" + (f": {message[-1]}" if message else ""), file=sys.stderr)
        raise SystemExit(1)
    print(f"job {job_id} SUCCEEDED", file=sys.stderr)


def status(args: argparse.Namespace) -> None:
    jobs = client(args.address)
    info = _job_info(jobs, args.job_id)
    print(f"{args.job_id} {info.status.value}" + (f": {info.message}" if info.message else ""))


def logs(args: argparse.Namespace) -> None:
    jobs = client(args.address)
    _job_info(jobs, args.job_id)
    if args.follow:
        _follow(jobs, args.job_id)
        _exit_with(jobs, args.job_id)
    else:
        sys.stdout.write(jobs.get_job_logs(args.job_id))


def _job_info(jobs, job_id: str):
    try:
        return jobs.get_job_info(job_id)
    except RuntimeError as exc:
        raise SpecError(f"job {job_id}: {str(exc).splitlines()[0]}") from None
