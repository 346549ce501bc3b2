"""Run directories: commit by manifest, skip what is committed, rerun on change or --force, same on S3."""

from __future__ import annotations

import io
import json
import os
import pathlib
import subprocess
import sys

import pytest

from pipelines.run.runner import committed_stage, run_spec
from pipelines.run.spec import parse_spec
from pipelines.run.storage import MANIFEST, StageDir, open_storage

ROOT = pathlib.Path(__file__).resolve().parents[2]


def make_spec(storage, overrides=(), folder=None):
    stages = [{"stage": "ingest", "name": "pool", "source": {"kind": "embedded", "limit": 24}, "shard_size": 10}]
    if folder:
        stages.append({"stage": "ingest", "name": "extra", "source": {"kind": "caption_folder", "path": folder}})
    return parse_spec({"name": "r", "storage": storage, "stages": stages}, overrides)


def run(spec, force=()):
    log = io.StringIO()
    manifests = run_spec(spec, force=force, stream=log)
    return manifests, log.getvalue()


def exercise_commit_protocol(storage: str):
    spec = make_spec(storage)
    first, log = run(spec)
    assert "[1/1] ingest pool: 24 rows out, 0 rejected" in log
    m = first["pool"]
    assert m["rows_in"] == 24 and m["config_hash"] and m["files"]

    again, log = run(spec)
    assert "committed, skipped" in log and again["pool"]["timings"] == m["timings"]

    changed, log = run(make_spec(storage, ["stages.pool.shard_size=5"]))
    assert "committed, skipped" not in log and changed["pool"]["config_hash"] != m["config_hash"]
    assert changed["pool"]["shards"] == 5

    forced, log = run(make_spec(storage, ["stages.pool.shard_size=5"]), force=["pool"])
    assert "committed, skipped" not in log and forced["pool"]["timings"] != changed["pool"]["timings"]

    # a stage that died halfway: no manifest, stray files; readers ignore it, a rerun clears and redoes it
    fs, root = open_storage(storage)
    stage_dir = f"{root}/r/pool"
    fs.rm(f"{stage_dir}/{MANIFEST}")
    with fs.open(f"{stage_dir}/half-written.tmp", "wb") as f:
        f.write(b"x")
    assert committed_stage(spec, "pool") is None
    redone, log = run(make_spec(storage, ["stages.pool.shard_size=5"]))
    assert "committed, skipped" not in log and not fs.exists(f"{stage_dir}/half-written.tmp")
    assert committed_stage(spec, "pool") is not None
    attempt = redone["pool"]["attempt"]
    listed = {p.rsplit("/pool/", 1)[1] for p in fs.find(stage_dir)}
    # older attempts deleted; the attempt holds its files and the marker naming its config
    assert listed == {f"{attempt}/{f}" for f in redone["pool"]["files"]} | {MANIFEST, f"{attempt}/_ATTEMPT.json"}

    resolved = fs.cat_file(f"{root}/r/spec.resolved.yaml").decode()
    assert "shard_size: 5" in resolved and "templates:" in resolved  # overrides and defaults, resolved
    return fs, root


def test_commit_skip_force_local(tmp_path, ray_local):
    exercise_commit_protocol(str(tmp_path / "runs"))


def test_same_run_on_s3(s3_endpoint, ray_local):
    fs, _ = open_storage("s3://gm-bucket")
    fs.mkdir("gm-bucket")
    fs, root = exercise_commit_protocol("s3://gm-bucket/team/runs")
    manifest = json.loads(fs.cat_file("gm-bucket/team/runs/r/pool/_MANIFEST.json"))
    assert manifest["rows_out"] == 24
    shard = manifest["files"][0]
    assert fs.exists(f"gm-bucket/team/runs/r/pool/{manifest['attempt']}/{shard}")
    everything = b"".join(fs.cat_file(p) for p in fs.find("gm-bucket/team/runs/r") if p.endswith((".yaml", ".json")))
    assert os.environ["AWS_SECRET_ACCESS_KEY"].encode() not in everything  # credentials never land in the run


def test_failed_stage_commits_nothing_and_keeps_earlier_stages(tmp_path, ray_local):
    storage = str(tmp_path / "runs")
    run(make_spec(storage))
    with pytest.raises(FileNotFoundError, match="source folder not found: .*nowhere"):
        run(make_spec(storage, folder=str(tmp_path / "nowhere")))
    assert committed_stage(make_spec(storage), "pool") is not None
    assert not (tmp_path / "runs/r/extra" / MANIFEST).exists()
    with pytest.raises(ValueError, match="--force nope: no stage of that name"):
        run(make_spec(storage), force=["nope"])


def test_rerunning_a_stage_reruns_its_readers(tmp_path, ray_local, monkeypatch):
    from dataclasses import dataclass, field

    from pipelines.run.registry import STAGES, StageDef

    @dataclass(frozen=True)
    class CountConfig:
        data: str = field(metadata={"ref": "dataset"})

    broken = []

    def count(cfg, ctx):
        if broken:
            raise RuntimeError("count broke")
        rows = ctx.inputs[cfg.data].manifest()["rows_out"]
        return {"rows_in": rows, "rows_out": rows, "rejected": 0}

    monkeypatch.setitem(STAGES, "count", StageDef(CountConfig, count, "count rows", "report"))
    spec = parse_spec({"name": "r", "storage": str(tmp_path), "stages": [
        {"stage": "ingest", "name": "pool", "source": {"kind": "embedded", "limit": 12}},
        {"stage": "count", "name": "n", "data": "pool"}]})
    first, _ = run(spec)
    assert first["n"]["rows_out"] == 12
    _, log = run(spec)
    assert log.count("committed, skipped") == 2
    _, log = run(spec, force=["pool"])
    assert "committed, skipped" not in log  # pool forced, so n, which reads it, reruns too
    _, log = run(spec, force=["n"])
    assert log.count("committed, skipped") == 1
    # pool reruns but the invocation stops before n: n is stale (it read the old attempt) and reruns next time
    broken.append(True)
    with pytest.raises(RuntimeError, match="count broke"):
        run(spec, force=["pool"])
    broken.clear()
    again, log = run(spec)
    assert log.count("committed, skipped") == 1 and "ingest pool: committed, skipped" in log
    assert again["n"]["input_attempts"] == {"pool": again["pool"]["attempt"]}


def cli(*args):
    return subprocess.run([sys.executable, "-m", "pipelines", *args], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)


def test_cli_run_errors(tmp_path):
    res = cli("run", "pipelines/configs/debug.yaml", f"storage={tmp_path}", "--force", "nope")
    assert res.returncode == 2 and res.stderr.strip().endswith("--force nope: no stage of that name in debug.yaml")
    res = cli("run", "pipelines/configs/debug.yaml", f"storage={tmp_path}", "stages.pool.source.path=x")
    assert res.returncode == 2 and "source.path: unknown key" in res.stderr
    res = cli("run", "pipelines/configs/debug.yaml", f"storage={tmp_path}", "--max-parallel", "0")
    assert res.returncode == 2 and res.stderr.strip().endswith("--max-parallel 0: must be at least 1")
    assert not any(tmp_path.iterdir())  # refused before anything is written


def test_resumable_stage_reopens_its_unfinished_attempt_unless_its_input_reran(tmp_path, ray_local, monkeypatch):
    from dataclasses import dataclass, field

    from pipelines.run.registry import STAGES, StageDef

    calls = []

    @dataclass(frozen=True)
    class LongConfig:
        data: str = field(metadata={"ref": "dataset"})
        fail: bool = False

    def long(cfg, ctx):
        fs = ctx.out.fs
        progress = ctx.out.join("progress")
        done = int(fs.cat_file(progress)) if fs.exists(progress) else 0
        calls.append((ctx.out.attempt, done))
        ctx.out.write_bytes("progress", str(done + 1).encode())
        if len(calls) == 1:
            raise RuntimeError("the driver died")
        return {"rows_in": done + 1, "rows_out": done + 1, "rejected": 0}

    monkeypatch.setitem(STAGES, "long", StageDef(LongConfig, long, "a long stage", "model", resumable=True))
    spec = parse_spec({"name": "r", "storage": str(tmp_path), "stages": [
        {"stage": "ingest", "name": "pool", "source": {"kind": "embedded", "limit": 12}},
        {"stage": "long", "name": "job", "data": "pool"}]})
    with pytest.raises(RuntimeError, match="the driver died"):
        run(spec)
    first, log = run(spec)
    assert "continuing the unfinished attempt" in log and calls[1] == (calls[0][0], 1)  # same attempt, its progress
    assert first["job"]["rows_out"] == 2
    fs, root = open_storage(str(tmp_path))
    stale = StageDir(fs, f"{root}/r/job")
    stale.begin("other-config")  # an unfinished attempt of another config is never reopened
    again, log = run(spec, force=["pool"])  # the input reran: start afresh even with an attempt lying around
    assert "continuing" not in log and calls[2][1] == 0 and calls[2][0] != calls[0][0]
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{root}/r/job")) == sorted([MANIFEST, again["job"]["attempt"]])


def test_the_newest_unfinished_attempt_of_a_config_is_reopened(tmp_path):
    fs, root = open_storage(str(tmp_path))
    stage = StageDir(fs, f"{root}/r/job")
    stage.begin("h1")
    older = stage.attempt
    stage.begin("h1")
    newer = stage.attempt
    stage.begin("h2")
    reader = StageDir(fs, f"{root}/r/job")
    assert reader.begin("h1", resume=True) and reader.attempt == newer != older
    assert not reader.begin("h3", resume=True) and reader.attempt not in (older, newer)
    # an attempt is reopened only for the input attempts it read (an input rerun since: start afresh)
    stage.begin("h4", inputs={"pool": "_attempt-a"})
    read_a = stage.attempt
    assert reader.begin("h4", resume=True, inputs={"pool": "_attempt-a"}) and reader.attempt == read_a
    assert not reader.begin("h4", resume=True, inputs={"pool": "_attempt-b"}) and reader.attempt != read_a


def map_context(tmp_path):
    import io

    from pipelines.run.context import Progress, StageContext

    out = StageDir(open_storage(str(tmp_path))[0], str(tmp_path / "stage"))
    return StageContext(out, {}, "m", Progress(io.StringIO()))


def _rows(item):
    return [{"x": item["x"] * 2}]


def test_map_dataset_gives_its_rows_without_rays_remote_args_warning(tmp_path, ray_local):
    """Ray warns that task retries given as remote args are deprecated (no named parameter yet): not on every run."""
    import warnings

    ctx = map_context(tmp_path)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")  # what Ray's own filter for its deprecations would let through
        rows = ctx.map_dataset(_rows, [{"x": i} for i in range(3)], "items")
    assert sorted(r["x"] for r in rows) == [0, 2, 4]
    assert not [w for w in seen if "ray_remote_args" in str(w.message)]


def test_map_keeps_a_bounded_number_of_tasks_in_flight(tmp_path, ray_local, monkeypatch):
    """200 tiny tasks through a map bounded to 3 in flight: a counter actor sees at most 3 running at once (all 4
    CPUs would be used otherwise); results in order, and the fold sees every result once."""
    import ray

    from pipelines.run import context

    @ray.remote(num_cpus=0)
    class Gauge:
        def __init__(self):
            self.now, self.most = 0, 0

        def enter(self):
            self.now += 1
            self.most = max(self.most, self.now)

        def leave(self):
            self.now -= 1

        def peak(self):
            return self.most

    gauge = Gauge.options(name="map-gauge").remote()

    def square(i, pause):
        import time

        import ray

        g = ray.get_actor("map-gauge")
        ray.get(g.enter.remote())
        time.sleep(pause)
        ray.get(g.leave.remote())
        return i * i

    monkeypatch.setattr(context, "MAX_IN_FLIGHT", 3)
    ctx = map_context(tmp_path)
    tasks = [(i, 0.02 if i < 24 else 0.0) for i in range(200)]
    assert ctx.map(square, tasks, rows=[1] * 200) == [i * i for i in range(200)]
    assert 1 <= ray.get(gauge.peak.remote()) <= 3
    assert ctx.map(square, tasks[:50], combine=lambda a, v: (a or 0) + v) == sum(i * i for i in range(50))
    assert "m tasks: 200/200 (200 rows" in ctx.progress.stream.getvalue()
    # two returns: the first fetched, the second left in the object store as a ref
    got = ctx.map(lambda i: (i, [i] * 3), [(i,) for i in range(10)], num_returns=2)
    assert [v for v, _ in got] == list(range(10)) and ray.get([r for _, r in got]) == [[i] * 3 for i in range(10)]
    monkeypatch.setattr(context, "MAX_IN_FLIGHT", 1024)
    monkeypatch.setattr(context, "IN_FLIGHT_PER_CPU", 3)
    assert context.in_flight_bound() == context.MIN_IN_FLIGHT  # a small cluster: the floor
    monkeypatch.setattr(context, "MIN_IN_FLIGHT", 1)
    assert context.in_flight_bound() == 12  # the session's Ray has 4 CPUs
    ray.kill(gauge)


def test_a_failed_map_task_fails_the_map_and_sends_no_more(tmp_path, ray_local, monkeypatch):
    from pipelines.run import context

    started = tmp_path / "started"
    started.mkdir()

    def task(i):
        import time

        (started / str(i)).touch()
        if i == 1:
            raise ValueError("bad input 1")
        time.sleep(0.05)
        return i

    monkeypatch.setattr(context, "MAX_IN_FLIGHT", 2)
    with pytest.raises(ValueError, match="bad input 1"):
        map_context(tmp_path).map(task, [(i,) for i in range(100)])
    assert len(list(started.iterdir())) < 10  # task 1 failed within the first few: the rest were never sent

    def bad_file(i):
        from pipelines.run.errors import InputError

        raise InputError(f"file {i}: not a pool shard")

    from pipelines.run.errors import InputError

    with pytest.raises(InputError) as caught:  # bad input is raised as itself, its one line intact
        map_context(tmp_path).map(bad_file, [(7,)])
    assert type(caught.value) is InputError and str(caught.value) == "file 7: not a pool shard"


# ------------------------------------------------------------------------------------------------ the graph


def wait_stages(monkeypatch, broken=()):
    """A ``wait`` stage: sleeps, holds ``cpus`` CPUs, reads a dataset; fails while its name is in ``broken``."""
    import time
    from dataclasses import dataclass, field

    from pipelines.run.registry import STAGES, StageDef

    @dataclass(frozen=True)
    class WaitConfig:
        data: str = field(metadata={"ref": "dataset"})
        seconds: float = 1.0
        cpus: float = 1.0

    def wait(cfg, ctx):
        time.sleep(cfg.seconds)
        if ctx.name in broken:
            raise RuntimeError(f"{ctx.name} broke")
        return {"rows_in": 1, "rows_out": 1, "rejected": 0}

    monkeypatch.setitem(STAGES, "wait", StageDef(WaitConfig, wait, "wait", "dataset",
                                                 needs=lambda cfg: (cfg.cpus, 0.0)))


def graph_spec(storage, cpus=1.0):
    return parse_spec({"name": "g", "storage": storage, "stages": [
        {"stage": "ingest", "name": "pool", "source": {"kind": "embedded", "limit": 12}},
        {"stage": "wait", "name": "a", "data": "pool", "cpus": cpus},
        {"stage": "wait", "name": "b", "data": "pool", "cpus": cpus},
        {"stage": "wait", "name": "c", "data": "a", "seconds": 0.1}]})


def spans(manifests):
    return {n: (m["timings"]["started"], m["timings"]["started"] + m["timings"]["seconds"])
            for n, m in manifests.items()}


def test_independent_stages_run_at_once_and_a_stage_waits_for_its_inputs(tmp_path, ray_local, monkeypatch):
    wait_stages(monkeypatch)
    at_once = spans(run_spec(graph_spec(str(tmp_path / "par")), stream=io.StringIO()))
    assert at_once["a"][0] < at_once["b"][1] and at_once["b"][0] < at_once["a"][1]  # a and b overlap
    assert at_once["c"][0] >= at_once["a"][1] and at_once["a"][0] >= at_once["pool"][1]  # inputs first
    # one at a time: the file's order, none overlapping
    log = io.StringIO()
    one = spans(run_spec(graph_spec(str(tmp_path / "seq")), stream=log, max_parallel=1))
    order = sorted(one, key=lambda n: one[n][0])
    assert order == ["pool", "a", "b", "c"]
    assert all(one[x][1] <= one[y][0] for x, y in zip(order, order[1:]))
    assert [line.split()[2].rstrip(":") for line in log.getvalue().splitlines() if line.startswith("[")] == order


def test_stages_that_need_the_whole_cluster_do_not_overlap(tmp_path, ray_local, monkeypatch):
    import ray

    wait_stages(monkeypatch)
    cpus = ray.cluster_resources()["CPU"]
    got = spans(run_spec(graph_spec(str(tmp_path), cpus=cpus * 0.75), stream=io.StringIO()))
    assert got["a"][1] <= got["b"][0] or got["b"][1] <= got["a"][0]


def test_a_failed_branch_leaves_the_other_committed_and_a_rerun_completes_it(tmp_path, ray_local, monkeypatch):
    broken = {"a"}
    wait_stages(monkeypatch, broken)
    spec = graph_spec(str(tmp_path))
    with pytest.raises(RuntimeError, match="a broke"):
        run_spec(spec, stream=io.StringIO())
    assert committed_stage(spec, "b") is not None  # it ran to its end
    assert committed_stage(spec, "a") is None and committed_stage(spec, "c") is None  # c never started
    broken.clear()
    log = io.StringIO()
    done = run_spec(spec, stream=log)
    assert "wait b: committed, skipped" in log.getvalue() and set(done) == {"pool", "a", "b", "c"}
    assert "wait a: 1 rows out" in log.getvalue() and "wait c: 1 rows out" in log.getvalue()


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_terminal_shows_a_live_line_per_running_stage(tmp_path, ray_local, monkeypatch):
    """Two stages at once on a terminal: both live lines drawn together (rich), then each stage's summary stays."""
    import re

    from pipelines.run import registry

    wait_stages(monkeypatch)
    wait = registry.STAGES["wait"]

    def waiting(cfg, ctx):
        ctx.progress.line(ctx.label, f"  {ctx.label}: waiting")
        return wait.run(cfg, ctx)

    monkeypatch.setitem(registry.STAGES, "wait", registry.StageDef(wait.config, waiting, "wait", "dataset",
                                                                   needs=wait.needs))
    term = Terminal()
    run_spec(graph_spec(str(tmp_path)), stream=term)
    out = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", term.getvalue())  # rich's cursor moves and colours
    assert re.search(r"\[2/4\] wait a: waiting\n +\[3/4\] wait b: waiting", out)  # one frame, both lines
    for name in ("a", "b", "c"):
        assert f"wait {name}: 1 rows out" in out
    # a stage's live line goes when it ends: none after both summaries
    after = out[max(out.index("wait a: 1 rows out"), out.index("wait b: 1 rows out")):]
    assert "wait a: waiting" not in after and "wait b: waiting" not in after
    assert out.rstrip().splitlines()[-1].startswith("done: 4 stages")
