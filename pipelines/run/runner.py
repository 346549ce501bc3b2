"""Run a spec: each stage into ``<storage>/<run>/<stage>/`` once the stages it reads are done, independent stages at
once (as the cluster's resources allow), skipping what is already committed.

A stage's config hash covers its resolved config, the hashes of the stages it reads, and the package version;
a rerun skips a committed stage whose hash matches and reruns the rest, and every stage that reads a stage rerun
in the same invocation (``force`` reruns named stages, so their readers too).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import posixpath
import queue
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Sequence, TextIO, Tuple

from gradmimic import __version__
from pipelines.formats.report import RESOLVED_SPEC
from pipelines.run import failpoints
from pipelines.run.config import SpecError, config_refs, to_plain
from pipelines.run.context import Progress, StageContext
from pipelines.run.errors import InputError
from pipelines.run.registry import STAGES
from pipelines.run.spec import Spec, StageSpec, check_spec, dump_spec
from pipelines.run.storage import StageDir, is_local, open_storage
from pipelines.training import groups

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


def make_run_root(spec: Spec, fs, run_root: str) -> None:
    """The run's folder, made before anything else: local storage that is a file, or where this user cannot write,
    is the spec's fault (exit 2), found before Ray starts."""
    import errno

    try:
        fs.makedirs(run_root, exist_ok=True)
    except OSError as exc:
        if not is_local(fs) or exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST,
                                                 errno.ENOENT):
            raise
        path = run_root  # the nearest existing path above: a file there is the usual mistake
        while not fs.exists(path) and posixpath.dirname(path) != path:
            path = posixpath.dirname(path)
        if not fs.isdir(path):
            raise SpecError(f"{spec.source}: storage: {path} is a file, not a folder") from None
        raise SpecError(f"{spec.source}: storage: cannot make {run_root} ({exc.strerror})") from None


def run_spec(spec: Spec, force: Sequence[str] = (), stream: TextIO = sys.stderr,
             max_parallel: Optional[int] = None) -> Dict[str, Dict[str, Any]]:
    """Run every stage, each once its inputs are committed, as many at once as the cluster's resources allow (at most
    ``max_parallel``; 1: one after another, in the file's order); returns each stage's manifest."""
    unknown = [f for f in force if f not in {s.name for s in spec.stages}]
    if unknown:
        raise InputError(f"--force {unknown[0]}: no stage of that name in {spec.source}")
    if max_parallel is not None and max_parallel < 1:
        raise InputError(f"--max-parallel {max_parallel}: must be at least 1")
    check_spec(spec)
    fs, root = open_storage(spec.storage, spec.storage_options)
    ray_ready = spec.ray.address != "local"
    if ray_ready:  # a cluster: before anything is written, make sure every node can reach the storage
        init_ray(spec)
        require_shared_storage(spec, fs)
    run_root = posixpath.join(root, spec.name)
    make_run_root(spec, fs, run_root)
    with fs.open(posixpath.join(run_root, RESOLVED_SPEC), "wb") as f:
        f.write(dump_spec(spec).encode())
    total_start = time.perf_counter()
    manifests = _Graph(spec, fs, run_root, set(force), stream, max_parallel, ray_ready).run()
    stream.write(f"done: {len(spec.stages)} stages in {time.perf_counter() - total_start:.1f}s, run {spec.name} "
                 f"in {fs.unstrip_protocol(run_root)}\n")
    return manifests


class _Graph:
    """The stages as a graph: each starts once every stage it reads is done (committed, or skipped as committed
    before), if the CPUs and GPUs it holds (:attr:`StageDef.needs`) are free; the first in the file's order first,
    later ones filling what is left.  A stage runs on a thread of its own (its work is on Ray); a failure starts
    nothing new, lets the running stages finish, and is raised then."""

    def __init__(self, spec: Spec, fs, run_root: str, force: set, stream: TextIO, max_parallel: Optional[int],
                 ray_ready: bool) -> None:
        self.spec, self.fs, self.run_root, self.force = spec, fs, run_root, force
        self.max_parallel, self.ray_ready = max_parallel, ray_ready
        self.progress = Progress(stream)
        self.hashes: Dict[str, str] = {}
        for stage in spec.stages:  # a stage's hash covers its inputs' (earlier stages')
            self.hashes[stage.name] = config_hash(stage, {i: self.hashes[i] for i in stage_inputs(stage)})
        self.manifests: Dict[str, Dict[str, Any]] = {}
        self.ran: set = set()  # stages (re)run by this invocation: whatever reads them must rerun too
        self.finished: "queue.Queue[tuple]" = queue.Queue()
        self.running: Dict[str, Tuple[float, float]] = {}  # name -> the (CPUs, GPUs) it holds
        self.capacity: Optional[Tuple[float, float]] = None  # the cluster's (CPUs, GPUs), once Ray is up

    def run(self) -> Dict[str, Dict[str, Any]]:
        wait = 60.0  # for the train worker groups to end (their CPUs free for whatever runs next on this Ray)
        try:
            return self._run()
        except KeyboardInterrupt as exc:  # the CLI says what was running and what a rerun does
            exc.gradmimic_interrupted = self._interrupted()
            wait = 0.0
            raise
        finally:
            groups.close_all(wait)
            self.progress.close()

    def _interrupted(self) -> str:
        running = [self.spec.stage(name) for name in self.running]
        if not running:
            return "between stages; a rerun skips the committed ones"
        names = ", ".join(f"{st.name!r} ({st.stage})" for st in running)
        resumed = [st.name for st in running if STAGES[st.stage].resumable]
        again = [st.name for st in running if not STAGES[st.stage].resumable]
        plan = "; ".join(part for part in (
            f"resumes {', '.join(map(repr, resumed))} from the last checkpoint" if resumed else "",
            f"runs {', '.join(map(repr, again))} again" if again else "") if part)
        return f"while running {names}; a rerun skips the committed stages and {plan}"

    def _run(self) -> Dict[str, Dict[str, Any]]:
        pending = list(enumerate(self.spec.stages, 1))
        failure: Optional[BaseException] = None
        while pending or self.running:
            if failure is None:
                pending = self._start_ready(pending)
            if not self.running:
                break
            name, result = self.finished.get()
            del self.running[name]
            if isinstance(result, BaseException):
                failure = failure or result
            else:
                self.manifests[name] = result
                self.ran.add(name)
        if failure is not None:
            raise failure
        return self.manifests

    def _start_ready(self, pending: List[Tuple[int, StageSpec]]) -> List[Tuple[int, StageSpec]]:
        """Skip or start every pending stage that can go now (in order); the rest stay pending."""
        waiting = []
        for n, stage in pending:
            inputs = stage_inputs(stage)
            if any(i not in self.manifests for i in inputs):
                waiting.append((n, stage))
                continue
            label = f"[{n}/{len(self.spec.stages)}] {stage.stage} {stage.name}"
            out = StageDir(self.fs, posixpath.join(self.run_root, stage.name))
            read = {name: self.manifests[name].get("attempt") for name in inputs}
            committed = out.manifest()
            h = self.hashes[stage.name]
            # a committed stage stands if its config and the attempts it read are still the committed ones (an input
            # rerun by an invocation that stopped before this stage leaves it stale: its files may point into the old
            # one); a manifest that records none (written by a tool, such as the benches' prepared stages) is trusted
            if committed and committed.get("config_hash") == h and stage.name not in self.force \
                    and not self.ran & set(inputs) and committed.get("input_attempts", read) == read:
                self.manifests[stage.name] = committed
                self.progress.write(f"{label}: committed, skipped (config {h})")
                continue
            needs = self._needs(stage)
            if self.running and (len(self.running) == self.max_parallel or not self._fits(needs)):
                waiting.append((n, stage))
                continue
            self._start(stage, label, out, read, needs)
        return waiting  # (inputs come earlier in the file: a skip above readies the stages below it in this pass)

    def _cluster(self) -> Tuple[float, float]:
        """The cluster's (CPUs, GPUs); Ray starts here for the first stage that runs."""
        if self.capacity is None:
            import ray

            if not self.ray_ready:
                init_ray(self.spec)
                self.ray_ready = True
            res = ray.cluster_resources()
            self.capacity = (float(res.get("CPU", 0)), float(res.get("GPU", 0)))
            self._check_fits(self.spec.stages)  # before the first stage that runs starts
        return self.capacity

    @staticmethod
    def _held(stage: StageSpec) -> Optional[Tuple[float, float]]:
        """The (CPUs, GPUs) the stage declares it holds; ``None``: the whole cluster."""
        needs = STAGES[stage.stage].needs
        return needs(stage.config) if needs is not None else None

    def _needs(self, stage: StageSpec) -> Tuple[float, float]:
        """The (CPUs, GPUs) the stage holds, at most the cluster's."""
        cluster, held = self._cluster(), self._held(stage)
        return cluster if held is None else (min(held[0], cluster[0]), min(held[1], cluster[1]))

    def _check_fits(self, stages: Sequence[StageSpec]) -> None:
        """A stage that needs more CPUs or GPUs than the cluster has would wait for ever: on a Ray started here that
        is the spec's fault, refused before anything runs; a cluster may still grow (an autoscaler), so there it is
        a note."""
        cluster = self.capacity
        for stage in stages:
            held = self._held(stage)
            if held is None or all(held[k] <= cluster[k] + 1e-9 for k in (0, 1)):
                continue
            text = (f"{STAGES[stage.stage].needs_field}: needs {held[0]:g} CPUs and {held[1]:g} GPUs, the cluster has "
                    f"{cluster[0]:g} CPUs and {cluster[1]:g} GPUs")
            if self.spec.ray.address == "local":
                raise SpecError(f"{self.spec.source}: stage {stage.name!r} ({stage.stage}): {text} (ask for less, or "
                                "for more with ray.num_cpus)")
            self.progress.write(f"note: stage {stage.name!r} ({stage.stage}): {text}: it waits for the cluster to grow")

    def _fits(self, needs: Tuple[float, float]) -> bool:
        cluster = self._cluster()
        return all(sum(r[k] for r in self.running.values()) + needs[k] <= cluster[k] + 1e-9 for k in (0, 1))

    def _start(self, stage: StageSpec, label: str, out: StageDir, read: Dict[str, Any],
               needs: Tuple[float, float]) -> None:
        definition = STAGES[stage.stage]
        # idle train worker groups hold CPUs the runner counts as free: keep those this stage leaves free (and one it
        # can take), stop the rest
        cluster = self._cluster()
        room = tuple(cluster[k] - sum(r[k] for r in self.running.values()) - needs[k] for k in (0, 1))
        groups.release_idle(stage.name, keep=definition.reuses(stage.config) if definition.reuses else None, room=room)
        inputs = stage_inputs(stage)
        # an unfinished attempt continues, unless this invocation forced it or rewrote one of its inputs
        resume = definition.resumable and stage.name not in self.force and not self.ran & set(inputs)
        reopened = out.begin(self.hashes[stage.name], resume=resume, inputs=read)
        if reopened:
            self.progress.write(f"{label}: continuing the unfinished attempt {out.attempt}")
        ctx = StageContext(out, {name: StageDir(self.fs, posixpath.join(self.run_root, name)) for name in inputs},
                           label, self.progress, dict(self.spec.storage_options), self.spec.ray.address, stage.name)

        def body() -> None:
            try:
                result: Any = self._run_stage(stage, ctx, read, reopened)
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread, raised there
                result = exc
            finally:
                groups.unreserve(stage.name)
                self.progress.drop(label)
            self.finished.put((stage.name, result))

        self.running[stage.name] = needs
        threading.Thread(target=body, name=f"stage {stage.name}", daemon=True).start()

    def _run_stage(self, stage: StageSpec, ctx: StageContext, read: Dict[str, Any], reopened: bool) -> Dict[str, Any]:
        spec, out, label = self.spec, ctx.out, ctx.label
        definition = STAGES[stage.stage]
        started, t0 = time.time(), time.perf_counter()
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
            inputs = stage_inputs(stage)
            manifest = {
                "stage": stage.stage, "name": stage.name, "config_hash": self.hashes[stage.name],
                "config": to_plain(stage.config), "inputs": {name: self.hashes[name] for name in inputs},
                "input_attempts": read, "version": VERSION,
                "timings": {"started": started, "seconds": round(seconds, 3)}, **result,
            }
            failpoints.hit(f"commit:{stage.name}")
            manifest = out.commit(manifest)
        self.progress.drop(label)
        rate = result["rows_in"] / max(seconds, 1e-9)
        rejected = f"{result['rejected']} rejected" if "rejected" in result else f"from {result['rows_in']} rows in"
        self.progress.write(f"{label}: {result['rows_out']} rows out, {rejected}, "
                            f"{seconds:.1f}s ({rate:,.0f} rows/s) -> {out.url}")
        return manifest


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

