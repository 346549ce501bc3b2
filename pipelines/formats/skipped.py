"""Samples the train stage skipped: why a sample did not decode, and the per-rank record of each (docs/architecture.md).

A pool indexed in place is not decoded at ingest (unless ``validate_images``), so the train stage's decoders meet
the broken images.  A decoder never raises for one sample: it marks the row with a **reason code** (:data:`REASONS`:
a stable ``uint8`` and its name, no exception text) and a zero image, and the worker drops the row from its share
of the step before the forward pass.  Every skipped ``(step, uid)`` is recorded exactly once, per rank per
checkpoint, next to the score log and under its rules (:mod:`pipelines.formats.score_log`: flushed just before the
checkpoint is registered, named by step range and rank, segments past the resumed checkpoint deleted):

    skipped/part-s<first step>-<last step>-r<rank>.parquet

with the columns of :data:`SCHEMA` (``reason`` by name) and, in the footer's key-value metadata
(:data:`COUNTS_KEY`), the file's ``{reason: rows}``, so the stage's counts come from footers, never from rows.  A
file is written only for a segment that skipped something.
"""

from __future__ import annotations

import io
import json
from typing import Dict, Iterable, List

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.formats.score_log import SegmentWriter, beside_log, segment_of

OK = 0
SHORT_READ = 1
NOT_AN_IMAGE = 2
TRUNCATED = 3
TOO_LARGE = 4
CORRUPT = 5
BAD_CAPTION = 6
EMPTY_SHARE = 7
NO_FEATURES = 8
REASONS: Dict[int, str] = {
    SHORT_READ: "short_read",  # the ranged read did not return the byte count the index gives
    NOT_AN_IMAGE: "not_an_image",  # no image format recognises the bytes
    TRUNCATED: "truncated",  # the image's data ends early
    TOO_LARGE: "too_large",  # more pixels than the decoder's bound (a decompression bomb)
    CORRUPT: "corrupt",  # the image's data is malformed
    BAD_CAPTION: "bad_caption",  # the caption's bytes are missing or not UTF-8
    EMPTY_SHARE: "empty_share",  # decoded, but some rank had no decodable sample that step: the step is skipped
    NO_FEATURES: "no_features",  # cached tower features: its image or caption did not decode when they were computed
}

MAX_PIXELS = 1 << 26  # the decoders' bound on an image's pixels (8192 x 8192): a decompression bomb is a reject


class TooLarge(Exception):
    """An image over the decoder's pixel bound, found from its header."""


def guarded(decode, data: bytes, *args):
    """``(decode(data, *args), OK)``, or ``(None, reason code)`` for image bytes that do not decode: never raises
    for bad data (the train stage's decoders and ingest's ``validate_images`` share it, so a sample has the same
    reason wherever it is found)."""
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return decode(data, *args), OK
    except (Image.DecompressionBombError, Image.DecompressionBombWarning, TooLarge):
        return None, TOO_LARGE
    except Image.UnidentifiedImageError:
        return None, NOT_AN_IMAGE
    except (EOFError, OSError) as exc:
        return None, TRUNCATED if isinstance(exc, EOFError) or "truncated" in str(exc).lower() else CORRUPT
    except MemoryError:
        raise
    except Exception:  # noqa: BLE001 - PIL's plugins raise many kinds (SyntaxError, ValueError, struct.error) on bad data
        return None, CORRUPT


def load_image(data: bytes, max_pixels: int = MAX_PIXELS) -> None:
    """Decode every pixel of ``data`` (raises as :func:`guarded` expects)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        if img.size[0] * img.size[1] > max_pixels:
            raise TooLarge(img.size)
        img.load()


DIR = "skipped"
PATTERN = f"{DIR}/part-s<first>-<last>-r<rank>.parquet"
COUNTS_KEY = "gradmimic.skipped"
SCHEMA = pa.schema([
    ("uid_hi", pa.uint64()), ("uid_lo", pa.uint64()), ("uid", pa.string()), ("step", pa.int64()),
    ("epoch", pa.int32()), ("rank", pa.int32()), ("reason", pa.string()),
])


def skipped_root(scores_root: str) -> str:
    """The folder of the skipped-sample segments, next to the score log's folder."""
    return beside_log(scores_root, DIR)


def reason_names(codes: np.ndarray) -> List[str]:
    return [REASONS.get(int(c), f"code_{int(c)}") for c in codes]


def uid_hex(uid_hi: np.ndarray, uid_lo: np.ndarray) -> List[str]:
    return [f"{int(h):016x}{int(lo):016x}" for h, lo in zip(uid_hi, uid_lo)]


def is_skipped_file(rel: str) -> bool:
    """Whether a stage file (relative to the stage directory) is one of its skipped-sample segments."""
    return rel.startswith(DIR + "/") and "/" not in rel[len(DIR) + 1:] and segment_of(rel) is not None


def skipped_files(files: Iterable[str]) -> List[str]:
    """The skipped-sample segments among a manifest's ``files``, in (first step, rank) order."""
    return sorted(f for f in files if is_skipped_file(f))


class SkippedWriter(SegmentWriter):
    """One rank's buffered record of skipped samples; ``root`` is the stage's ``skipped`` directory on ``fs``."""

    def add(self, step: int, epoch: int, uid_hi, uid_lo, reasons) -> None:
        n = len(uid_lo)
        if n:
            self._parts.append({"uid_hi": np.asarray(uid_hi, np.uint64), "uid_lo": np.asarray(uid_lo, np.uint64),
                                "step": np.full(n, step, np.int64), "epoch": np.full(n, epoch, np.int32),
                                "reason": np.asarray(reasons, np.uint8)})

    def encode(self, cols: Dict[str, np.ndarray]) -> bytes:
        return encode(cols, self.rank)


def encode(cols: Dict[str, np.ndarray], rank: int) -> bytes:
    names = reason_names(cols["reason"])
    counts: Dict[str, int] = {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    table = pa.table({"uid_hi": cols["uid_hi"], "uid_lo": cols["uid_lo"], "uid": uid_hex(cols["uid_hi"], cols["uid_lo"]),
                      "step": cols["step"], "epoch": cols["epoch"],
                      "rank": np.full(len(names), rank, np.int32), "reason": names}, schema=SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table.replace_schema_metadata({COUNTS_KEY: json.dumps(counts, sort_keys=True)}), buf)
    return buf.getvalue()


def file_counts(fs, path: str) -> Dict[str, int]:
    """A segment's ``{reason: rows}`` from its footer."""
    with fs.open(path, "rb") as f:
        meta = pq.ParquetFile(f).metadata
    return json.loads((meta.metadata or {}).get(COUNTS_KEY.encode(), b"{}"))


def total_counts(fs, paths: Iterable[str]) -> Dict[str, int]:
    """``{reason: rows}`` over segments, from their footers (sorted by reason)."""
    out: Dict[str, int] = {}
    for path in paths:
        for name, n in file_counts(fs, path).items():
            out[name] = out.get(name, 0) + int(n)
    return dict(sorted(out.items()))
