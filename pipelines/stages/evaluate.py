"""``evaluate``: a trained model on a dataset's held-out split.

CLIP: the held-out loss (mean per-sample symmetric InfoNCE over chunks of ``batch_size`` rows, as the train stage's
periodic evaluation computes it), zero-shot classification accuracy from the class prompts where the pool has
classes, and image->text / text->image recall@1 and @5 over the whole split (:mod:`pipelines.evaluation`).
Classifier: the held-out cross-entropy and accuracy.  Runs as one Ray task (``resources``); the split is decoded
inside it, chunk by chunk.  Output: ``metrics.json``, the same figures in the manifest under ``metrics``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Dict, Literal, Optional

import numpy as np

from ..config import SpecError, doc, require

METRICS = "metrics.json"


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
    from ..models import ModelSpec

    backbone = model_json.get("backbone")
    return ModelSpec(model_json["task"], model_json["arch"], backbone, int(model_json.get("num_classes") or 0),
                     model_json["image_size"] if backbone else None)


def evaluate_model(model_json: Dict[str, Any], weights: bytes, rows, class_names, templates, batch_size: int,
                   use_gpu: bool, storage_options) -> Dict[str, float]:
    import torch
    import torch.nn.functional as F
    from gradmimic import clip_per_sample_loss, load_state_dict

    from ..evaluation import retrieval_recall, zero_shot_classifier
    from ..models import load_weights
    from ..training.data import Decoder, tokenize
    from ..training.loop import to_images

    spec = model_spec_of(model_json)
    device = torch.device("cuda" if use_gpu else "cpu")
    model = spec.build(0, device)
    load_weights(model, load_state_dict(weights))
    model.eval()
    clip = spec.task == "clip"
    labelled = "label" in rows.column_names
    decoder = Decoder(spec.image_size, tokens=spec.context_length if clip else None, arch=spec.arch,
                      labels=labelled, storage_options=storage_options)
    sums = {"loss": 0.0, "correct": 0, "n": 0}
    images, texts = [], []
    with torch.no_grad():
        classes = None
        if clip and class_names:
            classes = zero_shot_classifier(model, lambda t: tokenize(spec.arch, spec.context_length, t),
                                           class_names, templates, device)
        for start in range(0, rows.num_rows, batch_size):
            idx = np.arange(start, min(start + batch_size, rows.num_rows))
            batch = decoder(rows, idx)
            x = to_images(batch, spec, device)
            if clip:
                img = model.encode_image(x).float()
                txt = model.encode_text(torch.from_numpy(batch["tokens"]).to(device)).float()
                loss = clip_per_sample_loss(img, txt, model.logit_scale.exp().float())
                img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
                images.append(img.cpu())
                texts.append(txt.cpu())
                pred = (img @ classes.T).argmax(1).cpu() if classes is not None else None
            else:
                logits = model(x).float()
                loss = F.cross_entropy(logits, torch.from_numpy(batch["label"]).to(device), reduction="none")
                pred = logits.argmax(1).cpu()
            sums["loss"] += float(loss.double().sum())
            sums["n"] += len(idx)
            if pred is not None and labelled:
                sums["correct"] += int((pred == torch.from_numpy(batch["label"])).sum())
    n = max(sums["n"], 1)
    out = {"test_loss": sums["loss"] / n, "rows": sums["n"]}
    if labelled and (classes is not None or not clip):
        out["zero_shot_accuracy" if clip else "test_accuracy"] = sums["correct"] / n
    if clip:
        out.update(retrieval_recall(torch.cat(images), torch.cat(texts), rows["text"].to_pylist()))
    return out


def run_evaluate(cfg: EvaluateConfig, ctx) -> Dict[str, Any]:
    import ray

    from ..training.data import read_pool, split_rows
    from .train import WEIGHTS_FILE

    model_stage, data = ctx.inputs[cfg.model], ctx.inputs[cfg.data]
    with model_stage.fs.open(model_stage.join("model.json"), "rb") as f:
        model_json = json.loads(f.read())
    with model_stage.fs.open(model_stage.join(WEIGHTS_FILE), "rb") as f:
        weights = f.read()
    dm = data.manifest()
    columns = ["uid_hi", "uid_lo", "text", "split", "tar", "image_offset", "image_size"]
    class_names = dm.get("class_names") or []
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
    templates = list(dm.get("templates") or ["{}"])
    task = ray.remote(num_cpus=cfg.cpus, num_gpus=1 if cfg.use_gpu else 0)(evaluate_model)
    metrics = ray.get(task.remote(model_json, weights, rows, class_names, templates, cfg.batch_size, cfg.use_gpu,
                                  ctx.storage_options))
    ctx.out.write_bytes(METRICS, json.dumps(metrics, indent=2, sort_keys=True).encode())
    return {"rows_in": rows.num_rows, "rows_out": rows.num_rows, "rejected": 0, "files": [METRICS],
            "metrics": metrics, "task": model_json["task"], "split": cfg.split}
