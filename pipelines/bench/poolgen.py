"""A synthetic DataComp-layout pool for ``gradmimic bench scale``: what ``ingest``'s ``kind: datacomp`` reads.

``<root>/shards/NNNNNNNN.tar``: webdataset tars of ``per_tar`` samples each (``<key>.jpg``, a tiny real JPEG of 8 to
16 pixels a side in two colours; ``<key>.txt``, the caption; ``<key>.json``, ``{"uid", "url", "caption", ...}``
as DataComp's downloader writes it); ``<root>/metadata/NNNNNNNN.parquet``: one file per ``tars_per_file`` tars,
DataComp's columns (``uid`` as 32 hex chars, ``url``, ``text``, ``original_width``, ``original_height``,
``clip_b32_similarity_score``, ``clip_l14_similarity_score``, ``face_bboxes``, ``sha256``) in a shuffled order,
with ``missing`` of the rows extra: samples whose download failed (in the metadata, not in the tars), as in a
real pool.  Everything is a function of ``(seed, file number)``: one process per metadata file writes it and its
tars, in parallel, and a rerun writes the same bytes.  ``_POOL.json`` is written last: a pool with it and the
same parameters is reused, anything else under the root is removed and written again.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import shutil
import tarfile
from dataclasses import asdict, dataclass, fields
from typing import List, Tuple

import numpy as np

from pipelines.stages.ingest.sources import DataCompSource

MARKER = "_POOL.json"
COLOURS = ("red", "green", "blue", "yellow", "black", "white", "orange", "purple")
RGB = ((200, 30, 30), (30, 160, 40), (30, 60, 200), (230, 210, 40), (10, 10, 10), (245, 245, 245),
       (240, 140, 20), (120, 40, 160))
NOUNS = ("dog", "cat", "house", "tree", "car", "boat", "flower", "bird", "chair", "mountain", "cup", "bicycle")

# the DataComp layout the datacomp source reads by default: <root>/<metadata>/*.parquet, <root>/<shards>/*.tar
SHARDS, METADATA = (next(f.default for f in fields(DataCompSource) if f.name == n) for n in ("shards", "metadata"))


@dataclass(frozen=True)
class PoolShape:
    rows: int  # samples in the tars
    per_tar: int = 10_000
    tars_per_file: int = 10  # tars per metadata parquet
    missing: float = 0.01  # extra metadata rows, per sample, with no image in the tars
    seed: int = 0

    @property
    def tars(self) -> int:
        return -(-self.rows // self.per_tar)

    @property
    def files(self) -> int:
        return -(-self.tars // self.tars_per_file)

    @property
    def missing_rows(self) -> int:
        return sum(self._missing(f) for f in range(self.files))

    def tar_rows(self, t: int) -> int:
        return min(self.per_tar, self.rows - t * self.per_tar)

    def _missing(self, f: int) -> int:
        rows = sum(self.tar_rows(t) for t in range(f * self.tars_per_file, min(self.tars, (f + 1) * self.tars_per_file)))
        return int(round(rows * self.missing))


def _palette(seed: int) -> List[Tuple[bytes, int, int, int, int]]:
    """64 tiny two-colour JPEGs: ``(bytes, width, height, colour, other colour)``."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng([seed, 1 << 20])
    out = []
    for _ in range(64):
        w, h = (int(x) for x in rng.integers(8, 17, 2))
        a, b = (int(x) for x in rng.choice(len(RGB), 2, replace=False))
        img = Image.new("RGB", (w, h), RGB[a])
        ImageDraw.Draw(img).rectangle([0, 0, w // 2, h - 1], fill=RGB[b])
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        out.append((buf.getvalue(), w, h, a, b))
    return out


def _samples(shape: PoolShape, t: int, palette) -> Tuple[List[str], List[str], np.ndarray]:
    """Tar ``t``'s uids, captions and palette images (``-1`` tar: the failed downloads of file ``-t - 1``)."""
    n = shape.tar_rows(t) if t >= 0 else shape._missing(-t - 1)
    rng = np.random.default_rng([shape.seed, t + (1 << 32)])
    halves = rng.integers(0, np.iinfo(np.uint64).max, (n, 2), dtype=np.uint64, endpoint=True)
    uids = [f"{int(a):016x}{int(b):016x}" for a, b in halves]
    pics = rng.integers(0, len(palette), n)
    nouns = rng.integers(0, len(NOUNS), n)
    texts = [f"a photo of a {COLOURS[palette[p][3]]} {NOUNS[k]} on {COLOURS[palette[p][4]]}, #{i}"
             for i, (p, k) in enumerate(zip(pics, nouns))]
    return uids, texts, pics


def _member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tf.addfile(info, io.BytesIO(data))


def write_file(root: str, shape: PoolShape, f: int) -> int:
    """Metadata file ``f`` and its tars (one process); returns the metadata rows written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    palette = _palette(shape.seed)
    cols = {k: [] for k in ("uid", "url", "text", "original_width", "original_height", "pic")}
    first, last = f * shape.tars_per_file, min(shape.tars, (f + 1) * shape.tars_per_file)
    for t in list(range(first, last)) + [-f - 1]:
        uids, texts, pics = _samples(shape, t, palette)
        urls = [f"https://img.example.com/{t}/{i}.jpg" for i in range(len(uids))]
        if t >= 0:
            with tarfile.open(os.path.join(root, SHARDS, f"{t:08d}.tar"), "w", format=tarfile.USTAR_FORMAT) as tf:
                for i, (uid, text, p) in enumerate(zip(uids, texts, pics)):
                    key = f"{t:08d}{i:05d}"
                    image, w, h = palette[p][:3]
                    _member(tf, key + ".jpg", image)
                    _member(tf, key + ".txt", text.encode())
                    _member(tf, key + ".json", json.dumps({"uid": uid, "url": urls[i], "caption": text, "key": key,
                                                           "width": w, "height": h}).encode())
        cols["uid"] += uids
        cols["url"] += urls
        cols["text"] += texts
        cols["pic"] += list(pics)
    pics = np.array(cols.pop("pic"), np.int64)
    n = len(pics)
    rng = np.random.default_rng([shape.seed, f, 7])
    scale = rng.integers(4, 64, n)
    width = np.array([palette[p][1] for p in pics]) * scale
    height = np.array([palette[p][2] for p in pics]) * scale
    b32 = rng.normal(0.3, 0.05, n).astype(np.float32)
    order = rng.permutation(n)  # DataComp's metadata is not in tar order
    table = pa.table({
        "uid": pa.array(cols["uid"]).take(order), "url": pa.array(cols["url"]).take(order),
        "text": pa.array(cols["text"]).take(order),
        "original_width": width[order], "original_height": height[order],
        "clip_b32_similarity_score": b32[order],
        "clip_l14_similarity_score": (b32 * 0.9 + rng.normal(0, 0.02, n).astype(np.float32))[order],
        "face_bboxes": pa.array([[] for _ in range(n)], pa.list_(pa.list_(pa.float64()))),
        "sha256": pa.array([hashlib.sha256(u.encode()).hexdigest() for u in cols["uid"]]).take(order),
    })
    pq.write_table(table, os.path.join(root, METADATA, f"{f:08d}.parquet"))
    return n


def ensure_pool(cache: str, shape: PoolShape, processes: int) -> Tuple[str, bool]:
    """``(pool root, reused)``: the pool of ``shape`` under ``cache``, written (in ``processes`` processes) unless a
    complete one is there."""
    root = os.path.join(os.path.abspath(cache), f"datacomp-{shape.rows}-{shape.per_tar}-s{shape.seed}")
    marker = os.path.join(root, MARKER)
    if os.path.exists(marker):
        with open(marker) as fh:
            if json.load(fh) == asdict(shape):
                return root, True
    shutil.rmtree(root, ignore_errors=True)
    for sub in (SHARDS, METADATA):
        os.makedirs(os.path.join(root, sub))
    with multiprocessing.get_context("spawn").Pool(max(1, min(processes, shape.files))) as pool:
        written = sum(pool.starmap(write_file, [(root, shape, f) for f in range(shape.files)]))
    assert written == shape.rows + shape.missing_rows, (written, shape)
    with open(marker + ".tmp", "w") as fh:
        json.dump(asdict(shape), fh)
    os.replace(marker + ".tmp", marker)
    return root, False
