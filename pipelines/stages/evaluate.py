"""``evaluate``: a trained model on a dataset's held-out split.

CLIP: the held-out loss (mean per-sample symmetric InfoNCE over chunks of ``batch_size`` rows, as the train stage's
periodic evaluation computes it), zero-shot classification accuracy from the class prompts where the pool has
classes, and image->text / text->image recall@1 and @5 over the whole split, in chunks of rows
(:mod:`pipelines.training.evaluation`).
Classifier: the held-out cross-entropy and accuracy.  Rows whose image does not decode are left out and counted
(``skipped``, the manifest's ``rejected``).  Runs as one Ray task (``resources``) on the split's rows as index
tasks found them (no pool table on the driver); the rows are decoded inside it, chunk by chunk.  Output:
``metrics.json``, the same figures in the manifest under ``metrics``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Dict, List, Literal, Optional

import numpy as np

from pipelines.formats import model as fm
from pipelines.formats.manifest import DatasetManifest, EvaluationManifest
from pipelines.run.config import MAX_BATCH, MAX_COUNT, MAX_CPUS, SpecError, doc, require
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
        require(self, "batch_size", 1, high=MAX_BATCH)
        require(self, "samples", 1, allow_none=True, high=MAX_COUNT)
        require(self, "cpus", 0, strict=True, high=MAX_CPUS)


def model_spec_of(model_json: Dict[str, Any]):
    from pipelines.models.build import ModelSpec

    backbone = model_json.get("backbone")
    return ModelSpec(model_json["task"], model_json["arch"], backbone, int(model_json.get("num_classes") or 0),
                     model_json["image_size"] if backbone else None, model_json.get("text_tower"),
                     int(model_json.get("embed_dim") or 0))


def evaluate_model(model_json: Dict[str, Any], weights: bytes, rows, class_names, templates, batch_size: int,
                   use_gpu: bool, storage_options) -> Dict[str, float]:
    """The model's metrics on ``rows`` (a :class:`~pipelines.training.index.RowIndex`), decoded ``batch_size``
    rows at a time (a Ray task's body)."""
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
    decoder = Decoder(spec.image_size, tokens=spec.context_length if clip else None, arch=spec.tokenizer,
                      labels=bool(class_names), storage_options=storage_options, keep_text=clip)
    captions: List[np.ndarray] = []

    def chunks():
        for start in range(0, rows.num_rows, batch_size):
            batch = decoder(rows, np.arange(start, min(start + batch_size, rows.num_rows)))
            captions.append(batch.pop("text", np.zeros(0, object)))
            yield batch

    held = heldout(model, spec, chunks(), device, zero_shot=(class_names, templates) if class_names else None,
                   keep_embeddings=clip)
    n = int(held.sums[2])
    out = {"test_loss": float(held.sums[0]) / max(n, 1), "rows": n, "skipped": int(held.sums[3])}
    if held.labelled:
        out["zero_shot_accuracy" if clip else "test_accuracy"] = float(held.sums[1]) / max(n, 1)
    if clip:
        decoded = np.concatenate(captions)[np.concatenate(held.kept)]  # the captions of the rows that decoded
        out.update(retrieval_recall(torch.cat(held.images).to(device), torch.cat(held.texts).to(device), decoded))
    return out


def run_evaluate(cfg: EvaluateConfig, ctx: StageContext) -> Dict[str, Any]:
    """The split's rows are found by index tasks (:func:`~pipelines.training.index.build_index`): the driver holds
    object refs and counts, the evaluation task decodes the rows itself."""
    from pipelines.training.index import build_index

    model_stage, data = ctx.inputs[cfg.model], ctx.inputs[cfg.data]
    model_json = fm.read_model_json(model_stage)
    weights = fm.read_weights(model_stage)
    dm = DatasetManifest.read(data)
    class_names = dm.class_names or []
    if model_json["task"] == "classify" and not class_names:
        raise SpecError(f"data: stage {cfg.data!r} has no classes to evaluate a classifier on")
    if model_json["task"] == "classify" and model_json.get("num_classes") != len(class_names):
        raise SpecError(f"data: stage {cfg.data!r} has {len(class_names)} classes, the model "
                        f"{model_json.get('num_classes')}")
    rows = build_index(ctx, data, labels=bool(class_names), text=model_json["task"] == "clip").split(cfg.split)
    if rows.num_rows == 0:
        raise SpecError(f"split: stage {cfg.data!r} has no {cfg.split!r} rows")
    rows = rows.head(cfg.samples)
    templates = list(dm.templates or ["{}"])
    metrics = ctx.run_task(evaluate_model, model_json, weights, rows, class_names, templates, cfg.batch_size,
                           cfg.use_gpu, ctx.storage_options, num_cpus=cfg.cpus, num_gpus=1 if cfg.use_gpu else 0)
    ctx.out.write_bytes(fm.EVAL_METRICS, json.dumps(metrics, indent=2, sort_keys=True).encode())
    return EvaluationManifest(rows_in=rows.num_rows, rows_out=metrics["rows"], rejected=metrics["skipped"],
                              files=[fm.EVAL_METRICS],
                              metrics=metrics, task=model_json["task"], split=cfg.split).to_json()
