"""A real Ray head on 127.0.0.1 (its own ports and temp dir, ended by its own process id): ``gradmimic submit``,
``status`` and ``logs``, and the refusal of local storage on a multi-node cluster."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def free_ports(n: int):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def cli(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "pipelines", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)


@pytest.fixture(scope="module")
def ray_head():
    """``ray start --head --block`` on 127.0.0.1 with token authentication (its own token); yields the job
    server's URL and the environment a client needs (``RAY_AUTH_MODE=token`` and the token's file)."""
    import secrets

    ray_bin = shutil.which("ray", path=os.path.dirname(sys.executable)) or shutil.which("ray")
    gcs, dashboard, agent_grpc, agent_http, metrics, node, obj, runtime_env = free_ports(8)
    temp = tempfile.mkdtemp(prefix="gmray")  # short: Ray's sockets live under it
    token = os.path.join(temp, "auth_token")
    with open(token, "w") as f:
        f.write(secrets.token_hex(32))
    os.chmod(token, 0o600)
    # no storage credentials on the cluster itself: a job gets them from its submitter (--env) or not at all
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("AWS_")},
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": token}
    cmd = [ray_bin, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
           f"--dashboard-agent-grpc-port={agent_grpc}", f"--dashboard-agent-listen-port={agent_http}",
           f"--metrics-export-port={metrics}", f"--node-manager-port={node}", f"--object-manager-port={obj}",
           f"--runtime-env-agent-port={runtime_env}", "--num-cpus=4", f"--temp-dir={temp}", "--include-dashboard=true"]
    head = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 180
        while True:  # up when the job server answers (here: that it has no such job)
            assert head.poll() is None, "ray start exited"
            res = cli("status", "raysubmit_probe", "--address", url, env=env, timeout=60)
            if "job raysubmit_probe:" in res.stderr:
                break
            assert time.monotonic() < deadline, f"the Ray head's job server did not answer: {res.stderr[-500:]}"
            time.sleep(2)
        yield url, env, temp
    finally:
        stop_group(head)
        shutil.rmtree(temp, ignore_errors=True)


def stop_group(proc: subprocess.Popen) -> None:
    """End ``ray start`` and everything it started (its own session: never a machine-wide ``ray stop``)."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 30)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue


def debug_spec(tmp_path, **stages_override):
    data = yaml.safe_load((ROOT / "pipelines/configs/debug.yaml").read_text())
    data["storage"] = str(tmp_path / "runs")
    pool, ref, mimic, utility, kept = data["stages"]
    pool["source"]["limit"] = 100
    for st in (ref, mimic):
        st.update(batch_size=16, epochs=1)
    path = tmp_path / "debug.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_submit_runs_the_spec_as_a_job_and_exits_with_its_status(ray_head, tmp_path):
    spec = debug_spec(tmp_path)
    url, env, _ = ray_head
    res = cli("submit", str(spec), "--address", url, env=env, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:] + res.stdout[-3000:]
    assert "SUCCEEDED" in res.stderr.splitlines()[-1]
    assert "done: 5 stages" in res.stdout  # the job's own log, streamed
    # the debug spec (README), shrunk: ingest, a plain reference, Grad-Mimic on 2 workers, aggregate, filter
    assert "ingest pool: 100 rows out, 0 rejected" in res.stdout
    assert "train ref: 80 rows out" in res.stdout and "train mimic: 80 rows out" in res.stdout
    from tests.support.train import assert_exactly_once, score_log

    log = score_log(str(tmp_path / "runs"), "mimic", "debug")
    assert_exactly_once(log, 16, 5, sizes=[8])
    manifest = json.loads((tmp_path / "runs/debug/mimic/_MANIFEST.json").read_text())
    assert manifest["workers"] == 2 and {"test_loss", "test_accuracy"} <= set(manifest["final"])
    utility = json.loads((tmp_path / "runs/debug/utility/_MANIFEST.json").read_text())
    assert utility["rows_in"] == len(log) and utility["samples"] == log.groupby(["uid_hi", "uid_lo"]).ngroups
    kept = json.loads((tmp_path / "runs/debug/kept/_MANIFEST.json").read_text())
    assert kept["rows_in"] == 100 == kept["rows_out"] + kept["rejected"] and kept["passed_through"] == 20
    assert 0 < kept["kept_in_scope"] < 80 and kept["unscored"]["pool_rows"] == 0
    assert f"filter kept: {kept['rows_out']} rows out, {kept['rejected']} rejected" in res.stdout
    resolved = yaml.safe_load((tmp_path / "runs/debug/spec.resolved.yaml").read_text())
    assert resolved["ray"]["address"] == "auto"  # the job's driver joined the cluster it ran on


def test_a_failing_job_is_failed_and_exits_non_zero(ray_head, tmp_path):
    """Valid here, wrong only where it runs (a score log that is not there): FAILED, and the reason's last line."""
    data = {"name": "bad", "storage": str(tmp_path / "runs"),
            "stages": [{"stage": "aggregate", "name": "agg", "scores": {"path": str(tmp_path / "nothing")}}]}
    spec = tmp_path / "bad.yaml"
    spec.write_text(yaml.safe_dump(data))
    url, env, _ = ray_head
    res = cli("submit", str(spec), "--address", url, "--no-wait", env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    job_id = res.stdout.strip()
    follow = cli("logs", job_id, "--address", url, "--follow", env=env)
    assert follow.returncode == 1
    assert f"gradmimic: job {job_id} FAILED" in follow.stderr.splitlines()[-1]
    assert "no score-log files" in follow.stdout
    state = cli("status", job_id, "--address", url, env=env)
    assert state.returncode == 0 and state.stdout.startswith(f"{job_id} FAILED")
    assert not (tmp_path / "runs/bad/agg/_MANIFEST.json").exists()


def test_bad_submissions_are_one_line_before_anything_is_sent(ray_head, tmp_path):
    spec = debug_spec(tmp_path)
    url, env, _ = ray_head
    env = {k: v for k, v in env.items() if k != "GM_NOT_SET"}
    res = cli("submit", str(spec), "--address", url, "--env", "GM_NOT_SET", env=env)
    assert res.returncode == 2 and res.stderr.strip() == "gradmimic: error: --env GM_NOT_SET: not set in this environment"
    res = cli("submit", str(spec), "stages.mimic.mimic.temperature=0", "--address", url, env=env)
    assert res.returncode == 2 and "mimic.temperature" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    port = free_ports(1)[0]
    res = cli("status", "raysubmit_x", "--address", f"http://127.0.0.1:{port}", env=env)
    assert res.returncode == 2 and res.stderr.startswith(f"gradmimic: error: --address http://127.0.0.1:{port}: ")
    res = cli("status", "raysubmit_nope", "--address", url, env=env)
    assert res.returncode == 2 and res.stderr.startswith("gradmimic: error: job raysubmit_nope: ")


def test_local_storage_is_refused_on_a_multi_node_cluster(tmp_path):
    """Two nodes (``ray.cluster_utils.Cluster``): a local storage path stops the run before anything is written."""
    code = f"""
import sys
from ray.cluster_utils import Cluster
from pipelines.run.config import SpecError
from pipelines.run.runner import run_spec
from pipelines.run.spec import parse_spec
cluster = Cluster(initialize_head=True, head_node_args={{"num_cpus": 1}})
cluster.add_node(num_cpus=1)
cluster.wait_for_nodes()
spec = parse_spec({{"name": "t", "storage": {str(tmp_path / 'runs')!r}, "ray": {{"address": cluster.address}},
                   "stages": [{{"stage": "ingest", "name": "pool", "source": {{"kind": "embedded", "limit": 10}}}}]}},
                  label="t.yaml")
try:
    run_spec(spec)
except SpecError as exc:
    print(exc)
finally:
    import ray
    ray.shutdown()  # the driver first: the cluster will not remove the node it is connected to
    cluster.shutdown()
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().splitlines()[-1] == (
        f"t.yaml: storage: {str(tmp_path / 'runs')!r} is a local path, but the Ray cluster has 2 nodes and tasks on "
        "the others cannot reach it: give shared storage (an s3:// prefix)")
    assert not (tmp_path / "runs").exists()


def test_two_workers_on_two_nodes_write_a_complete_score_log_to_s3(s3_endpoint, tmp_path):
    """Three one-CPU nodes (``ray.cluster_utils.Cluster``): the two training workers cannot share a node, storage
    is the S3 server on 127.0.0.1, and the score log has every sample of every step exactly once."""
    from pipelines.run.storage import open_storage
    from tests.support.train import POOL, assert_exactly_once, reference_file, score_log

    fs, _ = open_storage("s3://gm-two")
    fs.mkdir("gm-two")
    storage = "s3://gm-two/runs"
    ref = reference_file(tmp_path / "ref.safetensors", "clip")
    stages = [POOL, {"stage": "train", "name": "mimic", "data": "pool", "mode": "mimic", "reference": {"path": ref},
                     "batch_size": 16, "steps": 4, "checkpoint_every": 2, "optimizer": {"lr": 1e-3},
                     "resources": {"num_workers": 2, "cpus_per_worker": 1, "cpus_per_decoder": 0.25}}]
    code = f"""
import json, ray
from ray.cluster_utils import Cluster
from pipelines.run.runner import run_spec
from pipelines.run.spec import parse_spec
cluster = Cluster(initialize_head=True, head_node_args={{"num_cpus": 1}})
for _ in range(2):
    cluster.add_node(num_cpus=1)
cluster.wait_for_nodes()
try:
    spec = parse_spec({{"name": "t", "storage": {storage!r}, "ray": {{"address": cluster.address}},
                       "stages": {stages!r}}}, label="t.yaml")
    print(json.dumps(run_spec(spec)["mimic"]))
finally:
    ray.shutdown()
    cluster.shutdown()
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    manifest = json.loads(res.stdout.strip().splitlines()[-1])
    assert manifest["workers"] == 2 and manifest["worker_nodes"] == 2
    assert manifest["steps"] == 4 and manifest["score_rows"] == 64
    assert_exactly_once(score_log(storage, "mimic"), 16, 4, sizes=[8])
    assert fs.exists("gm-two/runs/t/mimic/_MANIFEST.json")


def test_credentials_reach_the_job_and_no_output(ray_head, s3_endpoint, tmp_path):
    """A secret passed with --env: the job's tasks reach S3 with it (the head has no credentials of its own), and
    it is in no output: the CLI's, the job's logs and metadata, every object the run wrote, Ray's log files."""
    import secrets

    from pipelines.run.storage import open_storage

    url, env, temp = ray_head
    secret = "gmsecret" + secrets.token_hex(16)
    fs, _ = open_storage("s3://gm-secret")
    fs.mkdir("gm-secret")
    data = {"name": "sec", "storage": "s3://gm-secret/runs", "stages": [
        {"stage": "ingest", "name": "pool", "source": {"kind": "embedded", "limit": 60}, "shard_size": 20},
        {"stage": "filter", "name": "kept", "data": "pool", "keep": {"random": {"top": 0.5}}}]}
    spec = tmp_path / "sec.yaml"
    spec.write_text(yaml.safe_dump(data))
    client_env = {**env, "AWS_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": "testing",
                  "AWS_SECRET_ACCESS_KEY": secret}
    res = cli("submit", str(spec), "--address", url, "--env", "AWS_ENDPOINT_URL", "--env", "AWS_ACCESS_KEY_ID",
              "--env", "AWS_SECRET_ACCESS_KEY", env=client_env, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:] + res.stdout[-3000:]
    kept = json.loads(fs.cat_file("gm-secret/runs/sec/kept/_MANIFEST.json"))
    assert kept["rows_in"] == 60 and kept["rows_out"] + kept["rejected"] == 60
    job_id = res.stderr.split("submitted ")[1].split()[0]
    dump = f"""
import dataclasses, json
from ray.job_submission import JobSubmissionClient
jobs = JobSubmissionClient({url!r})
plain = lambda j: j.dict() if hasattr(j, "dict") else dataclasses.asdict(j)
print(json.dumps({{"info": plain(jobs.get_job_info({job_id!r})), "list": [plain(j) for j in jobs.list_jobs()],
                  "logs": jobs.get_job_logs({job_id!r})}}, default=str))
"""
    seen = subprocess.run([sys.executable, "-c", dump], capture_output=True, text=True, timeout=120, env=env)
    assert seen.returncode == 0, seen.stderr[-2000:]
    job = json.loads(seen.stdout.strip().splitlines()[-1])
    assert job["info"]["runtime_env"]["worker_process_setup_hook"] == "pipelines.ops.jobenv.load"
    assert "done: 2 stages" in job["logs"]
    outputs = {"cli": res.stdout + res.stderr, "job": seen.stdout}
    for path in fs.find("gm-secret/runs"):
        outputs[path] = fs.cat_file(path).decode("latin-1")
    for path in pathlib.Path(temp).rglob("*"):
        if path.is_file() and "runtime_resources" not in path.parts and not path.is_socket():
            outputs[str(path)] = path.read_bytes().decode("latin-1")
    assert len(outputs) > 20
    leaked = [where for where, text in outputs.items() if secret in text]
    assert leaked == []

