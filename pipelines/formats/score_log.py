"""The score log: one row per sample per training step, written by every rank (docs/architecture.md, "Formats").

Rows ``(uid_hi, uid_lo, step, epoch, rank, score, weight, loss, batch_size)`` (``batch_size``: the global batch),
partitioned by ``bucket = uid_lo % num_buckets`` so that aggregation needs no shuffle:

    scores/bucket=<b>/part-s<first step>-<last step>-r<rank>.parquet

**Exactly once.**  A rank buffers its rows in memory and writes them only when a checkpoint is taken
(:meth:`ScoreLogWriter.flush`), just before that checkpoint is reported: the rows of steps up to a checkpoint are
durable once the checkpoint is.  A segment's files are named by its step range and rank, so a segment rerun after
a failure rewrites the same names, and on resume from step ``c`` every file of a segment that starts after ``c``
(written for a checkpoint that never registered) is deleted first (:func:`discard_after`).  Local files are
written under a temporary name and renamed; an object store's PUT is atomic already.
"""

from __future__ import annotations

import io
import posixpath
import re
from typing import Dict, List, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.run.storage import atomic_write, is_local, read_parquet

SCHEMA = pa.schema([
    ("uid_hi", pa.uint64()), ("uid_lo", pa.uint64()), ("step", pa.int64()), ("epoch", pa.int32()),
    ("rank", pa.int32()), ("score", pa.float32()), ("weight", pa.float32()), ("loss", pa.float32()),
    ("batch_size", pa.int32()),
])
DIR = "scores"
PATTERN = f"{DIR}/bucket=<b>/*.parquet"  # how messages name the layout
_PART = re.compile(r"part-s(\d+)-(\d+)-r(\d+)\.parquet$")
_BUCKET = re.compile(r"(?:^|/)bucket=(\d+)/")


def part_name(first: int, last: int, rank: int) -> str:
    return f"part-s{first:09d}-{last:09d}-r{rank:04d}.parquet"


def bucket_dir(bucket: int) -> str:
    """The folder of a bucket's files (the score log's, and the utility's)."""
    return f"bucket={bucket}"


def bucket_of(path: str) -> Optional[int]:
    """The bucket a file's path (relative to the log's or the utility's root) puts it in, if any."""
    m = _BUCKET.search(path)
    return int(m.group(1)) if m is not None else None


def is_log_file(rel: str) -> bool:
    """Whether a stage file (a path relative to the stage directory) belongs to its score log."""
    return rel.startswith(DIR + "/")


def buckets_of(uid_lo: np.ndarray, num_buckets: int) -> np.ndarray:
    lo = np.asarray(uid_lo, dtype=np.uint64)
    if num_buckets & (num_buckets - 1) == 0:  # a power of two: a mask, several times cheaper than a 64-bit modulo
        return (lo & np.uint64(num_buckets - 1)).astype(np.int64)
    return (lo % np.uint64(num_buckets)).astype(np.int64)


class ScoreLogWriter:
    """One rank's buffered writer.  ``root`` is the stage's ``scores`` directory on ``fs``."""

    def __init__(self, fs, root: str, rank: int, num_buckets: int, first_step: int = 1) -> None:
        self.fs, self.root, self.rank, self.num_buckets = fs, root.rstrip("/"), rank, num_buckets
        self.first = first_step  # the first step not yet flushed
        self._parts: List[Dict[str, np.ndarray]] = []

    def add(self, step: int, epoch: int, uid_hi, uid_lo, scores, weights, losses, batch_size: int) -> None:
        n = len(uid_lo)
        self._parts.append({
            "uid_hi": np.asarray(uid_hi, dtype=np.uint64), "uid_lo": np.asarray(uid_lo, dtype=np.uint64),
            "step": np.full(n, step, np.int64), "epoch": np.full(n, epoch, np.int32),
            "rank": np.full(n, self.rank, np.int32), "score": np.asarray(scores, dtype=np.float32),
            "weight": np.asarray(weights, dtype=np.float32), "loss": np.asarray(losses, dtype=np.float32),
            "batch_size": np.full(n, batch_size, np.int32),
        })

    def flush(self, step: int) -> List[str]:
        """Write the buffered rows of steps ``first..step`` (one file per bucket present); returns their paths."""
        written: List[str] = []
        if self._parts:
            cols = {f.name: np.concatenate([p[f.name] for p in self._parts]) for f in SCHEMA}
            bucket = buckets_of(cols["uid_lo"], self.num_buckets)
            order = np.argsort(bucket, kind="stable")
            bounds = np.searchsorted(bucket[order], np.arange(self.num_buckets + 1))
            name = part_name(self.first, step, self.rank)
            files = {}
            for b in range(self.num_buckets):
                rows = order[bounds[b]:bounds[b + 1]]
                if len(rows):
                    table = pa.table({c: v[rows] for c, v in cols.items()}, schema=SCHEMA)
                    buf = io.BytesIO()
                    pq.write_table(table, buf)
                    files[posixpath.join(self.root, bucket_dir(b), name)] = buf.getvalue()
            _write_all(self.fs, files)
            written = sorted(files)
        self._parts = []
        self.first = step + 1
        return written


def _write_all(fs, files: Dict[str, bytes]) -> None:
    if not files:
        return
    if is_local(fs):
        for path, data in files.items():
            atomic_write(fs, path, data)
    else:
        fs.pipe(files)  # concurrent PUTs, each atomic


def list_parts(fs, root: str) -> List[str]:
    try:
        return sorted(p for p in fs.find(root.rstrip("/")) if p.endswith(".parquet"))
    except FileNotFoundError:
        return []


def list_buckets(fs, root: str) -> Dict[int, List[str]]:
    """``{bucket: [files]}`` of a log, in bucket order (files outside any ``bucket=<b>/`` folder left out)."""
    buckets: Dict[int, List[str]] = {}
    for path in list_parts(fs, root):
        b = bucket_of(path[len(root.rstrip("/")):])
        if b is not None:
            buckets.setdefault(b, []).append(path)
    return dict(sorted(buckets.items()))


def discard_after(fs, root: str, step: int) -> int:
    """Delete every segment that starts after ``step`` and any leftover temporary file; returns how many."""
    try:
        found = fs.find(root.rstrip("/"))
    except FileNotFoundError:
        return 0
    stale = []
    for path in found:
        m = _PART.search(posixpath.basename(path))
        if m is None or int(m.group(1)) > step:
            stale.append(path)
    if stale:
        fs.rm(stale)
    return len(stale)


def read_score_log(fs, root: str, columns: Optional[List[str]] = None) -> pa.Table:
    """The whole log as one table (tests and small runs; the aggregate stage reads it per bucket on Ray Data)."""
    tables = []
    for path in list_parts(fs, root):
        tables.append(read_parquet(fs, path, columns))
    return pa.concat_tables(tables) if tables else SCHEMA.empty_table()
