"""Sample shards: what ``ingest`` and ``filter`` write and ``train``, ``evaluate``, ``report`` read
(docs/architecture.md, "Formats").

Under a dataset stage's directory:

- ``shards/shard-NNNNN.parquet``: one row per sample: :data:`RESERVED` columns (``uid``, ``uid_hi``, ``uid_lo``,
  ``text``, ``key``, ``shard``, ``split``, ``corrupted``, ``source``; where its image is: ``tar`` the tar's path
  relative to the stage directory (a tar the stage wrote) or an absolute URL (a webdataset or DataComp pool
  indexed in place: the source tar's; a filter's index: the tar its pool's row resolved to), ``image`` the
  member's name, ``image_offset`` / ``image_size`` the member's
  bytes in the tar, so one ranged read fetches it; ``text_offset`` / ``text_size`` the caption's UTF-8 bytes in
  the same tar (``-1`` / ``-1`` where that tar holds no copy of ``text``: read the ``text`` column then);
  ``label``, ``true_label``, ``class_name`` for labelled sources) and the source's extra columns (DataComp
  metadata such as ``clip_b32_similarity_score``);
- ``shards/shard-NNNNN.tar``: webdataset tars of ``<key>.jpg|png``, ``<key>.txt``, ``<key>.json`` (``{"uid": ...}``),
  only for the sources ingest copies and for ``reshard: true`` (an index of a pool in place, and a filter's
  default output, write none);
- ``rejects.parquet`` (ingest), or ``rejects/part-NNNNN.parquet`` (an ingest indexing in place, one part per uid
  partition): ``source``, ``uid``, ``reason`` of every sample left out;
- ``features/shard-NNNNN.f32`` (features): the towers' features of the shard's rows, ``image_dim + text_dim``
  little-endian float32 per row (image first), a row's at ``features_offset`` in the file ``features`` names (a
  full URL) and ``features_size`` bytes long (``0``: its image or caption did not decode);
- ``rejected/part-NNNNN.parquet`` (filter): every dropped row with its pool columns and ``reason``;
- ``subset.npy`` (filter): the kept uids as DataComp's resharder reads them, a sorted ``"u8,u8"`` array.

A uid is 128 bits: 32 lowercase hex chars in ``uid``, the two halves as ``uint64`` in ``uid_hi`` / ``uid_lo``.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import tarfile
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa

from pipelines.run.errors import InputError

SHARDS = "shards"
REJECTS = "rejects.parquet"
REJECTED = "rejected"
SUBSET = "subset.npy"
SUBSET_DTYPE = np.dtype("u8,u8")

RESERVED = ("uid", "uid_hi", "uid_lo", "text", "key", "shard", "split", "corrupted", "source", "tar", "image",
            "image_offset", "image_size", "text_offset", "text_size", "label", "true_label", "class_name", "features",
            "features_offset", "features_size")
UID_KEY = ("uid_hi", "uid_lo")
IMAGE_COLUMNS = ("tar", "image", "image_offset", "image_size")
TEXT_COLUMNS = ("text_offset", "text_size")  # the caption's bytes in the row's tar; -1 where it holds none
REASON = "reason"
FEATURES = "features"
FEATURE_COLUMNS = ("features", "features_offset", "features_size")  # where a row's cached tower features are
FEATURE_DTYPE = np.dtype("<f4")


# ------------------------------------------------------------------------------------------------ file names


def shard_parquet(shard: int) -> str:
    return f"{SHARDS}/shard-{shard:05d}.parquet"


def shard_tar(shard: int) -> str:
    return f"{SHARDS}/shard-{shard:05d}.tar"


def features_file(shard_parquet_name: str) -> str:
    """The cached tower features of a shard (``shards/shard-NNNNN.parquet``'s rows, in its order)."""
    stem = posixpath.splitext(posixpath.basename(shard_parquet_name))[0]
    return f"{FEATURES}/{stem}.f32"


def shard_parquets(files: Iterable[str]) -> List[str]:
    """The parquet shards among a dataset manifest's ``files``, in their order there."""
    return [f for f in files if f.startswith(SHARDS + "/") and f.endswith(".parquet")]


def shard_files(files: Iterable[str]) -> List[str]:
    """Every shard file (parquet and tar) among a manifest's ``files``."""
    return [f for f in files if f.startswith(SHARDS + "/")]


def rejected_part(group: int) -> str:
    return f"{REJECTED}/part-{group:05d}.parquet"


def rejects_part(part: int) -> str:
    """An ingest's rejects, one part per uid partition (an index of a pool in place)."""
    return f"{posixpath.splitext(REJECTS)[0]}/part-{part:05d}.parquet"


def rejects_files(files: Iterable[str]) -> List[str]:
    """An ingest manifest's rejects files (``rejects.parquet`` or its parts), in their order there."""
    stem = posixpath.splitext(REJECTS)[0] + "/"
    return [f for f in files if f == REJECTS or f.startswith(stem)]


# ------------------------------------------------------------------------------------------------ uids


def uid_of(identity: str) -> str:
    """A deterministic 128-bit uid (32 lowercase hex chars) for a source without one."""
    return hashlib.md5(identity.encode("utf-8")).hexdigest()


def is_uid(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 32 and not value.strip("0123456789abcdef")


_HEX = np.zeros(256, dtype=np.uint64)
_HEX[np.frombuffer(b"0123456789", np.uint8)] = np.arange(10, dtype=np.uint64)
_HEX[np.frombuffer(b"abcdef", np.uint8)] = np.arange(10, 16, dtype=np.uint64)


def uid_halves(uids) -> Tuple[np.ndarray, np.ndarray]:
    """``(uid_hi, uid_lo)`` as uint64, the two halves of the 128-bit uids (a list or string array of valid uids,
    32 lowercase hex chars each), vectorised."""
    uids = uids if isinstance(uids, pa.Array) else pa.array(uids, pa.string())
    if len(uids) == 0:
        return np.zeros(0, np.uint64), np.zeros(0, np.uint64)
    offsets = np.frombuffer(uids.buffers()[1], dtype=np.int32)[uids.offset:uids.offset + len(uids) + 1]
    chars = np.frombuffer(uids.buffers()[2], dtype=np.uint8)[offsets[0]:offsets[-1]].reshape(len(uids), 32)
    nibbles = _HEX[chars]
    shifts = np.arange(60, -1, -4, dtype=np.uint64)
    return (np.bitwise_or.reduce(nibbles[:, :16] << shifts, axis=1),
            np.bitwise_or.reduce(nibbles[:, 16:] << shifts, axis=1))


def uid_hex(hi: np.ndarray, lo: np.ndarray) -> pa.Array:
    """32 lowercase hex chars per uid, vectorised."""
    n = len(hi)
    raw = np.empty((n, 2), dtype=">u8")
    raw[:, 0], raw[:, 1] = hi, lo
    digits = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
    b = raw.view(np.uint8).reshape(n, 16)
    chars = np.empty((n, 32), dtype=np.uint8)
    chars[:, 0::2], chars[:, 1::2] = digits[b >> 4], digits[b & 15]
    offsets = pa.py_buffer(np.arange(0, 32 * n + 1, 32, dtype=np.int32).tobytes())
    return pa.StringArray.from_buffers(n, offsets, pa.py_buffer(chars.tobytes()))


# ------------------------------------------------------------------------------------------------ tables


Where = Tuple[int, ...]  # an image's (member, offset, size) in its tar, then its caption's (offset, size)


def shard_table(uids: List[str], texts: List[str], keys: List[str], shards: List[int], splits: Sequence[str],
                corrupted: Sequence[bool], sources: List[str], where: List[Where],
                extras: Dict[str, list], class_names: Optional[List[str]] = None) -> pa.Table:
    """The rows of sample shards: the reserved columns, then ``extras`` (a source's own columns, ``label`` and
    ``true_label``), then ``class_name`` (from ``label``) where the source has classes."""
    hi, lo = uid_halves(uids)
    cols: Dict[str, pa.Array] = {
        "uid": pa.array(uids, type=pa.string()),
        "uid_hi": pa.array(hi, type=pa.uint64()),
        "uid_lo": pa.array(lo, type=pa.uint64()),
        "text": pa.array(texts, type=pa.string()),
        "key": pa.array(keys, type=pa.string()),
        "shard": pa.array(shards, type=pa.int32()),
        "split": pa.array(list(splits), type=pa.string()),
        "corrupted": pa.array([bool(c) for c in corrupted], type=pa.bool_()),
        "source": pa.array(sources, type=pa.string()),
        "tar": pa.array([shard_tar(s) for s in shards], type=pa.string()),
        "image": pa.array([w[0] for w in where], type=pa.string()),
        "image_offset": pa.array([w[1] for w in where], type=pa.int64()),
        "image_size": pa.array([w[2] for w in where], type=pa.int64()),
        "text_offset": pa.array([w[3] if len(w) > 3 else -1 for w in where], type=pa.int64()),
        "text_size": pa.array([w[4] if len(w) > 3 else -1 for w in where], type=pa.int64()),
    }
    for name, values in extras.items():
        cols[name] = pa.array(values)
    if class_names is not None:
        cols["class_name"] = pa.array([class_names[i] for i in extras.get("label", [])], type=pa.string())
    return pa.table(cols)


def rejects_table(sources: List[str], uids: List[str], reasons: List[str]) -> pa.Table:
    """``rejects.parquet``: one row per sample ingest left out."""
    return pa.table({
        "source": pa.array(sources, type=pa.string()),
        "uid": pa.array(uids, type=pa.string()),
        "reason": pa.array(reasons, type=pa.string()),
    })


def with_reason(rows: pa.Table, reasons: Sequence[str]) -> pa.Table:
    """Dropped pool rows as ``rejected/`` holds them: their columns and why."""
    return rows.append_column(REASON, pa.array(reasons, pa.string()))


def _set(t: pa.Table, name: str, values: pa.Array) -> pa.Table:
    return t.set_column(t.column_names.index(name), name, values)


def reshard(rows: pa.Table, shard: int, keys: List[str], where: Optional[List[Where]] = None) -> pa.Table:
    """Pool rows moved to output shard ``shard`` under new ``keys``; with ``where``, their images moved into that
    shard's tar too (``tar``, ``image``, ``image_offset``, ``image_size``, and ``text_offset`` / ``text_size``
    where ``where`` locates the captions too, rewritten)."""
    rows = _set(rows, "shard", pa.array(np.full(rows.num_rows, shard, np.int32)))
    rows = _set(rows, "key", pa.array(keys, pa.string()))
    if where is not None:
        for name, values, tp in (("tar", [shard_tar(shard)] * rows.num_rows, pa.string()),
                                 ("image", [w[0] for w in where], pa.string()),
                                 ("image_offset", [w[1] for w in where], pa.int64()),
                                 ("image_size", [w[2] for w in where], pa.int64())):
            rows = _set(rows, name, pa.array(values, tp))
        if where and len(where[0]) > 3:
            for name, i in (("text_offset", 3), ("text_size", 4)):
                values = pa.array([w[i] for w in where], pa.int64())
                rows = _set(rows, name, values) if name in rows.column_names else rows.append_column(name, values)
    return rows


def tar_records(records: List[Tuple[str, str, bytes, str, str]]) -> Tuple[bytes, Dict[str, Where]]:
    """A webdataset tar of ``(key, ext, image bytes, text, uid)`` records: ``<key>.<ext>``, ``<key>.txt``,
    ``<key>.json``.  Returns the tar's bytes and ``{key: (member, offset, size, text_offset, text_size)}`` locating
    each image's bytes and its caption's in it."""
    buf = io.BytesIO()
    index: Dict[str, Where] = {}
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for key, ext, image, text, uid in records:
            where = []
            for name, data in ((f"{key}.{ext}", image), (f"{key}.txt", text.encode("utf-8")),
                               (f"{key}.json", json.dumps({"uid": uid}).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
                blocks = -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
                where.append(tf.offset - blocks)  # the data ends the member (after however many header blocks)
            index[key] = (f"{key}.{ext}", where[0], len(image), where[1], len(text.encode("utf-8")))
    return buf.getvalue(), index


def copy_samples(fs, rows: pa.Table, keys: List[str], path: str, options=None) -> List[Where]:
    """Resharding: the rows' images (``tar`` full URLs, byte ranges read in place) and captions copied into a new
    webdataset tar at ``path`` on ``fs`` under ``keys``; returns where each landed (for :func:`reshard`)."""
    from pipelines.run.storage import read_ranges, write_file

    starts = rows["image_offset"].to_numpy()
    images = read_ranges(rows["tar"].to_pylist(), starts, starts + rows["image_size"].to_numpy(), options)
    exts = [posixpath.splitext(m)[1].lstrip(".") for m in rows["image"].to_pylist()]
    data, index = tar_records(list(zip(keys, exts, images, rows["text"].to_pylist(), rows["uid"].to_pylist())))
    write_file(fs, path, data)
    return [index[k] for k in keys]


# ------------------------------------------------------------------------------------------------ reading


def read_pool(stage, columns: Sequence[str]) -> pa.Table:
    """A dataset stage's rows (its parquet shards), with ``tar`` made a full URL; images stay where they are."""
    from pipelines.formats.manifest import DatasetManifest

    files = shard_parquets(DatasetManifest.read(stage).files)
    tables = [stage.read_table(f) for f in files]
    if not tables:
        raise InputError(f"{stage.url}: the ingest stage has no rows")
    table = pa.concat_tables(tables, promote_options="default")
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise InputError(f"{stage.url}: the pool has no column {missing[0]!r} (rerun its ingest stage)")
    table = table.select(list(columns))
    tars = tar_urls(stage.fs.unstrip_protocol(stage.join("")), table["tar"])
    return table.set_column(table.column_names.index("tar"), "tar", tars)


def features_as_location(table: pa.Table) -> pa.Table:
    """A shard's rows pointing at their cached tower features: ``FEATURE_COLUMNS`` renamed to ``tar``,
    ``image_offset``, ``image_size`` (the image's own columns, if read, left out)."""
    location = ("tar", "image_offset", "image_size")
    table = table.drop_columns([c for c in location if c in table.column_names])
    return table.rename_columns([location[FEATURE_COLUMNS.index(c)] if c in FEATURE_COLUMNS else c
                                 for c in table.column_names])


def tar_urls(base: str, tars) -> pa.Array:
    """The ``tar`` column as full URLs: a path relative to the dataset stage's directory ``base`` (a tar the stage
    wrote) is joined to it; an absolute one (a URL with a scheme, or a local path from ``/``: a source tar indexed
    in place) is kept as it is."""
    import pyarrow.compute as pc

    joined = pc.binary_join_element_wise(pa.scalar(base.rstrip("/")), tars, "/")
    absolute = pc.match_substring_regex(tars, r"^(/|[A-Za-z][A-Za-z0-9+.-]*://)")
    return pc.if_else(absolute, tars, joined)


def split_rows(pool: pa.Table, split: str) -> pa.Table:
    import pyarrow.compute as pc

    return pool.filter(pc.equal(pool["split"], split))


# ------------------------------------------------------------------------------------------------ subset.npy


def write_subset(fs, path: str, total: int, chunks: Iterable[Tuple[np.ndarray, np.ndarray]]) -> None:
    """``subset.npy`` of ``total`` uids, streamed: ``chunks`` yields ``(uid_hi, uid_lo)`` arrays in ascending
    order of ``uid_hi`` ranges; each chunk is sorted here."""
    header = {"descr": np.lib.format.dtype_to_descr(SUBSET_DTYPE), "fortran_order": False, "shape": (int(total),)}
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    with fs.open(path, "wb") as f:
        f.write(buf.getvalue())
        for hi, lo in chunks:
            order = np.lexsort((lo, hi))
            arr = np.empty(len(hi), SUBSET_DTYPE)
            arr["f0"], arr["f1"] = hi[order], lo[order]
            f.write(arr.tobytes())


def read_subset(fs, path: str) -> np.ndarray:
    with fs.open(path, "rb") as f:
        return np.load(io.BytesIO(f.read()))
