"""``evaluate``: a trained model on a dataset's held-out split.

CLIP: the held-out loss (mean per-sample symmetric InfoNCE over chunks of ``batch_size`` rows, as the train stage's
periodic evaluation computes it), zero-shot classification accuracy from the class prompts where the pool has
classes, and image->text / text->image recall@1 and @5 over the whole split, in chunks of rows
(:mod:`pipelines.training.evaluation`).
Classifier: the held-out cross-entropy and accuracy.  Rows whose image does not decode are left out and counted
(``skipped``, the manifest's ``rejected``).  Runs as one Ray task (``resources``); the split is decoded
inside it, chunk by chunk.  Output: ``metrics.json``, the same figures in the manifest under ``metrics``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Dict, Literal, Optional

import numpy as np

from pipelines.formats import model as fm
from pipelines.formats.manifest import DatasetManifest, EvaluationManifest
from pipelines.formats.pool import EVAL_COLUMNS, read_pool, split_rows
from pipelines.run.config import SpecError, doc, require
from pipelines.run.context import StageContext


@dataclass(frozen=True)
class EvaluateConfig:
    model: str = doc("the train stage whose final weights to evaluate", ref="model")
    data: str = doc("the dataset stage whose split to evaluate on", ref="dataset")
    split: Literal["test", "reference", "train"] = doc("the split (test: held out, never trained on)", default="test")
    batch_size: int = doc("rows per chunk (CLIP's held-out loss is over a chunk)", default=256)
    samples: Optional[int] = doc("evaluate on at most this many rows", default=None)
    cpus: float = doc("CPUs for the evaluation task", default=1.0)
    use_gpu: bool = doc("evaluate on a GPU", default=False)

    def validate(self) -> None:
        require(self, "batch_size", 1)
        require(self, "samples", 1, allow_none=True)
        require(self, "cpus", 0, strict=True)


def model_spec_of(model_json: Dict[str, Any]):
    from pipelines.models.build import ModelSpec

    backbone = model_json.get("backbone")
    return ModelSpec(model_json["task"], model_json["arch"], backbone, int(model_json.get("num_classes") or 0),
                     model_json["image_size"] if backbone else None)


def evaluate_model(model_json: Dict[str, Any], weights: bytes, rows, class_names, templates, batch_size: int,
                   use_gpu: bool, storage_options) -> Dict[str, float]:
    """The model's metrics on ``rows``, decoded ``batch_size`` rows at a time (a Ray task's body)."""
    import torch

    from gradmimic import load_state_dict
    from pipelines.models.build import load_weights
    from pipelines.training.data import Decoder
    from pipelines.training.evaluation import heldout, retrieval_recall

    spec = model_spec_of(model_json)
    device = torch.device("cuda" if use_gpu else "cpu")
    model = spec.build(0, device)
    load_weights(model, load_state_dict(weights))
    model.eval()
    clip = spec.task == "clip"
    decoder = Decoder(spec.image_size, tokens=spec.context_length if clip else None, arch=spec.arch,
                      labels="label" in rows.column_names, storage_options=storage_options)
    chunks = (decoder(rows, np.arange(start, min(start + batch_size, rows.num_rows)))
              for start in range(0, rows.num_rows, batch_size))
    held = heldout(model, spec, chunks, device, zero_shot=(class_names, templates) if class_names else None,
                   keep_embeddings=clip)
    n = int(held.sums[2])
    out = {"test_loss": float(held.sums[0]) / max(n, 1), "rows": n, "skipped": int(held.sums[3])}
    if held.labelled:
        out["zero_shot_accuracy" if clip else "test_accuracy"] = float(held.sums[1]) / max(n, 1)
    if clip:
        captions = rows["text"].filter(np.concatenate(held.kept)).to_pylist()  # the rows that decoded
        out.update(retrieval_recall(torch.cat(held.images).to(device), torch.cat(held.texts).to(device), captions))
    return out


def run_evaluate(cfg: EvaluateConfig, ctx: StageContext) -> Dict[str, Any]:
    model_stage, data = ctx.inputs[cfg.model], ctx.inputs[cfg.data]
    model_json = fm.read_model_json(model_stage)
    weights = fm.read_weights(model_stage)
    dm = DatasetManifest.read(data)
    columns = list(EVAL_COLUMNS)
    class_names = dm.class_names or []
    if class_names:
        columns.append("label")
    try:
        rows = split_rows(read_pool(data, columns), cfg.split)
    except ValueError as exc:
        raise SpecError(f"data: {exc}") from None
    if rows.num_rows == 0:
        raise SpecError(f"split: stage {cfg.data!r} has no {cfg.split!r} rows")
    if model_json["task"] == "classify" and not class_names:
        raise SpecError(f"data: stage {cfg.data!r} has no classes to evaluate a classifier on")
    if model_json["task"] == "classify" and model_json.get("num_classes") != len(class_names):
        raise SpecError(f"data: stage {cfg.data!r} has {len(class_names)} classes, the model "
                        f"{model_json.get('num_classes')}")
    if cfg.samples is not None:
        rows = rows.slice(0, cfg.samples)
    templates = list(dm.templates or ["{}"])
    metrics = ctx.run_task(evaluate_model, model_json, weights, rows, class_names, templates, cfg.batch_size,
                           cfg.use_gpu, ctx.storage_options, num_cpus=cfg.cpus, num_gpus=1 if cfg.use_gpu else 0)
    ctx.out.write_bytes(fm.EVAL_METRICS, json.dumps(metrics, indent=2, sort_keys=True).encode())
    return EvaluationManifest(rows_in=rows.num_rows, rows_out=metrics["rows"], rejected=metrics["skipped"],
                              files=[fm.EVAL_METRICS],
                              metrics=metrics, task=model_json["task"], split=cfg.split).to_json()
