"""``aggregate``: a train stage's score log (one row per sample per step) -> one utility row per sample.

Per uid: ``num_steps``, ``mean_score``, ``mean_weight``, ``mean_loss``, ``last_weight`` and, for each binariser
(:mod:`gradmimic.binarize`: ``threshold``, ``kmeans``, ``gmm``), ``vote_<name>``: the fraction of the sample's
steps in which its step's binariser voted "keep".  Options: ``first_step`` (skip e.g. a mimic warm-up, whose
weights are the plain mean), ``last_epochs`` (only the last k epochs), ``decay`` (a row of step ``t`` counts
``decay ** (T - t)``, ``T`` the log's last step; ``num_steps`` stays a count).

**Shuffle-free.**  The log is partitioned by ``bucket = uid_lo % num_buckets`` (docs/architecture.md, "Formats"), so every
row of a uid is in one bucket: one Ray Data task per bucket reduces its files with numpy kernels, a chunk of rows
at a time into per-uid partial sums (sums and "latest step" merge exactly), and writes the bucket's utility
file (:mod:`pipelines.formats.utility`).  A task holds one chunk plus its bucket's partial sums; the driver
holds per-task counters only.

**Fitted binarisers** (``kmeans``, ``gmm``) need each step's whole global batch, which is spread over every
bucket.  Two light passes first (reading ``step`` and the clustered column only): per-step min / max, then
per-step binned summaries on that range (``bins`` bins, count / sum / sum of squares, added across tasks); the
per-step fits on those summaries are approximate as :mod:`gradmimic.binarize` describes (exact k-means split up
to the bin width, binned EM), and the tests compare them with exact per-step fits.  Their driver memory is
``steps x bins x 24`` bytes (e.g. 312k steps of a 4096 batch, 64 bins: 480 MB): lower ``bins`` for very long logs.

The manifest holds the dataset quality estimate: the fraction of samples whose ``quality`` binariser's vote is at
least ``min_vote``, and the mean score.
"""

from __future__ import annotations

import json
import math
import posixpath
from dataclasses import dataclass
from typing import Any, Dict, List, Literal, Optional, Tuple, Union

import numpy as np
import pyarrow as pa

from pipelines.formats import utility as fu
from pipelines.formats.manifest import ModelManifest, UtilityManifest
from pipelines.formats.score_log import DIR, PATTERN, buckets_of, is_log_file, list_buckets
from pipelines.run.config import SpecError, doc, ref_name, require
from pipelines.run.context import StageContext
from pipelines.run.errors import InputError
from pipelines.run.storage import open_storage, parquet_metadata, parquet_schema, read_parquet, write_parquet

BINARISERS = ("threshold", "kmeans", "gmm")
OUTPUTS = fu.OUTPUTS


@dataclass(frozen=True)
class LogPath:
    path: str = doc("a score-log directory (local path or URL) laid out as a train stage's scores/")


ScoresRef = Union[str, LogPath]  # a bare string names a previous train stage


@dataclass(frozen=True)
class AggregateConfig:
    scores: ScoresRef = doc("the train stage whose score log to reduce, or {path: <score-log directory>}",
                            ref="model")
    binarisers: Tuple[Literal["threshold", "kmeans", "gmm"], ...] = doc(
        "per-step keep votes: threshold (weight > 1/B), kmeans (two clusters), gmm (two components)",
        default=BINARISERS)
    cluster_on: Literal["score", "weight"] = doc("the column kmeans and gmm split", default="score")
    quality: Optional[Literal["threshold", "kmeans", "gmm"]] = doc(
        "the binariser behind the quality estimate (null: none)", default="threshold")
    outputs: Tuple[Literal["mean_score", "mean_weight", "mean_loss", "last_weight"], ...] = doc(
        "per-sample figures besides num_steps and the votes (fewer read fewer log columns)", default=OUTPUTS)
    min_vote: float = doc("a sample counts as kept (quality estimate) when its vote is at least this", default=0.5)
    first_step: int = doc("ignore steps before this one (e.g. the mimic warm-up)", default=1)
    last_epochs: Optional[int] = doc("only the last k epochs of the log", default=None)
    decay: Optional[float] = doc("weight a row of step t by decay ** (T - t), T the last step (0 < decay <= 1)",
                                 default=None)
    bins: int = doc("bins per step for the kmeans / gmm summaries", default=64)
    chunk_rows: int = doc("rows a task reduces at once (its memory)", default=4_000_000)
    cpus_per_task: float = doc("CPUs per task", default=1.0)

    def validate(self) -> None:
        if self.quality is not None and self.quality not in self.binarisers:
            raise SpecError(f"quality: {self.quality!r} is not one of the binarisers ({', '.join(self.binarisers)})")
        if not 0 <= self.min_vote <= 1:
            raise SpecError(f"min_vote: must be in [0, 1], got {self.min_vote}")
        if self.decay is not None and not 0 < self.decay <= 1:
            raise SpecError(f"decay: must be in (0, 1], got {self.decay}")
        require(self, "first_step", 1)
        require(self, "last_epochs", 1, allow_none=True)
        require(self, "bins", 2)
        require(self, "chunk_rows", 1)
        require(self, "cpus_per_task", 0, strict=True)

    @property
    def fitted(self) -> Tuple[str, ...]:
        return tuple(b for b in self.binarisers if b != "threshold")

    def log_columns(self, has_loss: bool) -> List[str]:
        """The score-log columns this configuration reads."""
        wants = set(self.outputs) | {f"vote_{b}" for b in self.binarisers}
        need = {"uid_hi", "uid_lo"}
        if self.first_step > 1 or self.decay is not None or self.fitted or "last_weight" in wants:
            need.add("step")
        if self.last_epochs:
            need |= {"step", "epoch"}
        if "mean_score" in wants or (self.fitted and self.cluster_on == "score"):
            need.add("score")
        if wants & {"mean_weight", "last_weight", "vote_threshold"} or (self.fitted and self.cluster_on == "weight"):
            need.add("weight")
        if "vote_threshold" in wants:
            need.add("batch_size")
        if "mean_loss" in wants and has_loss:
            need.add("loss")
        return [c for c in ("uid_hi", "uid_lo", "step", "epoch", "score", "weight", "batch_size", "loss") if c in need]


def check_aggregate(cfg: AggregateConfig, spec) -> None:
    name = ref_name(cfg.scores)
    if name is None:
        return
    stage = next(s for s in spec.stages if s.name == name)
    if getattr(stage.config, "mode", None) == "plain":
        raise SpecError(f"scores: stage {name!r} trains with mode plain: its log has no scores to aggregate")


# ------------------------------------------------------------------------------------------------ reading


def _footer_span(fs, files: List[str]) -> Dict[str, int]:
    """Rows, last step and last epoch of some files, from their parquet footers only."""
    out = {"rows": 0, "max_step": 0, "max_epoch": 0}
    for path in files:
        meta = parquet_metadata(fs, path)
        names = meta.schema.names
        out["rows"] += meta.num_rows
        for i in range(meta.num_row_groups):
            rg = meta.row_group(i)
            for key, col in (("max_step", "step"), ("max_epoch", "epoch")):
                if col in names:
                    stats = rg.column(names.index(col)).statistics
                    if stats is not None and stats.has_min_max:
                        out[key] = max(out[key], int(stats.max))
    return out


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


def reduce_bucket(bucket: int, files: List[str], fs, num_buckets: int, out_fs, out_dir: str, cfg: AggregateConfig,
                  filt: LogFilter, fits: Dict[str, np.ndarray], check: bool = True) -> Dict[str, Any]:
    """One bucket's files -> its utility file; returns counters for the manifest.  ``check``: verify that every
    row belongs to the bucket (a log given by path, whose bucket count was inferred)."""
    columns = cfg.log_columns("loss" in parquet_schema(fs, files[0]).names)
    parts, pending, pending_rows, rows_in = [], [], 0, 0
    for i, path in enumerate(files):
        t = read_parquet(fs, path, columns)
        rows_in += t.num_rows
        if check and np.any(buckets_of(t["uid_lo"].to_numpy(), num_buckets) != bucket):
            raise InputError(f"{path}: holds uids of another bucket than {bucket} (of {num_buckets})")
        for col in ("score", "weight"):  # the train stage never logs them; a log from elsewhere might
            if col in t.column_names and not np.isfinite(t[col].to_numpy()).all():
                raise InputError(f"{path}: the score log has non-finite values (NaN or inf) in column {col!r}")
        pending.append(t)
        pending_rows += t.num_rows
        if pending_rows >= cfg.chunk_rows or i == len(files) - 1:
            parts.append(reduce_partials(_partial(pa.concat_tables(pending), cfg, filt, fits)))
            pending, pending_rows = [], 0
    merged = parts[0] if len(parts) == 1 else reduce_partials(pa.concat_tables(parts))
    table = utility_table(merged, cfg)
    rel = fu.part_path(bucket)
    write_parquet(out_fs, posixpath.join(out_dir, rel), table)
    stats = {"bucket": bucket, "file": rel, "rows_in": rows_in, "rows_used": int(merged["n"].to_numpy().sum()),
             "samples": table.num_rows, "score_sum": float(np.nansum(table["mean_score"].to_numpy()))
             if "mean_score" in cfg.outputs else 0.0}
    for name in cfg.binarisers:
        vote = table[fu.vote(name)].to_numpy(zero_copy_only=False)
        stats[f"kept_{name}"] = int(np.sum(vote >= cfg.min_vote))
    return stats


def reduce_buckets(item: Dict[str, Any], fits_ref, **kw) -> List[Dict[str, Any]]:
    """A task's group of buckets, one after another (a Ray Data ``flat_map``: a stats row per bucket)."""
    import ray

    fits = ray.get(fits_ref) if isinstance(fits_ref, ray.ObjectRef) else fits_ref
    files = json.loads(item["files"])
    return [reduce_bucket(int(b), files[str(b)], fits=fits, **kw) for b in json.loads(item["buckets"])]


# ------------------------------------------------------------------------------------------------ the stage


def _open_log(cfg: AggregateConfig, ctx: StageContext):
    """``(fs, root, num_buckets)``; a log given by path is taken to have ``max bucket + 1`` buckets (each task
    checks that its rows belong to its bucket)."""
    name = ref_name(cfg.scores)
    if name is not None:
        stage = ctx.inputs[name]
        manifest = ModelManifest.read(stage)
        if manifest.score_rows is None:
            raise SpecError(f"scores: stage {name!r} has no score log")
        return stage.fs, stage.join(DIR), int(manifest.config_dict["num_buckets"])
    fs, root = open_storage(cfg.scores.path, ctx.storage_options)
    return fs, root, None


def _check_listed(cfg: AggregateConfig, ctx: StageContext, fs, buckets: Dict[int, List[str]]) -> None:
    """A train stage's log must be exactly the files its manifest lists: none lost, none added since."""
    name = ref_name(cfg.scores)
    if name is None:
        return
    stage = ctx.inputs[name]
    listed = {fs._strip_protocol(stage.join(f)) for f in ModelManifest.read(stage).files if is_log_file(f)}
    found = {fs._strip_protocol(p) for files in buckets.values() for p in files}
    for missing, what in ((listed - found, "is missing"), (found - listed, "has files its manifest does not list")):
        if missing:
            raise SpecError(f"scores: the score log of stage {name!r} {what}: {len(missing)} file(s), e.g. "
                            f"{fs.unstrip_protocol(sorted(missing)[0])} (rerun that stage)")


def _groups(buckets: Dict[int, List[str]], n: int) -> List[List[str]]:
    """Buckets dealt round-robin into ``n`` task groups (for the summary passes)."""
    keys = list(buckets)
    return [[p for k in keys[i::n] for p in buckets[k]] for i in range(min(n, len(keys)))]


def run_aggregate(cfg: AggregateConfig, ctx: StageContext) -> Dict[str, Any]:
    import ray

    fs, root, num_buckets = _open_log(cfg, ctx)
    url = fs.unstrip_protocol(root)
    buckets = list_buckets(fs, root)
    if not buckets:
        raise SpecError(f"scores: no score-log files ({PATTERN}) under {url}")
    _check_listed(cfg, ctx, fs, buckets)
    check = num_buckets is None
    num_buckets = num_buckets or max(buckets) + 1
    needed = cfg.log_columns(has_loss=False)  # loss is optional: mean_loss is NaN without it
    first = next(iter(buckets.values()))[0]
    have = parquet_schema(fs, first).names
    missing = [c for c in needed if c not in have]
    if missing:
        raise SpecError(f"scores: {fs.unstrip_protocol(first)}: the score log has no column {missing[0]!r} "
                        f"(expected {', '.join(needed)})")
    width = max(1, int(ray.cluster_resources().get("CPU", 1) // cfg.cpus_per_task))
    groups = _groups(buckets, width)
    spans = []  # the log's last step and epoch, from the footers: only when an option needs them
    if cfg.fitted or cfg.decay is not None or cfg.last_epochs is not None:
        spans = ctx.map(_footer_span, [(fs, g) for g in groups], unit="footers")
    max_step = max((s["max_step"] for s in spans), default=0)
    max_epoch = max((s["max_epoch"] for s in spans), default=0)
    filt = LogFilter(cfg, max_step, max_epoch)
    fits = fit_steps(ctx, cfg, fs, groups, filt, max_step) if cfg.fitted else {}
    fits_ref = ray.put(fits)
    keys = list(buckets)
    per_task = max(1, math.ceil(len(keys) / (4 * width)))  # a few tasks per CPU: balance without per-task overhead
    items = [{"buckets": json.dumps(keys[i:i + per_task]),
              "files": json.dumps({str(b): buckets[b] for b in keys[i:i + per_task]})}
             for i in range(0, len(keys), per_task)]
    results = ctx.map_dataset(
        reduce_buckets, items, unit="buckets", total=len(keys), rows="rows_in", num_cpus=cfg.cpus_per_task,
        fn_kwargs={"fits_ref": fits_ref, "fs": fs, "num_buckets": num_buckets, "out_fs": ctx.out.fs,
                   "out_dir": ctx.out.join(""), "cfg": cfg, "filt": filt, "check": check})
    results.sort(key=lambda r: r["bucket"])
    rows_in = sum(r["rows_in"] for r in results)
    if spans and rows_in != sum(s["rows"] for s in spans):
        raise RuntimeError(f"{ctx.label}: read {rows_in} score rows, the footers count {sum(s['rows'] for s in spans)}")
    samples = sum(r["samples"] for r in results)
    kept = {name: sum(r[f"kept_{name}"] for r in results) for name in cfg.binarisers}
    frac = {name: (k / samples if samples else 0.0) for name, k in kept.items()}
    return UtilityManifest(
        rows_in=rows_in, rows_out=samples, files=[r["file"] for r in results],
        log=url, log_rows_used=sum(r["rows_used"] for r in results),
        steps=max_step if spans else None, epochs=max_epoch + 1 if spans else None,
        num_buckets=num_buckets, samples=samples,
        kept_fraction=frac, quality_estimate=frac[cfg.quality] if cfg.quality else None,
        quality={"binariser": cfg.quality, "min_vote": cfg.min_vote},
        mean_score=sum(r["score_sum"] for r in results) / samples if samples and "mean_score" in cfg.outputs
        else None,
        fitted_on=f"per-step binned summaries ({cfg.bins} bins) of {cfg.cluster_on}" if cfg.fitted else None,
    ).to_json()
