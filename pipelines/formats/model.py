"""What ``train`` and ``evaluate`` write, under their stage directories.

``train``:

- ``model.safetensors`` (:data:`WEIGHTS`): the final weights, also the name inside each checkpoint;
- ``model.json`` (:data:`MODEL_JSON`): how to rebuild the model (task, architecture, open_clip config, classes,
  image size and normalisation; :func:`pipelines.models.build.model_json`);
- ``metrics.parquet`` (:data:`METRICS`): one row per step, evaluation columns on evaluation steps;
- ``scores/``: the score log (:mod:`pipelines.formats.score_log`);
- ``train/`` (:data:`RUN_DIR`): Ray Train's run state and checkpoints, each holding :data:`WEIGHTS`,
  ``state.json`` (:data:`CHECKPOINT_STATE`: the step, counters and the metrics so far) and ``trainer.pt``
  (:data:`CHECKPOINT_TRAINER`: optimiser, scheduler, RNG and comparison direction).

``evaluate``: ``metrics.json`` (:data:`EVAL_METRICS`).
"""

from __future__ import annotations

import json
from typing import Any, Dict

import pyarrow as pa

WEIGHTS = "model.safetensors"
MODEL_JSON = "model.json"
METRICS = "metrics.parquet"
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
