"""The train stage's row index: where every row of a pool is, in fixed-width numpy pieces in Ray's object store.

A dataset stage is indexed by Ray tasks over its parquet shards (the dataset manifest's ``files``, in their order;
a task takes a run of consecutive shards, one shard when shards are large): each reads the location columns only
and returns its rows as a *piece*: a numpy structured array of :data:`INDEX_DTYPE` (no strings: the uid halves,
the tar as a number into the piece's own list of tar URLs, the image's and the caption's byte ranges in it, the
label or -1), that list and the captions no tar holds (both as packed bytes, so a fetch is zero-copy), the rows
grouped by split (file order within one), plus a small record of where each split's rows start and how many there
are.  The pieces stay in the object store: task returns, so the driver owns them (Ray rebuilds one whose node is
lost) without ever fetching them, and at least :data:`MIN_ROWS` rows each on average, well over the size Ray would
keep inline in the driver.  The driver holds a ref and a few counts per piece.

A split's global row ``i`` is row ``i`` of its rows in the pieces laid end to end: shards in manifest order, each
in file order, the order of the pool table read whole and filtered by split.  A :class:`RowIndex` maps row numbers
to ``(piece, row)`` with a binary search on the cumulative counts and gathers the index rows (from zero-copy views
of the pieces in the local object store), so a batch costs what its rows cost, never what the pool does.  It can
serve a prefix (``head``: an evaluation capped at ``eval_samples``) or a seeded sample drawn from the counts alone
(``sample``: a comparison set).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from pipelines.formats.pool import FEATURE_COLUMNS, features_as_location  # read as LOCATION[3:]

# ``text_offset`` / ``text_size``: the caption's UTF-8 bytes in the row's tar; where that tar holds none (the pool
# says -1), the caption is kept in the piece's own ``captions`` bytes instead, at ``-1 - text_offset``
INDEX_DTYPE = np.dtype([("uid_hi", "<u8"), ("uid_lo", "<u8"), ("tar", "<i4"), ("image_offset", "<i8"),
                        ("image_size", "<i8"), ("text_offset", "<i8"), ("text_size", "<i4"), ("label", "<i8")])
LOCATION = ("uid_hi", "uid_lo", "split", "tar", "image_offset", "image_size")
TEXT = ("text_offset", "text_size")
MIN_ROWS = 8192  # rows per index task (from the manifest's mean shard size): pieces of ~450 KB and up

# a piece: the index rows of some shards, the tar URLs their ``tar`` numbers (UTF-8 bytes and their offsets: numpy,
# so a fetch is zero-copy however many tars a shard points into), and the captions no tar holds
Piece = Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
Rows = Tuple[np.ndarray, List[str], bytes]  # what ``RowIndex.lookup`` gives: a batch's rows, its tar URLs, captions


def index_shards(fs, paths: Sequence[str], base: str, labels: bool, text: bool, stage_url: str,
                 features: bool = False) -> tuple:
    """Consecutive pool shards as one piece, its rows grouped by split: ``({split: (first, rows)}, piece)``; with
    ``text``, where each caption is too.  ``base`` is the dataset stage's committed directory (URL): a relative
    ``tar`` is relative to it.  With ``features`` the rows point at their cached tower features instead of their
    images (``tar``, ``image_offset``, ``image_size`` the pool's ``features`` columns; no captions)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    location = list(LOCATION[:3]) + list(FEATURE_COLUMNS) if features else list(LOCATION)
    text = text and not features
    columns = location + (list(TEXT) if text else []) + (["label"] if labels else [])
    tables = [_read_shard(fs, p, columns, text, stage_url) for p in paths]
    if features:
        tables = [features_as_location(t) for t in tables]
    table = pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]
    codes = pc.dictionary_encode(table["split"].combine_chunks())
    names = codes.dictionary.to_pylist()
    code = codes.indices.fill_null(len(names)).to_numpy(zero_copy_only=False)  # a row with no split: last, unused
    order = np.argsort(code, kind="stable")
    counts = np.bincount(code, minlength=len(names) + 1)
    firsts = np.concatenate([[0], np.cumsum(counts)])
    where = {n: (int(firsts[i]), int(counts[i])) for i, n in enumerate(names) if counts[i]}
    return where, _piece(table.take(pa.array(order)), base, labels)


def _read_shard(fs, path: str, columns: List[str], text: bool, stage_url: str):
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from pipelines.run.errors import InputError

    with fs.open(path, "rb") as f:
        try:
            reader = pq.ParquetFile(f, pre_buffer=False)
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several kinds for a file that is not parquet
            raise InputError(f"{fs.unstrip_protocol(path)}: not a readable parquet file "
                             f"({str(exc).splitlines()[0]})") from None
        missing = [c for c in columns if c not in reader.schema_arrow.names]
        if missing:
            raise InputError(f"{stage_url}: the pool has no column {missing[0]!r} (rerun its ingest stage)")
        table = reader.read(columns=columns, use_threads=False)
        if text and pc.any(pc.less(table["text_offset"], 0)).as_py():  # captions no tar holds: from the table
            table = table.append_column("text", reader.read(columns=["text"], use_threads=False)["text"])
    return table


def _piece(rows, base: str, labels: bool) -> Piece:
    import pyarrow as pa
    import pyarrow.compute as pc

    from pipelines.formats.pool import tar_urls

    tars = pc.dictionary_encode(rows["tar"].combine_chunks())
    piece = np.empty(rows.num_rows, INDEX_DTYPE)
    piece["tar"] = tars.indices.to_numpy(zero_copy_only=False)
    has_text = "text_offset" in rows.column_names
    for name in ("uid_hi", "uid_lo", "image_offset", "image_size") + (TEXT if has_text else ()):
        piece[name] = rows[name].to_numpy()
    if not has_text:
        piece["text_offset"], piece["text_size"] = -1, 0
    piece["label"] = rows["label"].fill_null(-1).to_numpy() if labels else -1
    captions = np.zeros(0, np.uint8)
    inline = np.flatnonzero(piece["text_offset"] < 0) if "text" in rows.column_names else []
    if len(inline):
        captions, offsets = _pack(rows["text"].take(pa.array(inline)).to_pylist())
        piece["text_offset"][inline] = -1 - offsets[:-1]
        piece["text_size"][inline] = np.diff(offsets)
    return (piece, *_pack(tar_urls(base, tars.dictionary).to_pylist()), captions)


def _pack(strings: List[Optional[str]]) -> Tuple[np.ndarray, np.ndarray]:
    """Strings as their UTF-8 bytes end to end and the ``len + 1`` offsets between them (a null: empty)."""
    data = [(v or "").encode("utf-8") for v in strings]
    offsets = np.zeros(len(data) + 1, np.int64)
    np.cumsum([len(d) for d in data], out=offsets[1:])
    return np.frombuffer(b"".join(data), np.uint8).copy(), offsets


@dataclass(frozen=True, eq=False)
class RowIndex:
    """Rows ``0 .. num_rows - 1`` of a split: row ``i`` is global row ``i`` (or ``pick[i]`` for a sample), found in
    piece ``p`` at ``firsts[p] + i - starts[p]`` for ``starts[p] <= i < starts[p + 1]`` (``starts[-1]``: the split's
    size)."""

    pieces: Tuple[Any, ...]  # object refs of the pieces holding rows of the split (the driver never fetches them)
    starts: np.ndarray
    firsts: np.ndarray
    num_rows: int
    pick: Optional[np.ndarray] = None

    @property
    def total(self) -> int:
        """Rows in the whole split (``num_rows`` may be fewer)."""
        return int(self.starts[-1])

    def head(self, n: Optional[int]) -> "RowIndex":
        """The first ``n`` rows (all with ``None``)."""
        if n is None:
            return self
        return RowIndex(self.pieces, self.starts, self.firsts, min(n, self.num_rows), self.pick)

    def sample(self, n: int, seed: int) -> "RowIndex":
        """``min(n, num_rows)`` rows drawn without replacement with ``seed``, in row order (from the counts only)."""
        n = min(n, self.num_rows)
        pick = np.sort(np.random.default_rng(seed).choice(self.num_rows, n, replace=False))
        return RowIndex(self.pieces, self.starts, self.firsts, n, pick if self.pick is None else self.pick[pick])

    def lookup(self, idx: np.ndarray) -> Rows:
        """The index rows of rows ``idx``, the tar URLs their ``tar`` numbers, and the captions no tar holds (at
        ``-1 - text_offset``): one fetch of each piece they touch, O(len(idx)) work whatever the pool size."""
        import ray

        idx = np.asarray(idx, dtype=np.int64)
        if len(idx) and (idx.min() < 0 or idx.max() >= self.num_rows):
            raise IndexError(f"rows outside 0..{self.num_rows - 1}")
        rows = idx if self.pick is None else self.pick[idx]
        which = np.searchsorted(self.starts, rows, side="right") - 1
        touched, inverse = np.unique(which, return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        bounds = np.searchsorted(inverse[order], np.arange(len(touched) + 1))
        out = np.empty(len(rows), INDEX_DTYPE)
        urls: List[str] = []
        captions: List[bytes] = []
        used = 0
        for k, (piece, tar_bytes, tar_offsets, inline) in enumerate(ray.get([self.pieces[p] for p in touched])):
            p, at = touched[k], order[bounds[k]:bounds[k + 1]]
            got = piece[self.firsts[p] + rows[at] - self.starts[p]]
            tars, local = np.unique(got["tar"], return_inverse=True)  # only the tars these rows are in
            got["tar"] = len(urls) + local.reshape(-1)
            urls.extend(tar_bytes[tar_offsets[t]:tar_offsets[t + 1]].tobytes().decode("utf-8") for t in tars)
            for j in np.flatnonzero(got["text_offset"] < 0) if len(inline) else ():  # re-based on this batch's
                start, size = -1 - int(got["text_offset"][j]), int(got["text_size"][j])
                captions.append(inline[start:start + size].tobytes())
                got["text_offset"][j] = -1 - used
                used += size
            out[at] = got
        return out, urls, b"".join(captions)


@dataclass(frozen=True, eq=False)
class PoolIndex:
    """A dataset stage's pieces and, per piece, where each split's rows are in it (the driver's whole share)."""

    pieces: Tuple[Any, ...]
    splits: Tuple[str, ...]
    firsts: np.ndarray  # (pieces, splits): the split's first row in the piece
    counts: np.ndarray  # (pieces, splits): its rows there

    def split(self, name: str) -> RowIndex:
        """The rows of split ``name`` (none if the pool has none)."""
        if name not in self.splits:
            return RowIndex((), np.zeros(1, np.int64), np.zeros(0, np.int64), 0)
        s = self.splits.index(name)
        keep = np.flatnonzero(self.counts[:, s])
        starts = np.concatenate([[0], np.cumsum(self.counts[keep, s])]).astype(np.int64)
        return RowIndex(tuple(self.pieces[i] for i in keep), starts, self.firsts[keep, s], int(starts[-1]))


def build_index(ctx: Optional[Any], stage, labels: bool, text: bool, features: bool = False) -> PoolIndex:
    """The :class:`PoolIndex` of dataset stage ``stage`` (with ``labels``, and with where the captions are for
    ``text``; with ``features``, where the rows' cached tower features are instead of images), built by tasks over runs of consecutive shards (:func:`~pipelines.run.context.map_tasks`; progress
    on ``ctx``'s line, if given)."""
    from pipelines.formats.manifest import DatasetManifest
    from pipelines.formats.pool import shard_parquets
    from pipelines.run import errors
    from pipelines.run.context import map_tasks

    manifest = DatasetManifest.read(stage)
    files = shard_parquets(manifest.files)
    if not files:
        raise errors.InputError(f"{stage.url}: the ingest stage has no rows")
    per_task = max(1, math.ceil(MIN_ROWS * len(files) / max(manifest.rows_out, 1)))
    runs = [[stage.join(f) for f in files[i:i + per_task]] for i in range(0, len(files), per_task)]
    base = stage.fs.unstrip_protocol(stage.join(""))
    tasks = [(stage.fs, run, base, labels, text, stage.url, features) for run in runs]
    # the pieces stay in the object store (each worker fetches what it reads); their row counts come back
    if ctx is not None:
        done = ctx.map(index_shards, tasks, unit="index", num_returns=2)
    else:
        done = map_tasks(index_shards, tasks, num_returns=2)
    found: List[Dict[str, Tuple[int, int]]] = [f for f, _ in done]
    splits = tuple(sorted({s for f in found for s in f}))
    firsts = np.array([[f.get(s, (0, 0))[0] for s in splits] for f in found], np.int64).reshape(len(runs), -1)
    counts = np.array([[f.get(s, (0, 0))[1] for s in splits] for f in found], np.int64).reshape(len(runs), -1)
    return PoolIndex(tuple(ref for _, ref in done), splits, firsts, counts)
