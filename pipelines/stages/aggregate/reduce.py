"""The aggregate stage's Ray tasks over a score log: the per-step fits and the per-uid reduction.

Both read the log as :mod:`pipelines.formats.score_log` lays it out; the design is in
:mod:`pipelines.stages.aggregate.stage`.  A reduce task takes a range of buckets (or one bucket's share of uids)
and reads only those buckets' row groups of every file; per bucket it gathers chunks of about ``chunk_rows`` rows
and merges each chunk's partial sums into the running ones at once (sums and "latest step" merge exactly, and
the running sums add each uid's chunk sums in the order one reduction of all of them would), so it holds one
chunk and its buckets' running sums.
"""

from __future__ import annotations

import posixpath
from typing import TYPE_CHECKING, Any, Dict, List, Optional

import numpy as np
import pyarrow as pa

from pipelines.formats import utility as fu
from pipelines.formats.score_log import buckets_of, open_part, read_bucket_rows
from pipelines.run.errors import InputError
from pipelines.run.storage import read_parquet, write_parquet

if TYPE_CHECKING:
    from pipelines.run.context import StageContext
    from pipelines.stages.aggregate.stage import AggregateConfig


class LogFilter:
    """Which rows count (first step, last epochs) and with what weight (decay)."""

    def __init__(self, cfg: AggregateConfig, max_step: int, max_epoch: int) -> None:
        self.first_step = cfg.first_step
        self.min_epoch = max_epoch - cfg.last_epochs + 1 if cfg.last_epochs else None
        self.decay, self.max_step = cfg.decay, max_step

    @property
    def columns(self) -> List[str]:
        return ["step"] + (["epoch"] if self.min_epoch is not None else [])

    def mask(self, t: pa.Table) -> np.ndarray:
        keep = np.ones(t.num_rows, bool)
        if self.first_step > 1:
            keep &= t["step"].to_numpy() >= self.first_step
        if self.min_epoch is not None:
            keep &= t["epoch"].to_numpy() >= self.min_epoch
        return keep

    def weight(self, step: np.ndarray) -> np.ndarray:
        if self.decay is None or self.decay == 1:
            return np.ones(len(step))
        return np.power(self.decay, (self.max_step - step).astype(np.float64))


# ------------------------------------------------------------------------------------------------ per-step fits


def _step_range(fs, files, value_col: str, filt: LogFilter, num_steps: int):
    lo, hi = np.full(num_steps, np.inf), np.full(num_steps, -np.inf)
    for path in files:
        t = read_parquet(fs, path, list(dict.fromkeys(filt.columns + [value_col])))
        keep = filt.mask(t)
        idx = t["step"].to_numpy()[keep] - 1
        v = t[value_col].to_numpy().astype(np.float64)[keep]
        ok = np.isfinite(v)
        g = pa.table({"i": idx[ok], "v": v[ok]}).group_by("i", use_threads=False).aggregate([("v", "min_max")])
        i = g["i"].to_numpy()
        mm = g["v_min_max"].combine_chunks()
        lo[i] = np.minimum(lo[i], mm.field("min").to_numpy())
        hi[i] = np.maximum(hi[i], mm.field("max").to_numpy())
    return lo, hi


def _step_summary(fs, files, value_col: str, filt: LogFilter, lo, hi, bins: int):
    """``count``, ``sum``, ``sumsq`` per (step, bin) over some files: each file adds into its own steps' rows."""
    from gradmimic.binarize import binned_summary

    acc = {k: np.zeros((len(lo), bins)) for k in ("count", "sum", "sumsq")}
    for path in files:
        t = read_parquet(fs, path, list(dict.fromkeys(filt.columns + [value_col])))
        keep = filt.mask(t)
        v = t[value_col].to_numpy().astype(np.float64)[keep]
        idx = t["step"].to_numpy()[keep] - 1
        ok = np.isfinite(v)
        v, idx = v[ok], idx[ok]
        if not len(v):
            continue
        a, b = int(idx.min()), int(idx.max()) + 1  # a file holds a segment of steps
        s = binned_summary(idx - a, v, lo[a:b], hi[a:b], bins, b - a)
        for k in acc:
            acc[k][a:b] += s[k]
    return acc


def fit_steps(ctx: StageContext, cfg: AggregateConfig, fs, groups: List[List[str]], filt: LogFilter, num_steps: int):
    """Per-step k-means boundaries ``[T]`` and GMM parameters ``[T, 6]`` from two passes over the log."""
    from gradmimic.binarize import gmm_fit, kmeans_split

    col = cfg.cluster_on
    lo, hi = np.full(num_steps, np.inf), np.full(num_steps, -np.inf)
    for a, b in ctx.map(_step_range, [(fs, g, col, filt, num_steps) for g in groups], unit="step ranges"):
        lo, hi = np.minimum(lo, a), np.maximum(hi, b)
    total = ctx.map(_step_summary, [(fs, g, col, filt, lo, hi, cfg.bins) for g in groups], unit="step summaries",
                    combine=lambda acc, s: s if acc is None else {k: acc[k] + s[k] for k in acc})
    out = {}
    if "kmeans" in cfg.binarisers:
        out["kmeans"] = kmeans_split(total["count"], total["sum"], total["sumsq"])[:, 0]
    if "gmm" in cfg.binarisers:
        out["gmm"] = gmm_fit(total["count"], total["sum"], total["sumsq"])
    return out


# ------------------------------------------------------------------------------------------------ per-uid reduce

def _partial(t: pa.Table, cfg: AggregateConfig, filt: LogFilter, fits: Dict[str, np.ndarray]) -> pa.Table:
    """One chunk of raw rows as per-row partial sums (reduced by :func:`reduce_partials`): ``n``, ``wsum`` and
    the ``w``-weighted ``score``, ``weight``, ``loss`` and ``vote_*``, and ``last``: ``step << 32 | weight bits``
    (its maximum is the latest step's weight; weights are non-negative, so their bits order as they do)."""
    keep = filt.mask(t)
    if not keep.all():
        t = t.filter(pa.array(keep))
    col = {name: t[name].to_numpy() for name in t.column_names}
    n = t.num_rows
    step = col["step"].astype(np.int64) if "step" in col else None
    part = {"uid_hi": col["uid_hi"], "uid_lo": col["uid_lo"], "n": np.ones(n, np.int64)}
    w = 1.0
    if cfg.decay is not None:
        w = part["wsum"] = filt.weight(step)
    weight = col["weight"].astype(np.float32) if "weight" in col else None
    if "mean_score" in cfg.outputs:
        part["score"] = w * col["score"]
    if "mean_weight" in cfg.outputs:
        part["weight"] = w * weight
    if "mean_loss" in cfg.outputs:
        part["loss"] = w * col["loss"] if "loss" in col else np.full(n, np.nan)
    if "last_weight" in cfg.outputs:
        part["last"] = (step << 32) | weight.view(np.uint32).astype(np.int64)
    for name in cfg.binarisers:
        if name == "threshold":  # in float32, as the weights are: uniform weights 1/B are not "above" 1/B
            vote = weight > (1.0 / col["batch_size"].astype(np.float64)).astype(np.float32)
        else:
            v = col[cfg.cluster_on].astype(np.float64)
            if name == "kmeans":
                vote = v > fits["kmeans"][step - 1]
            else:
                from gradmimic.binarize import gmm_keep

                vote = gmm_keep(v, fits["gmm"][step - 1])
        part[f"vote_{name}"] = w * vote
    return pa.table(part)


def reduce_partials(part: pa.Table) -> pa.Table:
    """Partial sums grouped by uid (pyarrow's hash aggregation on both uid halves): sums add, ``last`` is the
    maximum.  Partials of partials reduce the same way, so a bucket is reduced a chunk at a time."""
    sums = [c for c in part.column_names if c not in ("uid_hi", "uid_lo", "last")]
    out = part.group_by(["uid_hi", "uid_lo"], use_threads=False).aggregate(
        [(c, "sum") for c in sums] + ([("last", "max")] if "last" in part.column_names else []))
    return out.rename_columns([c.removesuffix("_sum").removesuffix("_max") for c in out.column_names])


def utility_table(part: pa.Table, cfg: AggregateConfig) -> pa.Table:
    """Reduced partial sums -> the bucket's utility rows (:mod:`pipelines.formats.utility`)."""
    col = {name: part[name].to_numpy() for name in part.column_names}
    wsum = col["wsum"] if "wsum" in col else col["n"]  # without decay every row weighs 1
    last = None
    with np.errstate(invalid="ignore", divide="ignore"):
        means = {name: col[name] / wsum for name in ("score", "weight", "loss") if f"mean_{name}" in cfg.outputs}
        if fu.LAST_WEIGHT in cfg.outputs:
            last = (col["last"] & 0xFFFFFFFF).astype(np.uint32).view(np.float32)
        votes = {name: col[f"vote_{name}"] / wsum for name in cfg.binarisers}
    return fu.utility_table(col["uid_hi"], col["uid_lo"], col["n"], means, last, votes)


class _Sums:
    """A bucket's (or a bucket part's) running reduction: raw rows gathered into chunks of about ``chunk_rows``
    (counted as the whole bucket's rows, so a split bucket chunks as it would unsplit), each chunk's partial sums
    merged into the running ones at once: the same sums, added in the same order, as one reduction of every
    chunk's, in the memory of one chunk and the running sums."""

    def __init__(self, cfg: AggregateConfig, filt: LogFilter, fits: Dict[str, np.ndarray]) -> None:
        self.cfg, self.filt, self.fits = cfg, filt, fits
        self.merged: Optional[pa.Table] = None
        self.pending: List[pa.Table] = []
        self.pending_rows = self.rows_in = 0

    def add(self, t: pa.Table, counted: int) -> None:
        self.pending.append(t)
        self.pending_rows += counted
        self.rows_in += t.num_rows
        if self.pending_rows >= self.cfg.chunk_rows:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        part = reduce_partials(_partial(pa.concat_tables(self.pending), self.cfg, self.filt, self.fits))
        self.merged = part if self.merged is None else reduce_partials(pa.concat_tables([self.merged, part]))
        self.pending, self.pending_rows = [], 0


def _check_rows(t: pa.Table, bucket: int, name: str, num_buckets: int, check: bool) -> None:
    if check and np.any(buckets_of(t["uid_lo"].to_numpy(), num_buckets) != bucket):
        raise InputError(f"{name}: holds uids of another bucket than {bucket} (of {num_buckets}) in that bucket's rows")
    for col in ("score", "weight"):  # the train stage never logs them; a log from elsewhere might
        if col in t.column_names and not np.isfinite(t[col].to_numpy()).all():
            raise InputError(f"{name}: the score log has non-finite values (NaN or inf) in column {col!r}")


def reduce_range(lo: int, hi: int, part: int, parts: int, files: List[str], fs, num_buckets: int, out_fs,
                 out_dir: str, cfg: AggregateConfig, filt: LogFilter, fits: Dict[str, np.ndarray], columns: List[str],
                 check: bool = True) -> List[Dict[str, Any]]:
    """Buckets ``lo <= b < hi`` (with ``parts > 1``: one bucket's uids with ``uid_lo // num_buckets % parts ==
    part``) from every log file, reading only their row groups -> a utility file each; returns counters for the
    manifest.  ``check``: verify that every row belongs to its bucket (a log given by path)."""
    sums: Dict[int, _Sums] = {}
    for path in files:
        name = fs.unstrip_protocol(path)
        with open_part(fs, path) as pf:
            for bucket, t in read_bucket_rows(pf, name, lo, hi, columns):
                _check_rows(t, bucket, name, num_buckets, check)
                counted = t.num_rows
                if parts > 1:
                    share = (t["uid_lo"].to_numpy() // np.uint64(num_buckets)) % np.uint64(parts) == part
                    t = t.filter(pa.array(share))
                sums.setdefault(bucket, _Sums(cfg, filt, fits)).add(t, counted)
    return [_write_utility(b, part, s, out_fs, out_dir, cfg) for b, s in sorted(sums.items())]


def _write_utility(bucket: int, part: int, sums: _Sums, out_fs, out_dir: str, cfg: AggregateConfig) -> Dict[str, Any]:
    sums.flush()
    table = utility_table(sums.merged, cfg)
    rel = fu.part_path(bucket, part)
    write_parquet(out_fs, posixpath.join(out_dir, rel), table)
    stats = {"bucket": bucket, "part": part, "file": rel, "rows_in": sums.rows_in,
             "rows_used": int(sums.merged["n"].to_numpy().sum()), "samples": table.num_rows,
             "score_sum": float(np.nansum(table["mean_score"].to_numpy())) if "mean_score" in cfg.outputs else 0.0}
    for name in cfg.binarisers:
        vote = table[fu.vote(name)].to_numpy(zero_copy_only=False)
        stats[f"kept_{name}"] = int(np.sum(vote >= cfg.min_vote))
    return stats


def reduce_buckets(item: Dict[str, Any], files_ref, fits_ref, **kw) -> List[Dict[str, Any]]:
    """A task's bucket range (or bucket part), a Ray Data ``flat_map``: a stats row per utility file."""
    import ray

    files = ray.get(files_ref) if isinstance(files_ref, ray.ObjectRef) else files_ref
    fits = ray.get(fits_ref) if isinstance(fits_ref, ray.ObjectRef) else fits_ref
    return reduce_range(int(item["lo"]), int(item["hi"]), int(item["part"]), int(item["parts"]), files, fits=fits,
                        **kw)
