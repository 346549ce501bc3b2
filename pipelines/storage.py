"""Run directories on any fsspec filesystem: ``<storage>/<run>/<stage>/``, committed by ``_MANIFEST.json``.

A stage writes its files into its directory and commits by writing the manifest last (one object PUT on S3, an
atomic rename locally).  Readers only trust a directory that has a manifest, and only the files it lists; a
stage that died halfway leaves no manifest and is cleared and rerun.  Object stores have no atomic directory
rename, which is why the manifest, not a rename, marks the commit.
"""

from __future__ import annotations

import io
import json
import posixpath
import uuid
from typing import Any, Dict, Optional

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

MANIFEST = "_MANIFEST.json"


def open_storage(url: str, options: Optional[Dict[str, Any]] = None):
    """``(filesystem, root path)`` for a local path or a URL such as ``s3://bucket/prefix``."""
    fs, root = fsspec.core.url_to_fs(url, **(options or {}))
    return fs, root.rstrip("/")


class StageDir:
    """One stage's directory."""

    def __init__(self, fs, path: str) -> None:
        self.fs = fs
        self.path = path.rstrip("/")

    @property
    def url(self) -> str:
        return self.fs.unstrip_protocol(self.path)

    def join(self, *rel: str) -> str:
        return posixpath.join(self.path, *rel)

    def manifest(self) -> Optional[Dict[str, Any]]:
        """The committed manifest, or ``None`` for a stage that never finished."""
        try:
            with self.fs.open(self.join(MANIFEST), "rb") as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None

    def clear(self) -> None:
        """Remove the manifest first (so nothing half-replaced ever looks committed), then everything else."""
        if self.fs.exists(self.join(MANIFEST)):
            self.fs.rm(self.join(MANIFEST))
        if self.fs.exists(self.path):
            self.fs.rm(self.path, recursive=True)
        self.fs.makedirs(self.path, exist_ok=True)

    def write_bytes(self, rel: str, data: bytes) -> None:
        self.fs.makedirs(posixpath.dirname(self.join(rel)), exist_ok=True)
        with self.fs.open(self.join(rel), "wb") as f:
            f.write(data)

    def write_table(self, rel: str, table: pa.Table) -> None:
        buf = io.BytesIO()
        pq.write_table(table, buf)
        self.write_bytes(rel, buf.getvalue())

    def read_table(self, rel: str) -> pa.Table:
        with self.fs.open(self.join(rel), "rb") as f:
            return pq.read_table(io.BytesIO(f.read()))

    def commit(self, manifest: Dict[str, Any]) -> None:
        data = json.dumps(manifest, indent=2, sort_keys=True, default=str).encode()
        if _is_local(self.fs):
            tmp = self.join(f".{MANIFEST}.{uuid.uuid4().hex}")
            self.write_bytes(tmp.rsplit("/", 1)[-1], data)
            self.fs.mv(tmp, self.join(MANIFEST))
        else:
            self.write_bytes(MANIFEST, data)


def _is_local(fs) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")
