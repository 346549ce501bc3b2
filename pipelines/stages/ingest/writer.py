"""Ingest's shard writer: one Ray task per output shard reads its samples' images, checks they decode, and writes
the shard's webdataset tar (:func:`pipelines.formats.pool.tar_records`); :func:`reshard_shard` does the same for
an index shard of a pool indexed in place (``reshard``), and :func:`image_problem` checks one image."""

from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np

from pipelines.formats import skipped
from pipelines.formats.pool import copy_samples, reshard, shard_tar, tar_records
from pipelines.run.storage import read_parquet, write_file, write_parquet

_DIGITS: Optional[np.ndarray] = None


def _digits() -> np.ndarray:
    global _DIGITS
    if _DIGITS is None:
        from pipelines.stages.ingest.embedded import load_digits_arrays

        _DIGITS = load_digits_arrays()[0]
    return _DIGITS


def image_problem(data: bytes) -> Optional[str]:
    """``None`` if ``data`` decodes as an image, else the reject reason: the train stage's reason code for it
    (:mod:`pipelines.formats.skipped`; an image over its pixel bound, a possible decompression bomb, is
    ``too_large``)."""
    _, code = skipped.guarded(skipped.load_image, data)
    return None if code == skipped.OK else f"unreadable image: {skipped.REASONS[code]}"


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
        image = digit_png(_digits()[int(where)])
        problem = image_problem(image)
        if problem:
            rejects.append((key, problem))
            continue
        good.append((key, "png", image, text, uid))
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
