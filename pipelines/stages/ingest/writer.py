"""Ingest's shard writer: one Ray task per output shard reads its samples' images, checks they decode, and writes
the shard's webdataset tar (:func:`pipelines.formats.pool.tar_records`)."""

from __future__ import annotations

import contextlib
import io
import tarfile
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from pipelines.formats.pool import tar_records
from pipelines.run.storage import open_storage, write_file


class ImageReader:
    """Fetches image bytes by reference, keeping each source tar open (and indexed once) while a shard is written."""

    def __init__(self) -> None:
        self._tars: Dict[str, Tuple[Any, tarfile.TarFile]] = {}

    def read(self, ref: str) -> bytes:
        kind, _, where = ref.partition(":")
        if kind == "digits":
            from pipelines.stages.ingest.embedded import digit_png

            return digit_png(_digits()[int(where)])
        if kind == "file":
            fs, path = open_storage(where)
            return fs.cat_file(path)
        if kind == "tar":
            url, _, member = where.rpartition("::")
            if url not in self._tars:
                fs, path = open_storage(url)
                handle = fs.open(path, "rb")
                self._tars[url] = (handle, tarfile.open(fileobj=handle, mode="r:"))
            return self._tars[url][1].extractfile(member).read()
        raise ValueError(f"unknown image reference {ref!r}")

    def close(self) -> None:
        for handle, tf in self._tars.values():
            tf.close()
            handle.close()
        self._tars.clear()


_DIGITS: Optional[np.ndarray] = None


def _digits() -> np.ndarray:
    global _DIGITS
    if _DIGITS is None:
        from pipelines.stages.ingest.embedded import load_digits_arrays

        _DIGITS = load_digits_arrays()[0]
    return _DIGITS


# what a corrupt or truncated file raises while decoding (UnidentifiedImageError is an OSError)
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError)


def checked_image(data: bytes) -> Tuple[bytes, str]:
    """``(bytes, ext)``: JPEG and PNG kept as they are, other formats re-encoded as PNG; raises if unreadable."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        img.load()
        fmt = (img.format or "").upper()
        if fmt in ("JPEG", "PNG"):
            return data, "jpg" if fmt == "JPEG" else "png"
        buf = io.BytesIO()
        img.convert("RGB").save(buf, format="PNG")
        return buf.getvalue(), "png"


def write_shard(fs, path: str, records: List[Tuple[str, str, str, str]]):
    """Write one webdataset tar of ``(key, ref, text, uid)`` records.

    Returns ``(rejects, index)``: ``(key, reason)`` of the samples left out, and ``{key: (member, offset, size)}``
    locating each written image's bytes in the tar.
    """
    rejects = []
    good = []
    reader = ImageReader()
    with contextlib.closing(reader):
        for key, ref, text, uid in records:
            data = reader.read(ref)  # I/O errors fail the task (Ray retries it), they are not the sample's fault
            try:
                image, ext = checked_image(data)
            except DECODE_ERRORS as exc:
                rejects.append((key, f"unreadable image: {type(exc).__name__}: {str(exc)[:200]}"))
                continue
            good.append((key, ext, image, text, uid))
    data, index = tar_records(good)
    write_file(fs, path, data)
    return rejects, index
