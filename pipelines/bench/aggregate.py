"""``gradmimic bench aggregate``: the aggregate stage next to DuckDB and Ray Data's generic groupby.

One run writes a realistic score log of about ``--rows`` rows (:mod:`pipelines.bench.scorelog`: about rows / 100
uids, 64 buckets, two ranks, parquet, in a temporary directory; in a separate process, so that the generator's
memory is not counted as the driver's), then computes the mean score per uid three ways on the same files:

- ``gradmimic``: the aggregate stage run by the runner (Ray up first, so Ray's start-up is not timed), asked for
  what the other two compute (``outputs: [mean_score]``, no binarisers: it reads the columns DuckDB reads);
  ``gradmimic_threshold_rows_per_s`` is the stage with every per-sample figure and the ``threshold`` votes
  (7 columns read, no extra pass), ``gradmimic_all_binarisers_rows_per_s`` with its defaults (below);
- ``duckdb``: ``SELECT uid_hi, uid_lo, avg(score) FROM read_parquet(...) GROUP BY ALL`` with a thread per core,
  the result fetched as an Arrow table;
- ``ray_groupby``: ``ray.data.read_parquet(...).groupby(["uid_hi", "uid_lo"]).mean("score")``, its result
  fetched to the driver.  ``--ray-rows`` runs it on the first segments of the log only (about that many rows,
  every uid in them): its rows/s, and so its ratio, are then on that subset, and its agreement is checked against
  DuckDB on the same files.

The three results must agree (same uids, mean scores within 1e-6), or the command prints the numbers and exits 1.
``driver_peak_mb`` is the peak resident set of the driver process alone (sampled every 50 ms) while the stage ran
(``driver_base_mb``: before it; the CLI has imported torch by then): Ray's workers are separate processes and not
counted.  ``gradmimic_all_binarisers_rows_per_s`` (unless
``--no-all-binarisers``) is the stage again with its default binarisers (threshold, kmeans, gmm: two more light
passes over the log for the per-step fits).  Every method first runs once, untimed, on a small log (25,600 rows),
so that no timing includes starting Ray's worker processes and their imports; ``gradmimic_cold_s`` is the stage's
time on that small log, almost all of it such fixed costs.  Machines are shared and noisy:
``--repeats`` times each method that many times, alternating, and reports the median; each round starts once the
CPUs are idle, and each later round first re-warms the stage (the Ray groupby's shuffle ends its idle workers).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import multiprocessing
import os
import statistics
import sys
import tempfile
import threading
import time
from typing import Any, Dict, List, Tuple

import numpy as np

from pipelines.bench import print_result
from pipelines.formats import score_log
from pipelines.run.errors import InputError

BATCH_SIZE = 256
TOLERANCE = 1e-6


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rows", type=int, default=2_000_000, help="score-log rows (about rows / 100 uids)")
    p.add_argument("--ray-rows", type=int, default=0,
                   help="run the Ray Data groupby on the log's first segments only, about this many rows "
                        "(0: the whole log); its rows/s and ratio are then on that subset")
    p.add_argument("--segment-rows", type=int, default=2_000_000,
                   help="rows per score-log segment (one file per rank each)")
    p.add_argument("--repeats", type=int, default=1, help="time each method this many times (median)")
    p.add_argument("--no-all-binarisers", action="store_true",
                   help="skip the extra stage run with the default binarisers (threshold, kmeans, gmm)")
    p.add_argument("--dir", default=None, help="write the log and the stage's output here and keep them "
                                                "(default: a temporary directory, removed at the end)")
    p.add_argument("--json", action="store_true", help="print one JSON line")


def log_shape(rows: int) -> Tuple[int, int]:
    """``(uids, epochs)``: uids a multiple of the batch size near rows / 100, epochs so that uids x epochs ~ rows."""
    uids = max(1, round(rows / 100 / BATCH_SIZE)) * BATCH_SIZE
    return uids, max(1, round(rows / uids))


WARMUP_UIDS, WARMUP_EPOCHS = 2 * BATCH_SIZE, 50  # 25,600 rows


def _write_logs(log_dir: str, warmup_dir: str, uids: int, epochs: int, steps_per_file: int) -> int:
    """Runs in a child process: the generator's arrays never enter the driver's memory."""
    from pipelines.bench.scorelog import write_score_log
    from pipelines.run.storage import open_storage

    fs, root = open_storage(warmup_dir)
    write_score_log(fs, root, WARMUP_UIDS, WARMUP_EPOCHS, BATCH_SIZE, seed=1)
    fs, root = open_storage(log_dir)
    return int(write_score_log(fs, root, uids, epochs, BATCH_SIZE, num_buckets=64, ranks=2,
                               steps_per_file=steps_per_file)["rows"])


def write_logs(log_dir: str, warmup_dir: str, rows: int, segment_rows: int) -> Dict[str, int]:
    """The measured log (about ``rows`` rows) and a small one to warm every method up on."""
    uids, epochs = log_shape(rows)
    steps_per_file = max(1, segment_rows // BATCH_SIZE)
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        written = pool.apply(_write_logs, (log_dir, warmup_dir, uids, epochs, steps_per_file))
    return {"rows": written, "uids": uids, "epochs": epochs}


def log_files(log_dir: str) -> List[Tuple[str, int]]:
    """Every file of the log with its row count, in step order (segment by segment), from the footers."""
    import pyarrow.parquet as pq

    from pipelines.formats.score_log import list_parts
    from pipelines.run.storage import open_storage

    fs, root = open_storage(log_dir)
    paths = list_parts(fs, root)  # part-s<first>-<last>-r<rank>: by first step, then rank
    return [(p, pq.read_metadata(p).num_rows) for p in paths]


def prefix_files(files: List[Tuple[str, int]], rows: int) -> List[Tuple[str, int]]:
    """The first whole segments (every rank's file of each) holding at least ``rows`` rows."""
    segments: Dict[str, List[Tuple[str, int]]] = {}
    for path, n in files:
        segments.setdefault(os.path.basename(path).rsplit("-r", 1)[0], []).append((path, n))
    out: List[Tuple[str, int]] = []
    for segment in segments.values():  # insertion order: step order
        out += segment
        if sum(n for _, n in out) >= rows:
            break
    return out


def settle(timeout: float = 30.0, idle_percent: float = 25.0) -> None:
    """Wait (at most ``timeout`` seconds) until the machine's CPUs are mostly idle: what one method leaves
    running (Ray tearing down a shuffle's actors, idle workers exiting) must not be timed as the next one's."""
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and psutil.cpu_percent(interval=0.5) > idle_percent:
        pass


class PeakRSS:
    """The driver's peak resident set, sampled every ``interval`` seconds in a background thread."""

    def __init__(self, interval: float = 0.05) -> None:
        import psutil

        self.proc, self.interval, self.peak = psutil.Process(), interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> "PeakRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


# ------------------------------------------------------------------------------------------------ the three ways
# each returns (seconds, uid_hi, uid_lo, mean score)


MEAN_ONLY = {"outputs": ["mean_score"], "binarisers": [], "quality": None}
THRESHOLD = {"binarisers": ["threshold"]}


def run_gradmimic(storage: str, log_dir: str, options: Dict[str, Any], name: str, quiet: bool, repeat: int):
    from pipelines.formats.utility import read_utility
    from pipelines.run.runner import committed_stage, run_spec
    from pipelines.run.spec import parse_spec

    stage: Dict[str, Any] = {"stage": "aggregate", "name": "agg", "scores": {"path": log_dir}, **options}
    spec = parse_spec({"name": name, "storage": storage, "stages": [stage]}, label="bench aggregate")
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        run_spec(spec, max_parallel=1, force=["agg"] if repeat else (), stream=io.StringIO() if quiet else sys.stderr)
        seconds = time.perf_counter() - t0
    t = read_utility(committed_stage(spec, "agg"), ["uid_hi", "uid_lo", "mean_score"])
    return seconds, rss.peak, t["uid_hi"].to_numpy(), t["uid_lo"].to_numpy(), t["mean_score"].to_numpy()


def run_duckdb(paths: List[str], threads: int):
    import duckdb

    con = duckdb.connect()
    try:
        con.execute(f"SET threads = {int(threads)}")
        t0 = time.perf_counter()
        rel = con.sql("SELECT uid_hi, uid_lo, avg(score) AS mean_score FROM read_parquet(?) GROUP BY ALL",
                      params=[paths])
        t = rel.to_arrow_table() if hasattr(rel, "to_arrow_table") else rel.arrow()
        seconds = time.perf_counter() - t0
    finally:
        con.close()
    return seconds, t["uid_hi"].to_numpy(), t["uid_lo"].to_numpy(), t["mean_score"].to_numpy()


def run_ray_groupby(paths: List[str]):
    import pyarrow as pa
    import ray
    import ray.data

    t0 = time.perf_counter()
    ds = ray.data.read_parquet(paths, columns=["uid_hi", "uid_lo", "score"])
    t = pa.concat_tables(ray.get(ds.groupby(["uid_hi", "uid_lo"]).mean("score").to_arrow_refs()))
    seconds = time.perf_counter() - t0
    return seconds, t["uid_hi"].to_numpy(), t["uid_lo"].to_numpy(), t["mean(score)"].to_numpy()


def compare(a, b) -> Tuple[bool, float, str]:
    """Whether two (uid_hi, uid_lo, mean) results hold the same uids and mean scores within TOLERANCE."""
    (hi_a, lo_a, m_a), (hi_b, lo_b, m_b) = a, b
    if len(hi_a) != len(hi_b):
        return False, float("inf"), f"{len(hi_a)} uids vs {len(hi_b)}"
    oa, ob = np.lexsort((lo_a, hi_a)), np.lexsort((lo_b, hi_b))
    if not (np.array_equal(hi_a[oa], hi_b[ob]) and np.array_equal(lo_a[oa], lo_b[ob])):
        return False, float("inf"), "different uids"
    diff = float(np.max(np.abs(m_a[oa].astype(np.float64) - m_b[ob].astype(np.float64)), initial=0.0))
    ok = diff < TOLERANCE  # NaN (a missing mean) fails too
    return ok, diff, "" if ok else f"max |mean score difference| {diff:.3g} (tolerance {TOLERANCE:g})"


def _rate(rows: int, seconds: float) -> float:
    return round(rows / seconds, 1)


@dataclasses.dataclass
class Log:
    """The generated score log: its files, and the prefix the Ray groupby reads."""

    shape: Dict[str, int]
    files: List[Tuple[str, int]]
    ray_files: List[Tuple[str, int]]
    generate_s: float

    @property
    def rows(self) -> int:
        return sum(n for _, n in self.files)

    @property
    def paths(self) -> List[str]:
        return [p for p, _ in self.files]

    @property
    def ray_rows(self) -> int:
        return sum(n for _, n in self.ray_files)

    @property
    def ray_paths(self) -> List[str]:
        return [p for p, _ in self.ray_files]


def _generate(args: argparse.Namespace, log_dir: str, warmup_dir: str) -> Log:
    if os.path.exists(log_dir) or os.path.exists(warmup_dir):
        raise InputError(f"--dir {args.dir}: has a score log already (give an empty or new directory)")
    t0 = time.perf_counter()
    shape = write_logs(log_dir, warmup_dir, args.rows, args.segment_rows)
    generate_s = time.perf_counter() - t0
    files = log_files(log_dir)
    log = Log(shape, files, prefix_files(files, args.ray_rows) if args.ray_rows else files, generate_s)
    if log.rows != shape["rows"]:
        raise RuntimeError(f"the log holds {log.rows} rows, the generator wrote {shape['rows']}")
    return log


def _measure(args: argparse.Namespace, log: Log, storage: str, log_dir: str, warmup_dir: str, cores: int):
    """Every method's times over the rounds, peaks, and each method's last result (on a local Ray it starts)."""
    import psutil
    import ray
    import ray.data

    ray.init(address="local", num_cpus=cores, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        if args.json:
            ray.data.DataContext.get_current().enable_progress_bars = False
        # each method once, untimed, on a small log: Ray's worker processes and their imports, DuckDB's set-up;
        # the stage last, so that its workers (which import torch) are the ones Ray keeps for its timed run
        warmup = [p for p, _ in log_files(warmup_dir)]
        run_ray_groupby(warmup)
        run_duckdb(warmup, cores)
        m: Dict[str, Any] = {"cold_s": run_gradmimic(storage, warmup_dir, THRESHOLD, "warmup", True, 0)[0],
                             "base_mb": psutil.Process().memory_info().rss / 2**20,
                             "times": {"gradmimic": [], "threshold": [], "duckdb": [], "ray_groupby": [], "all": []},
                             "peak": 0, "peak_threshold": 0, "peak_all": 0, "out": {}}
        times, out = m["times"], m["out"]
        for r in range(args.repeats):  # alternating, so a machine that slows down slows all alike
            if r:  # the Ray groupby's shuffle ended the stage's idle workers: start and warm them again
                run_gradmimic(storage, warmup_dir, THRESHOLD, "warmup", True, r)
            settle()
            m["base_mb"] = max(m["base_mb"], psutil.Process().memory_info().rss / 2**20)
            for key, options, name, peak in (("gradmimic", MEAN_ONLY, "bench", "peak"),
                                             ("duckdb", None, None, None),  # right after the stage: the ratio
                                             ("threshold", THRESHOLD, "bench_threshold", "peak_threshold"),
                                             ("all", {}, "bench_all", "peak_all"),
                                             ("ray_groupby", None, None, None)):
                if key == "all" and args.no_all_binarisers:
                    continue
                if key == "duckdb":
                    s, *out[key] = run_duckdb(log.paths, cores)
                elif key == "ray_groupby":
                    s, *out[key] = run_ray_groupby(log.ray_paths)
                else:
                    s, p, *out[key] = run_gradmimic(storage, log_dir, options, name, args.json, r)
                    m[peak] = max(m[peak], p)
                times[key].append(s)
        out["duckdb_subset"] = run_duckdb(log.ray_paths, cores)[1:] if args.ray_rows else out["duckdb"]
    finally:
        ray.shutdown()
    return m


def _checks(args: argparse.Namespace, out: Dict[str, Any]) -> Dict[str, Tuple[bool, float, str]]:
    gm, dd = tuple(out["gradmimic"]), tuple(out["duckdb"])
    checks = {"duckdb": compare(gm, dd), "ray_groupby": compare(tuple(out["ray_groupby"]), tuple(out["duckdb_subset"]))}
    checks["gradmimic_threshold"] = compare(tuple(out["threshold"]), gm)
    if not args.no_all_binarisers:
        checks["gradmimic_all_binarisers"] = compare(tuple(out["all"]), gm)
    return checks


def _result(args: argparse.Namespace, log: Log, m: Dict[str, Any], checks, cores: int) -> Dict[str, Any]:
    rows, ray_rows = log.rows, log.ray_rows
    sec = {k: statistics.median(v) for k, v in m["times"].items() if v}
    result: Dict[str, Any] = {
        "rows": rows, "uids": log.shape["uids"], "epochs": log.shape["epochs"], "buckets": 64,
        "files": len(log.files), "cores": cores, "stage_options": MEAN_ONLY,
        "gradmimic_rows_per_s": _rate(rows, sec["gradmimic"]),
        "duckdb_rows_per_s": _rate(rows, sec["duckdb"]),
        "ray_groupby_rows_per_s": _rate(ray_rows, sec["ray_groupby"]),
        "ratio_vs_duckdb": round(sec["duckdb"] / sec["gradmimic"], 3),
        "ratio_vs_ray_groupby": round(rows / sec["gradmimic"] / (ray_rows / sec["ray_groupby"]), 3),
        "ray_groupby_rows": ray_rows,
        "driver_peak_mb": round(m["peak"] / 2**20, 1), "driver_base_mb": round(m["base_mb"], 1),
        "gradmimic_cold_s": round(m["cold_s"], 3),
        "gradmimic_threshold_rows_per_s": _rate(rows, sec["threshold"]),
        "gradmimic_threshold_s": round(sec["threshold"], 3),
        "driver_peak_threshold_mb": round(m["peak_threshold"] / 2**20, 1),
        "gradmimic_s": round(sec["gradmimic"], 3), "duckdb_s": round(sec["duckdb"], 3),
        "ray_groupby_s": round(sec["ray_groupby"], 3),
    }
    if "all" in sec:
        result["gradmimic_all_binarisers_rows_per_s"] = _rate(rows, sec["all"])
        result["gradmimic_all_binarisers_s"] = round(sec["all"], 3)
        result["driver_peak_all_binarisers_mb"] = round(m["peak_all"] / 2**20, 1)
    result.update({
        "agree": all(ok for ok, _, _ in checks.values()), "max_abs_diff_vs_duckdb": checks["duckdb"][1],
        "max_abs_diff_ray_vs_duckdb": checks["ray_groupby"][1],
        "repeats": args.repeats, "generate_s": round(log.generate_s, 1),
    })
    return result


def run(args: argparse.Namespace) -> Dict[str, Any]:
    if args.rows < BATCH_SIZE or args.repeats < 1 or args.ray_rows < 0 or args.segment_rows < BATCH_SIZE:
        raise InputError(f"--rows and --segment-rows must be >= {BATCH_SIZE}, --repeats >= 1, --ray-rows >= 0")
    cores = os.cpu_count() or 1
    # --json: stdout holds the one result line; what Ray prints meanwhile (raylet warnings) goes to stderr
    with contextlib.redirect_stdout(sys.stderr if args.json else sys.stdout), \
            tempfile.TemporaryDirectory() as tmp:
        work = os.path.abspath(args.dir) if args.dir else tmp
        log_dir, storage = os.path.join(work, score_log.DIR), os.path.join(work, "runs")
        warmup_dir = os.path.join(work, "warmup-scores")
        log = _generate(args, log_dir, warmup_dir)
        m = _measure(args, log, storage, log_dir, warmup_dir, cores)
    checks = _checks(args, m["out"])
    result = _result(args, log, m, checks, cores)
    if not args.json:
        print(f"mean score per uid over {log.rows:,} score-log rows ({log.shape['uids']:,} uids, 64 buckets, "
              f"{len(log.files)} parquet files), {cores} cores; gradmimic = the aggregate stage asked for the mean "
              f"score only (outputs [mean_score], no binarisers), as the others compute" +
              (f"; Ray groupby on the first {log.ray_rows:,} rows only" if args.ray_rows else "") +
              "; driver_peak_mb: the driver process's resident set only")
    print_result(result, args.json)
    if not result["agree"]:
        bad = "; ".join(f"{k}: {why}" for k, (ok, _, why) in checks.items() if not ok)
        raise SystemExit(f"gradmimic bench aggregate: the results disagree: {bad}")
    return result
