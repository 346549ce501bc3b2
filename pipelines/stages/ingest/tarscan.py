"""A webdataset tar's samples for ingest's index pass (:func:`read_tar`), from its members' 512-byte headers parsed
directly (:func:`scan_tar`: names, where each member's bytes are, and the bytes of the small ``.json`` / ``.txt``
members, at a few microseconds a member instead of :mod:`tarfile`'s tens; docs/architecture.md, "Data flow").

Only the plain case is parsed directly: ustar or v7 headers of regular files and directories with safe names and
valid checksums.  Anything else (links, special files, pax or GNU long-name headers, an unsafe name, a bad
checksum, a truncated archive), and validating images, goes through :mod:`tarfile`, which then decides exactly as
it always did (rejects with reasons, or an error).
"""

from __future__ import annotations

import posixpath
import tarfile
from typing import Any, BinaryIO, Dict, List, Optional, Tuple

from pipelines.formats import pool as fp
from pipelines.stages.ingest.sources import IMAGE_EXTS, unsafe_member
from pipelines.stages.ingest.writer import image_problem

BLOCK = 512
READ = (".json", ".txt")  # members whose bytes are read; the others are skipped
SKIP_BY_READING = 8192  # a member this small is read past (cheaper than a seek), a larger one (an image) seeked over
Member = Tuple[str, int, int, Optional[bytes]]  # (name, data offset, size, data of a .json / .txt member)


def _number(field: bytes) -> Optional[int]:
    digits = field.split(b"\0", 1)[0].strip()
    if not digits:
        return 0
    try:
        return int(digits, 8)
    except ValueError:  # base-256 sizes and garbage: tarfile's call
        return None


def _checksum_ok(header: bytes) -> bool:
    stored = _number(header[148:156])
    unsigned = sum(header[:148]) + 8 * 32 + sum(header[156:])
    return stored is not None and stored == unsigned


def _safe(name: str) -> bool:
    """Names :func:`.sources.unsafe_member` accepts, and not a v7 directory (a trailing slash)."""
    parts = name.replace("\\", "/").split("/")
    return bool(name) and not (name.startswith(("/", "\\")) or name.endswith("/") or ".." in parts
                               or parts[0][1:2] == ":")


def scan_tar(f: BinaryIO) -> Optional[List[Member]]:
    """Every regular file member of the tar open at its start in ``f``, in order; ``None``: read it with tarfile."""
    members: List[Member] = []
    pos = 0
    while True:
        header = f.read(BLOCK)
        if len(header) < BLOCK:
            return None  # truncated, or an empty file: tarfile's call
        if header.count(0) == BLOCK:
            return members if pos else None  # the end-of-archive block
        kind = header[156:157]
        size = _number(header[124:136])
        if kind not in (b"0", b"\0", b"5") or size is None or not _checksum_ok(header):
            return None
        name = header[:100].split(b"\0", 1)[0]
        if header[257:262] == b"ustar":
            prefix = header[345:500].split(b"\0", 1)[0]
            name = prefix + b"/" + name if prefix else name
        try:
            text = name.decode("utf-8")
        except UnicodeDecodeError:
            return None
        pos += BLOCK
        padded = -(-size // BLOCK) * BLOCK
        if kind == b"5":
            if size:
                return None
            continue
        if not _safe(text):
            return None
        data = None
        if text.lower().endswith(READ) or padded <= SKIP_BY_READING:
            block = f.read(padded)
            if len(block) < size:
                return None
            if text.lower().endswith(READ):
                data = block[:size]
        else:
            f.seek(pos + padded)
        members.append((text, pos, size, data))
        pos += padded


# ------------------------------------------------------------------------------------------------ a tar's samples


def read_tar(fs, path: str, validate: bool) -> Tuple[Dict[str, Dict[str, Any]], List[Tuple[str, str]]]:
    """``({key: entry}, [(member, unsafe reason)])`` of one webdataset tar in member order, reading headers and
    ``.json`` / ``.txt`` members (and images only to ``validate`` them): the headers parsed directly
    (:func:`scan_tar`), or by :mod:`tarfile` for a tar with anything unusual in it, and to validate images."""
    entries: Dict[str, Dict[str, Any]] = {}
    unsafe: List[Tuple[str, str]] = []
    with fs.open(path, "rb") as f:
        members = None if validate else scan_tar(f)  # headers parsed directly; None: anything unusual
        if members is not None:
            return _scanned(members), unsafe
        f.seek(0)
        _read_with_tarfile(f, entries, unsafe, validate)
    return entries, unsafe


def _uid_of_json(data: bytes) -> Optional[str]:
    import json

    try:
        uid = json.loads(data).get("uid")
    except (ValueError, AttributeError):
        uid = None
    return uid if fp.is_uid(uid) else None


def _scanned(members) -> Dict[str, Dict[str, Any]]:
    """:func:`read_tar`'s entries from :func:`scan_tar`'s members."""
    entries: Dict[str, Dict[str, Any]] = {}
    for name, offset, size, data in members:
        key, ext = posixpath.splitext(name)
        ext = ext.lower()
        entry = entries.setdefault(key, {})
        if ext in IMAGE_EXTS and "image" not in entry:
            entry["image"] = (name, offset, size)
        elif ext == ".json":
            entry["uid"] = _uid_of_json(data)
        elif ext == ".txt":
            entry["text"] = _caption(data, offset)
    return entries


def _read_with_tarfile(f, entries: Dict[str, Dict[str, Any]], unsafe: List[Tuple[str, str]], validate: bool) -> None:
    with tarfile.open(fileobj=f, mode="r:") as tf:
        for m in tf:
            why = unsafe_member(m)
            if why:  # never followed nor used as a name: a reject of its own
                unsafe.append((m.name, why))
                continue
            if not m.isfile():
                continue
            key, ext = posixpath.splitext(m.name)
            ext = ext.lower()
            entry = entries.setdefault(key, {})
            if ext in IMAGE_EXTS and "image" not in entry:
                entry["image"] = (m.name, m.offset_data, m.size)
                if validate:
                    entry["problem"] = image_problem(tf.extractfile(m).read())
            elif ext == ".json":
                entry["uid"] = _uid_of_json(tf.extractfile(m).read())
            elif ext == ".txt":
                entry["text"] = _caption(tf.extractfile(m).read(), m.offset_data)


def _caption(data: bytes, offset: int) -> Tuple[Optional[str], int, int]:
    """A ``.txt`` member's caption, stripped, with where its bytes are (``-1`` if they are not its UTF-8)."""
    stripped = data.strip()
    lead = len(data) - len(data.lstrip())
    try:
        return stripped.decode("utf-8"), offset + lead, len(stripped)
    except UnicodeDecodeError:
        return stripped.decode("utf-8", errors="replace"), -1, -1
