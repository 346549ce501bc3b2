"""The train stage on Ray Train: DDP equals one process, the score log is exactly once, faults resume exactly.

All runs share one ingest of 160 real digits (128 train / 32 test) and the tiny CLIP; references are files made
here (the student's own initialisation plus a perturbation), so no test needs a reference training run.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import signal
import threading
import time

import numpy as np
import pytest
import torch

from pipelines.models.build import ModelSpec
from pipelines.run.config import SpecError
from pipelines.run.runner import run_spec
from pipelines.run.spec import parse_spec
from pipelines.run.storage import open_storage
from pipelines.stages.train import progress_board_name
from tests.support.train import POOL, assert_exactly_once, reference_file, score_log, stage_dir

pytestmark = pytest.mark.slow

TRAIN_ROWS = 128


def train_stage(name: str, **kw) -> dict:
    stage = {"stage": "train", "name": name, "data": "pool", "batch_size": 16, "steps": 4, "checkpoint_every": 2,
             "optimizer": {"lr": 1e-3}, "resources": {"num_workers": 1}}
    stage.update(kw)
    return stage


def run(storage: str, *stages: dict, name: str = "t", max_parallel=None):
    spec = parse_spec({"name": name, "storage": storage, "stages": [POOL, *stages]})
    log = io.StringIO()
    manifests = run_spec(spec, stream=log, max_parallel=max_parallel)
    return manifests, log.getvalue()


def weights(storage: str, stage: str, name: str = "t"):
    from safetensors.torch import load

    d = stage_dir(storage, stage, name)
    with d.fs.open(d.join("model.safetensors"), "rb") as f:
        return load(f.read())


def metrics(storage: str, stage: str):
    d = stage_dir(storage, stage)
    return d.read_table("metrics.parquet").to_pandas()


@pytest.fixture(scope="module")
def storage(tmp_path_factory, ray_local):
    root = str(tmp_path_factory.mktemp("train") / "runs")
    run(root)  # the shared ingest; every later run skips it
    return root


@pytest.fixture(scope="module")
def steady(storage, tmp_path_factory):
    """An uninterrupted 2-worker mimic run of 40 steps, which the fault tests must reproduce exactly."""
    ref = reference_file(tmp_path_factory.mktemp("ref") / "ref.safetensors", "clip")
    job = train_stage("steady", mode="mimic", reference={"path": ref}, batch_size=16, steps=40, checkpoint_every=5,
                      max_failures=2, resources={"num_workers": 2})
    run(storage, job)
    return job


def assert_close_weights(a, b, rtol=1e-5):
    """Equal to ``rtol`` relative to the model's parameter scale (its largest entry and its norm).

    Per tensor is too strict for float32 DDP: a parameter whose true gradient is 0 (attention key biases) gets
    float noise that Adam scales up to ``lr * noise / eps``, the same size in both runs but not the same values.
    """
    assert a.keys() == b.keys()
    scale = max(float(v.double().abs().max()) for v in b.values())
    norm = sum(float(v.double().pow(2).sum()) for v in b.values()) ** 0.5
    diff = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a) ** 0.5
    worst = max(a, key=lambda k: float((a[k].double() - b[k].double()).abs().max()))
    err = float((a[worst].double() - b[worst].double()).abs().max())
    assert err <= rtol * scale, f"{worst}: max error {err:.3e} vs scale {scale:.3e}"
    assert diff <= rtol * norm, f"relative L2 error {diff / norm:.3e}"


# ------------------------------------------------------------------------------------------------ DDP == 1 process


@pytest.mark.parametrize("task", ["clip", "classify"])
def test_two_workers_equal_one_process(storage, tmp_path, task):
    ref = reference_file(tmp_path / "ref.safetensors", task)
    params = ["visual.proj", "text_projection"] if task == "clip" else ["head.weight"]
    common = dict(task=task, mode="mimic", reference={"path": ref}, batch_size=15, steps=6, checkpoint_every=3,
                  eval_every=3, mimic={"params": params, "method": "normed_cos", "temperature": 0.3})
    manifests, _ = run(storage, train_stage(f"{task}1", **common),
                       train_stage(f"{task}2", **common, resources={"num_workers": 2}))
    assert manifests[f"{task}2"]["workers"] == 2 and manifests[f"{task}2"]["steps"] == 6
    # where a stage's seconds went, in the order they happen (seconds from the stage's start)
    phases = manifests[f"{task}2"]["phases"]
    order = ["fit", "process", "loop", "model", "first_step", "last_step", "reported", "fitted", "finished"]
    assert list(phases) == sorted(phases, key=phases.get) and set(phases) == set(order)
    assert all(phases[a] <= phases[b] for a, b in zip(order, order[1:])), phases
    assert 0 < phases["fit"] and phases["finished"] <= manifests[f"{task}2"]["timings"]["seconds"]
    one, two = weights(storage, f"{task}1"), weights(storage, f"{task}2")
    assert_close_weights(two, one)
    assert any(not torch.equal(one[k], v) for k, v in ModelSpec(task, num_classes=10).build().state_dict().items()
               if k in one)  # it trained
    log1, log2 = score_log(storage, f"{task}1"), score_log(storage, f"{task}2")
    assert_exactly_once(log1, 15, 6)
    assert_exactly_once(log2, 15, 6, sizes=[8, 7])  # unequal local batches
    assert (log1[["uid_hi", "uid_lo", "step", "epoch"]].values == log2[["uid_hi", "uid_lo", "step", "epoch"]].values).all()
    for col in ("score", "weight", "loss"):
        np.testing.assert_allclose(log2[col], log1[col], rtol=1e-4, atol=1e-6, err_msg=col)
    assert log2.weight.std() > 1e-4  # the weights are not uniform: reweighting happened
    m1, m2 = metrics(storage, f"{task}1"), metrics(storage, f"{task}2")
    for col in ("loss", "alignment", "weight_entropy", "test_loss"):
        np.testing.assert_allclose(m2[col].astype(float), m1[col].astype(float), rtol=1e-4, err_msg=col)
    assert m1.test_loss.notna().sum() == 2 and m1.test_accuracy.notna().sum() == 2  # steps 3 and 6


# ------------------------------------------------------------------------------------------------ worker groups


def test_stages_of_the_same_resources_share_a_worker_group_and_train_as_on_a_fresh_one(storage, tmp_path):
    """One after another, three stages asking for the same workers run on one group (no new process: no `process`
    phase), the third with the first's config reproduces it exactly after another stage ran there; a stage asking
    for other workers gets its own group."""
    ref = reference_file(tmp_path / "ref.safetensors", "clip")
    first = train_stage("g1", mode="mimic", reference={"path": ref}, eval_every=2, seed=5)
    manifests, _ = run(storage, first, train_stage("g2", mode="grand", seed=3), {**first, "name": "g3"},
                       train_stage("g4", resources={"num_workers": 2}), max_parallel=1)
    group = {name: manifests[name]["worker_group"] for name in ("g1", "g2", "g3", "g4")}
    assert group["g1"] == group["g2"] == group["g3"] != group["g4"] and all(group.values())
    assert ["process" in manifests[n]["phases"] for n in ("g1", "g2", "g3", "g4")] == [True, False, False, True]
    one, three = weights(storage, "g1"), weights(storage, "g3")
    assert one.keys() == three.keys() and all(torch.equal(one[k], three[k]) for k in one)
    log1, log3 = score_log(storage, "g1"), score_log(storage, "g3")
    assert_exactly_once(log3, 16, 4)
    assert log1.equals(log3)
    assert metrics(storage, "g1")[["loss", "test_loss"]].equals(metrics(storage, "g3")[["loss", "test_loss"]])
    assert not alive_train_controllers(), "a worker group outlived its run"


# ------------------------------------------------------------------------------------------------ modes


@pytest.mark.long
def test_every_mode_runs(storage, tmp_path):
    """Every mode through the stage (grand: test_train_on_s3), on 2 workers where the scores couple the ranks
    (mimic's global softmax, agra's and influence's direction), on 1 elsewhere."""
    ref = reference_file(tmp_path / "ref.safetensors", "clip")
    comparison = {"data": "pool", "split": "train", "samples": 24, "every": 2}
    modes = {
        "plain": {"resources": {"num_workers": 1}},
        "mimic": {"reference": {"path": ref}, "mimic": {"warmup_steps": 1}},
        "rho": {"reference": {"path": ref}, "precision": "bf16",  # autocast (on CPU here; on GPU by default)
                "resources": {"num_workers": 1}},
        "agra": {"comparison": comparison}, "influence": {"comparison": comparison},
    }
    stages = [train_stage(f"mode_{m}", mode=m, batch_size=12, steps=3, checkpoint_every=3,
                          **{"resources": {"num_workers": 2}, **kw}) for m, kw in modes.items()]
    manifests, _ = run(storage, *stages)
    for mode in modes:
        assert manifests[f"mode_{mode}"]["steps"] == 3
        log = score_log(storage, f"mode_{mode}")
        assert_exactly_once(log, 12, 3)
        if mode == "plain":
            assert (log.score == 0).all() and np.allclose(log.weight, 1 / 12)
        else:
            assert log.score.std() > 0, mode
        if mode == "agra":  # kept samples share the weight equally, dropped ones get none
            for _, w in log.groupby("step").weight:
                kept = w[w > 0]
                assert np.allclose(kept, 1 / len(kept), rtol=1e-5)
        if mode == "mimic":  # warm-up step 1: the plain mean; then the softmax
            assert np.allclose(log[log.step == 1].weight, 1 / 12) and log[log.step > 1].weight.std() > 1e-5
        m = metrics(storage, f"mode_{mode}")
        assert m.test_loss.notna().any()


# ------------------------------------------------------------------------------------------------ faults


def kill_rank_when(board_name: str, step: int, done: threading.Event, killed: list) -> None:
    """SIGKILL rank 1's process once the run passes ``step`` (a real process death, not an exception)."""
    import ray

    deadline = time.time() + 180
    while time.time() < deadline and not done.is_set():
        try:
            info = ray.get(ray.get_actor(board_name).get.remote(), timeout=5)
        except (ValueError, Exception):  # noqa: BLE001 - not started yet
            time.sleep(0.05)
            continue
        if info["state"].get("step", 0) >= step and 1 in info["pids"]:
            os.kill(info["pids"][1], signal.SIGKILL)
            killed.append(info["pids"][1])
            return
        time.sleep(0.01)


def test_killed_worker_resumes_exactly(storage, steady):
    fs, root = open_storage(storage)
    done, killed = threading.Event(), []
    killer = threading.Thread(target=kill_rank_when, args=(progress_board_name(f"{root}/t/faulty"), 12, done, killed))
    killer.start()
    try:  # then a stage with the same resources: it does not get the group that restarted
        manifests, _ = run(storage, {**steady, "name": "faulty"}, {**steady, "name": "after", "steps": 2},
                           max_parallel=1)
    finally:
        done.set()
        killer.join(timeout=10)
    assert killed, "the worker was never killed (the run finished first?)"
    assert manifests["faulty"]["restarts"] == 1 and manifests["after"]["restarts"] == 0
    assert manifests["after"]["worker_group"] != manifests["faulty"]["worker_group"]
    log, steady = score_log(storage, "faulty"), score_log(storage, "steady")
    assert_exactly_once(log, 16, 40)
    assert (log[["uid_hi", "uid_lo", "step"]].values == steady[["uid_hi", "uid_lo", "step"]].values).all()
    np.testing.assert_allclose(log.score, steady.score, rtol=1e-6, atol=1e-9)
    assert_close_weights(weights(storage, "faulty"), weights(storage, "steady"), rtol=1e-6)
    history = metrics(storage, "faulty")
    assert history.step.tolist() == list(range(1, 41))  # the metrics, too, once per step


# ------------------------------------------------------------------------------------------------ storage


def test_train_on_s3(s3_endpoint, ray_local, tmp_path):
    fs, _ = open_storage("s3://gm-train")
    fs.mkdir("gm-train")
    storage = "s3://gm-train/runs"
    manifests, _ = run(storage, train_stage("s3run", mode="grand", batch_size=16, steps=4, checkpoint_every=2),
                       name="s3")
    m = manifests["s3run"]
    assert m["steps"] == 4 and m["rows_out"] == 64
    assert_exactly_once(score_log(storage, "s3run", "s3"), 16, 4)
    attempt = f"gm-train/runs/s3/s3run/{m['attempt']}"
    held = sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{attempt}/checkpoints", detail=False))
    assert held == ["latest.json", "step-000000002", "step-000000004"]  # the two latest, the last registered
    assert fs.exists(f"{attempt}/checkpoints/step-000000004/model.safetensors")
    assert json.loads(fs.cat_file(f"{attempt}/checkpoints/latest.json"))["state"]["step"] == 4
    assert set(weights(storage, "s3run", "s3")) == set(ModelSpec("clip").build().state_dict())
    assert json.loads(fs.cat_file(f"{attempt}/model.json"))["open_clip_config"]["embed_dim"] == 32
    assert not alive_train_controllers(), "the stage's Ray Train controller outlived it"
    assert not fs.exists("gm-train/runs/s3/_train"), "the worker group's Ray Train run state outlived it"


def alive_train_controllers(wait_s: float = 30.0) -> list:
    """Ray Train controller actors still alive after ``wait_s`` (an actor whose handles are gone exits soon, not at
    once).  Ray's state API needs the dashboard, which the session's Ray runs without: the GCS table instead."""
    import time

    import ray._private.state

    deadline = time.monotonic() + wait_s
    while True:
        alive = [a for a in ray._private.state.actors().values()
                 if a["ActorClassName"] == "TrainController" and a["State"] == "ALIVE"]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.5)


# ------------------------------------------------------------------------------------------------ bad configs at run time


def test_run_time_config_errors_leave_nothing(storage, tmp_path, monkeypatch):
    import socket

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket, "create_connection", offline)  # the same on every machine: no network
    other = tmp_path / "other.safetensors"
    from safetensors.torch import save_file

    save_file({"visual.proj": torch.zeros(64, 7)}, str(other))
    cases = [
        (train_stage("big", batch_size=TRAIN_ROWS + 1),
         f"stage 'big' (train): batch_size: {TRAIN_ROWS + 1} is larger than the training pool ({TRAIN_ROWS} train rows"),
        (train_stage("shape", mode="mimic", reference={"path": str(other)}),
         "stage 'shape' (train): reference: parameter 'visual.proj' has shape (64, 7) in the weights but (64, 32)"),
        (train_stage("nofile", init={"path": str(tmp_path / "missing.safetensors")}),
         "stage 'nofile' (train): init.path: weights file not found"),
        (train_stage("hub", model={"arch": "ViT-B-32"}, init={"pretrained": "laion2b_s34b_b79k"}),
         "stage 'hub' (train): init.pretrained: pretrained ViT-B-32/laion2b_s34b_b79k must be downloaded from "
         "huggingface.co, which is not reachable (no network?)"),
        (train_stage("tag", model={"arch": "ViT-B-32"}, init={"pretrained": "nonsense"}),
         "stage 'tag' (train): init.pretrained: open_clip has no pretrained tag 'nonsense' for ViT-B-32 (tags: openai,"),
        (train_stage("gpu", resources={"num_workers": 1, "use_gpu": True}),
         "stage 'gpu' (train): resources: needs 2 CPUs and 1 GPUs, the cluster has 4 CPUs and 0 GPUs"),
        (train_stage("cpus", resources={"num_workers": 2, "cpus_per_worker": 2}),
         "stage 'cpus' (train): resources: needs 5.5 CPUs and 0 GPUs, the cluster has 4 CPUs and 0 GPUs"),
    ]
    for stage, message in cases:
        with pytest.raises(SpecError) as err:
            run(storage, stage)
        assert message in str(err.value) and "\n" not in str(err.value)
        fs, root = open_storage(storage)
        assert not fs.exists(f"{root}/t/{stage['name']}/_MANIFEST.json")
        d = f"{root}/t/{stage['name']}"
        assert not fs.exists(d) or not [p for p in fs.ls(d) if "_attempt-" in p]  # nothing half-written


def test_rerun_after_the_driver_was_killed_resumes(storage, steady, tmp_path):
    import glob
    import subprocess
    import sys

    import psutil
    import yaml
    from fsspec.implementations.local import LocalFileSystem

    from pipelines.formats.model import registered_step

    spec = tmp_path / "spec.yaml"  # the shared run: its ingest is committed already
    spec.write_text(yaml.safe_dump({"name": "t", "storage": storage, "ray": {"address": "local", "num_cpus": 4},
                                    "stages": [POOL, {**steady, "name": "job"}]}))
    cmd = [sys.executable, "-m", "pipelines", "run", str(spec)]
    root = pathlib.Path(__file__).resolve().parents[2]
    driver = subprocess.Popen(cmd, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and max([registered_step(LocalFileSystem(), p) for p in
                                              glob.glob(f"{storage}/t/job/_attempt-*/checkpoints")] or [0]) < 10:
            assert driver.poll() is None, "the run ended before it could be killed"
            time.sleep(0.2)
        driver.send_signal(signal.SIGKILL)  # the driver dies mid-run, its local Ray with it
    finally:
        driver.kill()
        driver.wait(timeout=30)
    deadline = time.time() + 60
    while time.time() < deadline and any("RayTrainWorker" in " ".join(p.info["cmdline"] or [])
                                         for p in psutil.process_iter(["cmdline"])):
        time.sleep(0.5)
    again = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "ingest pool: committed, skipped" in again.stderr
    assert "train job: continuing the unfinished attempt" in again.stderr
    resumed = int(again.stderr.split("resuming from the checkpoint at step ")[1].split("/")[0])
    assert 10 <= resumed < 40
    log, reference = score_log(storage, "job"), score_log(storage, "steady")
    assert_exactly_once(log, 16, 40)
    assert (log[["uid_hi", "uid_lo", "step"]].values == reference[["uid_hi", "uid_lo", "step"]].values).all()
    assert_close_weights(weights(storage, "job"), weights(storage, "steady"), rtol=1e-6)
