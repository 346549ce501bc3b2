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
- ``train/`` (:data:`RUN_DIR`): Ray Train's run state and checkpoints, each holding :data:`WEIGHTS`,
  ``state.json`` (:data:`CHECKPOINT_STATE`: the step and counters) and ``trainer.pt``
  (:data:`CHECKPOINT_TRAINER`: optimiser, scheduler, RNG and comparison direction).

``evaluate``: ``metrics.json`` (:data:`EVAL_METRICS`).
"""

from __future__ import annotations

import io
import json
import posixpath
from typing import Any, Dict, List, Optional, Tuple

import pyarrow as pa
import pyarrow.parquet as pq

WEIGHTS = "model.safetensors"
MODEL_JSON = "model.json"
METRICS = "metrics.parquet"
METRICS_DIR = "metrics"
RUN_DIR = "train"
CHECKPOINT_STATE = "state.json"
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
    return posixpath.join(posixpath.dirname(scores_root.rstrip("/")), METRICS_DIR)


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
