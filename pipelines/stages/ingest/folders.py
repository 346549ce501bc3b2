"""Caption folders and labelled folders indexed in place (the first phase of :mod:`.index` for these kinds): the
images stay where they are, each one a "tar" of one member (``tar`` the image file's URL, ``image_offset`` 0,
``image_size`` its size), the caption in the ``text`` column.

The folders are found breadth first by tasks (:func:`list_folder`: one listing of one folder each, returning its
files' count and its sub-folders), so the driver holds folder names and counts, never a file name.  Then one task
per group of folders (about :data:`FILES_PER_TASK` files) lists them again and writes one row per image into the
uid partitions (:func:`index_folders`), reading the ``.txt`` captions of a caption folder (all of a folder's at
once) or captioning a labelled image from its class name.
"""

from __future__ import annotations

import posixpath
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pyarrow as pa

from pipelines.formats import pool as fp
from pipelines.run.errors import InputError, InputNotFound
from pipelines.run.storage import open_storage
from pipelines.stages.ingest.sources import IMAGE_EXTS, template
from pipelines.stages.ingest.writer import image_problem

FILES_PER_TASK = 10_000  # files listed and indexed by one phase-1 task (folders are grouped up to about this)
MAX_ROUNDS = 64  # folder depth searched


def _entries(fs, folder: str) -> Tuple[List[Tuple[str, int]], List[str]]:
    """``([(file, size)], [sub-folder])`` of one folder, sorted: one listing."""
    files, dirs = [], []
    for info in fs.ls(folder, detail=True):
        name = info["name"]
        if info.get("type") == "directory":
            dirs.append(name)
        else:
            files.append((name, int(info.get("size") or 0)))
    return sorted(files), sorted(dirs)


def _images(files: List[Tuple[str, int]]) -> List[Tuple[str, int]]:
    return [(p, s) for p, s in files if posixpath.splitext(p)[1].lower() in IMAGE_EXTS]


def list_folder(fs, folder: str) -> Tuple[int, List[str]]:
    """A folder's image count and its sub-folders (a breadth-first round's task)."""
    files, dirs = _entries(fs, folder)
    return len(_images(files)), dirs


def find_folders(ctx, fs, tops: List[Tuple[str, int]]) -> List[Tuple[str, int, int]]:
    """Every folder under ``tops`` (``(folder, label)``, label ``-1`` for none) with its image count: ``(folder,
    label, images)`` in breadth-first order, sorted within a round; one round of tasks per level."""
    found: List[Tuple[str, int, int]] = []
    level = list(tops)
    for _ in range(MAX_ROUNDS):
        if not level:
            return found
        listed = ctx.map(list_folder, [(fs, f) for f, _ in level], unit="folders listed")
        found += [(f, label, n) for (f, label), (n, _) in zip(level, listed)]
        level = sorted((d, label) for (_, label), (_, dirs) in zip(level, listed) for d in dirs)
    raise InputError(f"{fs.unstrip_protocol(tops[0][0])}: folders nested deeper than {MAX_ROUNDS} levels")


def group_folders(folders: List[Tuple[str, int, int]]) -> List[List[Tuple[str, int]]]:
    """Consecutive folders in groups of about :data:`FILES_PER_TASK` images (a folder with none is skipped)."""
    groups: List[List[Tuple[str, int]]] = []
    size = FILES_PER_TASK
    for folder, label, n in folders:
        if not n:
            continue
        if size + n > FILES_PER_TASK and size:
            groups.append([])
            size = 0
        groups[-1].append((folder, label))
        size += n
    return groups


def plan_folders(src, ctx) -> Tuple[Any, str, List[List[Tuple[str, int]]], Optional[List[str]], int]:
    """``(fs, root, groups of (folder, label), class names, images)`` of a caption or labelled folder."""
    fs, root = open_storage(src.path)
    if not fs.isdir(root):
        raise InputNotFound(f"source folder not found: {src.path}")
    names = None
    tops = [(root, -1)]
    if src.kind == "labelled":
        _, dirs = _entries(fs, root)  # the classes (images directly under the root have no label: not samples)
        if not dirs:
            raise InputNotFound(f"labelled source {src.path}: expected one sub-folder of images per class")
        base = [posixpath.basename(d.rstrip("/")) for d in dirs]
        names = [src.class_names.get(d, d.replace("_", " ")) for d in base]
        tops = [(d, i) for i, d in enumerate(dirs)]
    folders = find_folders(ctx, fs, tops)
    return fs, root, group_folders(folders), names, sum(n for _, _, n in folders)


def _captions(fs, images: List[Tuple[str, int]], present: set, first_line: bool) -> List[Optional[str]]:
    """The same-named ``.txt`` caption of each image (stripped, or its first line with ``first_line``; ``None`` if
    there is none)."""
    wanted = [posixpath.splitext(p)[0] + ".txt" for p, _ in images]
    have = [w for w in wanted if w in present]
    # cat_ranges: concurrent on object stores, and no glob expansion of names such as "a[1].txt"
    texts = dict(zip(have, fs.cat_ranges(have, [None] * len(have), [None] * len(have)))) if have else {}
    out: List[Optional[str]] = []
    for w in wanted:
        text = texts[w].decode("utf-8", errors="replace").strip() if w in texts else None
        out.append(text.split("\n", 1)[0].strip() if text and first_line else text)
    return out


def _folder_rows(fs, root: str, folder: str, label: int, src, names) -> Dict:
    kind, templates = src.kind, tuple(getattr(src, "templates", ()))
    files, _ = _entries(fs, folder)
    images = _images(files)
    captions = (_captions(fs, images, {p for p, _ in files}, src.first_line) if kind == "caption_folder"
                else [None] * len(images))
    problems = [None] * len(images)
    if src.validate_images and images:
        blobs = fs.cat_ranges([p for p, _ in images], [None] * len(images), [None] * len(images))
        problems = [image_problem(b) for b in blobs]
    cols: Dict[str, list] = {k: [] for k in ("uid", "key", "source", "tar", "image", "image_size", "text", "reason",
                                             "label")}
    for (path, size), text, problem in zip(images, captions, problems):
        rel = posixpath.relpath(path, root)
        uid = fp.uid_of(f"{kind}:{rel}")
        if kind == "labelled":
            text = template(templates, uid, names[label])
        reason = problem or ("missing caption" if text is None else None)
        for k, v in (("uid", uid), ("key", posixpath.splitext(rel)[0]), ("source", rel),
                     ("tar", fs.unstrip_protocol(path)), ("image", rel), ("image_size", size),
                     ("text", text), ("reason", reason), ("label", label)):
            cols[k].append(v)
    return cols


def index_folders(fs, root: str, group: List[Tuple[str, int]], number: int, src, names, parts: int, out_fs,
                  work: str) -> int:
    """Phase 1 for folders: a group of folders' images into the uid partitions (``src``: the source's config);
    returns the rows written."""
    from pipelines.stages.ingest.index import TAR_SCHEMA, write_partitions

    cols: Dict[str, list] = {}
    for folder, label in group:
        for k, v in _folder_rows(fs, root, folder, label, src, names).items():
            cols.setdefault(k, []).extend(v)
    n = len(cols.get("uid", []))
    if not n:
        return 0
    hi, lo = fp.uid_halves(cols["uid"])
    table = {name: pa.array(cols[name], TAR_SCHEMA.field(name).type) for name in
             ("uid", "key", "source", "tar", "image", "image_size", "text", "reason")}
    table.update(uid_hi=pa.array(hi, pa.uint64()), uid_lo=pa.array(lo, pa.uint64()),
                 image_offset=pa.array(np.zeros(n, np.int64)), text_offset=pa.array(np.full(n, -1, np.int64)),
                 text_size=pa.array(np.full(n, -1, np.int64)),
                 order=pa.array((np.int64(number) << 32) | np.arange(n, dtype=np.int64)))
    out = pa.table({name: table[name] for name in TAR_SCHEMA.names})
    if src.kind == "labelled":
        out = out.append_column("label", pa.array(cols["label"], pa.int64()))
    write_partitions(out_fs, work, f"t{number:07d}", out, parts)
    return n
