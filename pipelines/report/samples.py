"""Bounded reads for the report and ``gradmimic show``: they read what they show, never a whole table.

- :func:`extremes`: the ``k`` highest and ``k`` lowest rows of a utility column, found file by file (one file and
  ``2k`` rows in memory);
- :func:`pool_rows`: the pool rows of given uids, shard by shard: each shard's ``uid_hi`` / ``uid_lo`` (and
  ``corrupted`` marks) first, and the asked columns only of the shards that hold one of them;
- :func:`detection_stream`: the detection figures of :func:`pipelines.report.metrics.detection` (and what its plots
  need) over the utility files, against the pool's corrupted uids: memory is one file plus the corrupted samples'
  scores (none on a pool without injected noise).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.run.errors import InputError

KEY = ["uid_hi", "uid_lo"]


def _keys(table) -> np.ndarray:
    """A table's uids as the sortable ``"u8,u8"`` array (a DataComp subset file's dtype)."""
    out = np.empty(len(table), dtype="u8,u8")
    out["f0"], out["f1"] = np.asarray(table["uid_hi"]), np.asarray(table["uid_lo"])
    return out


def _among(keys: np.ndarray, sorted_keys: np.ndarray) -> np.ndarray:
    """Which of ``keys`` are in ``sorted_keys`` (sorted ``"u8,u8"``): a binary search each, nothing copied."""
    if not len(sorted_keys):
        return np.zeros(len(keys), bool)
    at = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
    return sorted_keys[at] == keys


def _utility_files(stage) -> List[str]:
    from pipelines.formats.manifest import UtilityManifest
    from pipelines.formats.utility import utility_files

    return utility_files(UtilityManifest.read(stage).files)


def _read(stage, rel: str, columns: Sequence[str]) -> pa.Table:
    """``columns`` of one file of ``stage``; a column it lacks is an :class:`InputError` naming both."""
    from pipelines.run.storage import parquet_schema, read_parquet

    try:
        return read_parquet(stage.fs, stage.join(rel), list(columns))
    except InputError:
        missing = [c for c in columns if c not in parquet_schema(stage.fs, stage.join(rel)).names]
        if missing:
            raise InputError(f"{stage.fs.unstrip_protocol(stage.join(rel))}: no column {missing[0]!r} (rerun the "
                             f"stage that wrote it)") from None
        raise


def extremes(stage, column: str, k: int, columns: Sequence[str]) -> Tuple[pd.DataFrame, pd.DataFrame]:
    """``(highest first, lowest first)``: the ``k`` rows of a committed aggregate stage with the highest and the
    lowest ``column`` (equal values by uid; missing values never), with ``columns`` (which include ``column``)."""
    top: Optional[pd.DataFrame] = None
    bottom: Optional[pd.DataFrame] = None
    for f in _utility_files(stage):
        part = _read(stage, f, list(dict.fromkeys([*columns, *KEY, column]))).to_pandas()
        part = part[part[column].notna()]
        top = _keep(part if top is None else pd.concat([top, part]), column, k, high=True)
        bottom = _keep(part if bottom is None else pd.concat([bottom, part]), column, k, high=False)
    if top is None:
        empty = pd.DataFrame({c: pd.Series(dtype="uint64" if c in KEY else float) for c in columns})
        return empty, empty
    return top, bottom


def _keep(rows: pd.DataFrame, column: str, k: int, high: bool) -> pd.DataFrame:
    """The ``k`` first of ``rows`` by ``column`` (descending when ``high``), ties by uid: a partition, then a sort
    of the ``k`` (and of the rows tied with the ``k``-th)."""
    values = rows[column].to_numpy()
    if len(rows) > k:
        cut = np.partition(-values if high else values, k - 1)[k - 1]
        rows = rows[(values >= -cut) if high else (values <= cut)]
    ordered = rows.sort_values([column, *KEY], ascending=[not high, True, True], kind="stable")
    return ordered.head(k).reset_index(drop=True)


def pool_rows(stage, uids: pd.DataFrame, columns: Sequence[str]) -> Tuple[pd.DataFrame, np.ndarray]:
    """The rows of a dataset stage whose ``(uid_hi, uid_lo)`` are among ``uids``'s, with ``columns`` (``tar`` made a
    full URL), and the sorted ``"u8,u8"`` uids it marks ``corrupted``: one pass over its shards, each read for its
    uids and marks, and for the asked columns only if it holds one of ``uids``."""
    from pipelines.formats.manifest import DatasetManifest
    from pipelines.formats.pool import shard_parquets, tar_urls

    want = np.unique(_keys(uids))
    his = pa.array(np.unique(want["f0"]), pa.uint64())
    found, bad = [], []
    for f in shard_parquets(DatasetManifest.read(stage).files):
        keys = _read(stage, f, [*KEY, "corrupted"])
        bad.append(_keys(keys.filter(pc.fill_null(keys["corrupted"], False))))
        near = np.flatnonzero(np.asarray(pc.is_in(keys["uid_hi"], value_set=his)))  # vectorised; exact pairs next
        hits = near[_among(_keys(keys.take(near)), want)]
        if len(hits):
            found.append(_read(stage, f, list(dict.fromkeys([*KEY, *columns]))).take(hits))
    corrupted = np.sort(np.concatenate(bad)) if bad else np.empty(0, "u8,u8")
    if not found:
        empty = {c: pd.Series(dtype="uint64" if c in KEY else object) for c in dict.fromkeys([*KEY, *columns])}
        return pd.DataFrame(empty), corrupted
    table = pa.concat_tables(found, promote_options="default")
    if "tar" in table.column_names:
        tars = tar_urls(stage.fs.unstrip_protocol(stage.join("")), table["tar"].cast(pa.string()))
        table = table.set_column(table.column_names.index("tar"), "tar", tars)
    return table.to_pandas(), corrupted


@dataclass
class Detection:
    """What :func:`detection_stream` counts: rows, corrupted rows, per binariser the flagged and the flagged
    corrupted, the corrupted rows' scores, and the clean rows' scores as counts against them (for the AUROC and the
    ROC's corners) and in the histogram's bins."""

    rows: int = 0
    bad: int = 0
    flagged: Dict[str, int] = field(default_factory=dict)
    hits: Dict[str, int] = field(default_factory=dict)
    bad_scores: np.ndarray = field(default_factory=lambda: np.empty(0))
    low: float = float("inf")
    high: float = float("-inf")
    below: Optional[np.ndarray] = None  # per sorted distinct bad score: clean rows scored below it, and equal to it
    equal: Optional[np.ndarray] = None
    clean_hist: Optional[np.ndarray] = None
    bins: Optional[np.ndarray] = None


def detection_stream(util_stage, corrupted: np.ndarray, binarisers: Sequence[str], min_vote: float) -> Detection:
    """Two passes over the utility files (``mean_score`` and the votes only): counts, the corrupted rows' scores and
    the score range; then the clean rows against the sorted distinct corrupted scores and in 40 histogram bins."""
    det = Detection(flagged={b: 0 for b in binarisers}, hits={b: 0 for b in binarisers})
    files, bad_scores = _utility_files(util_stage), []
    for f in files:
        t = _read(util_stage, f, [*KEY, "mean_score", *(f"vote_{b}" for b in binarisers)])
        bad, s = _among(_keys(t), corrupted), t["mean_score"].to_numpy(zero_copy_only=False)
        det.rows, det.bad = det.rows + len(s), det.bad + int(bad.sum())
        bad_scores.append(s[bad])
        if len(s):
            det.low, det.high = min(det.low, float(np.nanmin(s))), max(det.high, float(np.nanmax(s)))
        for b in binarisers:
            flagged = t[f"vote_{b}"].to_numpy(zero_copy_only=False) < min_vote
            det.flagged[b] += int(flagged.sum())
            det.hits[b] += int((flagged & bad).sum())
    det.bad_scores = np.concatenate(bad_scores) if bad_scores else np.empty(0)
    distinct = np.unique(det.bad_scores)
    det.below, det.equal = np.zeros(len(distinct), np.int64), np.zeros(len(distinct), np.int64)
    if det.rows:  # the histogram's bins over every score (a single value: a unit-wide range around it)
        widen = 0.0 if det.high > det.low else 0.5
        det.bins = np.linspace(det.low - widen, det.high + widen, 40)
    det.clean_hist = np.zeros(39, np.int64)
    for f in files:
        t = _read(util_stage, f, [*KEY, "mean_score"])
        s = np.sort(t["mean_score"].to_numpy(zero_copy_only=False)[~_among(_keys(t), corrupted)])
        left = np.searchsorted(s, distinct, side="left")
        det.below += left
        det.equal += np.searchsorted(s, distinct, side="right") - left
        if det.bins is not None:
            det.clean_hist += np.histogram(s, bins=det.bins)[0]
    return det


def detection_figures(det: Detection) -> Dict[str, Any]:
    """:func:`pipelines.report.metrics.detection`'s figures from the counts (the AUROC as the Mann-Whitney count,
    which is what the area under the ROC is; ``_roc`` the curve through the corners that a corrupted score makes)."""
    out: Dict[str, Any] = {}
    clean = det.rows - det.bad
    if det.bad and clean:
        distinct, per = np.unique(det.bad_scores, return_counts=True)
        # a corrupted score beats (is lower than) every clean score above it; an equal one counts half
        twice = (2 * (clean - det.below - det.equal) + det.equal) * per  # whole numbers: no rounding until the end
        out["detection_auroc"] = float(twice.sum(dtype=np.float64) / (2.0 * det.bad * clean))
        tp = np.cumsum(per) / det.bad  # flagging scores up to each distinct corrupted score, lowest first
        fp_before, fp_at = det.below / clean, (det.below + det.equal) / clean
        fpr = np.concatenate([[0.0], np.column_stack([fp_before, fp_at]).ravel(), [1.0]])
        tpr = np.concatenate([[0.0], np.column_stack([np.r_[0.0, tp[:-1]], tp]).ravel(), [1.0]])
        out["_roc"] = (fpr, tpr)
    for b in det.flagged:
        flagged, tp = det.flagged[b], det.hits[b]
        p = tp / flagged if flagged else 0.0
        r = tp / det.bad if det.bad else 0.0
        out[f"precision_{b}"], out[f"recall_{b}"] = p, r
        out[f"f1_{b}"] = 2 * p * r / (p + r) if p + r else 0.0
    return out
