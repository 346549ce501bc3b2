"""Run a spec: stages in order, each into ``<storage>/<run>/<stage>/``, skipping what is already committed.

A stage's config hash covers its resolved config, the hashes of the stages it reads, and the package version;
a rerun skips a committed stage whose hash matches and reruns the rest, and every stage that reads a stage rerun
in the same invocation (``force`` reruns named stages, so their readers too).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import posixpath
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, TextIO

from gradmimic import __version__
from pipelines.formats.report import RESOLVED_SPEC
from pipelines.run import failpoints
from pipelines.run.config import SpecError, config_refs, to_plain
from pipelines.run.context import Progress, StageContext
from pipelines.run.errors import InputError
from pipelines.run.registry import STAGES
from pipelines.run.spec import Spec, StageSpec, check_spec, dump_spec
from pipelines.run.storage import StageDir, is_local, open_storage

VERSION = __version__  # in every config hash: a release that changes what stages write reruns them


def config_hash(stage: StageSpec, input_hashes: Dict[str, str]) -> str:
    payload = {"stage": stage.stage, "config": to_plain(stage.config), "inputs": input_hashes, "version": VERSION}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def stage_inputs(stage: StageSpec) -> List[str]:
    return list(dict.fromkeys(name for _, _, name in config_refs(stage.config)))


def local_ray_defaults() -> None:
    """Settings for a Ray on one machine, before it starts (its processes inherit them; a user's value wins): no
    node can be preempted, so no preemption watcher (one actor process fewer per train stage), and Ray Train's
    controller polls its workers every 0.5 s instead of 2 s (a short stage ends sooner)."""
    import os

    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


def init_ray(spec: Spec) -> None:
    import ray

    if ray.is_initialized():
        return
    if spec.ray.address == "local":
        local_ray_defaults()
        # address="local": a new Ray here, even where `ray start` left a cluster to auto-connect to
        ray.init(address="local", num_cpus=spec.ray.num_cpus, dashboard_host="127.0.0.1",
                 log_to_driver=False, configure_logging=False)
    else:
        address = spec.ray.address
        hostport = address.split("://", 1)[-1]
        if address != "auto":  # a wrong address fails in seconds here, not after Ray's minute of retries
            import socket

            host, _, port = hostport.rpartition(":")
            try:
                socket.create_connection((host, int(port)), timeout=5).close()
            except OSError as exc:
                raise SpecError(f"{spec.source}: ray.address: nothing answers at {address} ({exc.strerror or exc}); "
                                "is the cluster up, and is this its head's address?") from None
        try:
            ray.init(address=address, log_to_driver=False)
        except (ConnectionError, RuntimeError) as exc:
            raise SpecError(f"{spec.source}: ray.address: {address}: {str(exc).strip().splitlines()[0]}") from None


def require_shared_storage(spec: Spec, fs) -> None:
    """A local storage path only works where every task runs on this machine: refuse it on a multi-node cluster."""
    import ray

    if not is_local(fs):
        return
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) > 1:
        raise SpecError(f"{spec.source}: storage: {spec.storage!r} is a local path, but the Ray cluster has "
                        f"{len(nodes)} nodes and tasks on the others cannot reach it: give shared storage "
                        "(an s3:// prefix)")


def run_spec(spec: Spec, force: Sequence[str] = (), stream: TextIO = sys.stderr) -> Dict[str, Dict[str, Any]]:
    """Run every stage; returns each stage's manifest."""
    unknown = [f for f in force if f not in {s.name for s in spec.stages}]
    if unknown:
        raise InputError(f"--force {unknown[0]}: no stage of that name in {spec.source}")
    check_spec(spec)
    fs, root = open_storage(spec.storage, spec.storage_options)
    ray_ready = spec.ray.address != "local"
    if ray_ready:  # a cluster: before anything is written, make sure every node can reach the storage
        init_ray(spec)
        require_shared_storage(spec, fs)
    run_root = posixpath.join(root, spec.name)
    fs.makedirs(run_root, exist_ok=True)
    with fs.open(posixpath.join(run_root, RESOLVED_SPEC), "wb") as f:
        f.write(dump_spec(spec).encode())
    progress = Progress(stream)
    hashes: Dict[str, str] = {}
    manifests: Dict[str, Dict[str, Any]] = {}
    ran: set = set()  # stages (re)run by this invocation: whatever reads them must rerun too
    total_start = time.perf_counter()
    for n, stage in enumerate(spec.stages, 1):
        inputs = stage_inputs(stage)
        h = config_hash(stage, {name: hashes[name] for name in inputs})
        hashes[stage.name] = h
        out = StageDir(fs, posixpath.join(run_root, stage.name))
        label = f"[{n}/{len(spec.stages)}] {stage.stage} {stage.name}"
        committed = out.manifest()
        # a committed stage stands if its config and the attempts it read are still the committed ones (an input
        # rerun by an invocation that stopped before this stage leaves it stale: its files may point into the old
        # one); a manifest that records none (written by a tool, such as the benches' prepared stages) is trusted
        read = {name: manifests[name].get("attempt") for name in inputs}
        if committed and committed.get("config_hash") == h and stage.name not in force and not ran & set(inputs) \
                and committed.get("input_attempts", read) == read:
            manifests[stage.name] = committed
            stream.write(f"{label}: committed, skipped (config {h})\n")
            continue
        if not ray_ready:
            init_ray(spec)
            ray_ready = True
        definition = STAGES[stage.stage]
        # an unfinished attempt continues, unless this invocation forced it or rewrote one of its inputs
        reopened = out.begin(h, resume=definition.resumable and stage.name not in force and not ran & set(inputs),
                             inputs=read)
        if reopened:
            stream.write(f"{label}: continuing the unfinished attempt {out.attempt}\n")
        started, t0 = time.time(), time.perf_counter()
        ctx = StageContext(out, {name: StageDir(fs, posixpath.join(run_root, name)) for name in inputs}, label, progress,
                           dict(spec.storage_options), spec.ray.address, stage.name)
        with _stage_failure(spec, stage, out, definition.resumable):
            try:
                result = definition.run(stage.config, ctx)
            except SpecError as exc:  # a problem only the inputs reveal: still the user's, still one line
                if not reopened:
                    out.abandon()  # checks run before anything is written: leave no attempt behind
                raise SpecError(f"{spec.source}: stage {stage.name!r} ({stage.stage}): {exc}") from None
            seconds = time.perf_counter() - t0
            if "rejected" in result and result["rows_in"] != result["rows_out"] + result["rejected"]:
                raise RuntimeError(f"{label}: row counts do not add up: {result}")  # a bug, never user error
            manifest = {
                "stage": stage.stage, "name": stage.name, "config_hash": h, "config": to_plain(stage.config),
                "inputs": {name: hashes[name] for name in inputs}, "input_attempts": read, "version": VERSION,
                "timings": {"started": started, "seconds": round(seconds, 3)}, **result,
            }
            failpoints.hit(f"commit:{stage.name}")
            manifests[stage.name] = manifest = out.commit(manifest)
        ran.add(stage.name)
        rate = result["rows_in"] / max(seconds, 1e-9)
        rejected = f"{result['rejected']} rejected" if "rejected" in result else f"from {result['rows_in']} rows in"
        stream.write(f"{label}: {result['rows_out']} rows out, {rejected}, "
                     f"{seconds:.1f}s ({rate:,.0f} rows/s) -> {out.url}\n")
    stream.write(f"done: {len(spec.stages)} stages in {time.perf_counter() - total_start:.1f}s, run {spec.name} "
                 f"in {fs.unstrip_protocol(run_root)}\n")
    return manifests


@contextlib.contextmanager
def _stage_failure(spec: Spec, stage: StageSpec, out: StageDir, resumable: bool):
    """A stage that fails (not for its spec): its attempt is removed unless a rerun can resume it (which frees
    the space on a full disk), and the error learns where it happened, for the CLI's one line."""
    try:
        yield
    except SpecError:
        raise
    except Exception as exc:
        if not resumable:
            with contextlib.suppress(Exception):
                if (out.manifest() or {}).get("attempt") != out.attempt:  # never one its manifest names
                    out.abandon()
        with contextlib.suppress(AttributeError):
            exc.gradmimic_where = f"{spec.source}: stage {stage.name!r} ({stage.stage})"
        raise


def committed_stage(spec: Spec, name: str) -> Optional[StageDir]:
    """A stage's directory if it is committed (readers ignore the rest)."""
    fs, root = open_storage(spec.storage, spec.storage_options)
    d = StageDir(fs, posixpath.join(root, spec.name, name))
    return d if d.manifest() is not None else None

