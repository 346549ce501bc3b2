"""Held-out metrics shared by the train loop's periodic evaluation and the ``evaluate`` stage.

- the held-out loop (:func:`heldout`): per chunk of rows, the per-sample loss (CLIP: symmetric InfoNCE within the
  chunk; a classifier: cross-entropy) and, where the rows carry labels, the predictions (CLIP: zero-shot), summed;
- zero-shot classification: each class's text embedding is the normalised mean over the prompt templates of the
  normalised embeddings of ``template.format(class name)`` (CLIP's recipe); an image's prediction is the class of
  highest cosine similarity;
- retrieval recall@k over the whole held-out split.  Image->text ranks the distinct captions (each once, so that
  copies of one templated caption do not fill the ``k`` places): an image is found when its own caption is among
  its ``k`` most similar captions.  Text->image ranks the images: a text is found when one of its ``k`` most
  similar images carries its caption (duplicate captions are not counted as misses).  Computed in chunks of query
  rows against every candidate, keeping per query only the rank of its best match: memory is bounded by the chunk,
  not ``N x N``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from pipelines.models.build import ModelSpec
from pipelines.training.batches import autocast, to_images


def zero_shot_classifier(model, tokenize, names: Sequence[str], templates: Sequence[str],
                         device: torch.device) -> torch.Tensor:
    """``[C, D]`` normalised class embeddings; ``tokenize(texts) ->`` what ``model.encode_text`` takes."""
    texts = [t.format(n) for n in names for t in templates]
    tokens = torch.from_numpy(tokenize(texts)).to(device)
    emb = F.normalize(model.encode_text(tokens).float(), dim=-1).reshape(len(names), len(templates), -1)
    return F.normalize(emb.mean(1), dim=-1)


# similarities held at once by :func:`retrieval_recall` (rows per chunk = this over the number of candidates)
RETRIEVAL_CHUNK = 1 << 24


def retrieval_recall(image_ND: torch.Tensor, text_ND: torch.Tensor, captions: Sequence[str],
                     ks: Sequence[int] = (1, 5), chunk_rows: Optional[int] = None) -> Dict[str, float]:
    """``i2t_recall@k`` and ``t2i_recall@k`` for normalised embeddings of matching rows (row ``i``'s image and text
    carry ``captions[i]``).

    Image->text ranks each distinct caption once, embedded as the text embedding of its first row (rows with the
    same caption go through the same text tower, so their embeddings agree): an image is found when its own caption
    is among its ``k`` most similar distinct captions.  Text->image ranks the images: a text is found when one of
    its ``k`` most similar images carries its caption.  Equal similarities rank by position (the first caption or
    image first, a stable sort's order; a caption's place is its first row's).

    Streams: ``chunk_rows`` query rows at a time (default :data:`RETRIEVAL_CHUNK` similarities per chunk) against
    every candidate, and per query only the rank of its best match is kept (one pass of comparisons, no sort).
    """
    _, first, codes = np.unique(np.asarray(captions, dtype=object).astype(str), return_index=True,
                                return_inverse=True)
    img, txt = image_ND.float(), text_ND.float()
    codes = torch.from_numpy(codes.reshape(-1)).to(img.device)  # row -> index of its caption among the distinct ones
    first = torch.from_numpy(first).to(img.device)  # a distinct caption's first row: its place among equals
    distinct = txt[first]  # [distinct captions, D]
    n = len(img)
    step = chunk_rows or max(1, RETRIEVAL_CHUNK // max(n, len(distinct), 1))
    i2t, t2i = torch.zeros(len(ks), dtype=torch.int64), torch.zeros(len(ks), dtype=torch.int64)
    limits = torch.tensor(list(ks), dtype=torch.int64)
    for start in range(0, n, step):
        rows = slice(start, min(start + step, n))
        own = codes[rows]
        own_caption = own[:, None] == torch.arange(len(distinct), device=img.device)
        i2t += (_best_rank(img[rows] @ distinct.T, own_caption, first).cpu()[:, None] < limits).sum(0)
        t2i += (_best_rank(txt[rows] @ img.T, own[:, None] == codes[None, :]).cpu()[:, None] < limits).sum(0)
    out = {}
    for j, k in enumerate(ks):
        out[f"i2t_recall@{k}"] = float(i2t[j]) / n if n else float("nan")
        out[f"t2i_recall@{k}"] = float(t2i[j]) / n if n else float("nan")
    return out


def _best_rank(sim: torch.Tensor, match: torch.Tensor, position: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per row of ``sim`` (``[queries, candidates]``), the 0-based place of its best ``match`` candidate when the
    candidates are ranked by similarity, ties by ``position`` (distinct, default the column): found at ``k`` is
    ``rank < k``.  A query whose best match is not a number (a diverged model) is never found."""
    if position is None:
        position = torch.arange(sim.shape[1], device=sim.device)
    best = sim.masked_fill(~match, float("-inf")).max(1).values[:, None]
    first = torch.where(match & (sim == best), position, position.max() + 1).min(1).values[:, None]
    rank = (sim > best).sum(1) + ((sim == best) & (position < first)).sum(1)
    return torch.where(best[:, 0].isnan() | ~match.any(1), torch.iinfo(torch.int64).max, rank)


@dataclass
class HeldOut:
    """What :func:`heldout` sums over its chunks (on the model's device, float64: loss, correct, rows, rows skipped
    as undecodable)."""

    sums: torch.Tensor
    labelled: bool = False  # some chunk had labels and predictions: sums[1] counts the correct ones
    images: List[torch.Tensor] = field(default_factory=list)  # normalised embeddings on the CPU (if kept)
    texts: List[torch.Tensor] = field(default_factory=list)
    kept: List[np.ndarray] = field(default_factory=list)  # per chunk, which rows decoded (with the embeddings)


def _text_inputs(spec: ModelSpec, texts: Sequence[str]) -> np.ndarray:
    """What the model's ``encode_text`` takes for ``texts``: token ids, or a cached tower CLIP's text features."""
    if spec.cached:
        from pipelines.models.towers import text_features

        return text_features(spec.text_tower, spec.context_length, texts).numpy()
    from pipelines.models.tokens import tokenize

    return tokenize(spec.tokenizer, spec.context_length, texts)


def decodable(batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """The rows of a decoded batch that decoded (``reason`` 0: :mod:`pipelines.formats.skipped`); ``batch`` itself
    when all did."""
    ok = batch["reason"] == 0 if "reason" in batch else None
    return batch if ok is None or ok.all() else {k: v[ok] for k, v in batch.items()}


def heldout(model, spec: ModelSpec, chunks: Iterable[Dict[str, np.ndarray]], device: torch.device, *,
            zero_shot: Optional[Tuple[Sequence[str], Sequence[str]]] = None, precision: str = "fp32",
            keep_embeddings: bool = False) -> HeldOut:
    """The held-out loop over decoded ``chunks`` (one batch each), without gradients and under ``precision``'s
    autocast; ``zero_shot`` (class names, templates) gives CLIP its predictions.  Rows that did not decode are left
    out (CLIP's loss is over a chunk's decodable rows) and counted.  The caller sets eval mode."""
    from gradmimic import clip_per_sample_loss

    out = HeldOut(torch.zeros(4, dtype=torch.float64, device=device))
    with torch.no_grad(), autocast(precision, device):
        classes = None
        if spec.task == "clip" and zero_shot:
            names, templates = zero_shot
            classes = zero_shot_classifier(model, functools.partial(_text_inputs, spec), names, templates, device)
        for chunk in chunks:
            batch = decodable(chunk)
            out.sums[3] += len(chunk["image"]) - len(batch["image"])
            if keep_embeddings:
                out.kept.append(chunk["reason"] == 0 if "reason" in chunk else np.ones(len(chunk["image"]), bool))
            if not len(batch["image"]):
                continue
            x = to_images(batch, spec, device)
            if spec.task == "clip":
                img = model.encode_image(x).float()
                txt = model.encode_text(torch.from_numpy(batch["tokens"]).to(device)).float()
                loss = clip_per_sample_loss(img, txt, model.logit_scale.exp().float())
                img = F.normalize(img, dim=-1)
                pred = (img @ classes.T).argmax(1) if classes is not None else None
                if keep_embeddings:
                    out.images.append(img.cpu())
                    out.texts.append(F.normalize(txt, dim=-1).cpu())
            else:
                logits = model(x).float()
                pred = logits.argmax(1)
                loss = F.cross_entropy(logits, torch.from_numpy(batch["label"]).to(device), reduction="none")
            out.sums[0] += loss.double().sum()
            out.sums[2] += len(loss)
            if pred is not None and "label" in batch:
                out.labelled = True
                out.sums[1] += (pred.cpu() == torch.from_numpy(batch["label"])).sum()
    return out
