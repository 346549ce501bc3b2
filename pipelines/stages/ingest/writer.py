"""Ingest's shard writer: one Ray task per output shard reads its samples' images, checks they decode, and writes
the shard's webdataset tar (:func:`pipelines.formats.pool.tar_records`); :func:`reshard_shard` does the same for
an index shard of a pool indexed in place (``reshard``), and :func:`image_problem` checks one image."""

from __future__ import annotations

import io
import re
from typing import List, Optional, Tuple

import numpy as np

from pipelines.formats.pool import copy_samples, reshard, shard_tar, tar_records
from pipelines.run.storage import read_parquet, write_file, write_parquet

_DIGITS: Optional[np.ndarray] = None


def _digits() -> np.ndarray:
    global _DIGITS
    if _DIGITS is None:
        from pipelines.stages.ingest.embedded import load_digits_arrays

        _DIGITS = load_digits_arrays()[0]
    return _DIGITS


# what a corrupt or truncated file raises while decoding (UnidentifiedImageError is an OSError); an image over
# twice PIL's Image.MAX_IMAGE_PIXELS raises DecompressionBombError (checked by name: PIL is imported late)
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError)


def decode_errors() -> tuple:
    from PIL import Image

    return DECODE_ERRORS + (Image.DecompressionBombError,)


def decode_reason(exc: BaseException) -> str:
    """A stable reject reason for an image that does not decode: the error's type and message, without the
    memory addresses some messages carry (``<_io.BytesIO object at 0x...>``)."""
    message = re.sub(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>", "", str(exc)).strip()
    return f"unreadable image: {type(exc).__name__}: {message[:200]}"


def image_problem(data: bytes) -> Optional[str]:
    """``None`` if ``data`` decodes as an image, else the reason; an image over PIL's ``Image.MAX_IMAGE_PIXELS``
    (a possible decompression bomb, which PIL only warns about up to twice that) is a reason too."""
    import warnings

    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            checked_image(data, reencode=False)
        except decode_errors() + (Image.DecompressionBombWarning,) as exc:
            return decode_reason(exc)
    return None


def checked_image(data: bytes, reencode: bool = True) -> Tuple[bytes, str]:
    """``(bytes, ext)``: JPEG and PNG kept as they are, other formats re-encoded as PNG (unless not
    ``reencode``); raises if unreadable."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        img.load()
        fmt = (img.format or "").upper()
        if fmt in ("JPEG", "PNG") or not reencode:
            return data, "jpg" if fmt == "JPEG" else "png"
        buf = io.BytesIO()
        img.convert("RGB").save(buf, format="PNG")
        return buf.getvalue(), "png"


def write_shard(fs, path: str, records: List[Tuple[str, str, str, str]]):
    """Write one webdataset tar of ``(key, ref, text, uid)`` records.

    Returns ``(rejects, index)``: ``(key, reason)`` of the samples left out, and
    ``{key: (member, offset, size, text_offset, text_size)}`` locating each written image's bytes and its caption's
    in the tar.
    """
    from pipelines.stages.ingest.embedded import digit_png

    rejects = []
    good = []
    for key, ref, text, uid in records:
        kind, _, where = ref.partition(":")
        if kind != "digits":
            raise ValueError(f"unknown image reference {ref!r}")
        try:
            image, ext = checked_image(digit_png(_digits()[int(where)]))
        except decode_errors() as exc:
            rejects.append((key, decode_reason(exc)))
            continue
        good.append((key, ext, image, text, uid))
    data, index = tar_records(good)
    write_file(fs, path, data)
    return rejects, index


def reshard_shard(fs, parquet_path: str, tar_path: str, shard: int, options=None) -> int:
    """``reshard``: an index shard's images and captions copied into a new webdataset tar of its own (ranged
    reads where they are, with the run's storage ``options``), its rows rewritten to point there; returns the
    rows."""
    rows = read_parquet(fs, parquet_path)
    if set(rows["tar"].to_pylist()) == {shard_tar(shard)}:  # done already (a retried task)
        return rows.num_rows
    keys = [f"{shard:05d}{i:09d}" for i in range(rows.num_rows)]  # unique across the stage's tars
    where = copy_samples(fs, rows, keys, tar_path, options)
    write_parquet(fs, parquet_path, reshard(rows, shard, keys, where))
    return rows.num_rows
