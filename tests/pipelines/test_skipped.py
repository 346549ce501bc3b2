"""Undecodable images in the train split: skipped by the train stage, each ``(step, uid)`` recorded once with its
reason, the math over the decodable rows exactly (and, with none skipped, bit for bit the same)."""

from __future__ import annotations

import io

import numpy as np
import pytest

from pipelines.formats import skipped
from pipelines.formats.score_log import discard_after, list_parts, segment_of
from pipelines.run.storage import open_storage, read_parquet
from tests.support.train import bomb_png, corrupt_png, random_bytes, truncated_jpeg


def test_skipped_writer_names_counts_and_resume(tmp_path):
    fs, root = open_storage(str(tmp_path / "skipped"))
    w = skipped.SkippedWriter(fs, root, rank=1, first_step=1)
    w.add(1, 0, [0], [5], [skipped.TRUNCATED])
    w.add(2, 0, [], [], [])
    w.add(2, 0, [0, 0], [6, 7], [skipped.TOO_LARGE, skipped.TRUNCATED])
    assert [p.rsplit("/", 1)[1] for p in w.flush(2)] == ["part-s000000001-000000002-r0001.parquet"]
    assert w.flush(4) == []  # nothing skipped in steps 3-4: no file
    w.add(5, 1, [1], [2], [skipped.EMPTY_SHARE])
    w.flush(6)
    parts = list_parts(fs, root)
    assert [segment_of(p) for p in parts] == [(1, 2, 1), (5, 6, 1)]
    assert skipped.total_counts(fs, parts) == {"empty_share": 1, "too_large": 1, "truncated": 2}
    t = read_parquet(fs, parts[0]).to_pylist()
    assert [(r["uid"], r["step"], r["reason"]) for r in t] == [
        (f"{5:032x}", 1, "truncated"), (f"{6:032x}", 2, "too_large"), (f"{7:032x}", 2, "truncated")]
    # a resume from the checkpoint at step 4: the segment written for a checkpoint that never registered goes, and
    # the rerun rewrites it under the same name
    assert discard_after(fs, root, 4) == 1
    again = skipped.SkippedWriter(fs, root, rank=1, first_step=5)
    again.add(5, 1, [1], [2], [skipped.EMPTY_SHARE])
    again.flush(6)
    assert list_parts(fs, root) == parts
    assert skipped.skipped_files(["scores/part-s000000001-000000002-r0000.parquet", "skipped/" + parts[1].rsplit(
        "/", 1)[1], "skipped/x.tmp"]) == ["skipped/" + parts[1].rsplit("/", 1)[1]]


# ------------------------------------------------------------------------------------------------ the train stage

N, BATCH, STEPS, WORLD = 80, 16, 6, 2
PLANTED = [truncated_jpeg(), random_bytes(), bomb_png(), corrupt_png()]


def _ingest(root, storage, name, bad=None):
    from pipelines.run.runner import run_spec
    from pipelines.run.spec import parse_spec
    from tests.support.train import webdataset_pool

    uids = webdataset_pool(root, N, bad)
    spec = parse_spec({"name": name, "storage": storage, "stages": [
        {"stage": "ingest", "name": "pool", "source": {"kind": "webdataset", "path": str(root)},
         "split": {"test_fraction": 0.2, "seed": 0}, "shard_size": 40}]})
    run_spec(spec, stream=io.StringIO())
    return uids


def _train_rows(storage, name):
    from tests.support.ingest import read_output
    from tests.support.train import stage_dir

    d = stage_dir(storage, "pool", name)
    rows, _, _ = read_output(d, d.manifest())
    return [r["uid"] for r in rows if r["split"] == "train"], [r["uid"] for r in rows if r["split"] == "test"]


def _pick(train, seed):
    """For a plan seed: the uids of rank 1's share of the last step (all planted: an empty share), if none of them
    is in step 1 (so step 1 trains on its whole batch), else None."""
    from pipelines.training.data import StepPlan

    plan = StepPlan(len(train), BATCH, WORLD, seed, STEPS)
    share = {train[i] for i in plan.rank_rows(STEPS, 1)}
    return None if share & {train[i] for i in plan.global_rows(1)} else sorted(share), plan


@pytest.mark.slow
def test_undecodable_images_are_skipped_and_recorded_once(tmp_path, ray_local):
    from pipelines.run.runner import run_spec
    from pipelines.run.spec import parse_spec
    from tests.support.train import reference_file, score_log, stage_dir

    storage = str(tmp_path / "runs")
    uids = _ingest(tmp_path / "clean", storage, "clean")
    train, test = _train_rows(storage, "clean")
    seed, (empty, plan) = next((s, _pick(train, s)) for s in range(1000) if _pick(train, s)[0] is not None)
    step1 = {train[i] for i in plan.global_rows(1)}
    others = [u for u in train if u not in step1 and u not in empty][:3]  # more planted rows, after step 1
    planted = {u: PLANTED[k % len(PLANTED)] for k, u in enumerate(empty + others + test[:1])}
    _ingest(tmp_path / "bad", storage, "bad", {uids.index(u): b for u, b in planted.items()})
    assert _train_rows(storage, "bad") == (train, test)  # the same rows in the same order: the same batches

    ref = reference_file(tmp_path / "ref.safetensors", "clip")
    job = {"stage": "train", "name": "job", "data": "pool", "mode": "mimic", "reference": {"path": ref},
           "batch_size": BATCH, "steps": STEPS, "checkpoint_every": 2, "eval_every": 3, "seed": seed,
           "optimizer": {"lr": 1e-3}, "resources": {"num_workers": WORLD}}
    manifests = {}
    for name, stage in (("bad", job), ("bad", {**job, "name": "one", "resources": {"num_workers": 1}})):
        spec = parse_spec({"name": name, "storage": storage, "stages": [
            {"stage": "ingest", "name": "pool", "source": {"kind": "webdataset", "path": str(tmp_path / name)},
             "split": {"test_fraction": 0.2, "seed": 0}, "shard_size": 40}, stage]})
        manifests[(name, stage["name"])] = run_spec(spec, stream=io.StringIO())[stage["name"]]

    # what was skipped: every scheduled (step, uid) of a planted image once, with its image's reason; the rest of
    # the empty share's step once each as empty_share
    reason = {u: skipped.REASONS[code] for u, code in zip(
        planted, [skipped.TRUNCATED, skipped.NOT_AN_IMAGE, skipped.TOO_LARGE, skipped.CORRUPT] * 4)}
    expected = set()
    for s in range(1, STEPS + 1):
        for u in (train[i] for i in plan.global_rows(s)):
            if u in planted:
                expected.add((s, u, reason[u]))
            elif s == STEPS:
                expected.add((s, u, "empty_share"))
    m = manifests[("bad", "job")]
    d = stage_dir(storage, "job", "bad")
    files = skipped.skipped_files(m["files"])
    got = [r for f in files for r in d.read_table(f).to_pylist()]
    assert sorted((r["step"], r["uid"], r["reason"]) for r in got) == sorted(expected)
    assert len(got) == len(expected)  # each once
    counts = {}
    for _, _, r in expected:
        counts[r] = counts.get(r, 0) + 1
    assert m["skipped"] == dict(sorted(counts.items())) and m["rejected"] == len(expected)
    assert m["rows_in"] == BATCH * STEPS == m["rows_out"] + m["rejected"]

    # the score rows and the skipped rows account for every scheduled (step, uid), once
    log = score_log(storage, "job", "bad")
    scored = {(int(s), f"{int(h):016x}{int(lo):016x}") for s, h, lo in log[["step", "uid_hi", "uid_lo"]].values}
    assert len(scored) == len(log) and not scored & {(s, u) for s, u, _ in expected}
    assert scored | {(s, u) for s, u, _ in expected} == {(s, train[i]) for s in range(1, STEPS + 1)
                                                         for i in plan.global_rows(s)}
    per_step = log.groupby("step")
    assert (per_step.size() == per_step.batch_size.first()).all()  # the global batch: the decodable rows
    np.testing.assert_allclose(per_step.weight.sum(), 1.0, rtol=0, atol=1e-5)  # softmax over them
    assert STEPS not in per_step.groups  # the step with an empty share trained nothing

    # with skipped rows the two ranks' steps are the one process's (steps 1-5; 6 had an empty share on 2 ranks)
    one = score_log(storage, "one", "bad")
    two = log[log.step < STEPS].reset_index(drop=True)
    one5 = one[one.step < STEPS].reset_index(drop=True)
    assert (one5[["uid_hi", "uid_lo", "step", "batch_size"]].values == two[["uid_hi", "uid_lo", "step",
                                                                             "batch_size"]].values).all()
    for col in ("score", "weight", "loss"):
        np.testing.assert_allclose(two[col], one5[col], rtol=1e-4, atol=1e-6, err_msg=col)
    # the held-out evaluation left the planted test image out and counted it
    metrics = d.read_table("metrics.parquet").to_pandas()
    assert metrics.test_skipped.dropna().tolist() == [1, 1]
