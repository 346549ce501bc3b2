"""Pools on disk for the offline stages: a committed stage made of given tables (:func:`committed`), a DataComp-layout pool (metadata parquet + webdataset tars of tiny images)
to ingest in place, and a dataset stage's samples read back through the readers the train stage and the report use
(``read_pool``: ``tar`` resolved to full URLs; every image and caption fetched at its byte range)."""

from __future__ import annotations

from typing import Dict, List

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.formats.pool import read_pool
from pipelines.run.storage import StageDir, open_storage
from tests.support.ingest import image_bytes, sample_members, write_tar

SAMPLE_COLUMNS = ("uid", "key", "shard", "split", "text", "tar", "image", "image_offset", "image_size",
                  "text_offset", "text_size")


def committed(fs, path: str, tables: Dict[str, pa.Table], **manifest) -> StageDir:
    """A stage committed at ``path`` holding ``tables`` (relative path -> table) and ``manifest``'s fields."""
    d = StageDir(fs, path)
    d.begin()
    for rel, t in tables.items():
        d.write_table(rel, t)
    d.commit({"files": list(tables), **manifest})
    return StageDir(fs, path)


def datacomp_pool(root, n: int = 40, per_tar: int = 12, seed: int = 0) -> List[str]:
    """A clean DataComp pool of ``n`` samples under ``root`` (``metadata/part-<i>.parquet`` and
    ``shards/<i>.tar`` of ``per_tar`` samples each: PNG and JPEG images of distinct colours and sizes, captions
    that differ from the tars' ``.txt`` every third sample, a ``clip_b32_similarity_score`` with ties); returns
    the uids."""
    rng = np.random.default_rng(seed)
    uids = [f"{rng.integers(1, 2**62):016x}{i:016x}" for i in range(n)]
    captions = [f"caption {i} of the pool" for i in range(n)]
    clip = np.round(rng.uniform(0.1, 0.4, n), 2)
    for t, first in enumerate(range(0, n, per_tar)):
        entries = []
        for i in range(first, min(n, first + per_tar)):
            fmt = "PNG" if i % 2 else "JPEG"
            image = image_bytes(fmt, (i * 5 % 256, 255 - i * 3 % 256, 40), (8 + i % 5, 6 + i % 3))
            txt = captions[i] if i % 3 else f"the tar's own words {i}"
            entries += sample_members(f"{t:04d}{i:05d}", uids[i], image, txt, "png" if i % 2 else "jpg")
        write_tar(root / "shards" / f"{t:08d}.tar", entries)
        (root / "metadata").mkdir(parents=True, exist_ok=True)
        sl = slice(first, min(n, first + per_tar))
        pq.write_table(pa.table({"uid": uids[sl], "text": captions[sl], "clip_b32_similarity_score": clip[sl]}),
                       root / "metadata" / f"part-{t}.parquet")
    return uids


def samples(stage, storage_options=None) -> List[Dict]:
    """A dataset stage's rows in order, each with the bytes at its image range and its caption (from its byte
    range where the row has one, else the ``text`` column), read the way the train stage reads them."""
    rows = read_pool(stage, list(SAMPLE_COLUMNS)).to_pylist()
    for r in rows:
        fs, path = open_storage(r["tar"], storage_options)
        start = r["image_offset"]
        r["image_bytes"] = fs.cat_file(path, start=start, end=start + r["image_size"])
        if r["text_offset"] >= 0:
            start = r["text_offset"]
            r["caption"] = fs.cat_file(path, start=start, end=start + r["text_size"]).decode("utf-8")
        else:
            r["caption"] = r["text"]
    return rows
