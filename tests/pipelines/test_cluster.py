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
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], capture_output=True, text=True,
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
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
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
        yield url, env
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
    mimic["resources"] = {"num_workers": 1}
    path = tmp_path / "debug.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_submit_runs_the_spec_as_a_job_and_exits_with_its_status(ray_head, tmp_path):
    spec = debug_spec(tmp_path)
    url, env = ray_head
    res = cli("submit", str(spec), "--address", url, env=env, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:] + res.stdout[-3000:]
    assert "SUCCEEDED" in res.stderr.splitlines()[-1]
    assert "done: 5 stages" in res.stdout  # the job's own log, streamed
    for stage in ("pool", "ref", "mimic", "utility", "kept"):
        assert (tmp_path / "runs/debug" / stage / "_MANIFEST.json").exists(), stage
    kept = json.loads((tmp_path / "runs/debug/kept/_MANIFEST.json").read_text())
    assert kept["rows_in"] == 100 == kept["rows_out"] + kept["rejected"]
    resolved = yaml.safe_load((tmp_path / "runs/debug/spec.resolved.yaml").read_text())
    assert resolved["ray"]["address"] == "auto"  # the job's driver joined the cluster it ran on


def test_a_failing_job_is_failed_and_exits_non_zero(ray_head, tmp_path):
    """Valid here, wrong only where it runs (a score log that is not there): FAILED, and the reason's last line."""
    data = {"name": "bad", "storage": str(tmp_path / "runs"),
            "stages": [{"stage": "aggregate", "name": "agg", "scores": {"path": str(tmp_path / "nothing")}}]}
    spec = tmp_path / "bad.yaml"
    spec.write_text(yaml.safe_dump(data))
    url, env = ray_head
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
    url, env = ray_head
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
from pipelines.config import SpecError
from pipelines.runner import run_spec
from pipelines.spec import parse_spec
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
