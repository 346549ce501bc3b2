"""Run directories on any fsspec filesystem: ``<storage>/<run>/<stage>/``, committed by ``_MANIFEST.json``.

A stage writes every file into a fresh temporary directory ``<stage>/_attempt-<id>/`` and commits by writing the
manifest last (one object PUT on S3, an atomic rename locally); the manifest names the attempt and lists its
files.  Readers resolve paths through the committed manifest, so they never see a stage half written *or* half
replaced: a rerun's files sit in a new attempt until its manifest lands, then older attempts are deleted.
Object stores have no atomic directory rename, which is why the manifest, not a rename, is the commit.
"""

import contextlib
import errno
import io
import json
import posixpath
import time
import uuid
from typing import Any, Dict, List, Optional, Sequence

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.run.errors import InputError, StorageError

MANIFEST = "_MANIFEST.json"
ATTEMPT = "_ATTEMPT.json"  # inside an attempt: the config it was started for


def open_storage(url: str, options: Optional[Dict[str, Any]] = None):
    """``(filesystem, root path)`` for a local path or a URL such as ``s3://bucket/prefix``."""
    fs, root = fsspec.core.url_to_fs(url, **(options or {}))
    return fs, root.rstrip("/")


def read_ranges(urls: Sequence[str], starts, ends, options: Optional[Dict[str, Any]] = None) -> List[bytes]:
    """Bytes ``starts[i]:ends[i]`` of ``urls[i]`` (full URLs, any mix of filesystems): one ranged read each, issued
    together per filesystem (concurrent on object stores).  A read that fails raises (a missing file, storage
    down); a short one returns the bytes there are (the caller checks the sizes)."""
    out: List[bytes] = [b""] * len(urls)
    where: Dict[str, Any] = {url: open_storage(url, options) for url in dict.fromkeys(urls)}  # (fs, path)
    groups: Dict[int, List[int]] = {}
    for i, url in enumerate(urls):
        groups.setdefault(id(where[url][0]), []).append(i)
    for idx in groups.values():
        fs = where[urls[idx[0]]][0]
        got = fs.cat_ranges([where[urls[i]][1] for i in idx], [int(starts[i]) for i in idx],
                            [int(ends[i]) for i in idx], on_error="return")
        for i, blob in zip(idx, got):
            if isinstance(blob, BaseException):
                raise blob
            out[i] = blob
    return out


class StageDir:
    """One stage's directory: read through its committed manifest, written through a new attempt."""

    def __init__(self, fs, path: str) -> None:
        self.fs = fs
        self.path = path.rstrip("/")
        self.attempt: Optional[str] = None  # set by begin() for writing, or from the manifest for reading

    @property
    def url(self) -> str:
        return self.fs.unstrip_protocol(self.path)

    def manifest(self) -> Optional[Dict[str, Any]]:
        """The committed manifest, or ``None`` for a stage that never finished."""
        try:
            with self.fs.open(posixpath.join(self.path, MANIFEST), "rb") as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None

    def join(self, *rel: str) -> str:
        """Where a stage file lives: in the attempt being written, else in the committed one."""
        if self.attempt is None:
            committed = self.manifest()
            if committed is None:
                raise FileNotFoundError(f"{self.url}: stage is not committed (no {MANIFEST})")
            self.attempt = committed["attempt"]
        return posixpath.join(self.path, self.attempt, *rel)

    def begin(self, config_hash: str = "", resume: bool = False, inputs: Optional[Dict[str, Any]] = None) -> bool:
        """Start writing an attempt; the committed one (if any) stays readable until commit().

        With ``resume``, an uncommitted attempt of the same config that read the same ``inputs`` (the attempts of
        the stages it reads; a run that died: its checkpoints are inside) is reopened instead of starting afresh;
        returns whether one was.
        """
        if resume and config_hash:
            for attempt in self._open_attempts(config_hash, inputs or {}):
                self.attempt = attempt
                return True
        self.attempt = f"_attempt-{uuid.uuid4().hex[:12]}"
        self.fs.makedirs(self.join(), exist_ok=True)
        self.write_bytes(ATTEMPT, json.dumps({"config_hash": config_hash, "inputs": inputs or {},
                                              "created": time.time()}).encode())
        return False

    def abandon(self) -> None:
        """Delete the attempt being written (nothing of it was committed)."""
        if self.attempt is not None:
            self.fs.rm(self.join(), recursive=True)
            self.attempt = None

    def _open_attempts(self, config_hash: str, inputs: Dict[str, Any]):
        """Uncommitted attempts started for ``config_hash`` and ``inputs``, newest first."""
        try:
            entries = self.fs.ls(self.path, detail=False)
        except FileNotFoundError:
            return []
        committed = (self.manifest() or {}).get("attempt")
        found = []
        for entry in entries:
            name = posixpath.basename(entry.rstrip("/"))
            if not name.startswith("_attempt-") or name == committed:
                continue
            try:
                with self.fs.open(posixpath.join(self.path, name, ATTEMPT), "rb") as f:
                    marker = json.loads(f.read())
            except (FileNotFoundError, ValueError):
                continue
            if marker.get("config_hash") == config_hash and marker.get("inputs", {}) == inputs:
                found.append((float(marker.get("created", 0)), name))
        return [name for _, name in sorted(found, reverse=True)]

    def write_bytes(self, rel: str, data: bytes) -> None:
        write_file(self.fs, self.join(rel), data)

    def write_table(self, rel: str, table: pa.Table) -> None:
        write_parquet(self.fs, self.join(rel), table)

    def read_table(self, rel: str) -> pa.Table:
        return read_parquet(self.fs, self.join(rel))

    def commit(self, manifest: Dict[str, Any]) -> Dict[str, Any]:
        """Write the manifest (naming this attempt) last, then delete everything else in the stage directory."""
        manifest = {**manifest, "attempt": self.attempt}
        data = json.dumps(manifest, indent=2, sort_keys=True, default=str).encode()
        atomic_write(self.fs, posixpath.join(self.path, MANIFEST), data)
        for entry in self.fs.ls(self.path, detail=False):
            if posixpath.basename(entry.rstrip("/")) not in (MANIFEST, self.attempt):
                self.fs.rm(entry, recursive=True)
        return manifest


def write_file(fs, path: str, data: bytes) -> None:
    """``data`` into ``path``; a failure names the file, and a full disk or quota is a :class:`StorageError`."""
    try:
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
        with fs.open(path, "wb") as f:
            f.write(data)
    except OSError as exc:
        if exc.errno is None or isinstance(exc, StorageError):
            raise
        named = exc if exc.filename else OSError(exc.errno, exc.strerror, fs.unstrip_protocol(path))
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StorageError(f"storage full: {named}") from exc
        if named is exc:
            raise
        raise named from None  # the error names the file


def write_parquet(fs, path: str, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    write_file(fs, path, buf.getvalue())


@contextlib.contextmanager
def _naming(fs, path: str):
    """A file that is not parquet (or is cut short) is bad input: an :class:`InputError` naming it, never
    retried."""
    try:
        yield
    except pa.ArrowInvalid as exc:
        raise InputError(f"{fs.unstrip_protocol(path)}: not a readable parquet file ({str(exc).splitlines()[0]})") \
            from None


def read_parquet(fs, path: str, columns=None) -> pa.Table:
    """One parquet file, single-threaded: stage tasks already run one per core, and for many small files (a score
    log's) a reader's thread pool costs more than it saves (about 3x here)."""
    with _naming(fs, path):
        if is_local(fs):
            return pq.ParquetFile(path, pre_buffer=False).read(columns=columns, use_threads=False)
        with fs.open(path, "rb") as f:
            return pq.ParquetFile(io.BytesIO(f.read()), pre_buffer=False).read(columns=columns, use_threads=False)


def parquet_metadata(fs, path: str) -> pq.FileMetaData:
    """A parquet file's footer only."""
    with _naming(fs, path):
        if is_local(fs):
            return pq.read_metadata(path)
        with fs.open(path, "rb") as f:
            return pq.ParquetFile(f).metadata


def parquet_schema(fs, path: str) -> pa.Schema:
    return parquet_metadata(fs, path).schema.to_arrow_schema()


def is_local(fs) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def atomic_write(fs, path: str, data: bytes) -> None:
    """Readers see all of ``data`` at ``path`` or nothing: a local file is written aside and renamed; an object
    store's single PUT is atomic already."""
    if is_local(fs):
        parent, name = posixpath.split(path)
        fs.makedirs(parent, exist_ok=True)
        tmp = posixpath.join(parent, f".{name}.{uuid.uuid4().hex}.tmp")
        try:
            write_file(fs, tmp, data)
        except OSError:
            with contextlib.suppress(OSError):
                fs.rm(tmp)
            raise
        fs.mv(tmp, path)
    else:
        with fs.open(path, "wb") as f:
            f.write(data)
