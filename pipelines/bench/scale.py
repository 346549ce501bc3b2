"""``gradmimic bench scale``: the pipeline end to end on a generated DataComp pool, stage by stage, with memory.

A DataComp-layout pool of ``--rows`` samples (:mod:`pipelines.bench.poolgen`: tiny JPEGs, ``--per-tar`` per tar,
the metadata parquet with 1% more rows than the tars hold, as failed downloads leave them) is written once under
``--cache`` and reused.  A spec built here (the shape of the shipped specs) then runs through the runner, one
stage at a time, into a fresh run directory on local storage:

- ``ingest`` (``kind: datacomp``, indexed in place, 1% test split);
- ``train`` (``mode: grand``: scored without a reference, so the log has scores; the tiny CLIP, ``--steps`` steps
  of ``--batch-size``, 2 workers; evaluation on at most 256 test rows);
- ``aggregate`` (the log to one utility row per scored uid);
- ``filter`` (the paper's combined rule, CLIP score top 30% minus ``mean_score`` bottom 20%, over the scored rows;
  the rows the few steps never drew are dropped as unscored, so the kept shards stay small and the stage's cost is
  the pool's join, decision and rejects).

For each stage: ``wall_s``; ``rows`` (the rows it processed: ingest and filter the pool's, train the samples its
steps drew, aggregate the score log's) and ``rows_per_core_s`` (rows / wall / cores, ``cores`` the CPUs Ray
may use); ``driver_peak_mb``, the driver's exact peak resident set during the stage (Linux: its high-water mark,
reset before the stage through ``/proc/self/clear_refs``; elsewhere sampled), and ``driver_growth_mb``, that peak
less its resident set just before the stage; ``worker_peak_mb``, the largest resident set of any Ray worker
process (a task's or an actor's) sampled at 5 Hz during the stage while it ran a task or hosted an actor (not
while idle: a worker keeps what an earlier stage's task grew it to), with ``worker_peak_task`` its process title;
``cpu_s``, the CPU seconds of the driver and every Ray worker during the stage (sampled, so approximate: a
worker that starts and exits between two samples is missed), and ``rows_per_cpu_s``, rows per CPU second: on a
shared machine, where wall time also counts other people's work, the rate to size a cluster from.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import sys
import tempfile
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

from pipelines.bench import print_result
from pipelines.run.errors import InputError

KEEP = {"minus": [{"clip_b32_similarity_score": {"top": 0.3}}, {"mean_score": {"bottom": 0.2}}]}
MB = 2 ** 20
AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")  # Ray's per-node agents: not workers


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rows", type=int, default=200_000, help="pool samples (in the tars)")
    p.add_argument("--per-tar", type=int, default=10_000, help="samples per webdataset tar")
    p.add_argument("--seed", type=int, default=0, help="the generated pool's seed")
    p.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "gradmimic-bench-scale"),
                   help="where generated pools are kept and reused (one folder per rows / per-tar / seed)")
    p.add_argument("--dir", default=None, help="run directory (kept); default: a temporary one, removed at the end")
    p.add_argument("--steps", type=int, default=8, help="train steps")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--shard-size", type=int, default=100_000,
                   help="ingest's rows per uid partition and the filter's kept rows per shard")
    p.add_argument("--num-cpus", type=int, default=0, help="Ray's logical CPUs (0: max(4, cores))")
    p.add_argument("--until", choices=("ingest", "train", "aggregate", "filter"), default="filter",
                   help="run the stages up to this one only")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def stages(pool: str, args) -> List[Dict[str, Any]]:
    return [
        {"stage": "ingest", "name": "pool", "source": {"kind": "datacomp", "path": pool},
         "split": {"test_fraction": 0.01, "seed": 0}, "shard_size": args.shard_size},
        {"stage": "train", "name": "train", "data": "pool", "mode": "grand", "model": {"arch": "tiny-clip"},
         "batch_size": args.batch_size, "steps": args.steps, "checkpoint_every": args.steps, "eval_samples": 256,
         "optimizer": {"lr": 5e-4}, "resources": {"num_workers": 2}},
        {"stage": "aggregate", "name": "utility", "scores": "train"},
        {"stage": "filter", "name": "kept", "data": "pool", "utility": "utility", "keep": KEEP, "unscored": "drop",
         "shard_size": args.shard_size},
    ]


# ------------------------------------------------------------------------------------------------ memory


def _status_kb(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak() -> bool:
    """Reset this process's resident high-water mark (Linux); ``False`` where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return _status_kb("VmHWM") is not None
    except OSError:
        return False


class Sampler:
    """At ``hz``: the driver's resident set (only where its high-water mark cannot be reset), and every Ray worker
    process's (the driver's descendants titled ``ray::...``) peak resident set and CPU time."""

    def __init__(self, exact: bool, hz: float = 5.0) -> None:
        import psutil

        self.me, self.exact, self.interval = psutil.Process(), exact, 1.0 / hz
        self.driver_peak = self.me.memory_info().rss
        self.worker_peak, self.worker_title = 0, ""
        self.cpu: Dict[int, Tuple[float, float]] = {}  # pid: (cpu at first sight, latest)
        self.t0 = time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _poll(self) -> None:
        import psutil

        if not self.exact:
            self.driver_peak = max(self.driver_peak, self.me.memory_info().rss)
        for p in self.me.children(recursive=True):
            try:
                with p.oneshot():
                    title = " ".join(p.cmdline())
                    if not title.startswith("ray::") or title.startswith(AGENTS):
                        continue
                    rss, t = p.memory_info().rss, p.cpu_times()
                    cpu = t.user + t.system
                    new = p.create_time() >= self.t0
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            first = self.cpu.get(p.pid, (0.0 if new else cpu, cpu))[0]
            self.cpu[p.pid] = (first, cpu)
            # an idle worker's resident set is what an earlier task grew it to, not this stage's
            if rss > self.worker_peak and not title.startswith("ray::IDLE"):
                self.worker_peak, self.worker_title = rss, title.split()[0]

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._poll()

    def __enter__(self) -> "Sampler":
        self._poll()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._poll()

    @property
    def worker_cpu(self) -> float:
        return sum(last - first for first, last in self.cpu.values())


# ------------------------------------------------------------------------------------------------ the run


def stage_rows(stage: str, manifest: Dict[str, Any], args) -> int:
    """The rows a stage processed: the train stage's drawn samples, the others' rows in."""
    return args.steps * args.batch_size if stage == "train" else int(manifest["rows_in"])


def measure_stage(spec, name: str, args, cores: int, quiet: bool) -> Dict[str, Any]:
    import psutil

    from pipelines.run.runner import run_spec

    me = psutil.Process()
    base = me.memory_info().rss
    exact = reset_peak()
    cpu0 = sum(me.cpu_times()[:2])
    with Sampler(exact) as s:
        t0 = time.perf_counter()
        manifest = run_spec(spec, max_parallel=1, stream=io.StringIO() if quiet else sys.stderr)[name]
        wall = time.perf_counter() - t0
    peak = (_status_kb("VmHWM") or 0) * 1024 if exact else s.driver_peak
    kind = spec.stages[-1].stage
    cpu = sum(me.cpu_times()[:2]) - cpu0 + s.worker_cpu
    rows = stage_rows(kind, manifest, args)
    out = {"wall_s": round(wall, 2), "rows": rows, "rows_per_core_s": round(rows / wall / cores, 1),
           "driver_base_mb": round(base / MB, 1), "driver_peak_mb": round(peak / MB, 1),
           "driver_growth_mb": round((peak - base) / MB, 1), "driver_peak_exact": exact,
           "worker_peak_mb": round(s.worker_peak / MB, 1), "worker_peak_task": s.worker_title,
           "cpu_s": round(cpu, 1), "rows_per_cpu_s": round(rows / max(cpu, 1e-9), 1)}
    for key in ("rows_in", "rows_out", "rejected"):
        if key in manifest:
            out[key] = manifest[key]
    return out


def run(args: argparse.Namespace) -> Dict[str, Any]:
    import ray

    from pipelines.bench.poolgen import PoolShape, ensure_pool
    from pipelines.run.runner import init_ray
    from pipelines.run.spec import parse_spec

    if args.rows < 1 or args.per_tar < 1 or args.steps < 1 or args.shard_size < 1:
        raise InputError("--rows, --per-tar, --steps and --shard-size must be >= 1")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    num_cpus = args.num_cpus or max(4, cores)
    shape = PoolShape(args.rows, args.per_tar, seed=args.seed)
    t0 = time.perf_counter()
    pool, reused = ensure_pool(args.cache, shape, cores)
    generate_s = time.perf_counter() - t0
    work = os.path.abspath(args.dir) if args.dir else tempfile.mkdtemp(prefix="gradmimic-scale-")
    storage = os.path.join(work, "runs")
    if os.path.exists(storage):
        raise InputError(f"--dir {args.dir}: holds a run already (give an empty or new directory)")
    plan = stages(pool, args)
    plan = plan[:[s["stage"] for s in plan].index(args.until) + 1]
    result: Dict[str, Any] = {"rows": args.rows, "metadata_rows": shape.rows + shape.missing_rows,
                              "tars": shape.tars, "cores": min(cores, num_cpus), "ray_cpus": num_cpus,
                              "pool": pool, "pool_reused": reused, "generate_s": round(generate_s, 1)}
    specs = [parse_spec({"name": "scale", "storage": storage, "ray": {"address": "local", "num_cpus": num_cpus},
                         "stages": plan[:k]}, label="bench scale") for k in range(1, len(plan) + 1)]
    try:
        with contextlib.redirect_stdout(sys.stderr if args.json else sys.stdout):
            init_ray(specs[0])
            import psutil

            result["driver_start_mb"] = round(psutil.Process().memory_info().rss / MB, 1)
            result["stages"] = {s["name"]: measure_stage(spec, s["name"], args, result["cores"], args.json)
                                for s, spec in zip(plan, specs)}
    finally:
        ray.shutdown()
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    _print(result, args.json)
    return result


def _print(result: Dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_result(result, True)
        return
    print_result({k: v for k, v in result.items() if k != "stages"}, False)
    cols = ("wall_s", "rows", "rows_per_core_s", "rows_per_cpu_s", "cpu_s", "driver_peak_mb", "driver_growth_mb",
            "worker_peak_mb", "worker_peak_task")
    print("stage      " + "  ".join(f"{c:>16}" for c in cols))
    for name, row in result["stages"].items():
        print(f"{name:<10} " + "  ".join(f"{row[c]:>16}" for c in cols))
