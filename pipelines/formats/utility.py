"""The utility: what ``aggregate`` writes from a score log, one row per uid (docs/architecture.md, "Formats").

    utility/bucket=<b>/part-00000.parquet

in the score log's buckets (``bucket = uid_lo % num_buckets``), so a join with a pool partitioned the same way
needs no shuffle.  A bucket the aggregate stage split over several tasks (more rows than a task's budget) has
several parts, ``part-<j>.parquet`` holding the uids with ``uid_lo // num_buckets % parts == j``; a reader takes
every part of its bucket (:func:`bucket_files`).  Columns: ``uid``, ``uid_hi``, ``uid_lo``, ``num_steps`` and, as the stage was asked,
``mean_score``, ``mean_weight``, ``mean_loss``, ``last_weight`` and ``vote_<binariser>`` (the fraction of the
sample's steps in which that binariser voted keep).
"""

from __future__ import annotations

import posixpath
from typing import Dict, Iterable, List, Optional

import numpy as np
import pyarrow as pa

from pipelines.formats.pool import uid_hex
from pipelines.formats.score_log import bucket_dir, bucket_of

DIR = "utility"
NUM_STEPS = "num_steps"
MEANS = ("mean_score", "mean_weight", "mean_loss")
LAST_WEIGHT = "last_weight"
OUTPUTS = (*MEANS, LAST_WEIGHT)  # what an aggregate stage may be asked for besides num_steps and the votes
KEY_COLUMNS = ("uid", "uid_hi", "uid_lo")


def vote(binariser: str) -> str:
    return f"vote_{binariser}"


def part_path(bucket: int, part: int = 0) -> str:
    """A bucket's file (its ``part``-th, for a bucket split by uid), relative to the stage directory."""
    return posixpath.join(DIR, bucket_dir(bucket), f"part-{part:05d}.parquet")


def utility_files(files: Iterable[str]) -> List[str]:
    """The utility files among a manifest's ``files``."""
    return [f for f in files if f.startswith(DIR + "/")]


def bucket_files(files: Iterable[str]) -> Dict[int, List[str]]:
    """``{bucket: [its files]}`` of a manifest's ``files``, in bucket and part order."""
    out: Dict[int, List[str]] = {}
    for f in sorted(utility_files(files)):
        out.setdefault(bucket_of(f), []).append(f)
    return dict(sorted(out.items()))


def utility_table(hi: np.ndarray, lo: np.ndarray, num_steps: np.ndarray, means: Dict[str, np.ndarray],
                  last_weight: Optional[np.ndarray], votes: Dict[str, np.ndarray]) -> pa.Table:
    """A bucket's rows: ``means`` keyed ``score`` / ``weight`` / ``loss``, ``votes`` keyed by binariser."""
    cols = {"uid": uid_hex(hi, lo), "uid_hi": pa.array(hi, pa.uint64()), "uid_lo": pa.array(lo, pa.uint64()),
            NUM_STEPS: pa.array(num_steps.astype(np.int32))}
    for name, values in means.items():
        cols[f"mean_{name}"] = pa.array(values)
    if last_weight is not None:
        cols[LAST_WEIGHT] = pa.array(last_weight)
    for name, values in votes.items():
        cols[vote(name)] = pa.array(values)
    return pa.table(cols)


def read_utility(stage, columns: Optional[List[str]] = None) -> pa.Table:
    """A committed aggregate stage's whole utility table (tests and small pools)."""
    from pipelines.formats.manifest import UtilityManifest

    files = utility_files(UtilityManifest.read(stage).files)
    return pa.concat_tables([stage.read_table(f).select(columns) if columns else stage.read_table(f)
                             for f in files])
