"""pipelines/formats owns the on-disk names: stages, training, the report and the benchmarks never spell them; the
names are the ones runs already hold; typed manifests read and write the same JSON."""

from __future__ import annotations

import ast
import json
import pathlib
import re

import numpy as np
import pytest

from pipelines.formats import manifest as fm
from pipelines.formats import model, pool, report, score_log, utility

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCANNED = ("pipelines/stages", "pipelines/training", "pipelines/report", "pipelines/bench")
# a file's whole name, or a piece of a path, that only pipelines/formats (and run/storage.py) may spell
NAMES = {"rejects.parquet", "subset.npy", "model.safetensors", "model.json", "metrics.parquet", "metrics.json",
         "state.json", "trainer.pt", "report.json", "report.html", "spec.resolved.yaml", "_MANIFEST.json"}
PIECES = re.compile(r"(^|/)(shards/|shard-|utility/|rejected/|scores/\S)|bucket=|part-0|_MANIFEST")
JOINED = {"scores", "shards", "rejected"}  # a folder name given to a path join


def _docstrings(tree: ast.AST) -> set:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def storage_literals(path: pathlib.Path):
    """``(line, text)`` of every string in the code (docstrings aside) that spells a name formats/ owns."""
    tree = ast.parse(path.read_text())
    docs = _docstrings(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            if node.value in NAMES or PIECES.search(node.value):
                yield node.lineno, node.value
        if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "join":
            for arg in node.args:
                if isinstance(arg, ast.Constant) and arg.value in JOINED:
                    yield arg.lineno, arg.value


def test_no_stage_spells_a_storage_path():
    found = [f"{p.relative_to(ROOT)}:{line}: {text!r}" for d in SCANNED for p in sorted((ROOT / d).rglob("*.py"))
             for line, text in storage_literals(p)]
    assert not found, "spelled outside pipelines/formats:\n" + "\n".join(found)


def test_the_scan_finds_what_it_looks_for(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text('"""shards/shard-NNNNN.parquet in a docstring is fine."""\nimport posixpath\n'
                   'a = f"shards/shard-{1:05d}.parquet"\nb = "subset.npy"\nc = posixpath.join("x", "scores")\n'
                   'd = {"scores": 1}\n')
    assert sorted(line for line, _ in storage_literals(bad)) == [3, 4, 5]


def test_names_are_the_ones_runs_hold():
    assert pool.shard_parquet(7) == "shards/shard-00007.parquet" and pool.shard_tar(7) == "shards/shard-00007.tar"
    assert pool.rejected_part(3) == "rejected/part-00003.parquet"
    assert (pool.REJECTS, pool.SUBSET) == ("rejects.parquet", "subset.npy")
    assert utility.part_path(5) == "utility/bucket=5/part-00000.parquet" and utility.vote("gmm") == "vote_gmm"
    assert (model.WEIGHTS, model.MODEL_JSON, model.METRICS, model.EVAL_METRICS) == (
        "model.safetensors", "model.json", "metrics.parquet", "metrics.json")
    assert (report.DIR, report.JSON, report.HTML) == ("report", "report.json", "report.html")
    files = ["shards/shard-00000.parquet", "shards/shard-00000.tar", "rejects.parquet", "shards/shard-00001.parquet"]
    assert pool.shard_parquets(files) == ["shards/shard-00000.parquet", "shards/shard-00001.parquet"]
    assert utility.part_path(5, 2) == "utility/bucket=5/part-00002.parquet"
    assert utility.bucket_files(["utility/bucket=12/part-00000.parquet", "utility/bucket=0/part-00001.parquet",
                                 "utility/bucket=0/part-00000.parquet"]) == {
        0: ["utility/bucket=0/part-00000.parquet", "utility/bucket=0/part-00001.parquet"],
        12: ["utility/bucket=12/part-00000.parquet"]}
    assert score_log.bucket_of("utility/bucket=3/part-00000.parquet") == 3
    assert score_log.bucket_of("/other/part.parquet") is None
    assert score_log.part_name(1, 20, 3) == "part-s000000001-000000020-r0003.parquet"
    assert score_log.is_log_file("scores/part-s000000001-000000020-r0003.parquet")
    assert not score_log.is_log_file("scores/bucket=1/x.parquet") and not score_log.is_log_file("model.json")
    assert model.metrics_part_name(1, 20) == "part-s000000001-000000020.parquet" and model.METRICS_DIR == "metrics"
    assert (model.CHECKPOINTS_DIR, model.CHECKPOINT_LATEST, model.checkpoint_name(4)) == (
        "checkpoints", "latest.json", "step-000000004")


def test_uids_round_trip():
    uids = [pool.uid_of(f"x{i}") for i in range(5)]
    hi, lo = pool.uid_halves(uids)
    assert pool.uid_hex(hi, lo).to_pylist() == uids
    assert all(pool.is_uid(u) for u in uids) and not pool.is_uid("A" * 32)


RUNNER = {"stage": "train", "name": "mimic", "config_hash": "0123456789abcdef", "config": {"num_buckets": 4},
          "inputs": {"pool": "fedcba9876543210"}, "version": "0.2.0",
          "timings": {"started": 1.5, "seconds": 2.25}, "attempt": "_attempt-abc"}
MANIFESTS = {
    "ingest": {"rows_in": 10, "rows_out": 9, "rejected": 1, "files": ["shards/shard-00000.parquet", "rejects.parquet"],
               "shards": 1, "corrupted": 2, "test": 3, "reference": 0, "class_names": ["a", "b"], "templates": None,
               "features": None},
    "filter": {"rows_in": 9, "rows_out": 5, "rejected": 4, "files": ["subset.npy"], "conserved": True,
               "kept_in_scope": 5, "in_scope": 7, "passed_through": 2, "kept_fraction": 5 / 7,
               "reasons": {"unscored": 1}, "unscored": {"pool_rows": 1, "utility_rows_not_in_pool": 0, "policy": "drop"},
               "clauses": {"x top 0.5": {"population": 6, "kept": 3, "cutoff_value": 0.25}}, "rule": "x top 0.5",
               "shards": 1, "class_names": None, "templates": ["{}."],
               "features": {"image_tower": "efficientnet_lite0", "text_tower": "all-minilm-l6-v2", "image_size": 32,
                            "image_dim": 1280, "text_dim": 384}},
    "train": {"rows_in": 66, "rows_out": 64, "rejected": 2, "skipped": {"truncated": 2},
              "files": ["model.safetensors", "model.json", "skipped/part-s000000001-000000002-r0000.parquet"],
              "steps": 2, "samples_seen": 64, "score_rows": 64, "samples_per_s": 10.5, "train_rows": 40,
              "test_rows": 9, "workers": 2, "resumed_from_step": 0, "final": {"test_loss": 1.0}, "mode": "mimic",
              "task": "clip", "nonfinite_steps": 0, "class_names": [], "restarts": 0, "worker_nodes": 1,
              "worker_group": "0123abcd4567", "phases": {"fit": 1.5, "first_step": 20.0, "last_step": 30.0, "finished": 32.0}},
    "aggregate": {"rows_in": 64, "rows_out": 40, "files": ["utility/bucket=0/part-00000.parquet"], "log": "/x/scores",
                  "log_rows_used": 64, "num_buckets": 4, "samples": 40, "kept_fraction": {"threshold": 0.5},
                  "quality_estimate": 0.5, "quality": {"binariser": "threshold", "min_vote": 0.5},
                  "mean_score": None, "fitted_on": None},
    "evaluate": {"rows_in": 9, "rows_out": 9, "rejected": 0, "files": ["metrics.json"],
                 "metrics": {"test_loss": 0.5, "rows": 9}, "task": "clip", "split": "test"},
}


@pytest.mark.parametrize("stage", sorted(MANIFESTS))
def test_manifests_round_trip(stage):
    written = {**RUNNER, "stage": stage, **MANIFESTS[stage]}
    typed = fm.from_json(written)
    assert type(typed) is fm.BY_STAGE[stage]
    assert typed.to_json() == written
    assert json.dumps(typed.to_json(), sort_keys=True) == json.dumps(written, sort_keys=True)
    returned = type(typed).from_json(MANIFESTS[stage])  # what the stage returns, before the runner's keys
    assert returned.to_json() == MANIFESTS[stage] and returned.stage is None
    extra = type(typed).from_json({**written, "added_later": [1, 2]})  # a key from a newer version is kept
    assert extra.extra == {"added_later": [1, 2]} and extra.to_json() == {**written, "added_later": [1, 2]}


def test_manifests_are_typed():
    train = fm.ModelManifest.from_json(MANIFESTS["train"])
    assert train.score_rows == 64 and train.final == {"test_loss": 1.0}
    assert fm.ModelManifest.from_json({"files": ["model.safetensors"]}).score_rows is None  # no score log
    agg = fm.UtilityManifest.from_json({**MANIFESTS["aggregate"], "steps": 7, "epochs": 2})
    assert agg.steps == 7 and agg.to_json()["epochs"] == 2
    assert "steps" not in fm.UtilityManifest(num_buckets=4).to_json()  # written only when known
    assert "rejected" not in fm.UtilityManifest().to_json()  # the runner's conservation check skips a utility
    data = fm.DatasetManifest.from_json({**MANIFESTS["ingest"], "config": {"source": {"templates": ["t {}"]}}})
    assert data.class_names == ["a", "b"] and data.caption_templates() == ["t {}"]
    assert isinstance(data.extra["corrupted"], int)  # an ingest stage's own figure, read as a dataset


def test_subset_file_round_trip(tmp_path):
    from pipelines.run.storage import open_storage

    fs, root = open_storage(str(tmp_path))
    chunks = [(np.array([5, 1], np.uint64), np.array([0, 9], np.uint64)), (np.array([200], np.uint64),
                                                                             np.array([3], np.uint64))]
    pool.write_subset(fs, f"{root}/{pool.SUBSET}", 3, iter(chunks))
    got = pool.read_subset(fs, f"{root}/{pool.SUBSET}")
    assert got.dtype == np.dtype("u8,u8") and got.tolist() == [(1, 9), (5, 0), (200, 3)]
