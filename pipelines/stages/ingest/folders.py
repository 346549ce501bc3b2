"""Caption folders and labelled folders indexed in place (the first phase of :mod:`.index` for these kinds): the
images stay where they are, each one a "tar" of one member (``tar`` the image file's URL, ``image_offset`` 0,
``image_size`` its size), the caption in the ``text`` column.

The folders are found breadth first by tasks (:func:`list_folder`: one listing of one folder each, returning its
files' count and its sub-folders), so the driver holds folder names and counts, never a file name.  Then one task
per group of folders (about :data:`FILES_PER_TASK` files) lists them again and writes one row per image into the
uid partitions (:func:`index_folders`), reading the ``.txt`` captions of a caption folder (all of a folder's at
once) or captioning a labelled image from its class name.

Files are read as files, inside the source: a folder's entries that are not regular files (a FIFO, a socket, a
device), symbolic links (to a file or a folder, inside the source or out), hard links (a file with more than one
name) and files over :data:`MAX_CAPTION_BYTES` / :data:`MAX_IMAGE_BYTES` are never opened or followed; an image
among them, or an image whose caption is among them, is a reject with the reason.  A local file is opened without
following a link or blocking and checked again once open (what was listed may have changed since).
"""

from __future__ import annotations

import errno
import os
import posixpath
import stat
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import pyarrow as pa

from pipelines.formats import pool as fp
from pipelines.run.errors import InputError, InputNotFound
from pipelines.run.storage import is_local, open_storage
from pipelines.stages.ingest.sources import IMAGE_EXTS, MAX_IMAGE_BYTES, template
from pipelines.stages.ingest.writer import image_problem

FILES_PER_TASK = 10_000  # files listed and indexed by one phase-1 task (folders are grouped up to about this)
MAX_ROUNDS = 64  # folder depth searched
MAX_CAPTION_BYTES = 64 << 10  # a caption file larger than this is a reject, never read
FOLDER_LINK = "a symbolic link to a folder, not followed"


def _entries(fs, folder: str):
    """``([(file, size)], [sub-folder], {entry: why it is not read})`` of one folder, sorted: one listing.  Only
    regular files and real folders are listed as such (see the module docstring)."""
    files, dirs, odd = [], [], {}
    for info in fs.ls(folder, detail=True):
        name, kind, size = info["name"], info.get("type"), int(info.get("size") or 0)
        # (only local folders have links: asking where one leads opens nothing)
        if info.get("islink") and os.path.isdir(name):
            odd[name] = FOLDER_LINK
        elif kind == "directory" and not info.get("islink"):
            dirs.append(name)
        else:
            why = _not_read(bool(info.get("islink")), kind == "file", int(info.get("nlink") or 1), size,
                            MAX_CAPTION_BYTES if name.endswith(".txt") else MAX_IMAGE_BYTES)
            if why:
                odd[name] = why
            else:
                files.append((name, size))
    return sorted(files), sorted(dirs), odd


def _not_read(link: bool, regular: bool, names: int, size: int, limit: int) -> Optional[str]:
    """Why a file is not read (see the module docstring), or ``None``: one rule for the listing and the open file."""
    if link:
        return "a symbolic link, not followed"
    if not regular:
        return "not a regular file"
    if names > 1:
        return f"a hard link ({names} names), not read"
    if size > limit:
        return f"larger than {limit:,} bytes"
    return None


def _is_image(path: str) -> bool:
    return posixpath.splitext(path)[1].lower() in IMAGE_EXTS


def _samples(files: List[Tuple[str, int]], odd: Dict[str, str]) -> List[Tuple[str, int, Optional[str]]]:
    """A folder's samples, ``(image, size, why it is rejected)``, sorted: its images, and the entries that would
    have been images or folders had they been regular (reported, not silently skipped)."""
    out = [(p, s, None) for p, s in files if _is_image(p)]
    out += [(p, 0, f"image: {why}") for p, why in odd.items() if _is_image(p)]
    out += [(p, 0, why) for p, why in odd.items() if why == FOLDER_LINK]
    return sorted(out)


def list_folder(fs, folder: str) -> Tuple[int, List[str]]:
    """A folder's sample count and its sub-folders (a breadth-first round's task)."""
    files, dirs, odd = _entries(fs, folder)
    return len(_samples(files, odd)), dirs


def read_files(fs, paths: List[str], limit: int) -> List[Union[bytes, str]]:
    """Each file's bytes, or why it was not read.  Local files are opened without following a link or blocking
    and must still be regular and within ``limit`` bytes once open; elsewhere (object stores) one concurrent read."""
    if not paths:
        return []
    if not is_local(fs):
        return list(fs.cat_ranges(paths, [None] * len(paths), [None] * len(paths)))
    out: List[Union[bytes, str]] = []
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            out.append("a symbolic link, not followed")
            continue
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(fd)
            why = _not_read(False, stat.S_ISREG(st.st_mode), st.st_nlink, st.st_size, limit)
            out.append(why or f.read(limit + 1))
    return out


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
        _, dirs, _ = _entries(fs, root)  # the classes (images directly under the root have no label: not samples)
        if not dirs:
            raise InputNotFound(f"labelled source {src.path}: expected one sub-folder of images per class")
        base = [posixpath.basename(d.rstrip("/")) for d in dirs]
        names = [src.class_names.get(d, d.replace("_", " ")) for d in base]
        tops = [(d, i) for i, d in enumerate(dirs)]
    folders = find_folders(ctx, fs, tops)
    return fs, root, group_folders(folders), names, sum(n for _, _, n in folders)


def _captions(fs, images: List[str], present: set, odd: Dict[str, str],
              first_line: bool) -> List[Tuple[Optional[str], Optional[str]]]:
    """``(caption, why it is rejected)`` of each image: its same-named ``.txt`` (stripped, or its first line with
    ``first_line``; ``None`` if there is none), or why that file was not read or is not UTF-8."""
    wanted = [posixpath.splitext(p)[0] + ".txt" for p in images]
    have = [w for w in wanted if w in present]
    # read_files: concurrent on object stores, and no glob expansion of names such as "a[1].txt"
    texts = dict(zip(have, read_files(fs, have, MAX_CAPTION_BYTES)))
    out: List[Tuple[Optional[str], Optional[str]]] = []
    for w in wanted:
        data = texts.get(w, odd.get(w))
        if isinstance(data, str):
            out.append((None, f"caption: {data}"))
            continue
        try:
            text = data.decode("utf-8").strip() if data is not None else None
        except UnicodeDecodeError:
            out.append((None, "caption: not UTF-8"))
            continue
        out.append((text.split("\n", 1)[0].strip() if text and first_line else text, None))
    return out


def _folder_rows(fs, root: str, folder: str, label: int, src, names) -> Dict:
    kind, templates = src.kind, tuple(getattr(src, "templates", ()))
    files, _, odd = _entries(fs, folder)
    samples = _samples(files, odd)
    images = [p for p, _, _ in samples]
    captions = (_captions(fs, images, {p for p, _ in files}, odd, src.first_line) if kind == "caption_folder"
                else [(None, None)] * len(images))
    problems = [why for _, _, why in samples]
    if src.validate_images:
        good = [i for i, why in enumerate(problems) if why is None]
        for i, blob in zip(good, read_files(fs, [images[i] for i in good], MAX_IMAGE_BYTES)):
            problems[i] = f"image: {blob}" if isinstance(blob, str) else image_problem(blob)
    cols: Dict[str, list] = {k: [] for k in ("uid", "key", "source", "tar", "image", "image_size", "text", "reason",
                                             "label")}
    for (path, size, _), (text, caption_problem), problem in zip(samples, captions, problems):
        rel = posixpath.relpath(path, root)
        uid = fp.uid_of(f"{kind}:{rel}")
        if kind == "labelled":
            text = template(templates, uid, names[label])
        reason = problem or caption_problem or ("missing caption" if text is None else None)
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
