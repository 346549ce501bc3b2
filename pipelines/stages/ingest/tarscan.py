"""A webdataset tar's samples for ingest's index pass (:func:`read_tar`), from its members' 512-byte headers parsed
directly (:func:`scan_tar`: names, where each member's bytes are, and the bytes of the small ``.json`` / ``.txt``
members, at a few microseconds a member instead of :mod:`tarfile`'s tens; docs/architecture.md, "Data flow").

Only the plain case is parsed directly: ustar or v7 headers of regular files and directories with safe names and
valid checksums.  Anything else (links, special files, pax or GNU long-name headers, an unsafe name, a bad
checksum, a truncated archive), and validating images, goes through :mod:`tarfile`, which then decides exactly as
it always did (rejects with reasons, or an error).
"""

from __future__ import annotations

import json
import posixpath
import tarfile
from typing import Any, BinaryIO, Dict, List, Optional, Tuple

import numpy as np

from pipelines.formats import pool as fp
from pipelines.stages.ingest.sources import IMAGE_EXTS, MAX_IMAGE_BYTES, unsafe_member
from pipelines.stages.ingest.writer import image_problem

BLOCK = 512
MAX_READ = 16 << 20  # a .json / .txt member larger than this (or a header's garbage size) goes to tarfile, which
# makes its sample a reject, unread
NEAR = 16 << 10  # bytes read after a seek over a member: the next few headers and small members of its sample
FAR = 1 << 20  # bytes read where the tar is read through (small images: reading on beats seeking)
_ZERO = bytes(BLOCK)
_KINDS = np.frombuffer(b"0\0" + b"5", np.uint8)  # a regular file (either mark) or a directory
Member = Tuple[str, int, int, Optional[bytes]]  # (name, data offset, size, data of a .json / .txt member)


def _number(field: bytes) -> Optional[int]:
    digits = field.split(b"\0", 1)[0].strip()
    if not digits:
        return 0
    try:
        return int(digits, 8)
    except ValueError:  # base-256 sizes and garbage: tarfile's call
        return None


def _headers_ok(headers: List[bytes]) -> bool:
    """Every header a regular file or an empty directory with a valid checksum (the unsigned sum of its bytes, the
    checksum field counted as spaces), checked all at once; a checksum field not in the usual ``%06o\\0 `` layout
    is parsed as tarfile does."""
    if not headers:
        return True
    blocks = np.frombuffer(b"".join(headers), np.uint8).reshape(len(headers), BLOCK)
    if not np.isin(blocks[:, 156], _KINDS).all():
        return False
    sums = blocks.sum(axis=1, dtype=np.int64) - blocks[:, 148:156].sum(axis=1, dtype=np.int64) + 8 * 32
    usual = np.zeros((len(headers), 8), np.uint8)
    for i in range(6):  # the usual layout: six octal digits, NUL, space
        usual[:, 5 - i] = 48 + ((sums >> (3 * i)) & 7)
    usual[:, 7] = 32
    odd = np.flatnonzero((blocks[:, 148:156] != usual).any(axis=1))
    return all(_number(headers[i][148:156]) == sums[i] for i in odd)


def _safe(name: str) -> bool:
    """Names :func:`.sources.unsafe_member` accepts, and not a v7 directory (a trailing slash)."""
    if "/" not in name and "\\" not in name and ":" not in name:  # the usual case: a plain file name
        return bool(name) and name != ".."
    parts = name.replace("\\", "/").split("/")
    return bool(name) and not (name.startswith(("/", "\\")) or name.endswith("/") or ".." in parts
                               or parts[0][1:2] == ":")


def scan_tar(f: BinaryIO) -> Optional[List[Member]]:
    """Every regular file member of the tar open at its start in ``f``, in order; ``None``: read it with tarfile.
    The tar is read on in steps growing to :data:`FAR` where it is dense, and from :data:`NEAR` again after a
    seek over a large member, so large images are skipped, not read.  Kinds and checksums are checked all at once at the end
    (a garbage size before that reads at most :data:`MAX_READ`)."""
    members: List[Member] = []
    headers: List[bytes] = []
    buf, base, pos, step = b"", 0, 0, NEAR  # buf: the file's bytes from base
    while True:
        if pos + BLOCK > base + len(buf):
            buf, base, step = _refill(f, buf, base, pos, BLOCK, step)
        header = buf[pos - base:pos - base + BLOCK]
        if len(header) < BLOCK:
            return None  # truncated, or an empty file: tarfile's call
        if header == _ZERO:  # the end-of-archive block
            return members if pos and _headers_ok(headers) else None
        try:  # the usual layout (eleven octal digits, then NUL or space) first
            size = int(header[124:135], 8) if header[135] in (0, 32) else _number(header[124:136])
        except ValueError:
            size = _number(header[124:136])
        if size is None:
            return None
        headers.append(header)
        name = header[:100].split(b"\0", 1)[0]
        if header[345] and header[257:262] == b"ustar":
            name = header[345:500].split(b"\0", 1)[0] + b"/" + name
        try:
            text = name.decode("utf-8")
        except UnicodeDecodeError:
            return None
        pos += BLOCK
        if header[156] == 53:  # a directory
            if size:
                return None
            continue
        if not _safe(text):
            return None
        data = None
        if text[-5:].lower() == ".json" or text[-4:].lower() == ".txt":
            if size > MAX_READ:
                return None
            if pos + size > base + len(buf):
                buf, base, step = _refill(f, buf, base, pos, size, step)
            data = buf[pos - base:pos - base + size]
            if len(data) < size:
                return None
        members.append((text, pos, size, data))
        pos += -(-size // BLOCK) * BLOCK


def _refill(f: BinaryIO, buf: bytes, base: int, start: int, size: int, step: int) -> Tuple[bytes, int, int]:
    """``(buffer, its base, the next step)``: a buffer holding at least ``size`` bytes from ``start`` (fewer at the
    end of the file).  Reading on doubles the step up to :data:`FAR`; a seek over a large member starts again from
    :data:`NEAR` (a readahead that follows the tar's density)."""
    have = base + len(buf)
    if base <= start <= have:  # reading on
        keep, step = buf[start - base:], min(2 * step, FAR)
    else:  # past a large member: seek over it
        f.seek(start)
        keep, step = b"", NEAR
    return keep + f.read(max(size - len(keep), step)), start, step


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


_JSON = json.JSONDecoder()


def _uid_of_json(data: bytes) -> Optional[str]:
    try:
        try:
            value = _JSON.decode(data.decode("utf-8-sig"))  # the usual case, without json.loads's encoding detection
        except UnicodeDecodeError:
            value = json.loads(data)
        uid = value.get("uid")
    except (ValueError, AttributeError):
        uid = None
    return uid if fp.is_uid(uid) else None


def _scanned(members) -> Dict[str, Dict[str, Any]]:
    """:func:`read_tar`'s entries from :func:`scan_tar`'s members."""
    entries: Dict[str, Dict[str, Any]] = {}
    for name, offset, size, data in members:
        dot, start = name.rfind("."), name.rfind("/") + 1
        if dot > start and name[start] != ".":  # the usual case, as posixpath.splitext splits it
            key, ext = name[:dot], name[dot:]
        else:
            key, ext = posixpath.splitext(name)
        ext = ext.lower()
        entry = entries.get(key)
        if entry is None:
            entry = entries[key] = {}
        if ext == ".json":
            entry["uid"] = _uid_of_json(data)
        elif ext == ".txt":
            entry["text"] = _caption(data, offset)
        elif ext in IMAGE_EXTS and "image" not in entry:
            entry["image"] = (name, offset, size)
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
            limit = MAX_IMAGE_BYTES if ext in IMAGE_EXTS else MAX_READ
            if m.size > limit and (ext in (".json", ".txt") or (validate and ext in IMAGE_EXTS)):
                entry["problem"] = f"member {posixpath.basename(m.name)[:60]!r} larger than {limit:,} bytes, not read"
                if ext in IMAGE_EXTS:
                    entry.setdefault("image", (m.name, m.offset_data, m.size))
                continue
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
