"""``filter``: join utilities with the pool by uid, evaluate a keep rule (:mod:`.keep_rule`), write the filtered
dataset.

Output, under the stage directory (the sample-shard contract of :mod:`pipelines.formats.pool`, so a train stage,
evaluate and the report read it as they read an ingest): the kept rows in parquet shards, resharded to
``shard_size`` in pool order, every pool column carried (``key``, ``shard`` rewritten).  By default these shards
are an **index**: no image is copied and each row's ``tar`` is the full URL of the tar that already holds its image
(:func:`~pipelines.formats.pool.tar_urls` against the pool stage's committed directory: the pool's own tars, or
the source tars of a pool indexed in place), its byte ranges unchanged.  With ``reshard: true`` the kept images and
captions are copied by ranged reads (on the run's ``storage_options``) into ``shards/shard-NNNNN.tar``, DataComp's
resharder, and ``tar`` / ``image*`` / ``text_offset`` / ``text_size`` point there.  Also: every dropped row with its
pool columns and ``reason`` (the clause that dropped it, or ``unscored``); and the subset file: the kept uids of the
filtered splits as DataComp's resharder reads them.

Only rows of the ``apply_to`` splits are filtered; the others (the held-out test split) pass through, counted.
The manifest records that kept + rejected = pool rows, and the uids on either side of the join that have no
partner: pool rows never scored (``unscored: keep | drop | error``) and utility rows not in the pool.

**At scale, without a driver-side table.**  Pool keys are partitioned like the utility (``uid_lo % n``, the score
log's buckets) by one task per group of shards, joined per partition (one task each), and the decisions go back
to the pool's shard groups through small files under the attempt's ``_work/`` (:mod:`.tasks`).  A ``top`` /
``bottom`` fraction is an exact rank over the whole population: a deterministic uid-hash sample brackets the
cut-off, passes over the partitions count the rows before and inside the bracket (narrowing it with fresh
uid-hash samples of it while it holds more than ``4 x sample_rows`` rows) and collect the keys inside once it
holds no more, and the driver picks the exact row (:func:`_cutoff`).  The subset file is written range by range
of ``uid_hi``.
"""

from __future__ import annotations

import math
import posixpath
from dataclasses import dataclass
from typing import Any, Dict, List, Literal, Optional, Tuple

import numpy as np

from pipelines.formats import pool as fp
from pipelines.formats.manifest import DatasetManifest, FilterManifest, UtilityManifest
from pipelines.formats.utility import bucket_files
from pipelines.run.config import MAX_BATCH, MAX_CPUS, MAX_SEED, SpecError, doc, require
from pipelines.run.context import StageContext, cluster_cpus
from pipelines.run.storage import parquet_schema
from pipelines.stages.filter import keep_rule as kr
from pipelines.stages.filter.tasks import (
    JoinArgs,
    KeptArgs,
    _bracket,
    _decide,
    _join,
    _partition_keys,
    _write_kept,
    _write_rejects,
    read_dir,
)

UNSCORED = "unscored"
BRACKET_CAP = 4  # a cut-off's bracket brings at most this many times sample_rows keys to the driver
MAX_PASSES = 1000  # a safety net: each pass narrows the bracket (a few do at any realistic size)


@dataclass(frozen=True)
class FilterConfig:
    data: str = doc("the dataset stage (ingest or filter) to filter", ref="dataset")
    keep: Any = doc("the keep rule: {column: c, top|bottom|min|max: v}, {c: {min: v}}, {and|or|minus: [rules]}")
    utility: Optional[str] = doc("an aggregate stage whose columns the rule may use (joined by uid)", default=None,
                                 ref="utility")
    unscored: Literal["keep", "drop", "error"] = doc(
        "pool rows of the filtered splits without a utility row (and utility rows not in the pool): keep or drop "
        "them, or stop with an error", default="error")
    apply_to: Tuple[Literal["train", "test"], ...] = doc("splits filtered; other rows pass through", default=("train",))
    shard_size: int = doc("kept samples per output shard", default=1000)
    rows_per_task: int = doc("pool rows per task", default=1_000_000)
    sample_rows: int = doc("uid-hash sample size that brackets each top / bottom cut-off; a bracket brings at most "
                           f"{BRACKET_CAP} x this many keys to the driver (else a fresh sample narrows it)",
                           default=200_000)
    reshard: bool = doc("copy the kept samples' images and captions into webdataset tars of the stage's own, one "
                        "per output shard (by ranged reads: DataComp's resharder); default: the output is an index "
                        "whose tar column points at the images where they are, nothing copied", default=False)
    cpus_per_task: float = doc("CPUs per task", default=1.0)
    seed: int = doc("seed of the rule's virtual column random (uniform in [0, 1) per uid): {random: {top: 0.7}} "
                    "keeps a random 70%, the baseline for a utility's top 70%", default=0)

    def validate(self) -> None:
        kr.parse_rule(self.keep)
        if not self.apply_to:
            raise SpecError("apply_to: give at least one split")
        require(self, "shard_size", 1, high=MAX_BATCH)
        require(self, "rows_per_task", 1, high=1 << 30)
        require(self, "sample_rows", 1, high=1 << 28)
        require(self, "cpus_per_task", 0, strict=True, high=MAX_CPUS)
        require(self, "seed", 0, high=MAX_SEED)

    @property
    def rule(self) -> kr.Rule:
        return kr.parse_rule(self.keep)


# ------------------------------------------------------------------------------------------------ the plan


@dataclass(frozen=True)
class Plan:
    """What every phase reads: the pool's shards and their groups (one task each), the utility's buckets, the
    partitions of the join, and which of the rule's columns come from where."""

    fs: Any  # the pool's filesystem (the output's too)
    pool: Any  # the pool's StageDir
    manifest: DatasetManifest
    shard_paths: List[str]
    pool_cols: set
    util_stage: Any  # None: no utility
    util_paths: Dict[int, List[str]]  # a bucket's utility parts
    util_cols: set
    from_util: List[str]
    from_pool: List[str]
    parts: int
    groups: List[List[int]]
    group_of: np.ndarray
    work: str

    def shard_jobs(self, members: List[int]) -> List[Tuple[int, str]]:
        return [(s, self.shard_paths[s]) for s in members]


def _plan(cfg: FilterConfig, ctx: StageContext) -> Plan:
    rule = cfg.rule
    pool = ctx.inputs[cfg.data]
    pm = DatasetManifest.read(pool)
    fs = pool.fs
    shard_files = sorted(fp.shard_parquets(pm.files))
    if not shard_files:
        raise SpecError(f"data: stage {cfg.data!r} has no rows")
    shard_paths = [pool.join(f) for f in shard_files]
    pool_cols = set(parquet_schema(fs, shard_paths[0]).names)
    util_cols: set = set()
    util_paths: Dict[int, List[str]] = {}
    parts = None
    util_stage = ctx.inputs[cfg.utility] if cfg.utility else None
    if util_stage is not None:
        um = UtilityManifest.read(util_stage)
        parts = int(um.num_buckets)
        util_paths = {b: [util_stage.join(f) for f in fs_] for b, fs_ in bucket_files(um.files).items()}
        util_cols = set(parquet_schema(util_stage.fs, next(iter(util_paths.values()))[0]).names)
        util_cols -= {"uid", "uid_hi", "uid_lo"}
    for c in kr.columns(rule):
        if c not in pool_cols and c not in util_cols and c != kr.RANDOM:
            where = f"the pool (stage {cfg.data!r})" + (f" nor the utility (stage {cfg.utility!r})" if util_stage else "")
            raise SpecError(f"keep: no column {c!r} in {where}; the pool has {', '.join(sorted(pool_cols))}")
    if cfg.reshard and "tar" not in pool_cols:
        raise SpecError(f"reshard: the pool (stage {cfg.data!r}) has no images in tars to copy")
    rule_cols = kr.columns(rule)
    rows_total = int(pm.rows_out or 0) or len(shard_files)
    groups = _shard_groups(shard_files, rows_total / len(shard_files), cfg.rows_per_task)
    group_of = np.zeros(len(shard_files), np.int64)
    for g, members in enumerate(groups):
        group_of[members] = g
    return Plan(fs, pool, pm, shard_paths, pool_cols, util_stage, util_paths, util_cols,
                from_util=[c for c in rule_cols if c in util_cols],
                from_pool=[c for c in rule_cols if c not in util_cols and (c != kr.RANDOM or c in pool_cols)],
                parts=parts if parts is not None else max(1, math.ceil(rows_total / cfg.rows_per_task)),
                groups=groups, group_of=group_of, work=ctx.out.join("_work"))


def _shard_groups(shard_files: List[str], rows_per_shard: float, rows_per_task: int) -> List[List[int]]:
    per = max(1, int(rows_per_task // max(rows_per_shard, 1)))
    return [list(range(i, min(i + per, len(shard_files)))) for i in range(0, len(shard_files), per)]


# ------------------------------------------------------------------------------------------------ the phases


def _partition(ctx: StageContext, plan: Plan) -> np.ndarray:
    """Pool keys split by partition, one task per shard group; returns the rows of every pool shard."""
    counts = ctx.map(_partition_keys, [(plan.fs, plan.shard_jobs(members), g, plan.parts, plan.from_pool, plan.work)
                                       for g, members in enumerate(plan.groups)], unit="key groups")
    rows_per_shard = np.zeros(len(plan.shard_paths), np.int64)
    for c in counts:
        for s, n in c.items():
            rows_per_shard[s] = n
    return rows_per_shard


def _joins(cfg: FilterConfig, ctx: StageContext, plan: Plan, args: JoinArgs) -> List[Dict[str, Any]]:
    """Every partition joined with its utility rows; refuses rows without a partner unless ``unscored`` says."""
    joined = ctx.map(_join, [(args, p, plan.util_paths.get(p)) for p in range(plan.parts)], unit="joins")
    unscored_rows = sum(j["unscored"] for j in joined)
    not_in_pool = sum(j["not_in_pool"] for j in joined)
    if plan.util_stage is not None and cfg.unscored == "error" and (unscored_rows or not_in_pool):
        raise SpecError(f"unscored: {unscored_rows} rows of the pool's {'/'.join(cfg.apply_to)} split have no utility "
                        f"row in stage {cfg.utility!r} and {not_in_pool} utility rows are not in the pool; set "
                        f"unscored: keep or drop")
    return joined


@dataclass(frozen=True)
class Bracket:
    """Keys ``[low, high]`` (``None``: unbounded) known to hold the cut-off: ``before`` rows of the population come
    before ``low``, ``inside`` are in it."""

    low: Any
    high: Any
    before: int
    inside: int


def _sorted_keys(parts) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(key, uid_hi, uid_lo)`` pieces concatenated and sorted in the clause's order."""
    keys, his, los = (np.concatenate([p[i] for p in parts]) if parts else np.zeros(0) for i in range(3))
    order = np.lexsort((los, his, keys))
    return keys[order], his[order], los[order]


class _Search:
    """The passes over the joined partitions that find one clause's exact ``k``-th key, bringing at most ``cap``
    keys to the driver in any pass (:func:`_cutoff`); counts the passes and the most keys held."""

    def __init__(self, ctx: StageContext, plan: "Plan", clause: kr.Clause, k: int, cap: int) -> None:
        self.ctx, self.plan, self.clause, self.k, self.cap = ctx, plan, clause, k, cap
        self.passes, self.most_keys = 0, 0

    def run(self, low, high, limit: int, rate: float = 0.0, salt: int = 0):
        """One pass: ``(before, inside, keys, every)`` over every partition (``every``: the keys are all the
        inside rows'); with a ``rate``, a sample of at most ``cap`` keys (``max(cap, parts)``: one per task)."""
        plan = self.plan
        most = max(1, self.cap // plan.parts)
        got = self.ctx.map(_bracket, [(plan.fs, p, plan.work, self.clause, low, high, limit, rate, salt, most)
                                      for p in range(plan.parts)], unit=f"{self.clause.label} pass")
        self.passes += 1
        keys = _sorted_keys([g[2] for g in got])
        self.most_keys = max(self.most_keys, len(keys[0]))
        return sum(g[0] for g in got), sum(g[1] for g in got), keys, all(g[2][3] for g in got)

    def pick(self, before: int, keys) -> Tuple[Any, Any, Any]:
        i = self.k - before - 1
        return keys[0][i], keys[1][i], keys[2][i]

    def narrow(self, bracket: Bracket, keys):
        """One counting pass that cuts ``bracket`` at two of ``keys`` (a uid-hash sample of its rows) either side of
        where the cut-off should be: ``(the piece that holds it, exact)``, ``exact`` the piece's keys when the middle
        one holds it and its keys all came back, else ``None``."""
        s, rank = len(keys[0]), self.k - bracket.before
        if not s:
            return bracket, None
        p = rank / bracket.inside
        q = p * s
        margin = 4 * math.sqrt(max(q * (1 - p), 1.0)) + 2
        a = min(max(int(q - margin), 0), s - 1)
        b = min(max(int(math.ceil(q + margin)), a), s - 1)
        low, high = (keys[0][a], keys[1][a], keys[2][a]), (keys[0][b], keys[1][b], keys[2][b])
        before, inside, got, every = self.run(low, high, self.cap // self.plan.parts)
        if self.k <= before:  # before low: [bracket.low, low] (low itself is a row of it)
            return Bracket(bracket.low, low, bracket.before, before - bracket.before + 1), None
        if self.k > before + inside:  # after high: [high, bracket.high]
            end = bracket.before + bracket.inside
            return Bracket(high, bracket.high, before + inside - 1, end - (before + inside - 1)), None
        return Bracket(low, high, before, inside), (got if every else None)


def _cutoff(ctx: StageContext, plan: "Plan", clause: kr.Clause, n: int, k: int, sample, rate: float, cap: int):
    """``(key, stats)``: the exact ``k``-th key (1-based) of the clause's order among ``n`` rows, and how it was
    found.  A bracket known to hold it starts as everything; while it holds more than ``cap`` rows, a pass counts
    the rows before and inside two keys of a uid-hash sample of it (first the join's, then a fresh one restricted to
    it) around the expected rank, and the piece holding the ``k``-th row becomes the bracket (each task sends the
    middle piece's keys with its counts when it has at most its share of ``cap``); once the bracket holds at most
    ``cap`` rows their keys come to the driver and the pick is exact.  No pass brings more than about ``cap`` keys
    to the driver."""
    search = _Search(ctx, plan, clause, k, cap)
    keys = _sorted_keys(sample)
    if rate >= 1:  # the sample is the whole population
        return search.pick(0, keys), {"passes": 0, "driver_keys": len(keys[0])}
    bracket, salt = Bracket(None, None, 0, n), 0
    for _ in range(MAX_PASSES):
        if bracket.inside <= cap:
            before, _, exact, _ = search.run(bracket.low, bracket.high, cap)
            return search.pick(before, exact), {"passes": search.passes, "driver_keys": search.most_keys}
        bracket, exact = search.narrow(bracket, keys)
        if exact is not None:
            return search.pick(bracket.before, exact), {"passes": search.passes, "driver_keys": search.most_keys}
        if bracket.inside > cap:  # a fresh sample of the bracket: about cap / 2 keys, at most cap
            salt += 1
            keys = search.run(bracket.low, bracket.high, 0, cap / 2 / bracket.inside, salt)[2]
    raise RuntimeError(f"no cut-off found for {clause.label} in {MAX_PASSES} passes")


def _cutoffs(ctx: StageContext, plan: Plan, ranked: List[kr.Clause], joined, rate: float, cap: int):
    """``(cutoffs, clause_stats)``: each ranked clause's exact cut-off key, and its population, kept count and
    cut-off value for the manifest."""
    cutoffs, clause_stats = {}, {}
    for i, clause in enumerate(ranked):
        n = sum(j["ranked"][i][0] for j in joined)
        k = int(math.floor(clause.value * n + 0.5))
        cut, found = None, {}
        if k > 0:
            cut, found = _cutoff(ctx, plan, clause, n, k, [j["ranked"][i][1:] for j in joined], rate, cap)
            cutoffs[clause] = cut
        value = None if cut is None else float(-cut[0] if clause.op == "top" else cut[0])
        clause_stats[clause.label] = {"population": n, "kept": k, "cutoff_value": value, **found}
    return cutoffs, clause_stats


def _decisions(cfg: FilterConfig, ctx: StageContext, plan: Plan, cutoffs, joined):
    """Keep / reason per row, one task per partition; ``bits``: the subset's ``uid_hi`` ranges (``2**bits``)."""
    kept_in_scope_est = sum(j["in_scope"] for j in joined)
    bits = min(8, max(0, math.ceil(math.log2(max(kept_in_scope_est, 1) / 4_000_000)))) if kept_in_scope_est else 0
    return ctx.map(_decide, [(plan.fs, p, plan.work, cfg.rule, cutoffs, cfg.unscored, len(plan.shard_paths),
                              plan.group_of, bits) for p in range(plan.parts)], unit="decisions")


def _rejects(ctx: StageContext, plan: Plan, reasons: List[str], rejected: int) -> List[str]:
    """The dropped rows with their reasons, one file per shard group that dropped any."""
    jobs = [(plan.fs, plan.work, g, plan.shard_jobs(members), reasons, ctx.out.join(fp.rejected_part(g)))
            for g, members in enumerate(plan.groups)]
    written = ctx.map(_write_rejects, jobs, unit="reject groups")
    if sum(written) != rejected:
        raise RuntimeError(f"{ctx.label}: wrote {sum(written)} rejected rows, decided {rejected}")
    return [fp.rejected_part(g) for g, n in enumerate(written) if n]


def _kept(cfg: FilterConfig, ctx: StageContext, plan: Plan, kept_per_shard: np.ndarray) -> Tuple[List[str], int]:
    """The kept rows resharded to ``shard_size``, a task per group of output shards; ``(files, shards)``."""
    kept = int(kept_per_shard.sum())
    offsets = np.concatenate([[0], np.cumsum(kept_per_shard)])
    sources = [(s, plan.shard_paths[s], int(offsets[s]), int(kept_per_shard[s])) for s in range(len(plan.shard_paths))]
    jobs = [(j, first, min(first + cfg.shard_size, kept)) for j, first in enumerate(range(0, kept, cfg.shard_size))]
    per_task = max(1, min(cfg.rows_per_task // cfg.shard_size, math.ceil(len(jobs) / _width(cfg))))
    args = KeptArgs(plan.fs, plan.work, plan.group_of, plan.fs.unstrip_protocol(plan.pool.join("")),
                    ctx.out.join(""), "tar" in plan.pool_cols, cfg.reshard, dict(ctx.storage_options))
    tasks = []
    for i in range(0, len(jobs), per_task):
        mine = jobs[i:i + per_task]
        lo, hi = mine[0][1], mine[-1][2]
        # the pool shards whose kept rows overlap [lo, hi): a run found by binary search, not a scan per task
        a, b = np.searchsorted(offsets[1:], lo, side="right"), np.searchsorted(offsets[:-1], hi, side="left")
        tasks.append((args, mine, [src for src in sources[a:b] if src[3]]))
    files: List[str] = []
    rows = [sum(j[2] - j[1] for j in t[1]) for t in tasks]
    for w in ctx.map(_write_kept, tasks, unit="output shard groups", rows=rows):
        files += w
    return files, len(jobs)


def _width(cfg: FilterConfig) -> int:
    """How many tasks the cluster runs at once (output shards are spread over at least that many; the files
    written do not depend on it)."""
    return max(1, int((cluster_cpus() or 1) // cfg.cpus_per_task))


def _write_subset(fs, work: str, sizes: np.ndarray, path: str) -> None:
    """Kept uids as a sorted ``"u8,u8"`` .npy, streamed one ``uid_hi`` range at a time (``sizes``: rows per range)."""
    def ranges():
        for r in np.flatnonzero(sizes):
            t = read_dir(fs, posixpath.join(work, "subset", f"r={r}"))
            hi, lo = t["uid_hi"].to_numpy(), t["uid_lo"].to_numpy()
            if len(hi) != sizes[r]:
                raise RuntimeError(f"subset range {r}: {len(hi)} uids, decided {sizes[r]}")
            yield hi, lo

    fp.write_subset(fs, path, int(sizes.sum()), ranges())


# ------------------------------------------------------------------------------------------------ the stage


def run_filter(cfg: FilterConfig, ctx: StageContext) -> Dict[str, Any]:
    rule = cfg.rule
    plan = _plan(cfg, ctx)
    rows_per_shard = _partition(ctx, plan)
    pool_rows = int(rows_per_shard.sum())
    ranked = [c for c in kr.clauses(rule) if c.ranked]
    rate = min(1.0, cfg.sample_rows / max(pool_rows, 1))
    args = JoinArgs(plan.fs, plan.util_stage.fs if plan.util_stage else None, plan.from_util, kr.columns(rule),
                    ranked, tuple(cfg.apply_to), rate, plan.work, cfg.seed)
    joined = _joins(cfg, ctx, plan, args)
    cutoffs, clause_stats = _cutoffs(ctx, plan, ranked, joined, rate, BRACKET_CAP * cfg.sample_rows)
    decided = _decisions(cfg, ctx, plan, cutoffs, joined)
    kept_per_shard = np.sum([d["kept_per_shard"] for d in decided], axis=0)
    reason_counts = np.sum([d["reasons"] for d in decided], axis=0)
    reasons = kr.reasons(rule) + [UNSCORED]
    rejected = int(reason_counts.sum())
    kept = int(kept_per_shard.sum())
    files = _rejects(ctx, plan, reasons, rejected)
    kept_files, shards = _kept(cfg, ctx, plan, kept_per_shard)
    files += kept_files
    _write_subset(plan.fs, plan.work, np.sum([d["subset_ranges"] for d in decided], axis=0), ctx.out.join(fp.SUBSET))
    files.append(fp.SUBSET)
    plan.fs.rm(plan.work, recursive=True)
    kept_in_scope = sum(d["kept_in_scope"] for d in decided)
    in_scope = sum(j["in_scope"] for j in joined)
    pm = plan.manifest
    return FilterManifest(
        rows_in=pool_rows, rows_out=kept, rejected=rejected, files=files,
        conserved=pool_rows == kept + rejected,
        kept_in_scope=kept_in_scope, in_scope=in_scope, passed_through=sum(d["passed"] for d in decided),
        kept_fraction=kept_in_scope / in_scope if in_scope else 0.0,
        reasons={reasons[i]: int(n) for i, n in enumerate(reason_counts) if n},
        unscored={"pool_rows": sum(j["unscored"] for j in joined),
                  "utility_rows_not_in_pool": sum(j["not_in_pool"] for j in joined), "policy": cfg.unscored},
        clauses=clause_stats, rule=rule.label, shards=shards,
        class_names=pm.class_names, templates=pm.caption_templates(), features=pm.features,  # carried with its rows
    ).to_json()
