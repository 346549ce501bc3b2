"""What ``train`` and ``evaluate`` write, under their stage directories.

``train``:

- ``model.safetensors`` (:data:`WEIGHTS`): the final weights, also the name inside each checkpoint;
- ``model.json`` (:data:`MODEL_JSON`): how to rebuild the model (task, architecture, open_clip config, classes,
  image size and normalisation; :func:`pipelines.models.build.model_json`);
- ``metrics.parquet`` (:data:`METRICS`): one row per step, evaluation columns on evaluation steps, concatenated
  when the stage finishes from ``metrics/part-s<first>-<last>.parquet`` (:data:`METRICS_DIR`): rank 0 writes a
  checkpoint's own rows next to the score log when it flushes, under the score log's exactly-once rules (named by
  step range, rewritten under the same name, discarded past the resumed checkpoint), so a checkpoint costs its
  own rows, not the whole history;
- ``scores/``: the score log (:mod:`pipelines.formats.score_log`);
- ``checkpoints/`` (:data:`CHECKPOINTS_DIR`): the stage's checkpoints, ``step-<step>/`` each holding :data:`WEIGHTS`
  and ``trainer.pt`` (:data:`CHECKPOINT_TRAINER`: optimiser, scheduler, RNG and comparison direction), and
  ``latest.json`` (:data:`CHECKPOINT_LATEST`), which *registers* one: its name and counters (step, samples seen,
  ...), so a checkpoint's cost does not grow with the run.  Rank 0 writes it (atomically) only after every rank
  has flushed the checkpoint's score rows, so the log, the metrics and the checkpoint become durable together;
  a worker group (re)starting, or a rerun reopening the attempt, resumes from it.  The two latest are kept.

A run's train stages share worker groups (:mod:`pipelines.training.groups`), whose Ray Train runs keep their own
state (a storage marker) under ``_train/`` (:data:`GROUPS_DIR`), removed when the group ends; nothing a stage needs
is there.

``evaluate``: ``metrics.json`` (:data:`EVAL_METRICS`).
"""

from __future__ import annotations

import io
import json
import posixpath
from typing import Any, Dict, List, Optional, Tuple

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.formats.score_log import beside_log

WEIGHTS = "model.safetensors"
MODEL_JSON = "model.json"
METRICS = "metrics.parquet"
METRICS_DIR = "metrics"
GROUPS_DIR = "_train"  # the Ray Train runs of a run's worker groups, in its folder on object storage (no stage name
# starts with _), in the temp folder on local storage
CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_LATEST = "latest.json"
CHECKPOINT_TRAINER = "trainer.pt"
EVAL_METRICS = "metrics.json"


def read_model_json(stage) -> Dict[str, Any]:
    with stage.fs.open(stage.join(MODEL_JSON), "rb") as f:
        return json.loads(f.read())


def read_weights(stage) -> bytes:
    with stage.fs.open(stage.join(WEIGHTS), "rb") as f:
        return f.read()


def read_metrics(stage) -> pa.Table:
    return stage.read_table(METRICS)


def metrics_root(scores_root: str) -> str:
    """The folder of the per-checkpoint metrics segments, next to the score log's folder."""
    return beside_log(scores_root, METRICS_DIR)


def checkpoints_root(scores_root: str) -> str:
    """The folder of the stage's checkpoints, next to the score log's folder."""
    return beside_log(scores_root, CHECKPOINTS_DIR)


def checkpoint_name(step: int) -> str:
    return f"step-{step:09d}"


def latest_checkpoint(fs, root: str) -> Optional[Dict[str, Any]]:
    """The registered checkpoint under ``root``: ``{"name": ..., "state": {"step": ..., ...}}``, or ``None``."""
    try:
        with fs.open(posixpath.join(root, CHECKPOINT_LATEST), "rb") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        return None


def registered_step(fs, root: str) -> int:
    """The step of the registered checkpoint under ``root`` (0: none yet): where a worker group resumes."""
    latest = latest_checkpoint(fs, root)
    return int(latest["state"]["step"]) if latest else 0


def register_checkpoint(fs, root: str, state: Dict[str, Any], keep: int = 2) -> None:
    """Make the checkpoint of ``state["step"]`` (written under ``root``) the one to resume from, then delete the
    others but the ``keep`` latest (unregistered ones past it too: a group that died before registering them)."""
    from pipelines.run.storage import atomic_write

    name = checkpoint_name(state["step"])
    atomic_write(fs, posixpath.join(root, CHECKPOINT_LATEST), json.dumps({"name": name, "state": state}).encode())
    held = sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(root, detail=False))
    held = [h for h in held if h.startswith("step-")]
    kept = {name, *[h for h in held if h < name][-(keep - 1):]} if keep > 1 else {name}
    for h in held:
        if h not in kept:
            fs.rm(posixpath.join(root, h), recursive=True)


def metrics_part_name(first: int, last: int) -> str:
    return f"part-s{first:09d}-{last:09d}.parquet"


def metrics_table(rows: List[Dict[str, Any]]) -> pa.Table:
    """Per-step rows as a table: columns in order of first appearance (evaluation columns are on some rows)."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    return pa.table({k: [row.get(k) for row in rows] for k in columns})


def write_metrics_part(fs, root: str, first: int, last: int, rows: List[Dict[str, Any]]) -> Optional[str]:
    """Rank 0's metrics rows of steps ``first..last`` as one segment (atomically); returns its path."""
    from pipelines.run.storage import atomic_write

    if not rows:
        return None
    buf = io.BytesIO()
    pq.write_table(metrics_table(rows), buf)
    path = posixpath.join(root, metrics_part_name(first, last))
    atomic_write(fs, path, buf.getvalue())
    return path


def concat_metrics(fs, parts: List[str], out_path: str) -> Tuple[int, Dict[str, Any]]:
    """The metrics segments (in step order) streamed into one file, a segment in memory at a time; returns the
    rows written and the last row that has ``test_loss`` (empty if none)."""
    from pipelines.run.storage import parquet_schema, read_parquet

    schemas = [parquet_schema(fs, p).remove_metadata() for p in parts]
    schema = pa.unify_schemas(schemas, promote_options="permissive") if schemas else pa.schema([])
    rows, last_eval = 0, {}
    fs.makedirs(posixpath.dirname(out_path), exist_ok=True)
    with fs.open(out_path, "wb") as f, pq.ParquetWriter(f, schema) as writer:
        for path in parts:
            t = read_parquet(fs, path)
            t = pa.table({c.name: t[c.name].cast(c.type) if c.name in t.column_names
                          else pa.nulls(t.num_rows, c.type) for c in schema}, schema=schema)
            writer.write_table(t)
            rows += t.num_rows
            if "test_loss" in t.column_names:
                valid = t["test_loss"].is_valid().to_pylist()
                if any(valid):
                    i = len(valid) - 1 - valid[::-1].index(True)
                    last_eval = {k: v[0] for k, v in t.slice(i, 1).to_pydict().items()}
    return rows, last_eval
