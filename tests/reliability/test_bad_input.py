"""Bad input, through the CLI: exit code 2, one line naming the file / stage / field, no traceback, and the stage
it stops left uncommitted (no manifest, no attempt).  Each case is one test; the pool they read is ingested once.

Most cases run ``pipelines.ops.cli.main`` in this process on the session's Ray (the same code path as the command,
without a process start per case); those that need a Ray of their own, or the process's exit, run the command.
"""

from __future__ import annotations

import io
import json
import pathlib
import subprocess
import sys
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipelines.bench.scorelog import write_score_log
from pipelines.ops import cli
from pipelines.run.storage import open_storage

ROOT = pathlib.Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.faults, pytest.mark.usefixtures("ray_local")]
POOL = {"stage": "ingest", "name": "pool", "source": {"kind": "embedded", "limit": 80}, "shard_size": 40,
        "split": {"test_fraction": 0.25, "seed": 0}}


@pytest.fixture(scope="module")
def storage(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad") / "runs"
    spec = tmp_path_factory.mktemp("spec") / "pool.yaml"
    spec.write_text(yaml.safe_dump({"name": "b", "storage": str(root), "stages": [POOL]}))
    assert cli.main(["run", str(spec)]) == 0
    return root


def run_bad(tmp_path, capsys, storage, stages=None, text=None, args=(), victim=None):
    """Run a spec that must be refused; returns the one error line."""
    path = tmp_path / "s.yaml"
    if text is None:
        text = yaml.safe_dump({"name": "b", "storage": str(storage), "stages": [POOL, *stages]}, sort_keys=False)
    path.write_text(text)
    capsys.readouterr()
    code = cli.main(["run", str(path), *args])
    err = _without_logging_errors(capsys.readouterr().err.strip().splitlines())
    assert code == 2, err
    errors = [line for line in err if line.startswith("gradmimic: error: ")]
    assert len(errors) == 1 and errors[0] == err[-1] and "Traceback" not in "\n".join(err), err
    if victim is not None:  # the refused stage: nothing of it committed or left behind
        d = pathlib.Path(storage) / "b" / victim
        assert not (d / "_MANIFEST.json").exists() and not list(d.glob("_attempt-*")), victim
    return err[-1][len("gradmimic: error: "):]


def _without_logging_errors(lines):
    """In-process only: a library logger still holding an earlier test's captured (closed) stream reports that
    with a traceback of its own; the command in its own process never sees it."""
    out, skipping = [], False
    for line in lines:
        if line == "--- Logging error ---":
            skipping = True
        elif skipping and line.startswith("Arguments:"):
            skipping = False
        elif not skipping:
            out.append(line)
    return out


def train(name="t", **kw):
    return {"stage": "train", "name": name, "data": "pool", "batch_size": 8, "steps": 2, **kw}


def weights_file(path, **tensors):
    from safetensors.torch import save_file

    save_file(tensors, str(path))
    return str(path)


# ------------------------------------------------------------------------------------------------ the spec


def test_malformed_yaml(tmp_path, capsys, storage):
    line = run_bad(tmp_path, capsys, storage, text="name: b\nstages: [\n  {stage: ingest\n")
    assert line.startswith("s.yaml: malformed YAML at line ")


def test_unknown_stage_kind(tmp_path, capsys, storage):
    line = run_bad(tmp_path, capsys, storage, [{"stage": "trian", "name": "t"}])
    assert line.startswith("s.yaml: stages[1]: stage: unknown stage 'trian' (known: ingest, train")


def test_unknown_key(tmp_path, capsys, storage):
    line = run_bad(tmp_path, capsys, storage, [train(batchsize=8)])
    assert line.startswith("s.yaml: stage 't' (train): batchsize: unknown key")


def test_wrong_type(tmp_path, capsys, storage):
    line = run_bad(tmp_path, capsys, storage, [train(batch_size="big")])
    assert "stage 't' (train): batch_size: expected" in line and "'big'" in line


def test_undefined_reference(tmp_path, capsys, storage):
    line = run_bad(tmp_path, capsys, storage, [train(data="nopool")])
    assert "stage 't' (train): data: " in line and "'nopool'" in line


def test_a_stage_reading_a_stage_of_the_wrong_kind(tmp_path, capsys, storage):
    line = run_bad(tmp_path, capsys, storage, [{"stage": "filter", "name": "f", "data": "pool", "utility": "pool",
                                               "keep": {"mean_score": {"top": 0.5}}}])
    assert "stage 'f' (filter): utility: " in line and "'pool'" in line


def test_temperature_must_be_positive(tmp_path, capsys, storage):
    line = run_bad(tmp_path, capsys, storage, [train(mode="grand", mimic={"temperature": 0})])
    assert "stage 't' (train): mimic.temperature: " in line and "> 0" in line


@pytest.mark.parametrize("fraction", [0, 1.5])
def test_a_fraction_outside_0_1(tmp_path, capsys, storage, fraction):
    line = run_bad(tmp_path, capsys, storage, [{"stage": "filter", "name": "f", "data": "pool",
                                               "keep": {"random": {"top": fraction}}}])
    assert "stage 'f' (filter): keep" in line and "(0, 1]" in line


def test_credentials_in_the_spec(tmp_path, capsys, storage):
    text = yaml.safe_dump({"name": "b", "storage": str(storage), "storage_options": {"secret": "hunter2"},
                           "stages": [POOL]})
    line = run_bad(tmp_path, capsys, storage, text=text)
    assert line == "s.yaml: storage_options.secret: credentials belong in the environment, not the spec"
    assert "hunter2" not in line


def test_a_missing_spec_file(tmp_path, capsys):
    capsys.readouterr()
    assert cli.main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert capsys.readouterr().err.strip() == f"gradmimic: error: {tmp_path / 'nope.yaml'}: no such spec file"


def test_an_override_of_a_stage_that_is_not_there(tmp_path, capsys, storage):
    line = run_bad(tmp_path, capsys, storage, [train()], args=["stages.nope.batch_size=4"])
    assert "stages.nope.batch_size" in line and "nope" in line


def test_force_of_a_stage_that_is_not_there(tmp_path, capsys, storage):
    line = run_bad(tmp_path, capsys, storage, [train()], args=["--force", "nope"])
    assert line.startswith("--force nope: no stage of that name in s.yaml")


# ------------------------------------------------------------------------------------------------ data


def test_a_missing_input_path(tmp_path, capsys, storage):
    line = run_bad(tmp_path, capsys, storage, [{"stage": "ingest", "name": "folder",
                                               "source": {"kind": "caption_folder", "path": str(tmp_path / "none")}}],
                   victim="folder")
    assert "stage 'folder' (ingest)" in line and str(tmp_path / "none") in line


def datacomp_source(root: pathlib.Path, tables: list) -> pathlib.Path:
    (root / "metadata").mkdir(parents=True)
    (root / "shards").mkdir()
    for i, t in enumerate(tables):
        pq.write_table(t, root / "metadata" / f"part-{i}.parquet")
    with tarfile.open(root / "shards" / "00000000.tar", "w") as tf:
        info = tarfile.TarInfo("000000000.txt")
        info.size = 1
        tf.addfile(info, io.BytesIO(b"x"))
    return root


def test_parquet_metadata_without_uid(tmp_path, capsys, storage):
    src = datacomp_source(tmp_path / "dc", [pa.table({"text": ["a cat"]})])
    line = run_bad(tmp_path, capsys, storage, [{"stage": "ingest", "name": "dc",
                                               "source": {"kind": "datacomp", "path": str(src)}}], victim="dc")
    assert line.endswith(f"datacomp metadata file://{src}/metadata/part-0.parquet: missing column 'uid'")


def test_duplicate_uids_in_a_pool(tmp_path, capsys, storage):
    uid = "0" * 31 + "1"
    src = datacomp_source(tmp_path / "dc", [pa.table({"uid": [uid], "text": ["a cat"]}),
                                            pa.table({"uid": ["0" * 31 + "2", uid], "text": ["a dog", "a cow"]})])
    line = run_bad(tmp_path, capsys, storage, [{"stage": "ingest", "name": "dc",
                                               "source": {"kind": "datacomp", "path": str(src)}}], victim="dc")
    assert line.endswith(f"datacomp metadata file://{src}/metadata/part-1.parquet: uid '{uid}' appears twice "
                         "(also in part-0.parquet); a pool's uids must be unique")


def test_a_score_log_without_a_column(tmp_path, capsys, storage):
    fs, _ = open_storage(str(tmp_path))
    write_score_log(fs, str(tmp_path / "log"), uids=32, epochs=1, batch_size=16, num_buckets=2, seed=0)
    part = next((tmp_path / "log").rglob("*.parquet"))
    pq.write_table(pq.read_table(part).drop(["weight"]), part)
    line = run_bad(tmp_path, capsys, storage, [{"stage": "aggregate", "name": "u",
                                               "scores": {"path": str(tmp_path / "log")}}], victim="u")
    assert "stage 'u' (aggregate): scores: " in line and "the score log has no column 'weight'" in line


def test_a_score_log_with_a_missing_file(tmp_path, capsys, storage):
    """A train stage's log that lost a file since it committed (its manifest lists it)."""
    from pipelines.run.runner import config_hash
    from pipelines.run.spec import parse_spec
    from pipelines.run.storage import StageDir

    spec = parse_spec({"name": "b", "storage": str(storage), "stages": [POOL, train("m", steps=4, mode="grand")]})
    pool_hash = json.loads((pathlib.Path(storage) / "b/pool/_MANIFEST.json").read_text())["config_hash"]
    fs, _ = open_storage(str(storage))
    d = StageDir(fs, f"{storage}/b/m")
    d.begin()
    write_score_log(fs, d.join("scores"), uids=32, epochs=2, batch_size=16, num_buckets=4, seed=0)
    files = sorted(str(p.relative_to(d.join(""))) for p in pathlib.Path(d.join("scores")).glob("*.parquet"))
    d.commit({"config_hash": config_hash(spec.stages[1], {"pool": pool_hash}), "files": files, "score_rows": 64,
              "config": {"num_buckets": 4, "mode": "mimic"}, "mode": "mimic", "stage": "train", "name": "m"})
    victim = pathlib.Path(d.join(files[1]))
    victim.unlink()
    line = run_bad(tmp_path, capsys, storage, [train("m", steps=4, mode="grand"), {"stage": "aggregate", "name": "u",
                                                                      "scores": "m"}], victim="u")
    assert "stage 'u' (aggregate): scores: the score log of stage 'm' is missing: 1 file(s), e.g. " in line
    assert victim.name in line


def test_a_corrupt_score_log_file_is_named(tmp_path, capsys, storage):
    fs, _ = open_storage(str(tmp_path))
    write_score_log(fs, str(tmp_path / "log"), uids=32, epochs=1, batch_size=16, num_buckets=2, seed=0)
    part = sorted((tmp_path / "log").rglob("*.parquet"))[-1]
    part.write_bytes(b"not parquet at all")
    line = run_bad(tmp_path, capsys, storage, [{"stage": "aggregate", "name": "u",
                                               "scores": {"path": str(tmp_path / "log")},
                                               "binarisers": ["threshold"]}], victim="u")
    assert f"file://{part}: not a readable parquet file" in line


def test_a_keep_rule_on_a_column_nobody_has(tmp_path, capsys, storage):
    line = run_bad(tmp_path, capsys, storage, [{"stage": "filter", "name": "f", "data": "pool",
                                               "keep": {"clip_score": {"top": 0.3}}}], victim="f")
    assert "stage 'f' (filter): keep: no column 'clip_score' in the pool (stage 'pool')" in line


# ------------------------------------------------------------------------------------------------ models


def test_a_mimic_parameter_not_in_the_model(tmp_path, capsys, storage):
    import torch

    ref = weights_file(tmp_path / "r.safetensors", w=torch.zeros(2))
    line = run_bad(tmp_path, capsys, storage, [train(mode="mimic", reference={"path": ref},
                                                     mimic={"params": ["visual.nope"]})])
    assert "stage 't' (train): mimic.params: " in line and "visual.nope" in line


def test_a_reference_of_another_shape(tmp_path, capsys, storage):
    import torch

    ref = weights_file(tmp_path / "r.safetensors", **{"visual.proj": torch.zeros(64, 7)})
    line = run_bad(tmp_path, capsys, storage, [train(mode="mimic", reference={"path": ref})], victim="t")
    assert "stage 't' (train): reference: parameter 'visual.proj' has shape (64, 7) in the weights but (64, 32)" in line


def test_a_weights_file_that_is_not_there(tmp_path, capsys, storage):
    line = run_bad(tmp_path, capsys, storage, [train(init={"path": str(tmp_path / "none.safetensors")})], victim="t")
    assert f"stage 't' (train): init.path: weights file not found: {tmp_path / 'none.safetensors'}" in line


def test_a_batch_larger_than_the_pool(tmp_path, capsys, storage):
    line = run_bad(tmp_path, capsys, storage, [train(batch_size=1000)], victim="t")
    assert "stage 't' (train): batch_size: 1000 is larger than the training pool" in line


# ------------------------------------------------------------------------------------------------ storage and cluster


def cli_process(spec: dict, tmp_path, env=None):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(spec))
    return subprocess.run([sys.executable, "-m", "pipelines", "run", str(path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=env)


def test_wrong_credentials(tmp_path):
    """An S3 server that checks credentials (moto with IAM auth on), given keys it does not know."""
    import os
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None
                time.sleep(0.2)
        env = {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "AKIAWRONG",
               "AWS_SECRET_ACCESS_KEY": "wrong-secret-value"}
        res = cli_process({"name": "c", "storage": "s3://gm-creds/runs", "ray": {"num_cpus": 1}, "stages": [POOL]},
                          tmp_path, env)
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert res.returncode == 2, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("gradmimic: error: storage: access denied (") and last.endswith("check the credentials")
    assert "wrong-secret-value" not in res.stderr + res.stdout and "Traceback" not in res.stderr


def test_an_unreachable_ray_address(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = cli_process({"name": "c", "storage": str(tmp_path / "runs"), "ray": {"address": f"127.0.0.1:{port}"},
                       "stages": [POOL]}, tmp_path)
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1].startswith(
        f"gradmimic: error: p.yaml: ray.address: nothing answers at 127.0.0.1:{port} (")
    assert not (tmp_path / "runs").exists()  # refused before anything was written
