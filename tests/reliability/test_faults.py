"""Faults, through the CLI as users meet them (each run its own local Ray, so failpoints reach every worker):
``gradmimic run`` killed in the middle of each stage, then rerun; tasks killed or failing transiently; object
storage going away mid-write; a full disk; non-finite training steps.  In every case nothing partial is ever
committed and the final outputs equal an uninterrupted run's."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pytest
import yaml

from pipelines.bench.scorelog import write_score_log
from pipelines.run.storage import StageDir, open_storage

ROOT = pathlib.Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.faults, pytest.mark.slow]

POOL = {"stage": "ingest", "name": "pool", "source": {"kind": "embedded", "limit": 160},
        "split": {"test_fraction": 0.2, "seed": 0}, "shard_size": 40}


def cli_run(spec: dict, tmp_path, failpoints: str = "", wait: bool = True, extra_env=None):
    """``gradmimic run`` on ``spec`` in a subprocess with its own local Ray; failpoints armed through the env."""
    path = tmp_path / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump({"ray": {"address": "local", "num_cpus": 4}, **spec}, sort_keys=False))
    env = {**os.environ, **(extra_env or {})}
    env.pop("GRADMIMIC_FAILPOINTS", None)
    if failpoints:
        points = tmp_path / f"failpoints-{time.monotonic_ns()}"
        points.mkdir()
        env.update(GRADMIMIC_FAILPOINTS=failpoints, GRADMIMIC_FAILPOINTS_DIR=str(points))
    cmd = [sys.executable, "-m", "pipelines", "run", str(path)]
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    res.points = env.get("GRADMIMIC_FAILPOINTS_DIR")
    return res


def fired_and_rerun(res, point: str) -> bool:
    """Whether ``point=action@n`` fired (its n-th hit happened) and the work ran again after it (hit n + 1)."""
    name, _, action = point.partition("=")
    n = int(action.partition("@")[2] or 1)
    stem = pathlib.Path(res.points) / name.replace(":", "_")
    return pathlib.Path(f"{stem}.hit{n}").exists() and pathlib.Path(f"{stem}.hit{n + 1}").exists()


def stage(storage: str, run: str, name: str) -> StageDir:
    fs, root = open_storage(storage)
    return StageDir(fs, f"{root}/{run}/{name}")


def committed(storage: str, run: str, name: str) -> bool:
    return stage(storage, run, name).manifest() is not None


def outputs(storage: str, run: str, name: str) -> dict:
    """A committed stage's files, parquet as tables (their bytes carry a writer's metadata), others as bytes; a
    ``tar`` column's full URLs (a filter's index points into its pool's committed attempt) as ``<stage>/<file>``,
    so two runs' outputs compare whatever their storage and attempt ids."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    d = stage(storage, run, name)
    m = d.manifest()
    out = {}
    for rel in m["files"]:
        data = d.fs.cat_file(d.join(rel))
        out[rel] = pq.read_table(pa.BufferReader(data)) if rel.endswith(".parquet") else data
        if rel.endswith(".parquet") and "tar" in out[rel].column_names:
            t = out[rel]
            tars = pc.replace_substring_regex(t["tar"], r"^.*/([^/]+)/_attempt-[0-9a-f]+/", r"\1/")
            out[rel] = t.set_column(t.column_names.index("tar"), "tar", tars)
    return out


def assert_same_outputs(a: dict, b: dict, exact_columns=True):
    assert sorted(a) == sorted(b)
    for rel in a:
        if isinstance(a[rel], pa.Table):
            assert a[rel].equals(b[rel]), rel
        else:
            assert a[rel] == b[rel], rel


def killed(res) -> bool:
    return res.returncode == -9


# ------------------------------------------------------------------------------------------------ SIGKILL


@pytest.mark.long
def test_a_run_killed_in_each_stage_reruns_to_the_same_outputs(tmp_path):
    """Kill ``gradmimic run`` (SIGKILL) in the middle of ingest, aggregate and filter (after some of their tasks)
    and of evaluate (its outputs written, before its commit), rerunning after each: the stage killed is never
    committed, and the final outputs equal an uninterrupted run's.  (The train stage's driver killed mid-run:
    tests/pipelines/test_train.py::test_rerun_after_the_driver_was_killed_resumes.)"""
    from tests.support.train import reference_file

    ref = reference_file(tmp_path / "ref.safetensors", "clip")
    stages = [POOL,
              {"stage": "train", "name": "mimic", "data": "pool", "mode": "mimic", "reference": {"path": ref},
               "batch_size": 16, "steps": 6, "checkpoint_every": 3, "resources": {"num_workers": 1}},
              {"stage": "aggregate", "name": "utility", "scores": "mimic"},
              {"stage": "filter", "name": "kept", "data": "pool", "utility": "utility",
               "keep": {"mean_score": {"top": 0.5}}, "unscored": "keep", "shard_size": 16},
              {"stage": "evaluate", "name": "eval", "model": "mimic", "data": "pool"}]
    clean, broken = str(tmp_path / "clean"), str(tmp_path / "broken")
    res = cli_run({"name": "r", "storage": clean, "stages": stages}, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    # ingest killed, alone (a pool is all it needs)
    res = cli_run({"name": "r", "storage": broken, "stages": [POOL]}, tmp_path, "stage:pool=kill@2")
    assert killed(res), res.stderr[-2000:]
    assert not committed(broken, "r", "pool") and list((tmp_path / "broken/r/pool").glob("_attempt-*"))
    assert cli_run({"name": "r", "storage": broken, "stages": [POOL]}, tmp_path).returncode == 0
    assert_same_outputs(outputs(broken, "r", "pool"), outputs(clean, "r", "pool"))
    # the offline stages and evaluate killed in turn, each rerun picking up what the last one committed; the
    # trained model is the clean run's, copied (the train stage's own kills: test_train.py)
    shutil.copytree(tmp_path / "clean/r/mimic", tmp_path / "broken/r/mimic")
    spec = {"name": "r", "storage": broken, "stages": stages}
    for point, victim, before in [("stage:utility=kill@1", "utility", ["pool", "mimic"]),
                                  ("stage:kept=kill@3", "kept", ["pool", "mimic", "utility"]),
                                  ("commit:eval=kill", "eval", ["pool", "mimic", "utility", "kept"])]:
        res = cli_run(spec, tmp_path, point)
        assert killed(res), f"{point}: {res.returncode} {res.stderr[-2000:]}"
        assert "train mimic: committed, skipped" in res.stderr
        assert not committed(broken, "r", victim), point
        assert all(committed(broken, "r", name) for name in before), point
        d = stage(broken, "r", victim)
        assert [p for p in d.fs.ls(d.path) if "_attempt-" in p], point  # its partial output is there, uncommitted
    res = cli_run(spec, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "ingest pool: committed, skipped" in res.stderr and "evaluate eval: " in res.stderr
    for name in ("pool", "utility", "kept", "eval"):
        assert_same_outputs(outputs(broken, "r", name), outputs(clean, "r", name))
    for name in ("pool", "mimic", "utility", "kept", "eval"):  # what a reader finds: one attempt, committed
        d = stage(broken, "r", name)
        assert sorted(p.rsplit("/", 1)[1] for p in d.fs.ls(d.path)) == sorted(["_MANIFEST.json", d.manifest()["attempt"]])


# ------------------------------------------------------------------------------------------------ tasks


def offline_spec(storage: str, log: str) -> dict:
    return {"name": "o", "storage": storage, "stages": [
        POOL,
        {"stage": "aggregate", "name": "utility", "scores": {"path": log}},
        {"stage": "filter", "name": "kept", "data": "pool", "keep": {"and": [{"random": {"top": 0.6}},
                                                                             {"label": {"max": 7}}]},
         "shard_size": 16}]}


def test_killed_and_failing_tasks_are_retried_to_the_same_outputs(tmp_path):
    fs, _ = open_storage(str(tmp_path))
    log = str(tmp_path / "log" / "scores")
    write_score_log(fs, log, uids=256, epochs=3, batch_size=32, num_buckets=8, seed=2)
    res = cli_run(offline_spec(str(tmp_path / "clean"), log), tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    # a worker killed (Ray reruns the task) or a dropped connection (retried) in ingest, aggregate (its Ray Data
    # reduction and a task of its per-step fits) and filter
    points = ";".join(["task:write_shard=kill@2", "task:_step_summary=transient@1", "task:reduce_buckets=kill@2",
                       "task:_join=transient@1", "task:_write_kept=kill@1", "task:_partition_keys=transient@1"])
    res = cli_run(offline_spec(str(tmp_path / "faulty"), log), tmp_path, points)
    assert res.returncode == 0, res.stderr[-3000:]
    assert [p for p in points.split(";") if not fired_and_rerun(res, p)] == []
    for name in ("pool", "utility", "kept"):
        assert_same_outputs(outputs(str(tmp_path / "faulty"), "o", name), outputs(str(tmp_path / "clean"), "o", name))


def test_bad_data_in_a_task_fails_at_once_naming_the_file(tmp_path):
    """A corrupt score-log file is not retried forever: the stage fails with the file named, exit 2."""
    fs, _ = open_storage(str(tmp_path))
    log = tmp_path / "log" / "scores"
    write_score_log(fs, str(log), uids=256, epochs=2, batch_size=32, num_buckets=4, seed=1)
    victim = sorted(log.rglob("*.parquet"))[3]
    victim.write_bytes(b"PAR1 this is not parquet PAR1")
    t0 = time.monotonic()
    res = cli_run(offline_spec(str(tmp_path / "runs"), str(log)), tmp_path)
    assert res.returncode == 2, res.stderr[-3000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("gradmimic: error: ") and str(victim) in last, last
    assert "Traceback" not in res.stderr
    assert time.monotonic() - t0 < 300
    assert not committed(str(tmp_path / "runs"), "o", "utility")


# ------------------------------------------------------------------------------------------------ storage


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_object_storage_lost_mid_write_then_back(tmp_path):
    """The S3 server goes away while a stage writes (after its files, before its commit): one line, exit 1,
    nothing committed; once it is back, a rerun completes with the outputs of a run that never failed."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_MAX_ATTEMPTS": "2", "AWS_RETRY_MODE": "standard"}
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        s3 = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, key="testing", secret="testing")
        s3.mkdir("gm-down")
        spec = {"name": "s", "storage": "s3://gm-down/runs", "stages": [POOL]}
        proc = cli_run(spec, tmp_path, "commit:pool=pause", wait=False, extra_env=env)
        points = next(tmp_path.glob("failpoints-*"))
        deadline = time.monotonic() + 300
        while not (points / "commit_pool.paused").exists():
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.2)
        server.stop()
        (points / "commit_pool.resume").touch()
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 1, err[-3000:]
        last = err.strip().splitlines()[-1]
        assert last.startswith("gradmimic: error: s.yaml: stage 'pool' (ingest): storage or cluster unreachable: "), last
        assert "Traceback" not in err
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
        server.start()
        s3.invalidate_cache()
        assert not s3.exists("gm-down/runs/s/pool/_MANIFEST.json")
        res = cli_run(spec, tmp_path, extra_env=env)
        assert res.returncode == 0, res.stderr[-3000:]
        clean = cli_run({**spec, "storage": str(tmp_path / "clean")}, tmp_path)
        assert clean.returncode == 0
        got = {k: v for k, v in json.loads(s3.cat_file("gm-down/runs/s/pool/_MANIFEST.json")).items()}
        assert got["rows_out"] == 160
        pool = StageDir(s3, "gm-down/runs/s/pool")
        want = stage(str(tmp_path / "clean"), "s", "pool")
        for rel in got["files"]:
            if rel.endswith(".parquet"):
                assert pool.read_table(rel).equals(want.read_table(rel)), rel  # tar: relative to the stage
            elif rel.endswith(".tar"):
                assert s3.cat_file(pool.join(rel)) == want.fs.cat_file(want.join(rel)), rel
    finally:
        server.stop()


def test_a_full_disk_is_one_line_and_leaves_nothing_committed(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {made.stderr.decode().strip()[:200]}")
    try:
        spec = {"name": "d", "storage": str(mount / "runs"), "stages": [{**POOL, "source": {"kind": "embedded"}}]}
        res = cli_run(spec, tmp_path)
        assert res.returncode == 1, res.stderr[-3000:]
        last = res.stderr.strip().splitlines()[-1]
        assert last.startswith("gradmimic: error: d.yaml: stage 'pool' (ingest): storage full: [Errno 28] No space "
                               f"left on device: 'file://{mount}/runs/d/pool/_attempt-"), last
        assert "Traceback" not in res.stderr
        assert not committed(str(mount / "runs"), "d", "pool")
        assert not list((mount / "runs" / "d" / "pool").glob("_attempt-*"))  # the failed attempt freed its space
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


# ------------------------------------------------------------------------------------------------ non-finite


def test_non_finite_steps_are_skipped_counted_never_logged_and_stop_a_stage_when_in_a_row(tmp_path):
    """One run, two stages: ``skips`` meets a NaN loss at steps 2 and 5 (on one rank of two: both skip), ``stops``
    at every step from 7 with ``max_nonfinite_steps: 3``."""
    from tests.support.train import reference_file

    ref = reference_file(tmp_path / "ref.safetensors", "clip")
    common = {"stage": "train", "data": "pool", "mode": "mimic", "reference": {"path": ref}, "batch_size": 16}
    skips = {**common, "name": "skips", "steps": 6, "checkpoint_every": 3, "resources": {"num_workers": 2}}
    stops = {**common, "name": "stops", "steps": 12, "checkpoint_every": 2, "max_nonfinite_steps": 3,
             "resources": {"num_workers": 1}}
    storage = str(tmp_path / "runs")
    res = cli_run({"name": "n", "storage": storage, "stages": [POOL, skips, stops]}, tmp_path,
                  ";".join(f"nonfinite:step{k}=flag" for k in (2, 5, *range(7, 13))))
    assert res.returncode == 1, res.stderr[-3000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last == ("gradmimic: error: n.yaml: stage 'stops' (train): 3 training steps in a row had a non-finite "
                    "loss, score, weight or gradient (steps 7-9); each was skipped; lower the learning rate or check "
                    "the data and the reference (max_nonfinite_steps: 3)"), last
    assert not committed(storage, "n", "stops")
    d = stage(storage, "n", "skips")
    m = d.manifest()
    assert m["nonfinite_steps"] == 2 and m["steps"] == 6 and m["score_rows"] == 4 * 16
    from pipelines.formats.score_log import log_files, read_score_log

    files = log_files(m["files"])  # one file per rank per checkpoint, found through the manifest
    assert files == [f"scores/part-s{a:09d}-{z:09d}-r{r:04d}.parquet" for a, z in ((1, 3), (4, 6)) for r in (0, 1)]
    log = read_score_log(d.fs, "", files=[d.join(f) for f in files]).to_pandas()
    assert sorted(log.step.unique()) == [1, 3, 4, 6]
    assert np.isfinite(log[["score", "weight", "loss"]].to_numpy()).all()
    assert (log.groupby("step").size() == 16).all()
    metrics = d.read_table("metrics.parquet").to_pandas()  # the two checkpoints' metrics segments, concatenated
    assert metrics.step.tolist() == [1, 2, 3, 4, 5, 6]
    assert metrics.nonfinite_steps.tolist() == [0, 1, 1, 1, 2, 2]
    assert metrics.loss.isna().tolist() == [False, True, False, False, True, False]
