"""Held-out metrics shared by the train loop's periodic evaluation and the ``evaluate`` stage.

- zero-shot classification: each class's text embedding is the normalised mean over the prompt templates of the
  normalised embeddings of ``template.format(class name)`` (CLIP's recipe); an image's prediction is the class of
  highest cosine similarity;
- retrieval recall@k, image->text and text->image over the whole held-out split: a query counts as found when one
  of its ``k`` most similar items carries the query's own caption (so duplicate captions, such as templated ones,
  are not counted as misses).
"""

from __future__ import annotations

from typing import Dict, Sequence

import numpy as np
import torch
import torch.nn.functional as F


def zero_shot_classifier(model, tokenize, names: Sequence[str], templates: Sequence[str],
                         device: torch.device) -> torch.Tensor:
    """``[C, D]`` normalised class embeddings; ``tokenize(texts) -> int64 array``."""
    texts = [t.format(n) for n in names for t in templates]
    tokens = torch.from_numpy(tokenize(texts)).to(device)
    emb = F.normalize(model.encode_text(tokens).float(), dim=-1).reshape(len(names), len(templates), -1)
    return F.normalize(emb.mean(1), dim=-1)


def retrieval_recall(image_ND: torch.Tensor, text_ND: torch.Tensor, captions: Sequence[str],
                     ks: Sequence[int] = (1, 5)) -> Dict[str, float]:
    """``i2t_recall@k`` and ``t2i_recall@k`` for normalised embeddings of matching rows."""
    sim = image_ND.float() @ text_ND.float().T  # [images, texts]
    _, codes = np.unique(np.asarray(captions, dtype=object).astype(str), return_inverse=True)
    codes = torch.from_numpy(codes)
    out = {}
    for k in ks:
        kk = min(k, sim.shape[1])
        i2t = sim.topk(kk, dim=1).indices  # texts retrieved per image
        t2i = sim.T.topk(kk, dim=1).indices  # images retrieved per text
        out[f"i2t_recall@{k}"] = float((codes[i2t] == codes[:, None]).any(1).float().mean())
        out[f"t2i_recall@{k}"] = float((codes[t2i] == codes[:, None]).any(1).float().mean())
    return out
