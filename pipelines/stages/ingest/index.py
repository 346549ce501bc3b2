"""Ingest in place: a pool's sources become an index, not a copy (docs/architecture.md, "Data flow").  Every row
of work runs in tasks; the driver (:func:`run_index`) holds counts and file lists.

1. One task per group of source tars (:func:`index_tars`; :func:`tar_groups` sizes the groups to the cluster),
   reads each tar's headers and its ``.json`` / ``.txt`` members (images too, decoded, only with
   ``validate_images``) and writes one row per sample (uid, key, caption, where the image and the caption's bytes
   are in that tar) into the partition of its uid (``(uid_hi ^ uid_lo) % P``); caption and labelled folders are
   listed by :mod:`.folders` into the same partitions.
2. For a DataComp pool, one task per metadata parquet (:func:`partition_metadata`) writes its rows the same way,
   in the same map as phase 1's tasks.
3. One task per partition (:func:`join_partition`) joins the two on uid, keeps the first copy of every uid in the
   order (tar, member) and rejects the others, assigns split and caption noise seeded by the spec and the
   partition, and writes the partition's index shard and rejects part.  Source tars are never changed; with
   ``reshard`` each shard's samples are then copied into a new tar of its own (:func:`reshard_shard`).

The partition files are scratch under the attempt's ``_index/`` and are deleted once the shards are written.
"""

from __future__ import annotations

import math
import posixpath
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.formats import pool as fp
from pipelines.run.context import cluster_cpus
from pipelines.run.errors import InputError, InputNotFound
from pipelines.run.storage import open_storage, parquet_metadata, read_parquet, write_parquet
from pipelines.stages.ingest import folders
from pipelines.stages.ingest.noise import assign_split, flip_labels, swap_captions
from pipelines.stages.ingest.sources import caption_problem
from pipelines.stages.ingest.tarscan import read_tar
from pipelines.stages.ingest.writer import reshard_shard

MAX_PARTITIONS = 1024  # bounds the scratch files (tar groups x partitions) and the partition pass's fan-out
TARS_PER_TASK = 64  # source tars indexed by one phase-1 task at most (~640,000 DataComp samples)
MIN_TAR_TASKS = 32  # tars are grouped only beyond this many tasks (parallelism first, then fewer scratch files)
TASKS_PER_CPU = 4  # ... and this many per CPU of the cluster (a balanced tail)
TAR_SAMPLE_BYTES = 4096  # a guess at the bytes per sample of a webdataset tar, to size the partitions
SCRATCH = "_index"
TAR_SCHEMA = pa.schema([
    ("uid", pa.string()), ("uid_hi", pa.uint64()), ("uid_lo", pa.uint64()), ("key", pa.string()),
    ("source", pa.string()), ("tar", pa.string()), ("image", pa.string()), ("image_offset", pa.int64()),
    ("image_size", pa.int64()), ("text", pa.string()), ("text_offset", pa.int64()), ("text_size", pa.int64()),
    ("reason", pa.string()), ("order", pa.int64())])
META_KEYS = ("uid_hi", "uid_lo", "_valid", "_file", "_row", "_source")  # added to a metadata row by phase 2


# ------------------------------------------------------------------------------------------------ helpers


def partition_dir(work: str, part: int) -> str:
    return posixpath.join(work, f"p{part:05d}")


def write_partitions(fs, work: str, name: str, table: pa.Table, parts: int) -> None:
    """``table``'s rows into ``<work>/pNNNNN/<name>.parquet`` by ``(uid_hi ^ uid_lo) % parts`` (only non-empty
    ones)."""
    if table.num_rows == 0:
        return
    part = (table["uid_hi"].to_numpy() ^ table["uid_lo"].to_numpy()) % np.uint64(parts)
    order = np.argsort(part, kind="stable")
    bounds = np.searchsorted(part[order], np.arange(parts + 1))
    for p in np.flatnonzero(np.diff(bounds)):
        rows = table.take(pa.array(order[bounds[p]:bounds[p + 1]]))
        write_parquet(fs, posixpath.join(partition_dir(work, int(p)), f"{name}.parquet"), rows)


# ------------------------------------------------------------------------------------------------ phase 1


def tar_rows(fs, path: str, number: int, rel: str, kind: str, validate: bool) -> pa.Table:
    """One source tar's samples as rows of :data:`TAR_SCHEMA` (``order``: the tar's ``number``, then member order),
    built column by column."""
    entries, unsafe = read_tar(fs, path, validate)
    keys = list(entries) + [name for name, _ in unsafe]
    found = list(entries.values()) + [{"unsafe": why} for _, why in unsafe]
    n = len(keys)
    sources = [f"{rel}/{key}" for key in keys]
    uids = [e.get("uid") for e in found]
    if kind == "datacomp":
        reasons = [e.get("unsafe") or (None if u is not None else "no uid in json") for e, u in zip(found, uids)]
    else:
        reasons = [e.get("unsafe") for e in found]
    uids = [u if u is not None else fp.uid_of(f"{kind}:{s}") for u, s in zip(uids, sources)]
    images = [e.get("image", ("", -1, -1)) for e in found]
    texts = [e.get("text", (None, -1, -1)) for e in found]
    reasons = [r if r is not None or im[0] else "no image in tar" for r, im in zip(reasons, images)]
    # a .txt that is not UTF-8 (its offset -1) is the sample's reject, but in a datacomp pool, whose captions are
    # the metadata's
    reasons = [r or e.get("problem") or (None if t[0] is None or t[1] >= 0 or kind == "datacomp" else
                                         "caption: not UTF-8") for r, e, t in zip(reasons, found, texts)]
    uid_array = pa.array(uids, pa.string())
    hi, lo = fp.uid_halves(uid_array)
    order = (np.int64(number) << np.int64(32)) | np.arange(n, dtype=np.int64)
    image, image_offset, image_size = zip(*images) if n else ((), (), ())
    text, text_offset, text_size = zip(*texts) if n else ((), (), ())
    cols = {"uid": uid_array, "uid_hi": hi, "uid_lo": lo, "key": keys, "source": sources,
            "tar": pa.array([fs.unstrip_protocol(path)] * n, pa.string()), "image": image,
            "image_offset": image_offset, "image_size": image_size, "text": text, "text_offset": text_offset,
            "text_size": text_size, "reason": reasons, "order": order}
    return pa.table({name: pa.array(cols[name], TAR_SCHEMA.field(name).type) if not isinstance(cols[name], pa.Array)
                     else cols[name] for name in TAR_SCHEMA.names})


def index_tars(fs, tars: List[Tuple[str, int, str]], kind: str, parts: int, out_fs, work: str,
               validate: bool) -> int:
    """Phase 1: a group of source tars' (``(path, number, relative name)``) samples into the uid partitions, one
    scratch file per partition for the whole group; returns how many rows it wrote."""
    table = pa.concat_tables([tar_rows(fs, path, number, rel, kind, validate) for path, number, rel in tars])
    write_partitions(out_fs, work, f"t{tars[0][1]:07d}", table, parts)
    return table.num_rows


# ------------------------------------------------------------------------------------------------ phase 2


def metadata_schema(fs, path: str) -> Tuple[int, pa.Schema]:
    """A metadata parquet's ``(rows, schema)`` from its footer, checking the columns a pool needs."""
    meta = parquet_metadata(fs, path)
    schema = meta.schema.to_arrow_schema()
    for col in ("uid", "text"):
        if col not in schema.names:
            raise InputError(f"datacomp metadata {fs.unstrip_protocol(path)}: missing column {col!r}")
    return meta.num_rows, schema


def partition_metadata(fs, path: str, number: int, rel: str, schema: pa.Schema, parts: int, out_fs,
                       work: str) -> int:
    """Phase 2: one metadata parquet's rows into the uid partitions (cast to the pool's unified ``schema``)."""
    table = read_parquet(fs, path)
    table = pa.table({f.name: (table[f.name] if f.name in table.column_names else pa.nulls(table.num_rows))
                      .cast(f.type) for f in schema})
    uids = pc.cast(table["uid"], pa.string()).combine_chunks() if table.num_rows else pa.array([], pa.string())
    valid = pc.fill_null(pc.match_substring_regex(uids, "^[0-9a-f]{32}$"), False).to_numpy(zero_copy_only=False)
    routed = uids
    if not valid.all():  # a value that is no uid still lands in a partition, to be rejected there
        fixed = uids.to_pylist()
        for i in np.flatnonzero(~valid):
            fixed[i] = fp.uid_of(f"datacomp-metadata:{rel}#{i}")
        routed = pa.array(fixed, pa.string())
    hi, lo = fp.uid_halves(routed)
    n = table.num_rows
    table = (table.append_column("uid_hi", pa.array(hi, pa.uint64())).append_column("uid_lo", pa.array(lo, pa.uint64()))
             .append_column("_valid", pa.array(valid, pa.bool_()))
             .append_column("_file", pa.array(np.full(n, number, np.int32)))
             .append_column("_row", pa.array(np.arange(n, dtype=np.int64)))
             .append_column("_source", pa.array([f"{rel}#{i}" for i in range(n)], pa.string())))
    write_partitions(out_fs, work, f"m{number:07d}", table, parts)
    return n


# ------------------------------------------------------------------------------------------------ phase 3


def _read_part(fs, directory: str, prefix: str) -> List[pa.Table]:
    try:
        names = sorted(fs.ls(directory, detail=False))
    except FileNotFoundError:
        return []
    return [read_parquet(fs, n) for n in names if posixpath.basename(n).startswith(prefix)]


def _metadata_duplicate(meta: pa.Table) -> Optional[Tuple[str, int, int]]:
    """``(uid, file of its first row, file of its second)`` of a uid twice in the metadata, or ``None``."""
    valid = meta.filter(meta["_valid"])
    counts = valid.group_by(["uid_hi", "uid_lo"]).aggregate([([], "count_all")])
    twice = counts.filter(pc.greater(counts["count_all"], 1))
    if twice.num_rows == 0:
        return None
    # keys only: Acero joins no nested columns (DataComp's face_bboxes)
    rows = valid.select(["uid_hi", "uid_lo", "_file", "_row"]).join(
        twice.slice(0, 1), ["uid_hi", "uid_lo"], join_type="inner").sort_by([("_file", "ascending"),
                                                                            ("_row", "ascending")])
    uid = fp.uid_hex(rows["uid_hi"].to_numpy()[:1], rows["uid_lo"].to_numpy()[:1])[0].as_py()
    return uid, int(rows["_file"][0].as_py()), int(rows["_file"][1].as_py())


def _positions(left: pa.Table, right: pa.Table) -> np.ndarray:
    """For each row of ``left``, the row of ``right`` with the same uid (``-1``: none); ``right``'s uids unique."""
    keys = ["uid_hi", "uid_lo"]
    a = left.select(keys).append_column("_l", pa.array(np.arange(left.num_rows, dtype=np.int64)))
    b = right.select(keys).append_column("_r", pa.array(np.arange(right.num_rows, dtype=np.int64)))
    joined = a.join(b, keys, join_type="left outer").sort_by("_l")
    return pc.fill_null(joined["_r"], -1).to_numpy()


def _join_metadata(tars: pa.Table, meta: pa.Table, reasons: np.ndarray, texts: np.ndarray, offsets: np.ndarray,
                   sizes: np.ndarray) -> Tuple[Dict[str, pa.Array], pa.Table]:
    """A DataComp partition: every tar row takes its metadata row's caption (the tar's bytes of it kept only where
    they are the same caption) and columns (``extras``); returns those and the metadata rows no tar row has."""
    valid = meta.filter(meta["_valid"])
    at = _positions(tars, valid)
    matched = at >= 0
    reasons[(reasons == None) & ~matched] = "uid not in metadata"  # noqa: E711 - elementwise
    meta_text = np.array(valid["text"].to_pylist(), dtype=object)
    new = np.where(matched, meta_text[np.maximum(at, 0)] if len(meta_text) else None, None)
    same = np.array([a == b for a, b in zip(new, texts)], dtype=bool)
    offsets[~same], sizes[~same] = -1, -1
    texts[:] = new
    taken = pa.array(np.where(matched, at, 0), pa.int64())  # only matched rows are ever kept
    extras = {}
    for name in valid.column_names:
        if name in ("uid", "text", "key", "shard") + META_KEYS:
            continue
        col = valid[name].take(taken) if valid.num_rows else pa.nulls(len(at), valid.schema.field(name).type)
        # metadata columns keep their data but never shadow a column ingest computes
        extras[f"metadata_{name}" if name in fp.RESERVED else name] = col
    keys = meta.select(["uid_hi", "uid_lo", "_file", "_row"]).append_column(
        "_i", pa.array(np.arange(meta.num_rows, dtype=np.int64)))  # keys only: no nested columns in a join
    lone = keys.join(tars.select(["uid_hi", "uid_lo"]).group_by(["uid_hi", "uid_lo"]).aggregate([]),
                     ["uid_hi", "uid_lo"], join_type="left anti").sort_by([("_file", "ascending"),
                                                                          ("_row", "ascending")])
    return extras, meta.take(lone["_i"])


def _first_copies(hi: np.ndarray, lo: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """Among the ``ok`` rows (in their order), the first of each uid."""
    idx = np.flatnonzero(ok)
    order = idx[np.lexsort((idx, lo[idx], hi[idx]))]
    first = np.ones(len(order), dtype=bool)
    first[1:] = (hi[order][1:] != hi[order][:-1]) | (lo[order][1:] != lo[order][:-1])
    keep = np.zeros(len(ok), dtype=bool)
    keep[order[first]] = True
    return keep


def _part_rows(fs, work: str, part: int, kind: str, schema: Optional[pa.Schema], labelled: bool = False):
    """The partition's tar rows (in (tar, member) order) and metadata rows."""
    directory = partition_dir(work, part)
    tars = _read_part(fs, directory, "t")
    empty = pa.schema(list(TAR_SCHEMA) + [pa.field("label", pa.int64())]) if labelled else TAR_SCHEMA
    tars = pa.concat_tables(tars).sort_by("order") if tars else empty.empty_table()
    meta = None
    if kind == "datacomp":
        full = pa.schema(list(schema) + [pa.field(name, tp) for name, tp in (
            ("uid_hi", pa.uint64()), ("uid_lo", pa.uint64()), ("_valid", pa.bool_()), ("_file", pa.int32()),
            ("_row", pa.int64()), ("_source", pa.string()))])
        parts = _read_part(fs, directory, "m")
        meta = pa.concat_tables(parts).cast(full) if parts else full.empty_table()
    return tars, meta


def join_partition(fs, work: str, part: int, kind: str, schema: Optional[pa.Schema], split, noise,
                   shard_path: str, rejects_path: str, classes=None) -> Dict[str, Any]:
    """Phase 3: one uid partition's index shard and rejects part; returns its counts (and which files it wrote),
    or ``{"duplicate": (uid, file, file)}`` for a uid twice in the metadata.  ``classes``: a labelled source's
    ``(class names, templates)``."""
    tars, meta = _part_rows(fs, work, part, kind, schema, classes is not None)
    if meta is not None and (dup := _metadata_duplicate(meta)) is not None:
        return {"duplicate": dup}
    reasons = np.array(tars["reason"].to_pylist(), dtype=object)
    texts = np.array(tars["text"].to_pylist(), dtype=object)
    offsets, sizes = tars["text_offset"].to_numpy().copy(), tars["text_size"].to_numpy().copy()
    extras: Dict[str, pa.Array] = {}
    orphans = None
    if meta is not None:
        extras, orphans = _join_metadata(tars, meta, reasons, texts, offsets, sizes)
    for i in np.flatnonzero(reasons == None):  # noqa: E711 - elementwise
        reasons[i] = caption_problem(texts[i], kind)
    hi, lo = tars["uid_hi"].to_numpy(), tars["uid_lo"].to_numpy()
    ok = reasons == None  # noqa: E711 - elementwise
    keep = _first_copies(hi, lo, ok)
    reasons[ok & ~keep] = "duplicate uid"
    kept = np.flatnonzero(keep)
    splits = assign_split(len(kept), split, part)
    texts_k, offsets_k, sizes_k = texts[kept], offsets[kept], sizes[kept]
    corrupted = np.zeros(len(kept), dtype=bool)
    if noise is not None and noise.kind == "caption":
        tar_names = np.array(tars["tar"].take(pa.array(kept)).to_pylist(), dtype=object)
        corrupted = swap_captions(texts_k, tar_names, offsets_k, sizes_k, splits == "train", noise, part)
    if classes is not None:  # a labelled source: labels over all the partition's rows, noise on the kept ones
        truth = tars["label"].to_numpy()
        labels, kept_labels = truth.copy(), truth[kept]
        if noise is not None and noise.kind == "label":
            uids = np.array(tars["uid"].take(pa.array(kept, pa.int64())).to_pylist(), dtype=object)
            corrupted = flip_labels(kept_labels, texts_k, uids, splits == "train", noise, part, *classes)
            labels[kept] = kept_labels
        extras = {"label": pa.array(labels), "true_label": pa.array(truth),
                  "class_name": pa.array(np.array(classes[0], dtype=object)[labels].tolist(), pa.string())}
    shard = _shard_table(tars, kept, part, texts_k, offsets_k, sizes_k, splits, corrupted, extras)
    rejects = _rejects_table(tars, reasons, orphans)
    if shard.num_rows:
        write_parquet(fs, shard_path, shard)
    if rejects.num_rows:
        write_parquet(fs, rejects_path, rejects)
    return {"rows_in": tars.num_rows + (orphans.num_rows if orphans is not None else 0),
            "rows_out": shard.num_rows, "rejected": rejects.num_rows, "corrupted": int(corrupted.sum()),
            "test": int((splits == "test").sum()), "reference": int((splits == "reference").sum()),
            "shard": bool(shard.num_rows), "rejects": bool(rejects.num_rows)}


def _shard_table(tars: pa.Table, kept: np.ndarray, part: int, texts, offsets, sizes, splits, corrupted,
                 extras: Dict[str, pa.Array]) -> pa.Table:
    take = pa.array(kept, pa.int64())
    rows = tars.take(take)
    cols = {
        "uid": rows["uid"], "uid_hi": rows["uid_hi"], "uid_lo": rows["uid_lo"],
        "text": pa.array(list(texts), pa.string()), "key": rows["key"],
        "shard": pa.array(np.full(len(kept), part, np.int32)), "split": pa.array(list(splits), pa.string()),
        "corrupted": pa.array(corrupted, pa.bool_()), "source": rows["source"], "tar": rows["tar"],
        "image": rows["image"], "image_offset": rows["image_offset"], "image_size": rows["image_size"],
        "text_offset": pa.array(offsets, pa.int64()), "text_size": pa.array(sizes, pa.int64()),
    }
    for name, values in extras.items():
        cols[name] = values.take(take)
    return pa.table(cols)


def _rejects_table(tars: pa.Table, reasons: np.ndarray, orphans: Optional[pa.Table]) -> pa.Table:
    bad = np.flatnonzero(reasons != None)  # noqa: E711 - elementwise
    rows = tars.take(pa.array(bad, pa.int64()))
    sources, uids, why = rows["source"].to_pylist(), rows["uid"].to_pylist(), list(reasons[bad])
    if orphans is not None and orphans.num_rows:
        valid = orphans["_valid"].to_numpy(zero_copy_only=False)
        sources += orphans["_source"].to_pylist()
        uids += fp.uid_hex(orphans["uid_hi"].to_numpy(), orphans["uid_lo"].to_numpy()).to_pylist()
        why += ["no image in the shards" if v else "invalid uid in metadata" for v in valid]
    return fp.rejects_table(sources, uids, why)


# ------------------------------------------------------------------------------------------------ the driver


def _find(fs, root: str, suffix: str, what: str) -> List[Tuple[str, int]]:
    """``(path, size)`` of every file under ``root`` ending with ``suffix`` (or ``root`` itself), sorted."""
    if fs.isfile(root) and root.endswith(suffix):
        return [(root, int(fs.size(root)))]
    if not fs.isdir(root):
        raise InputNotFound(f"{what} folder not found: {fs.unstrip_protocol(root)}")
    found = {p: info for p, info in fs.find(root, detail=True).items() if p.endswith(suffix)}
    for p, info in sorted(found.items()):  # read as files: never followed, never opened blocking (see .folders)
        if info.get("islink") or info.get("type") != "file":
            why = "a symbolic link (give the folder it leads to)" if info.get("islink") else "not a regular file"
            raise InputError(f"{what}: {fs.unstrip_protocol(p)}: {why}")
    return sorted((p, int(info.get("size") or 0)) for p, info in found.items())


def _plan(src, ctx) -> Tuple[List[str], str, List[str], Optional[pa.Schema], int]:
    """``(tars, their root, metadata files, the metadata's unified schema, estimated rows)``."""
    fs, root = open_storage(src.path)
    if src.kind == "datacomp":
        metas = [p for p, _ in _find(fs, posixpath.join(root, src.metadata), ".parquet", "datacomp metadata")]
        tar_root = posixpath.join(root, src.shards)
        tars = _find(fs, tar_root, ".tar", "datacomp shards")
        if not metas:
            raise InputNotFound(f"datacomp source {src.path}: no parquet under {src.metadata}/")
        if not tars:
            raise InputNotFound(f"datacomp source {src.path}: no .tar under {src.shards}/")
        footers = ctx.map(metadata_schema, [(fs, p) for p in metas], unit="metadata footers")
        try:
            schema = pa.unify_schemas([s for _, s in footers], promote_options="permissive")
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise InputError(f"datacomp source {src.path}: metadata files disagree on a column's type: {exc}") \
                from None
        return [p for p, _ in tars], tar_root, metas, schema, sum(n for n, _ in footers)
    tars = _find(fs, root, ".tar", "webdataset")
    if not tars:
        raise InputNotFound(f"webdataset source {src.path}: no .tar under it")
    return [p for p, _ in tars], root, [], None, sum(size for _, size in tars) // TAR_SAMPLE_BYTES


def tar_groups(count: int, cpus: int) -> int:
    """Source tars per phase-1 task: as many as leave :data:`TASKS_PER_CPU` tasks per CPU of the cluster (at least
    :data:`MIN_TAR_TASKS` tasks: an autoscaled cluster grows), at most :data:`TARS_PER_TASK`.  Fewer, larger tasks
    write fewer scratch files (one per partition per task) and pay Ray's per-task cost less often."""
    return max(1, min(TARS_PER_TASK, count // max(MIN_TAR_TASKS, TASKS_PER_CPU * cpus)))


def _phase_one(src, cfg, ctx, out_fs, work: str):
    """Phases 1 and 2 as one map (tar groups and metadata files, or folder groups, into the uid partitions, every
    task independent of the others); returns ``(fs, metadata files, schema, parts, classes)``: what the join
    needs."""
    if src.kind in ("caption_folder", "labelled"):
        fs, root, groups, names, rows = folders.plan_folders(src, ctx)
        if cfg.noise is not None and cfg.noise.kind == "label" and len(names) < 2:
            raise InputError(f"label noise needs at least 2 classes, the source has {len(names)}")
        parts = min(MAX_PARTITIONS, max(1, math.ceil(rows / cfg.shard_size)))
        templates = tuple(getattr(src, "templates", ()))
        ctx.map(folders.index_folders, [(fs, root, g, i, src, names, parts, out_fs, work)
                                        for i, g in enumerate(groups)], unit="folder groups")
        return fs, [], None, parts, (names, templates) if names is not None else None
    fs, root = open_storage(src.path)
    tars, tar_root, metas, schema, rows = _plan(src, ctx)
    parts = min(MAX_PARTITIONS, max(1, math.ceil(rows / cfg.shard_size)))
    per = tar_groups(len(tars), cluster_cpus())
    named = [(t, i, _rel(t, tar_root)) for i, t in enumerate(tars)]
    # the metadata files first: each is larger than a tar group, so they do not make the map's tail
    jobs = [("metadata", fs, p, j, _rel(p, root), schema, parts, out_fs, work) for j, p in enumerate(metas)]
    jobs += [("tars", fs, named[i:i + per], src.kind, parts, out_fs, work, src.validate_images)
             for i in range(0, len(named), per)]
    ctx.map(_partition_task, jobs, unit="tar groups and metadata files" if metas else "tar groups")
    return fs, metas, schema, parts, None


def _partition_task(what: str, *args) -> int:
    """One task of phases 1 and 2: ``index_tars(*args)`` or ``partition_metadata(*args)``."""
    return (index_tars if what == "tars" else partition_metadata)(*args)


def _rel(path: str, base: str) -> str:
    return posixpath.relpath(path, base) if path != base else posixpath.basename(path)


def run_index(cfg, ctx) -> Dict[str, Any]:
    """The stage for a pool indexed in place: three passes of tasks; returns the manifest's fields."""
    src = cfg.source
    out_fs, work = ctx.out.fs, ctx.out.join(SCRATCH)
    fs, metas, schema, parts, classes = _phase_one(src, cfg, ctx, out_fs, work)
    results = ctx.map(join_partition, [(out_fs, work, p, src.kind, schema, cfg.split, cfg.noise,
                                        ctx.out.join(fp.shard_parquet(p)), ctx.out.join(fp.rejects_part(p)), classes)
                                       for p in range(parts)], unit="partitions joined")
    dup = next((r["duplicate"] for r in results if "duplicate" in r), None)
    if dup is not None:  # which sample would a score belong to? refuse, naming both places
        uid, first, again = dup
        raise InputError(f"datacomp metadata {fs.unstrip_protocol(metas[again])}: uid {uid!r} appears twice (also "
                         f"in {posixpath.basename(metas[first])}); a pool's uids must be unique")
    if out_fs.exists(work):
        out_fs.rm(work, recursive=True)
    total = {k: sum(r[k] for r in results) for k in ("rows_in", "rows_out", "rejected", "corrupted", "test",
                                                     "reference")}
    written = [p for p, r in enumerate(results) if r["shard"]]
    shards = [fp.shard_parquet(p) for p in written]
    if src.reshard:
        ctx.map(reshard_shard, [(out_fs, ctx.out.join(fp.shard_parquet(p)), ctx.out.join(fp.shard_tar(p)), p,
                                 ctx.storage_options)
                                for p in written], unit="shards resharded")
        shards = [f for p in written for f in (fp.shard_parquet(p), fp.shard_tar(p))]
    files = shards + [fp.rejects_part(p) for p, r in enumerate(results) if r["rejects"]]
    names, templates = classes or (None, None)
    return {**total, "files": files, "shards": len(written), "class_names": names,
            "templates": list(templates) if templates else None}

