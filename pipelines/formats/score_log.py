"""The score log: one row per sample per training step, written by every rank (docs/architecture.md, "Formats").

Rows ``(uid_hi, uid_lo, step, epoch, rank, score, weight, loss, batch_size)`` (``batch_size``: the global batch).
Each rank writes one file per checkpoint (a *segment*), in one flat folder:

    scores/part-s<first step>-<last step>-r<rank>.parquet

so the files per checkpoint are bounded by the number of ranks.  Inside a file the rows are sorted (stably) by
``bucket = uid_lo % num_buckets`` and the row groups are cut at bucket boundaries; the footer's key-value metadata
(:data:`INDEX_KEY`) holds the bucket index: the number of buckets, the buckets present and the first row of each
(:class:`BucketIndex`).  Every row of a uid is in one bucket, so aggregation needs no shuffle: a task reads just
its buckets' row groups of every file (:func:`read_bucket_rows`).  The file stays plain parquet with the columns of
:data:`SCHEMA`; a rewrite that keeps the schema's metadata keeps the index right (it holds rows, not row groups).

**Exactly once.**  A rank buffers its rows in memory and writes them only when a checkpoint is taken
(:meth:`ScoreLogWriter.flush`), just before that checkpoint is reported: the rows of steps up to a checkpoint are
durable once the checkpoint is.  A segment is named by its step range and rank, so a segment rerun after a
failure rewrites the same name, and on resume from step ``c`` every segment that starts after ``c`` (written for a
checkpoint that never registered) is deleted first (:func:`discard_after`: one listing of the flat folder).  The
train stage's per-checkpoint metrics follow the same rules (:mod:`pipelines.formats.model`).  Local files are
written under a temporary name and renamed; an object store's PUT is atomic already.  Readers of a committed train
stage find the log in its manifest's ``files`` (:func:`log_files`), never by listing.
"""

from __future__ import annotations

import contextlib
import io
import json
import posixpath
import re
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.run.errors import InputError
from pipelines.run.storage import atomic_write, is_local, read_parquet

SCHEMA = pa.schema([
    ("uid_hi", pa.uint64()), ("uid_lo", pa.uint64()), ("step", pa.int64()), ("epoch", pa.int32()),
    ("rank", pa.int32()), ("score", pa.float32()), ("weight", pa.float32()), ("loss", pa.float32()),
    ("batch_size", pa.int32()),
])
DIR = "scores"
PATTERN = f"{DIR}/part-s<first>-<last>-r<rank>.parquet"  # how messages name the layout
INDEX_KEY = "gradmimic.buckets"  # the footer's key-value entry holding the bucket index
ROW_GROUP_ROWS = 1 << 20  # a bucket's rows in one file are cut into row groups of at most this many
_SEGMENT = re.compile(r"^part-s(\d+)-(\d+)(?:-r(\d+))?\.parquet$")
_BUCKET = re.compile(r"(?:^|/)bucket=(\d+)/")


def part_name(first: int, last: int, rank: int) -> str:
    return f"part-s{first:09d}-{last:09d}-r{rank:04d}.parquet"


def segment_of(path: str) -> Optional[Tuple[int, int, Optional[int]]]:
    """``(first step, last step, rank or None)`` of a segment file's name, or None for any other file."""
    m = _SEGMENT.match(posixpath.basename(path))
    if m is None:
        return None
    return int(m.group(1)), int(m.group(2)), None if m.group(3) is None else int(m.group(3))


def bucket_dir(bucket: int) -> str:
    """The folder of a bucket's utility files (``bucket = uid_lo % num_buckets``, as in the log)."""
    return f"bucket={bucket}"


def bucket_of(path: str) -> Optional[int]:
    """The bucket a utility file's path (relative to the stage) puts it in, if any."""
    m = _BUCKET.search(path)
    return int(m.group(1)) if m is not None else None


def is_log_file(rel: str) -> bool:
    """Whether a stage file (a path relative to the stage directory) is one of its score-log segments."""
    return rel.startswith(DIR + "/") and "/" not in rel[len(DIR) + 1:] and segment_of(rel) is not None


def log_files(files: Iterable[str]) -> List[str]:
    """The score-log segments among a manifest's ``files`` (relative paths), in (first step, rank) order."""
    return sorted(f for f in files if is_log_file(f))


def buckets_of(uid_lo: np.ndarray, num_buckets: int) -> np.ndarray:
    lo = np.asarray(uid_lo, dtype=np.uint64)
    if num_buckets & (num_buckets - 1) == 0:  # a power of two: a mask, several times cheaper than a 64-bit modulo
        return (lo & np.uint64(num_buckets - 1)).astype(np.int64)
    return (lo % np.uint64(num_buckets)).astype(np.int64)


# ------------------------------------------------------------------------------------------------ one file


@dataclass(frozen=True)
class BucketIndex:
    """Where each bucket's rows are in a file: rows ``offsets[i]:offsets[i + 1]`` hold bucket ``buckets[i]``."""

    num_buckets: int
    buckets: np.ndarray  # the buckets present, ascending
    offsets: np.ndarray  # len(buckets) + 1 row offsets

    def to_json(self) -> str:
        return json.dumps({"num_buckets": self.num_buckets, "buckets": self.buckets.tolist(),
                           "offsets": self.offsets.tolist()})

    def counts(self) -> np.ndarray:
        """Rows per bucket, ``[num_buckets]``."""
        out = np.zeros(self.num_buckets, np.int64)
        out[self.buckets] = np.diff(self.offsets)
        return out

    def rows(self, lo: int, hi: int) -> Tuple[int, int]:
        """The row range holding buckets ``lo <= b < hi`` (contiguous: the rows are sorted by bucket)."""
        a, b = np.searchsorted(self.buckets, [lo, hi])
        return int(self.offsets[a]), int(self.offsets[b])


def bucket_index(meta: pq.FileMetaData, name: str) -> BucketIndex:
    """A score-log file's index from its footer; ``name`` names the file in the error."""
    raw = (meta.metadata or {}).get(INDEX_KEY.encode())
    if raw is None:
        raise InputError(f"{name}: not a score-log file: its footer has no bucket index ({INDEX_KEY}); the log is "
                         f"written as {PATTERN}")
    try:
        d = json.loads(raw)
        index = BucketIndex(int(d["num_buckets"]), np.asarray(d["buckets"], np.int64),
                            np.asarray(d["offsets"], np.int64))
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{name}: unreadable bucket index ({exc})") from None
    if index.offsets[-1] != meta.num_rows or len(index.offsets) != len(index.buckets) + 1:
        raise InputError(f"{name}: its bucket index counts {int(index.offsets[-1])} rows, the file has "
                         f"{meta.num_rows}")
    return index


def encode(cols: Dict[str, np.ndarray], num_buckets: int, row_group_rows: int = ROW_GROUP_ROWS) -> bytes:
    """One segment file: ``cols`` (the :data:`SCHEMA` columns) sorted stably by bucket, a row group per bucket
    (several for a bucket of more than ``row_group_rows``), and the bucket index in the footer."""
    bucket = buckets_of(cols["uid_lo"], num_buckets)
    order = np.argsort(bucket, kind="stable")
    present, starts = np.unique(bucket[order], return_index=True)
    index = BucketIndex(num_buckets, present.astype(np.int64), np.append(starts, len(order)).astype(np.int64))
    table = pa.table({f.name: np.asarray(cols[f.name])[order] for f in SCHEMA}, schema=SCHEMA)
    buf = io.BytesIO()
    with pq.ParquetWriter(buf, SCHEMA.with_metadata({INDEX_KEY: index.to_json()})) as writer:
        for a, b in zip(index.offsets[:-1].tolist(), index.offsets[1:].tolist()):
            for s in range(a, b, row_group_rows):
                writer.write_table(table.slice(s, min(b, s + row_group_rows) - s), row_group_size=row_group_rows)
    return buf.getvalue()


@contextlib.contextmanager
def open_part(fs, path: str) -> Iterator[pq.ParquetFile]:
    """A segment file opened for reading row groups (ranged reads on an object store); a file that is not
    parquet is an :class:`InputError` naming it."""
    try:
        if is_local(fs):
            yield pq.ParquetFile(path, pre_buffer=False)
        else:
            with fs.open(path, "rb") as f:
                yield pq.ParquetFile(f, pre_buffer=False)
    except pa.ArrowInvalid as exc:
        raise InputError(f"{fs.unstrip_protocol(path)}: not a readable parquet file "
                         f"({str(exc).splitlines()[0]})") from None


def read_rows(pf: pq.ParquetFile, start: int, end: int, columns: Optional[List[str]] = None) -> pa.Table:
    """Rows ``start:end`` of a file, reading only the row groups that hold them."""
    meta = pf.metadata
    sizes = np.array([meta.row_group(i).num_rows for i in range(meta.num_row_groups)], np.int64)
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    groups = [i for i in range(len(sizes)) if bounds[i] < end and bounds[i + 1] > start]
    if start >= end or not groups:
        schema = pf.schema_arrow
        return (schema if columns is None else pa.schema([schema.field(c) for c in columns])).empty_table()
    t = pf.read_row_groups(groups, columns=columns, use_threads=False)
    return t.slice(start - int(bounds[groups[0]]), end - start).replace_schema_metadata(None)


def read_bucket_rows(pf: pq.ParquetFile, name: str, lo: int, hi: int,
                     columns: Optional[List[str]] = None) -> Iterator[Tuple[int, pa.Table]]:
    """``(bucket, rows)`` of a file for every bucket ``lo <= b < hi`` it holds, reading only their row groups."""
    index = bucket_index(pf.metadata, name)
    start, end = index.rows(lo, hi)
    if start == end:
        return
    t = read_rows(pf, start, end, columns)
    a, b = np.searchsorted(index.buckets, [lo, hi])
    for i in range(a, b):
        a_row, z_row = int(index.offsets[i]), int(index.offsets[i + 1])
        yield int(index.buckets[i]), t.slice(a_row - start, z_row - a_row)


# ------------------------------------------------------------------------------------------------ writing


class SegmentWriter:
    """One rank's buffered segments in a flat folder ``root`` on ``fs`` (the score log's, the skipped record's):
    rows added per step, written as one file per :meth:`flush` (:func:`part_name`, atomically), none without
    rows.  Subclasses say how a file is encoded (:meth:`encode`)."""

    def __init__(self, fs, root: str, rank: int, first_step: int = 1) -> None:
        self.fs, self.root, self.rank = fs, root.rstrip("/"), rank
        self.first = first_step  # the first step not yet flushed
        self._parts: List[Dict[str, np.ndarray]] = []

    def encode(self, cols: Dict[str, np.ndarray]) -> bytes:
        raise NotImplementedError

    def flush(self, step: int) -> List[str]:
        """Write the buffered rows of steps ``first..step`` as one file (none without rows); returns its path."""
        written: List[str] = []
        if self._parts:
            cols = {k: np.concatenate([p[k] for p in self._parts]) for k in self._parts[0]}
            path = posixpath.join(self.root, part_name(self.first, step, self.rank))
            atomic_write(self.fs, path, self.encode(cols))
            written = [path]
        self._parts = []
        self.first = step + 1
        return written


class ScoreLogWriter(SegmentWriter):
    """One rank's buffered writer.  ``root`` is the stage's ``scores`` directory on ``fs``."""

    def __init__(self, fs, root: str, rank: int, num_buckets: int, first_step: int = 1) -> None:
        super().__init__(fs, root, rank, first_step)
        self.num_buckets = num_buckets

    def add(self, step: int, epoch: int, uid_hi, uid_lo, scores, weights, losses, batch_size: int) -> None:
        n = len(uid_lo)
        self._parts.append({
            "uid_hi": np.asarray(uid_hi, dtype=np.uint64), "uid_lo": np.asarray(uid_lo, dtype=np.uint64),
            "step": np.full(n, step, np.int64), "epoch": np.full(n, epoch, np.int32),
            "rank": np.full(n, self.rank, np.int32), "score": np.asarray(scores, dtype=np.float32),
            "weight": np.asarray(weights, dtype=np.float32), "loss": np.asarray(losses, dtype=np.float32),
            "batch_size": np.full(n, batch_size, np.int32),
        })

    def encode(self, cols: Dict[str, np.ndarray]) -> bytes:
        return encode(cols, self.num_buckets)


# ------------------------------------------------------------------------------------------------ the folder


def beside_log(scores_root: str, name: str) -> str:
    """The folder ``name`` next to the score log's folder, in the same train stage's attempt (its metrics segments,
    skipped samples and checkpoints)."""
    return posixpath.join(posixpath.dirname(scores_root.rstrip("/")), name)


def list_parts(fs, root: str) -> List[str]:
    """The segment files of a flat log folder, in (first step, rank) order: one listing (a log given by path, and
    the train stage once when it finishes)."""
    try:
        found = fs.ls(root.rstrip("/"), detail=False)
    except FileNotFoundError:
        return []
    return sorted((p for p in found if segment_of(p) is not None), key=posixpath.basename)


def discard_after(fs, root: str, step: int) -> int:
    """Delete every segment of a flat folder that starts after ``step`` and any leftover temporary file (one
    listing); returns how many."""
    try:
        found = fs.ls(root.rstrip("/"), detail=False)
    except FileNotFoundError:
        return 0
    stale = []
    for path in found:
        seg = segment_of(path)
        if (seg is None and posixpath.basename(path).endswith(".tmp")) or (seg is not None and seg[0] > step):
            stale.append(path)
    if stale:
        fs.rm(stale)
    return len(stale)


def read_score_log(fs, root: str, columns: Optional[List[str]] = None, files: Optional[List[str]] = None) -> pa.Table:
    """The whole log (``files``, or the folder's segments) as one table (tests and small runs; the aggregate stage
    reads it by bucket in tasks)."""
    tables = [read_parquet(fs, path, columns).replace_schema_metadata(None)
              for path in (files if files is not None else list_parts(fs, root))]
    return pa.concat_tables(tables) if tables else SCHEMA.empty_table()
