"""``gradmimic bench filter``: the filter stage next to DuckDB, on a DataComp-shaped metadata pool.

One run writes, in a separate process (so the generator's memory is not the driver's):

- a committed pool of ``--rows`` rows in parquet shards of ``--shard-rows`` (``uid``, ``uid_hi``, ``uid_lo``,
  ``text``, ``key``, ``shard``, ``split`` (1% test), ``url``, ``clip_b32_similarity_score``, ``original_width``,
  ``original_height``, and where each image is, as an ingest indexing a DataComp pool in place writes it: ``tar``
  a source tar's absolute URL, ``image``, ``image_offset``, ``image_size``, ``text_offset``, ``text_size``; the
  tars themselves are not written: the filter's default output is an index, which reads none);
- a committed utility over the pool's train rows in 64 buckets (``mean_score``, ``vote_threshold``), as the
  aggregate stage writes it.

Both carry the config hashes the runner computes for the spec below, so the runner takes them as committed and
runs only the filter.  The rule is the paper's combination, ``clip_b32_similarity_score`` top 30% minus
``mean_score`` bottom 20% (exact ranks, uid tie-break), and the stage writes everything it writes in a real run:
the kept rows as an index (every pool column, ``tar`` a full URL), the rejects with reasons, ``subset.npy``.
``duckdb`` is the same decision in one SQL query (a join on uid, two window ranks) writing the kept rows (the same
columns) to parquet with a thread per core.  ``--reshard-rows``: a second, smaller pool whose source tars are
written (random bytes of about ``--image-bytes`` per image, and a caption), filtered by the same rule with
``reshard: true``: kept rows copied per second and bytes copied (resharding is I/O: it scales with the kept
bytes).  Both kept uid sets must
be equal, or the command prints the numbers and exits 1.  ``--repeats``: each method that many times, alternating
(median); every timing starts once the CPUs are idle; the stage runs once on a small pool first, untimed, so no
timing includes starting Ray's workers.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Dict, List

import numpy as np

from pipelines.bench import print_result
from pipelines.bench.aggregate import PeakRSS, settle
from pipelines.run.errors import InputError

BUCKETS = 64
KEEP = {"minus": [{"clip_b32_similarity_score": {"top": 0.3}}, {"mean_score": {"bottom": 0.2}}]}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rows", type=int, default=2_000_000, help="pool rows")
    p.add_argument("--shard-rows", type=int, default=100_000, help="pool rows per parquet shard")
    p.add_argument("--repeats", type=int, default=1, help="time each method this many times (median)")
    p.add_argument("--reshard-rows", type=int, default=20_000, help="pool rows (with real tars) of the reshard "
                                                                    "measurement; 0: skip it")
    p.add_argument("--image-bytes", type=int, default=3000, help="mean image size of the reshard pool's tars")
    p.add_argument("--dir", default=None, help="write the pool and the outputs here and keep them "
                                                "(default: a temporary directory, removed at the end)")
    p.add_argument("--json", action="store_true", help="print one JSON line")


def bench_spec(storage: str, name: str, reshard: bool = False):
    from pipelines.run.spec import parse_spec

    return parse_spec({"name": name, "storage": storage, "stages": [
        {"stage": "ingest", "name": "pool", "source": {"kind": "embedded"}},  # stands for the committed pool
        {"stage": "aggregate", "name": "utility", "scores": {"path": "generated"}},  # and for the utility
        {"stage": "filter", "name": "kept", "data": "pool", "utility": "utility", "keep": KEEP,
         "shard_size": 10_000, **({"reshard": True} if reshard else {})}]}, label="bench filter")


def where_columns(fs, source: str, s: int, keys, texts, uids, rng, image_bytes: int) -> dict:
    """Where each sample of pool shard ``s`` is, as an index in place records it: in source tar ``s`` under
    ``source``, written there (random image bytes, the caption) when ``image_bytes``, else only named."""
    from pipelines.formats.pool import tar_records
    from pipelines.run.storage import write_file

    path = f"{source}/{s:08d}.tar"
    n = len(keys)
    if image_bytes:
        sizes = rng.integers(image_bytes // 2, image_bytes * 3 // 2, n)
        blob = rng.bytes(int(sizes.sum()))
        cuts = np.concatenate([[0], np.cumsum(sizes)])
        data, index = tar_records([(k, "jpg", blob[cuts[i]:cuts[i + 1]], t, u)
                                   for i, (k, t, u) in enumerate(zip(keys.tolist(), texts.tolist(), uids))])
        write_file(fs, path, data)
        where = np.array([index[k][1:] for k in keys.tolist()], np.int64).reshape(n, 4)
    else:
        where = np.stack([512 + np.arange(n) * 4096, rng.integers(1000, 4000, n), np.full(n, -1), np.full(n, -1)], 1)
    return {"tar": np.full(n, fs.unstrip_protocol(path), object), "image": np.char.add(keys, ".jpg"),
            "image_offset": where[:, 0], "image_size": where[:, 1], "text_offset": where[:, 2],
            "text_size": where[:, 3]}


def write_inputs(storage: str, name: str, rows: int, shard_rows: int, seed: int = 0, image_bytes: int = 0) -> None:
    """The committed pool and utility of run ``name`` (runs in a child process); with ``image_bytes``, its source
    tars too."""
    import pyarrow as pa

    from pipelines.bench.scorelog import synthetic_uids
    from pipelines.formats import utility
    from pipelines.formats.manifest import DatasetManifest, UtilityManifest
    from pipelines.formats.pool import shard_parquet, uid_hex
    from pipelines.formats.score_log import buckets_of
    from pipelines.run.runner import config_hash
    from pipelines.run.storage import StageDir, open_storage

    spec = bench_spec(storage, name)
    fs, root = open_storage(storage)
    source = f"{root}/{name}-source"
    hi, lo = synthetic_uids(rows, seed)
    rng = np.random.default_rng(seed)
    test = rng.random(rows) < 0.01
    pool = StageDir(fs, f"{root}/{name}/pool")
    pool.begin()
    files = []
    for s, first in enumerate(range(0, rows, shard_rows)):
        sl = slice(first, min(rows, first + shard_rows))
        n = sl.stop - sl.start
        keys = np.char.zfill(np.arange(sl.start, sl.stop).astype(str), 9)
        uids, texts = uid_hex(hi[sl], lo[sl]), np.char.add("a photo of sample number ", keys)
        table = pa.table({
            "uid": uids, "uid_hi": hi[sl], "uid_lo": lo[sl], "text": texts, "key": keys,
            "shard": np.full(n, s, np.int64), "split": np.where(test[sl], "test", "train"),
            "url": np.char.add("https://images.example.com/", np.char.add(keys, ".jpg")),
            "clip_b32_similarity_score": np.round(rng.normal(0.3, 0.05, n), 4).astype(np.float32),
            "original_width": rng.integers(64, 4096, n), "original_height": rng.integers(64, 4096, n),
            **where_columns(fs, source, s, keys, texts, uids.to_pylist(), rng, image_bytes),
        })
        rel = shard_parquet(s)
        pool.write_table(rel, table)
        files.append(rel)
    pool.commit(DatasetManifest(config_hash=config_hash(spec.stages[0], {}), files=files, rows_out=rows).to_json())
    util = StageDir(fs, f"{root}/{name}/utility")
    util.begin()
    train = np.flatnonzero(~test)
    bucket = buckets_of(lo[train], BUCKETS)
    files = []
    for b in range(BUCKETS):
        sel = train[bucket == b]
        rel = utility.part_path(b)
        util.write_table(rel, pa.table({"uid_hi": hi[sel], "uid_lo": lo[sel],
                                        "mean_score": rng.normal(0, 1, len(sel)).astype(np.float32),
                                        utility.vote("threshold"): rng.integers(0, 9, len(sel)) / 8}))
        files.append(rel)
    util.commit(UtilityManifest(config_hash=config_hash(spec.stages[1], {}), files=files, num_buckets=BUCKETS,
                                rows_out=len(train)).to_json())


def run_stage(storage: str, name: str, quiet: bool, repeat: int):
    from pipelines.formats.manifest import DatasetManifest
    from pipelines.formats.pool import shard_parquets
    from pipelines.run.runner import committed_stage, run_spec
    from pipelines.run.storage import read_parquet

    spec = bench_spec(storage, name)
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        run_spec(spec, max_parallel=1, force=["kept"] if repeat else (), stream=io.StringIO() if quiet else sys.stderr)
        seconds = time.perf_counter() - t0
    kept = committed_stage(spec, "kept")
    shards = shard_parquets(DatasetManifest.read(kept).files)
    uids = np.concatenate([read_parquet(kept.fs, kept.join(f), ["uid"])["uid"].to_numpy(zero_copy_only=False)
                           for f in shards]) if shards else np.array([], object)
    return seconds, rss.peak, uids


def run_reshard(storage: str, name: str, quiet: bool) -> Dict[str, Any]:
    """The filter with ``reshard: true`` on run ``name``'s pool: kept rows copied per second, bytes copied."""
    from pipelines.formats.manifest import FilterManifest
    from pipelines.run.runner import committed_stage, run_spec

    spec = bench_spec(storage, name, reshard=True)
    t0 = time.perf_counter()
    run_spec(spec, max_parallel=1, stream=io.StringIO() if quiet else sys.stderr)
    seconds = time.perf_counter() - t0
    kept = committed_stage(spec, "kept")
    m = FilterManifest.read(kept)
    copied = sum(kept.fs.size(kept.join(f)) for f in m.files if f.endswith(".tar"))
    return {"reshard_rows": m.rows_in, "reshard_kept": m.rows_out, "reshard_s": round(seconds, 3),
            "reshard_kept_rows_per_s": round(m.rows_out / seconds, 1), "reshard_bytes_copied": copied,
            "reshard_mb_per_s": round(copied / seconds / 2**20, 2)}


def run_duckdb(storage: str, name: str, out: str, threads: int):
    import duckdb

    from pipelines.formats import pool as fp
    from pipelines.formats import utility as fu

    # <run>/<stage>/<attempt>/<files>
    pool = os.path.join(storage, name, "pool", "*", fp.SHARDS, "*.parquet")
    util = os.path.join(storage, name, "utility", "*", fu.DIR, "*", "*.parquet")
    query = f"""
        COPY (
          WITH j AS (SELECT p.*, u.mean_score FROM read_parquet('{pool}') p
                     LEFT JOIN read_parquet('{util}') u USING (uid_hi, uid_lo)),
          t AS (SELECT *,
                  row_number() OVER (ORDER BY clip_b32_similarity_score DESC, uid_hi, uid_lo) AS r_clip,
                  count(clip_b32_similarity_score) OVER () AS n_clip,
                  row_number() OVER (ORDER BY mean_score ASC, uid_hi, uid_lo) AS r_mimic,
                  count(mean_score) OVER () AS n_mimic
                FROM j WHERE split = 'train')
          SELECT * EXCLUDE (r_clip, n_clip, r_mimic, n_mimic) FROM t
          WHERE clip_b32_similarity_score IS NOT NULL AND r_clip <= floor(0.3 * n_clip + 0.5)
            AND NOT (mean_score IS NOT NULL AND r_mimic <= floor(0.2 * n_mimic + 0.5))
          UNION ALL
          SELECT *, NULL::FLOAT AS mean_score FROM read_parquet('{pool}') WHERE split <> 'train'
        ) TO '{out}' (FORMAT parquet)"""
    con = duckdb.connect()
    try:
        con.execute(f"SET threads = {int(threads)}")
        t0 = time.perf_counter()
        con.execute(query)
        seconds = time.perf_counter() - t0
        uids = np.array(con.execute(f"SELECT uid FROM read_parquet('{out}')").fetchnumpy()["uid"], dtype=object)
    finally:
        con.close()
    return seconds, uids


def run(args: argparse.Namespace) -> Dict[str, Any]:
    import psutil
    import ray

    if args.rows < 1000 or args.shard_rows < 1 or args.repeats < 1 or args.reshard_rows < 0 or args.image_bytes < 2:
        raise InputError("--rows must be >= 1000, --shard-rows and --repeats >= 1, --reshard-rows >= 0, "
                         "--image-bytes >= 2")
    cores = os.cpu_count() or 1
    with contextlib.redirect_stdout(sys.stderr if args.json else sys.stdout), \
            tempfile.TemporaryDirectory() as tmp:
        work = os.path.abspath(args.dir) if args.dir else tmp
        storage = os.path.join(work, "runs")
        if os.path.exists(storage):
            raise InputError(f"--dir {args.dir}: has a bench pool already (give an empty or new directory)")
        t0 = time.perf_counter()
        spawn = multiprocessing.get_context("spawn")
        with spawn.Pool(1) as pool:
            pool.apply(write_inputs, (storage, "warmup", 20_000, 5_000, 1))
            pool.apply(write_inputs, (storage, "bench", args.rows, args.shard_rows))
            if args.reshard_rows:
                pool.apply(write_inputs, (storage, "reshard", args.reshard_rows, 10_000, 2, args.image_bytes))
        generate_s = time.perf_counter() - t0
        ray.init(address="local", num_cpus=cores, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
        times: Dict[str, List[float]] = {"gradmimic": [], "duckdb": []}
        try:
            run_stage(storage, "warmup", True, 0)
            run_duckdb(storage, "warmup", os.path.join(work, "warmup-duckdb.parquet"), cores)
            base_mb = psutil.Process().memory_info().rss / 2**20
            peak = 0
            for r in range(args.repeats):
                settle()
                s, p, gm = run_stage(storage, "bench", args.json, r)
                times["gradmimic"].append(s)
                peak = max(peak, p)
                settle()
                s, dd = run_duckdb(storage, "bench", os.path.join(work, f"duckdb-{r}.parquet"), cores)
                times["duckdb"].append(s)
            settle()
            reshard = run_reshard(storage, "reshard", args.json) if args.reshard_rows else {}
        finally:
            ray.shutdown()
        from pipelines.formats.manifest import FilterManifest
        from pipelines.run.runner import committed_stage

        m = FilterManifest.read(committed_stage(bench_spec(storage, "bench"), "kept"))
    same = len(gm) == len(dd) and np.array_equal(np.sort(gm.astype(str)), np.sort(dd.astype(str)))
    sec = {k: statistics.median(v) for k, v in times.items()}
    rate = args.rows / sec["gradmimic"]
    result = {
        "rows": args.rows, "shards": -(-args.rows // args.shard_rows), "cores": cores, "rule": m.rule,
        "kept": m.rows_out, "rejected": m.rejected,
        "gradmimic_rows_per_s": round(rate, 1), "gradmimic_rows_per_core_s": round(rate / cores, 1),
        "duckdb_rows_per_s": round(args.rows / sec["duckdb"], 1),
        "ratio_vs_duckdb": round(sec["duckdb"] / sec["gradmimic"], 3),
        "gradmimic_s": round(sec["gradmimic"], 3), "duckdb_s": round(sec["duckdb"], 3),
        "driver_peak_mb": round(peak / 2**20, 1), "driver_base_mb": round(base_mb, 1),
        "agree": bool(same), "repeats": args.repeats, "generate_s": round(generate_s, 1), **reshard,
    }
    if not args.json:
        print(f"filter {args.rows:,} pool rows ({result['shards']} parquet shards, an index of images in place) by "
              f"{m.rule}, {cores} cores; gradmimic = the filter stage (the kept rows' index, rejects, subset.npy), "
              f"duckdb = one query writing the kept rows; reshard = the stage with reshard: true on "
              f"{args.reshard_rows:,} rows with their tars")
    print_result(result, args.json)
    if not same:
        raise SystemExit(f"gradmimic bench filter: the kept sets disagree ({len(gm)} vs {len(dd)} rows)")
    return result
