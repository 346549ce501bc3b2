"""``filter``: join utilities with the pool by uid, evaluate a keep rule (:mod:`.keep_rule`), write the filtered
dataset.

Output, under the stage directory (the same sample-shard contract as ``ingest``, so a train stage can read it):

- ``shards/shard-NNNNN.parquet`` (+ ``.tar`` when the pool has images in tars): the kept rows, resharded to
  ``shard_size`` in pool order, every pool column carried (``key``, ``shard``, ``tar``, ``image*`` rewritten);
- ``rejected/part-NNNNN.parquet``: every dropped row with its pool columns and ``reason`` (the clause that dropped
  it, or ``unscored``);
- ``subset.npy``: the kept uids of the filtered splits as DataComp's resharder reads them (sorted ``"u8,u8"``).

Only rows of the ``apply_to`` splits are filtered; the others (the held-out test split) pass through, counted.
The manifest records that kept + rejected = pool rows, and the uids on either side of the join that have no
partner: pool rows never scored (``unscored: keep | drop | error``) and utility rows not in the pool.

**At scale, without a driver-side table.**  Pool keys are partitioned like the utility (``uid_lo % n``, the score
log's buckets) by one task per group of shards, joined per partition (one task each), and the decisions go back
to the pool's shard groups through small files under the attempt's ``_work/``.  A ``top`` / ``bottom`` fraction is
an exact rank over the whole population: a deterministic uid-hash sample brackets the cut-off, one more pass
counts the rows before the bracket and collects the few inside it, and the driver picks the exact row (if the
bracket missed, it widens and repeats).  The subset file is written range by range of ``uid_hi``.
"""

from __future__ import annotations

import io
import math
import posixpath
from dataclasses import dataclass
from typing import Any, Dict, List, Literal, Optional, Tuple

import numpy as np
import pyarrow as pa

from ..config import SpecError, doc, require
from ..score_log import buckets_of
from ..storage import parquet_schema, read_parquet, write_file, write_parquet
from . import keep_rule as kr

UNSCORED = "unscored"
SUBSET = "subset.npy"
_HASH = np.uint64(0x9E3779B97F4A7C15)


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
    sample_rows: int = doc("uid-hash sample size that brackets each top / bottom cut-off", default=200_000)
    cpus_per_task: float = doc("CPUs per task", default=1.0)
    seed: int = doc("seed of the rule's virtual column random (uniform in [0, 1) per uid): {random: {top: 0.7}} "
                    "keeps a random 70%, the baseline for a utility's top 70%", default=0)

    def validate(self) -> None:
        kr.parse_rule(self.keep)
        if not self.apply_to:
            raise SpecError("apply_to: give at least one split")
        require(self, "shard_size rows_per_task sample_rows", 1)
        require(self, "cpus_per_task", 0, strict=True)

    @property
    def rule(self) -> kr.Rule:
        return kr.parse_rule(self.keep)


# ------------------------------------------------------------------------------------------------ files


def _read_dir(fs, path: str, columns=None) -> Optional[pa.Table]:
    """Every parquet file under ``path`` as one table (``None`` if there is none): one listing, no probing."""
    try:
        found = sorted(p for p in fs.find(path) if p.endswith(".parquet"))
    except FileNotFoundError:
        found = []
    tables = [read_parquet(fs, p, columns) for p in found]
    return pa.concat_tables(tables) if tables else None


def uid_uniform(hi: np.ndarray, lo: np.ndarray, seed: int) -> np.ndarray:
    """A uniform number in [0, 1) per uid, a deterministic function of the uid and the seed (the virtual
    ``random`` column): the two halves and the seed mixed, then splitmix64's finaliser."""
    with np.errstate(over="ignore"):
        h = hi ^ (lo * _HASH) ^ (np.uint64(seed & (2**64 - 1)) * np.uint64(0xD1B54A32D192ED03))
        h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        h = h ^ (h >> np.uint64(31))
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def _sampled(hi: np.ndarray, lo: np.ndarray, rate: float) -> np.ndarray:
    """A deterministic uid-hash Bernoulli sample."""
    if rate >= 1:
        return np.ones(len(hi), bool)
    h = (hi ^ (lo * _HASH)) * _HASH
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53) < rate


# ------------------------------------------------------------------------------------------------ phases


def _partition_keys(fs, shards: List[Tuple[int, str]], group: int, parts: int, pool_cols: List[str], work: str):
    """Pool keys of a group of shards, split by ``uid_lo % parts`` into ``_work/keys/p=<p>/g=<group>``."""
    tables, rows = [], {}
    for shard, path in shards:
        t = read_parquet(fs, path, ["uid_hi", "uid_lo", "split", *pool_cols])
        rows[shard] = t.num_rows
        t = t.append_column("shard", pa.array(np.full(t.num_rows, shard, np.int32)))
        tables.append(t.append_column("row", pa.array(np.arange(t.num_rows, dtype=np.int64))))
    t = pa.concat_tables(tables)
    p = buckets_of(t["uid_lo"].to_numpy(), parts)
    order = np.argsort(p, kind="stable")
    bounds = np.searchsorted(p[order], np.arange(parts + 1))
    for q in range(parts):
        if bounds[q + 1] > bounds[q]:
            write_parquet(fs, posixpath.join(work, "keys", f"p={q}", f"g={group}.parquet"),
                          t.take(order[bounds[q]:bounds[q + 1]]))
    return rows


def _join(fs, part: int, util_fs, util_path: Optional[str], util_cols: List[str], rule_cols: List[str],
          ranked: List[kr.Clause], apply_to: Tuple[str, ...], rate: float, work: str, seed: int = 0):
    """Join a partition's pool keys with its utility rows; write ``_work/joined/p=<p>``; return counts and samples."""
    import pandas as pd

    keys = _read_dir(fs, posixpath.join(work, "keys", f"p={part}"))
    left = keys.to_pandas() if keys is not None else pd.DataFrame({
        "uid_hi": np.zeros(0, np.uint64), "uid_lo": np.zeros(0, np.uint64), "split": np.zeros(0, object),
        "shard": np.zeros(0, np.int32), "row": np.zeros(0, np.int64), **{c: np.zeros(0) for c in rule_cols}})
    extra = 0
    if util_fs is not None:
        if util_path is not None:
            util = read_parquet(util_fs, util_path, ["uid_hi", "uid_lo", *util_cols]).to_pandas()
        else:  # an empty bucket: nobody here was scored
            util = pd.DataFrame({"uid_hi": np.zeros(0, np.uint64), "uid_lo": np.zeros(0, np.uint64),
                                 **{c: np.zeros(0) for c in util_cols}})
        util["_scored"] = True
        left = left.drop(columns=[c for c in util_cols if c in left.columns])
        merged = left.merge(util, on=["uid_hi", "uid_lo"], how="left", sort=False)
        if len(merged) != len(left):
            raise ValueError(f"partition {part}: a uid repeats in the utility or the pool")
        scored = merged["_scored"].eq(True).to_numpy()
        extra = int(len(util) - scored.sum())
        left = merged
    else:
        scored = np.ones(len(left), bool)
    n = len(left)
    in_scope = left["split"].isin(list(apply_to)).to_numpy() if n else np.zeros(0, bool)
    population = in_scope & scored
    cols = {"shard": left["shard"].to_numpy(np.int32), "row": left["row"].to_numpy(np.int64),
            "uid_hi": left["uid_hi"].to_numpy(np.uint64), "uid_lo": left["uid_lo"].to_numpy(np.uint64),
            "in_scope": in_scope, "scored": scored}
    for c in rule_cols:
        if c == kr.RANDOM and c not in left.columns:
            cols[f"v:{c}"] = uid_uniform(cols["uid_hi"], cols["uid_lo"], seed)
        else:
            cols[f"v:{c}"] = pd.to_numeric(left[c], errors="coerce").to_numpy(np.float64) if n else np.zeros(0)
    write_parquet(fs, posixpath.join(work, "joined", f"p={part}.parquet"), pa.table(cols))
    sample = _sampled(cols["uid_hi"], cols["uid_lo"], rate)
    out = {"rows": n, "in_scope": int(in_scope.sum()), "unscored": int((in_scope & ~scored).sum()),
           "not_in_pool": extra, "ranked": []}
    for clause in ranked:
        v = cols[f"v:{clause.column}"]
        ok = population & ~np.isnan(v)
        s = ok & sample
        out["ranked"].append((int(ok.sum()), kr.rank_key(clause, v[s]), cols["uid_hi"][s], cols["uid_lo"][s]))
    return out


def _bracket(fs, part: int, work: str, clause: kr.Clause, low, high):
    """Rows of the population before ``low``, and the keys in ``[low, high]`` (``None``: unbounded)."""
    t = read_parquet(fs, posixpath.join(work, "joined", f"p={part}.parquet"))
    v = t[f"v:{clause.column}"].to_numpy()
    hi, lo = t["uid_hi"].to_numpy(), t["uid_lo"].to_numpy()
    ok = t["in_scope"].to_numpy() & t["scored"].to_numpy() & ~np.isnan(v)
    key = kr.rank_key(clause, v)
    before = ok & kr.key_lt(key, hi, lo, low) if low is not None else np.zeros(len(v), bool)
    inside = ok & ~before & (kr.key_le(key, hi, lo, high) if high is not None else True)
    return int(before.sum()), key[inside], hi[inside], lo[inside]


def _decide(fs, part: int, work: str, rule: kr.Rule, cutoffs: Dict[kr.Clause, Any], unscored: str,
            num_shards: int, group_of: np.ndarray, ranges_bits: int):
    """Keep / reason per row of a partition; decisions to ``_work/decisions/g=<g>/p=<p>``, kept uids of the
    filtered splits to ``_work/subset/r=<r>/p=<p>``."""
    t = read_parquet(fs, posixpath.join(work, "joined", f"p={part}.parquet"))
    n = t.num_rows
    hi, lo = t["uid_hi"].to_numpy(), t["uid_lo"].to_numpy()
    in_scope, scored = t["in_scope"].to_numpy(), t["scored"].to_numpy()
    holds = {c: kr.clause_holds(c, t[f"v:{c.column}"].to_numpy(), hi, lo, cutoffs.get(c)) for c in kr.clauses(rule)}
    keep, reason = kr.evaluate(rule, holds, n)
    table = kr.reasons(rule)
    unscored_id = len(table)
    rows_unscored = in_scope & ~scored
    keep = np.where(~in_scope, True, np.where(rows_unscored, unscored == "keep", keep))
    reason = np.where(keep, -1, np.where(rows_unscored, unscored_id, reason)).astype(np.int32)
    shard = t["shard"].to_numpy()
    group = group_of[shard]
    for g in np.unique(group):
        sel = group == g
        write_parquet(fs, posixpath.join(work, "decisions", f"g={g}", f"p={part}.parquet"), pa.table({
            "shard": shard[sel], "row": t["row"].to_numpy()[sel], "keep": keep[sel], "reason": reason[sel]}))
    chosen = keep & in_scope
    r = (hi[chosen] >> np.uint64(64 - ranges_bits)).astype(np.int64) if ranges_bits else np.zeros(chosen.sum(), int)
    for q in np.unique(r):
        sel = r == q
        write_parquet(fs, posixpath.join(work, "subset", f"r={q}", f"p={part}.parquet"),
                      pa.table({"uid_hi": hi[chosen][sel], "uid_lo": lo[chosen][sel]}))
    return {"kept_per_shard": np.bincount(shard[keep], minlength=num_shards),
            "subset_ranges": np.bincount(r, minlength=1 << ranges_bits),
            "reasons": np.bincount(reason[~keep], minlength=unscored_id + 1),
            "passed": int((~in_scope).sum()), "kept_in_scope": int(chosen.sum())}


class Decisions:
    """A shard group's decisions, sorted by ``(shard, row)``: each shard's slice by binary search."""

    def __init__(self, fs, work: str, group: int) -> None:
        t = _read_dir(fs, posixpath.join(work, "decisions", f"g={group}"))
        cols = {c: (t[c].to_numpy() if t is not None else np.zeros(0)) for c in ("shard", "row", "keep", "reason")}
        order = np.lexsort((cols["row"], cols["shard"]))
        self.cols = {c: v[order] for c, v in cols.items()}

    def of(self, shard: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(row, keep, reason)`` of one shard, in row order."""
        a, b = np.searchsorted(self.cols["shard"], [shard, shard + 1])
        return self.cols["row"][a:b], self.cols["keep"][a:b].astype(bool), self.cols["reason"][a:b]


def _write_rejects(fs, work: str, group: int, shards: List[Tuple[int, str]], reasons: List[str],
                   out: str):
    d = Decisions(fs, work, group)
    tables = []
    for shard, path in shards:
        rows, keep, reason = d.of(shard)
        if (~keep).any():
            dropped = read_parquet(fs, path).take(rows[~keep])
            why = np.asarray(reasons, dtype=object)[reason[~keep]]
            tables.append(dropped.append_column("reason", pa.array(why, pa.string())))
    if tables:
        write_parquet(fs, out, pa.concat_tables(tables, promote_options="default"))
    return sum(t.num_rows for t in tables)


def _kept_rows(fs, work: str, shard: int, path: str, group: int, cache: dict) -> pa.Table:
    if group not in cache:
        cache.clear()
        cache[group] = Decisions(fs, work, group)
    rows, keep, _ = cache[group].of(shard)
    return read_parquet(fs, path).take(rows[keep])


def _write_kept(fs, work: str, jobs: List[Tuple[int, int, int]], sources, group_of, base: str,
                out_dir: str, has_tars: bool):
    """Output shards ``jobs`` = ``(shard j, first, last)`` (global kept indices); ``sources`` the pool shards with
    their global offsets.  Rewrites shard / key / tar / image columns; copies images by ranged reads."""
    from .ingest import shard_tar, tar_records

    cache: dict = {}
    written = []
    for j, first, last in jobs:
        pieces = []
        for shard, path, start, count in sources:
            lo, hi = max(first, start), min(last, start + count)
            if lo < hi:
                rows = _kept_rows(fs, work, shard, path, int(group_of[shard]), cache)
                pieces.append(rows.slice(lo - start, hi - lo))
        t = pa.concat_tables(pieces, promote_options="default")
        keys = [f"{i:09d}" for i in range(first, last)]
        t = t.set_column(t.column_names.index("shard"), "shard", pa.array(np.full(t.num_rows, j, np.int32)))
        t = t.set_column(t.column_names.index("key"), "key", pa.array(keys, pa.string()))
        rel_tar = shard_tar(j)
        if has_tars:
            tars = [posixpath.join(base, x) for x in t["tar"].to_pylist()]
            starts = t["image_offset"].to_numpy()
            images = fs.cat_ranges(tars, list(starts), list(starts + t["image_size"].to_numpy()))
            exts = [posixpath.splitext(m)[1].lstrip(".") for m in t["image"].to_pylist()]
            data, index = tar_records(list(zip(keys, exts, images, t["text"].to_pylist(), t["uid"].to_pylist())))
            write_file(fs, posixpath.join(out_dir, rel_tar), data)
            where = [index[k] for k in keys]
            for name, values, tp in (("tar", [rel_tar] * t.num_rows, pa.string()),
                                     ("image", [w[0] for w in where], pa.string()),
                                     ("image_offset", [w[1] for w in where], pa.int64()),
                                     ("image_size", [w[2] for w in where], pa.int64())):
                t = t.set_column(t.column_names.index(name), name, pa.array(values, tp))
            written.append(rel_tar)
        rel = f"shards/shard-{j:05d}.parquet"
        write_parquet(fs, posixpath.join(out_dir, rel), t)
        written.append(rel)
    return written


# ------------------------------------------------------------------------------------------------ the stage


def _cutoff(ctx, fs, work: str, parts: int, clause: kr.Clause, n: int, k: int, sample, rate: float):
    """The exact ``k``-th key (1-based) of the clause's order among ``n`` rows, from the sample and bracket
    passes."""
    keys, his, los = (np.concatenate([s[i] for s in sample]) for i in range(3))
    order = np.lexsort((los, his, keys))
    keys, his, los = keys[order], his[order], los[order]
    if rate >= 1:  # the sample is the whole population
        return keys[k - 1], his[k - 1], los[k - 1]
    s = len(keys)
    q = k / n * s
    margin = 4 * math.sqrt(max(q * (1 - k / n), 1.0)) + 8
    for attempt in range(3):
        a, b = int(q - margin), int(math.ceil(q + margin))
        low = (keys[a], his[a], los[a]) if a >= 0 and attempt < 2 else None
        high = (keys[b], his[b], los[b]) if b < s and attempt < 2 else None
        got = ctx.map(_bracket, [(fs, p, work, clause, low, high) for p in range(parts)], unit=f"{clause.label} pass")
        before = sum(g[0] for g in got)
        inside = [np.concatenate([g[i] for g in got]) for i in (1, 2, 3)]
        if before < k <= before + len(inside[0]):
            o = np.lexsort((inside[2], inside[1], inside[0]))
            i = o[k - before - 1]
            return inside[0][i], inside[1][i], inside[2][i]
        margin *= 8
    raise RuntimeError(f"no cut-off found for {clause.label}")  # unreachable: the last pass is unbounded


def _shard_groups(shard_files: List[str], rows_per_shard: float, rows_per_task: int) -> List[List[int]]:
    per = max(1, int(rows_per_task // max(rows_per_shard, 1)))
    return [list(range(i, min(i + per, len(shard_files)))) for i in range(0, len(shard_files), per)]


def run_filter(cfg: FilterConfig, ctx) -> Dict[str, Any]:
    rule = cfg.rule
    pool = ctx.inputs[cfg.data]
    pm = pool.manifest()
    fs = pool.fs
    shard_files = sorted(f for f in pm["files"] if f.startswith("shards/") and f.endswith(".parquet"))
    if not shard_files:
        raise SpecError(f"data: stage {cfg.data!r} has no rows")
    shard_paths = [pool.join(f) for f in shard_files]
    pool_cols = set(parquet_schema(fs, shard_paths[0]).names)
    util_cols: set = set()
    util_paths: Dict[int, str] = {}
    parts = None
    util_stage = ctx.inputs[cfg.utility] if cfg.utility else None
    if util_stage is not None:
        um = util_stage.manifest()
        parts = int(um["num_buckets"])
        for f in um["files"]:
            b = int(f.split("bucket=")[1].split("/")[0])
            util_paths[b] = util_stage.join(f)
        util_cols = set(parquet_schema(util_stage.fs, next(iter(util_paths.values()))).names)
        util_cols -= {"uid", "uid_hi", "uid_lo"}
    for c in kr.columns(rule):
        if c not in pool_cols and c not in util_cols and c != kr.RANDOM:
            where = f"the pool (stage {cfg.data!r})" + (f" nor the utility (stage {cfg.utility!r})" if util_stage else "")
            raise SpecError(f"keep: no column {c!r} in {where}; the pool has {', '.join(sorted(pool_cols))}")
    rule_cols = kr.columns(rule)
    from_util = [c for c in rule_cols if c in util_cols]
    from_pool = [c for c in rule_cols if c not in util_cols and (c != kr.RANDOM or c in pool_cols)]
    rows_total = int(pm.get("rows_out", 0)) or len(shard_files)
    if parts is None:
        parts = max(1, math.ceil(rows_total / cfg.rows_per_task))
    groups = _shard_groups(shard_files, rows_total / len(shard_files), cfg.rows_per_task)
    group_of = np.zeros(len(shard_files), np.int64)
    for g, members in enumerate(groups):
        group_of[members] = g
    work = ctx.out.join("_work")
    out_dir = ctx.out.join("")

    counts = ctx.map(_partition_keys, [(fs, [(s, shard_paths[s]) for s in members], g, parts, from_pool, work)
                                       for g, members in enumerate(groups)], unit="key groups")
    rows_per_shard = np.zeros(len(shard_files), np.int64)
    for c in counts:
        for s, n in c.items():
            rows_per_shard[s] = n
    pool_rows = int(rows_per_shard.sum())
    ranked = [c for c in kr.clauses(rule) if c.ranked]
    rate = min(1.0, cfg.sample_rows / max(pool_rows, 1))
    joined = ctx.map(_join, [(fs, p, util_stage.fs if util_stage else None, util_paths.get(p),
                              from_util, rule_cols, ranked, tuple(cfg.apply_to), rate, work, cfg.seed)
                             for p in range(parts)], unit="joins")
    unscored_rows = sum(j["unscored"] for j in joined)
    not_in_pool = sum(j["not_in_pool"] for j in joined)
    if util_stage is not None and cfg.unscored == "error" and (unscored_rows or not_in_pool):
        raise SpecError(f"unscored: {unscored_rows} rows of the pool's {'/'.join(cfg.apply_to)} split have no utility "
                        f"row in stage {cfg.utility!r} and {not_in_pool} utility rows are not in the pool; set "
                        f"unscored: keep or drop")
    cutoffs, clause_stats = {}, {}
    for i, clause in enumerate(ranked):
        n = sum(j["ranked"][i][0] for j in joined)
        k = int(math.floor(clause.value * n + 0.5))
        cut = None
        if k > 0:
            cut = _cutoff(ctx, fs, work, parts, clause, n, k, [j["ranked"][i][1:] for j in joined], rate)
            cutoffs[clause] = cut
        value = None if cut is None else float(-cut[0] if clause.op == "top" else cut[0])
        clause_stats[clause.label] = {"population": n, "kept": k, "cutoff_value": value}

    kept_in_scope_est = sum(j["in_scope"] for j in joined)
    bits = min(8, max(0, math.ceil(math.log2(max(kept_in_scope_est, 1) / 4_000_000)))) if kept_in_scope_est else 0
    decided = ctx.map(_decide, [(fs, p, work, rule, cutoffs, cfg.unscored, len(shard_files), group_of, bits)
                                for p in range(parts)], unit="decisions")
    kept_per_shard = np.sum([d["kept_per_shard"] for d in decided], axis=0)
    reason_counts = np.sum([d["reasons"] for d in decided], axis=0)
    reasons = kr.reasons(rule) + [UNSCORED]
    rejected = int(reason_counts.sum())
    kept = int(kept_per_shard.sum())

    files: List[str] = []
    reject_jobs = [(fs, work, g, [(s, shard_paths[s]) for s in members], reasons,
                    ctx.out.join(f"rejected/part-{g:05d}.parquet")) for g, members in enumerate(groups)]
    written_rejects = ctx.map(_write_rejects, reject_jobs, unit="reject groups")
    files += [f"rejected/part-{g:05d}.parquet" for g, n in enumerate(written_rejects) if n]
    if sum(written_rejects) != rejected:
        raise RuntimeError(f"{ctx.label}: wrote {sum(written_rejects)} rejected rows, decided {rejected}")

    offsets = np.concatenate([[0], np.cumsum(kept_per_shard)])
    sources = [(s, shard_paths[s], int(offsets[s]), int(kept_per_shard[s])) for s in range(len(shard_files))]
    jobs = [(j, first, min(first + cfg.shard_size, kept)) for j, first in enumerate(range(0, kept, cfg.shard_size))]
    per_task = max(1, cfg.rows_per_task // cfg.shard_size)
    tasks = []
    for i in range(0, len(jobs), per_task):
        mine = jobs[i:i + per_task]
        lo, hi = mine[0][1], mine[-1][2]
        srcs = [src for src in sources if src[3] and src[2] < hi and src[2] + src[3] > lo]
        tasks.append((fs, work, mine, srcs, group_of, pool.join(""), out_dir, "tar" in pool_cols))
    for w in ctx.map(_write_kept, tasks, unit="output shard groups", rows=[sum(j[2] - j[1] for j in t[2]) for t in tasks]):
        files += w

    _write_subset(fs, work, np.sum([d["subset_ranges"] for d in decided], axis=0), ctx.out.join(SUBSET))
    files.append(SUBSET)
    fs.rm(work, recursive=True)
    kept_in_scope = sum(d["kept_in_scope"] for d in decided)
    in_scope = sum(j["in_scope"] for j in joined)
    return {
        "rows_in": pool_rows, "rows_out": kept, "rejected": rejected, "files": files,
        "conserved": pool_rows == kept + rejected,
        "kept_in_scope": kept_in_scope, "in_scope": in_scope, "passed_through": sum(d["passed"] for d in decided),
        "kept_fraction": kept_in_scope / in_scope if in_scope else 0.0,
        "reasons": {reasons[i]: int(n) for i, n in enumerate(reason_counts) if n},
        "unscored": {"pool_rows": unscored_rows, "utility_rows_not_in_pool": not_in_pool, "policy": cfg.unscored},
        "clauses": clause_stats, "rule": rule.label, "shards": len(jobs),
        "class_names": pm.get("class_names"), "templates": pm.get("templates") or
        (pm.get("config", {}).get("source") or {}).get("templates"),
    }


def _write_subset(fs, work: str, sizes: np.ndarray, path: str) -> None:
    """Kept uids as a sorted ``"u8,u8"`` .npy, streamed one ``uid_hi`` range at a time (``sizes``: rows per range)."""
    dtype = np.dtype("u8,u8")
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (int(sizes.sum()),)}
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    with fs.open(path, "wb") as f:
        f.write(buf.getvalue())
        for r in np.flatnonzero(sizes):
            t = _read_dir(fs, posixpath.join(work, "subset", f"r={r}"))
            hi, lo = t["uid_hi"].to_numpy(), t["uid_lo"].to_numpy()
            if len(hi) != sizes[r]:
                raise RuntimeError(f"subset range {r}: {len(hi)} uids, decided {sizes[r]}")
            order = np.lexsort((lo, hi))
            arr = np.empty(len(hi), dtype)
            arr["f0"], arr["f1"] = hi[order], lo[order]
            f.write(arr.tobytes())


def read_subset(fs, path: str) -> np.ndarray:
    with fs.open(path, "rb") as f:
        return np.load(io.BytesIO(f.read()))

