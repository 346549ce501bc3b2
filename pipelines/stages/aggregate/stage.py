"""``aggregate``: a train stage's score log (one row per sample per step) -> one utility row per sample.

Per uid: ``num_steps``, ``mean_score``, ``mean_weight``, ``mean_loss``, ``last_weight`` and, for each binariser
(:mod:`gradmimic.binarize`: ``threshold``, ``kmeans``, ``gmm``), ``vote_<name>``: the fraction of the sample's
steps in which its step's binariser voted "keep".  Options: ``first_step`` (skip e.g. a mimic warm-up, whose
weights are the plain mean), ``last_epochs`` (only the last k epochs), ``decay`` (a row of step ``t`` counts
``decay ** (T - t)``, ``T`` the log's last step; ``num_steps`` stays a count).

**Shuffle-free.**  Every row of a uid is in one bucket (``bucket = uid_lo % num_buckets``), and each score-log
file (one per rank per checkpoint) holds its rows sorted by bucket, row groups cut at bucket boundaries, the
bucket index in its footer (docs/architecture.md, "Formats"; :mod:`pipelines.formats.score_log`).  The driver
finds a train stage's files in its manifest (a log given by path: one listing of its folder), sums the rows per
bucket from the footers (in tasks), and plans the reduce tasks from the log's size, not its bucket count: runs of
contiguous buckets of about ``total / (4 x CPUs)`` rows each, and a bucket of more than ``task_rows`` rows split
by uid (``uid_lo // num_buckets % parts``) over several tasks, each reading the bucket's row groups and keeping
its share.  A Ray Data task reads only its buckets' row groups of every file, reduces them with numpy kernels a
chunk at a time into per-uid running sums (:mod:`pipelines.stages.aggregate.reduce`) and writes a utility file
per bucket (or bucket part: :mod:`pipelines.formats.utility`); it holds one chunk and its buckets' running sums,
at most ``task_rows`` rows' worth.  The sums are the same, added in the same order, whatever the task count: the
utility does not depend on the plan.  The driver holds the file list and per-bucket and per-task counters.

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

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Literal, Optional, Tuple, Union

import numpy as np

from pipelines.formats import utility as fu
from pipelines.formats.manifest import ModelManifest, UtilityManifest
from pipelines.formats.score_log import DIR, PATTERN, bucket_index, list_parts, log_files, segment_of
from pipelines.run.config import MAX_COUNT, MAX_CPUS, SpecError, doc, ref_name, require
from pipelines.run.context import StageContext, cluster_cpus
from pipelines.run.errors import InputError
from pipelines.run.storage import open_storage, parquet_metadata, parquet_schema
from pipelines.stages.aggregate.reduce import LogFilter, fit_steps, reduce_buckets

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
    chunk_rows: int = doc("rows a task reduces at once (with its running sums, its memory)", default=4_000_000)
    task_rows: int = doc("score-log rows a task reduces at most (a bucket with more is split by uid over several "
                         "tasks)", default=20_000_000)
    cpus_per_task: float = doc("CPUs per task", default=1.0)

    def validate(self) -> None:
        if self.quality is not None and self.quality not in self.binarisers:
            raise SpecError(f"quality: {self.quality!r} is not one of the binarisers ({', '.join(self.binarisers)})")
        if not 0 <= self.min_vote <= 1:
            raise SpecError(f"min_vote: must be in [0, 1], got {self.min_vote}")
        if self.decay is not None and not 0 < self.decay <= 1:
            raise SpecError(f"decay: must be in (0, 1], got {self.decay}")
        require(self, "first_step", 1, high=MAX_COUNT)
        require(self, "last_epochs", 1, allow_none=True, high=1 << 20)
        require(self, "bins", 2, high=1 << 16)
        require(self, "chunk_rows", 1, high=1 << 28)
        require(self, "task_rows", 1, high=MAX_COUNT)
        require(self, "cpus_per_task", 0, strict=True, high=MAX_CPUS)

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


def _footer_scan(fs, files: List[str]) -> Dict[str, Any]:
    """Rows per bucket, the bucket count, the last step and epoch of some log files, from their footers only (a
    file that is gone is counted in ``missing``)."""
    out: Dict[str, Any] = {"rows": 0, "max_step": 0, "max_epoch": 0, "num_buckets": None, "counts": None,
                           "first": None, "missing": 0, "missing_file": None}
    for path in files:
        name = fs.unstrip_protocol(path)
        try:
            meta = parquet_metadata(fs, path)
        except FileNotFoundError:
            out["missing"] += 1
            out["missing_file"] = out["missing_file"] or name
            continue
        index = bucket_index(meta, name)
        if out["num_buckets"] is None:
            out.update(num_buckets=index.num_buckets, counts=np.zeros(index.num_buckets, np.int64), first=name)
        elif index.num_buckets != out["num_buckets"]:
            raise InputError(f"{name}: written with {index.num_buckets} buckets, {out['first']} with "
                             f"{out['num_buckets']}")
        out["counts"] += index.counts()
        out["rows"] += meta.num_rows
        names = meta.schema.names
        for i in range(meta.num_row_groups):
            rg = meta.row_group(i)
            for key, col in (("max_step", "step"), ("max_epoch", "epoch")):
                if col in names:
                    stats = rg.column(names.index(col)).statistics
                    if stats is not None and stats.has_min_max:
                        out[key] = max(out[key], int(stats.max))
    return out


def _merge_scans(acc: Optional[Dict[str, Any]], s: Dict[str, Any]) -> Dict[str, Any]:
    if acc is None or acc["num_buckets"] is None:
        return s if acc is None else {**s, "missing": acc["missing"] + s["missing"],
                                      "missing_file": acc["missing_file"] or s["missing_file"]}
    if s["num_buckets"] is not None and s["num_buckets"] != acc["num_buckets"]:
        raise InputError(f"{s['first']}: written with {s['num_buckets']} buckets, {acc['first']} with "
                         f"{acc['num_buckets']}")
    return {**acc, "rows": acc["rows"] + s["rows"], "max_step": max(acc["max_step"], s["max_step"]),
            "max_epoch": max(acc["max_epoch"], s["max_epoch"]), "missing": acc["missing"] + s["missing"],
            "missing_file": acc["missing_file"] or s["missing_file"],
            "counts": acc["counts"] + s["counts"] if s["counts"] is not None else acc["counts"]}


# ------------------------------------------------------------------------------------------------ the plan


def plan_tasks(counts: np.ndarray, task_rows: int, target: int) -> List[Tuple[int, int, int, int]]:
    """Reduce tasks ``(lo, hi, part, parts)`` from the rows per bucket: contiguous bucket ranges of about
    ``target`` rows (``target <= task_rows``; a range closes before it would pass ``target``), and a bucket of more
    than ``task_rows`` rows split by uid into ``parts`` tasks of about ``task_rows`` each."""
    tasks: List[Tuple[int, int, int, int]] = []
    lo = hi = None
    acc = 0
    for b in np.flatnonzero(counts).tolist():
        n = int(counts[b])
        if lo is not None and (n > task_rows or acc + n > target):
            tasks.append((lo, hi, 0, 1))
            lo = None
        if n > task_rows:
            k = -(-n // task_rows)
            tasks += [(b, b + 1, j, k) for j in range(k)]
            continue
        if lo is None:
            lo, acc = b, 0
        hi, acc = b + 1, acc + n
    if lo is not None:
        tasks.append((lo, hi, 0, 1))
    return tasks


def _segment_groups(files: List[str], n: int) -> List[List[str]]:
    """The files cut into at most ``n`` groups of whole segments (every rank's file of a step range together, in
    rank order: each step's per-step sums come from one task, added in one order, whatever ``n``)."""
    runs: List[List[str]] = []
    for path in files:
        seg = segment_of(path)
        key = seg[:2] if seg is not None else path
        if runs and runs[-1][0] == key:
            runs[-1][1].append(path)
        else:
            runs.append((key, [path]))
    per = max(1, math.ceil(len(runs) / n))
    return [[p for _, paths in runs[i:i + per] for p in paths] for i in range(0, len(runs), per)]


# ------------------------------------------------------------------------------------------------ the stage


@dataclass
class _Log:
    fs: Any
    root: str
    files: List[str]  # every segment, in (first step, rank) order
    num_buckets: Optional[int] = None  # a train stage's (its config); None: a log given by path
    stage: Optional[str] = None
    score_rows: Optional[int] = None  # the rows its manifest counts


def _open_log(cfg: AggregateConfig, ctx: StageContext) -> _Log:
    """A train stage's log: the files its manifest lists (no listing); a log given by path: its folder's
    segments (one listing), the bucket count from their footers (each task checks its rows' buckets)."""
    name = ref_name(cfg.scores)
    if name is not None:
        stage = ctx.inputs[name]
        manifest = ModelManifest.read(stage)
        if manifest.score_rows is None:
            raise SpecError(f"scores: stage {name!r} has no score log")
        return _Log(stage.fs, stage.join(DIR), [stage.join(f) for f in log_files(manifest.files)],
                    int(manifest.config_dict["num_buckets"]), name, int(manifest.score_rows))
    fs, root = open_storage(cfg.scores.path, ctx.storage_options)
    return _Log(fs, root, list_parts(fs, root))


def _scan(ctx: StageContext, log: _Log, width: int) -> Dict[str, Any]:
    """The footers' figures, checked against the train stage's manifest."""
    per = max(1, math.ceil(len(log.files) / (4 * width)))
    scan = ctx.map(_footer_scan, [(log.fs, log.files[i:i + per]) for i in range(0, len(log.files), per)],
                   unit="footers", combine=_merge_scans)
    which = f"the score log of stage {log.stage!r}"
    if scan["missing"]:
        raise SpecError(f"scores: {which} is missing: {scan['missing']} file(s), e.g. {scan['missing_file']} (rerun "
                        f"that stage)")
    if log.num_buckets is not None and scan["num_buckets"] != log.num_buckets:
        raise SpecError(f"scores: {which} is written in {scan['num_buckets']} buckets, its stage's num_buckets is "
                        f"{log.num_buckets} (rerun that stage)")
    if log.score_rows is not None and scan["rows"] != log.score_rows:
        raise SpecError(f"scores: {which} holds {scan['rows']} rows, its manifest counts {log.score_rows} (rerun "
                        f"that stage)")
    return scan


def _columns(cfg: AggregateConfig, log: _Log) -> List[str]:
    """The log columns to read (the first file's schema says whether the log has losses)."""
    needed = cfg.log_columns(has_loss=False)  # loss is optional: mean_loss is NaN without it
    first = log.files[0]
    try:
        have = parquet_schema(log.fs, first).names
    except FileNotFoundError:
        return needed  # named by the footer scan
    missing = [c for c in needed if c not in have]
    if missing:
        raise SpecError(f"scores: {log.fs.unstrip_protocol(first)}: the score log has no column {missing[0]!r} "
                        f"(expected {', '.join(needed)})")
    return cfg.log_columns("loss" in have)


def run_aggregate(cfg: AggregateConfig, ctx: StageContext) -> Dict[str, Any]:
    import ray

    log = _open_log(cfg, ctx)
    fs, url = log.fs, log.fs.unstrip_protocol(log.root)
    if not log.files:
        raise SpecError(f"scores: no score-log files ({PATTERN}) under {url}")
    columns = _columns(cfg, log)
    width = max(1, int((cluster_cpus() or 1) // cfg.cpus_per_task))
    scan = _scan(ctx, log, width)
    counts, total, num_buckets = scan["counts"], scan["rows"], scan["num_buckets"]
    filt = LogFilter(cfg, scan["max_step"], scan["max_epoch"])
    fits = fit_steps(ctx, cfg, fs, _segment_groups(log.files, width), filt, scan["max_step"]) if cfg.fitted else {}
    # tasks from the log's size: a few per CPU, none over the rows budget (a larger bucket is split by uid)
    tasks = plan_tasks(counts, cfg.task_rows, max(1, min(cfg.task_rows, math.ceil(total / (4 * width)))))
    items = [{"lo": lo, "hi": hi, "part": part, "parts": parts} for lo, hi, part, parts in tasks]
    outputs = sum(1 if parts > 1 else int(np.count_nonzero(counts[lo:hi])) for lo, hi, part, parts in tasks)
    results = ctx.map_dataset(
        reduce_buckets, items, unit="buckets", total=outputs, rows="rows_in", num_cpus=cfg.cpus_per_task,
        fn_kwargs={"files_ref": ray.put(log.files), "fits_ref": ray.put(fits), "fs": fs, "num_buckets": num_buckets,
                   "out_fs": ctx.out.fs, "out_dir": ctx.out.join(""), "cfg": cfg, "filt": filt, "columns": columns,
                   "check": log.stage is None})
    results.sort(key=lambda r: (r["bucket"], r["part"]))
    rows_in = sum(r["rows_in"] for r in results)
    if rows_in != total:
        raise RuntimeError(f"{ctx.label}: read {rows_in} score rows, the footers count {total}")
    samples = sum(r["samples"] for r in results)
    kept = {name: sum(r[f"kept_{name}"] for r in results) for name in cfg.binarisers}
    frac = {name: (k / samples if samples else 0.0) for name, k in kept.items()}
    return UtilityManifest(
        rows_in=rows_in, rows_out=samples, files=[r["file"] for r in results],
        log=url, log_rows_used=sum(r["rows_used"] for r in results),
        steps=scan["max_step"], epochs=scan["max_epoch"] + 1,
        num_buckets=num_buckets, samples=samples,
        kept_fraction=frac, quality_estimate=frac[cfg.quality] if cfg.quality else None,
        quality={"binariser": cfg.quality, "min_vote": cfg.min_vote},
        mean_score=sum(r["score_sum"] for r in results) / samples if samples and "mean_score" in cfg.outputs
        else None,
        fitted_on=f"per-step binned summaries ({cfg.bins} bins) of {cfg.cluster_on}" if cfg.fitted else None,
        extra={"tasks": len(tasks)},
    ).to_json()
