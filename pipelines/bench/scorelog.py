"""A realistic synthetic score log, written as the train stage writes one (benchmarks and tests).

``uids`` samples (random 128-bit uids, a fraction of them "corrupted": lower mean score), each seen once per epoch
in a seeded shuffle, in global batches of ``batch_size``; each step's weights are the softmax of its scores over
the batch.  Files follow :mod:`pipelines.formats.score_log`: ``part-s<first>-<last>-r<rank>.parquet`` (rows sorted by
bucket, the bucket index in the footer), one segment per ``steps_per_file`` steps and rank, ``ranks`` ranks
splitting each batch.
"""

from __future__ import annotations

import posixpath
from typing import Dict

import numpy as np

from pipelines.formats.score_log import encode, part_name


def synthetic_uids(n: int, seed: int):
    rng = np.random.default_rng(seed)
    hi = rng.integers(0, 2**63, n, dtype=np.int64).astype(np.uint64) * np.uint64(2) + rng.integers(0, 2, n).astype(np.uint64)
    lo = rng.integers(0, 2**63, n, dtype=np.int64).astype(np.uint64) * np.uint64(2) + rng.integers(0, 2, n).astype(np.uint64)
    return hi, lo


def write_score_log(fs, root: str, uids: int, epochs: int, batch_size: int, num_buckets: int = 64, ranks: int = 2,
                    steps_per_file: int = 0, corrupted: float = 0.3, temperature: float = 1.0,
                    seed: int = 0) -> Dict[str, object]:
    """Write the log under ``root``; returns ``rows``, ``steps``, ``uid_hi``, ``uid_lo``, ``corrupted``."""
    rng = np.random.default_rng(seed)
    hi, lo = synthetic_uids(uids, seed)
    bad = rng.random(uids) < corrupted
    quality = np.where(bad, -1.0, 1.0) + rng.normal(0, 0.7, uids)
    steps_per_epoch = uids // batch_size  # the last partial batch is dropped, as the train stage does
    steps = steps_per_epoch * epochs
    steps_per_file = steps_per_file or max(1, steps // 8)
    fs.makedirs(root, exist_ok=True)
    rows = 0
    for first in range(1, steps + 1, steps_per_file):
        last = min(steps, first + steps_per_file - 1)
        step = np.arange(first, last + 1)
        epoch = (step - 1) // steps_per_epoch
        idx = np.empty((len(step), batch_size), np.int64)
        for e in np.unique(epoch):
            perm = np.random.default_rng([seed, int(e)]).permutation(uids)[:steps_per_epoch * batch_size]
            perm = perm.reshape(steps_per_epoch, batch_size)
            sel = epoch == e
            idx[sel] = perm[(step[sel] - 1) % steps_per_epoch]
        score = (quality[idx] + rng.normal(0, 1.0, idx.shape)).astype(np.float32)
        z = score.astype(np.float64) / temperature
        z = np.exp(z - z.max(1, keepdims=True))
        weight = (z / z.sum(1, keepdims=True)).astype(np.float32)
        loss = (2.0 - 0.5 * score + rng.normal(0, 0.1, idx.shape)).astype(np.float32)
        rank = np.broadcast_to((np.arange(batch_size) * ranks // batch_size)[None], idx.shape)
        cols = {
            "uid_hi": hi[idx].ravel(), "uid_lo": lo[idx].ravel(),
            "step": np.repeat(step, batch_size), "epoch": np.repeat(epoch, batch_size).astype(np.int32),
            "rank": rank.ravel().astype(np.int32), "score": score.ravel(), "weight": weight.ravel(),
            "loss": loss.ravel(), "batch_size": np.full(idx.size, batch_size, np.int32),
        }
        for r in range(ranks):
            sel = cols["rank"] == r
            if sel.any():
                data = encode({c: v[sel] for c, v in cols.items()}, num_buckets)
                with fs.open(posixpath.join(root, part_name(first, last, r)), "wb") as f:
                    f.write(data)
        rows += idx.size
    return {"rows": rows, "steps": steps, "uid_hi": hi, "uid_lo": lo, "corrupted": bad}
