"""The filter stage's tasks: each runs on Ray (:meth:`StageContext.map`), reading and writing small files under
the attempt's ``_work/`` so that no table of the pool's size ever reaches the driver (see :mod:`.stage`).

``_work/keys/p=<p>/g=<g>``: pool keys (and the rule's pool columns) of shard group ``g`` in partition ``p``;
``_work/joined/p=<p>``: a partition joined with its utility rows; ``_work/decisions/g=<g>/p=<p>``: keep / reason
per row, back to the shard groups; ``_work/subset/r=<r>/p=<p>``: kept uids by ``uid_hi`` range.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pyarrow as pa

from pipelines.formats import pool as fp
from pipelines.formats.score_log import buckets_of
from pipelines.run.errors import InputError
from pipelines.run.storage import read_parquet, write_parquet
from pipelines.stages.filter import keep_rule as kr

_HASH = np.uint64(0x9E3779B97F4A7C15)


def read_dir(fs, path: str, columns=None) -> Optional[pa.Table]:
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
    with np.errstate(over="ignore"):
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


@dataclass(frozen=True)
class JoinArgs:
    """What every partition's join shares: the filesystems, the columns, the ranked clauses and the sample rate."""

    fs: Any
    util_fs: Any  # None: no utility, the rule reads pool columns only
    util_cols: List[str]  # utility columns the rule reads
    rule_cols: List[str]  # every column the rule reads
    ranked: List[kr.Clause]
    apply_to: Tuple[str, ...]
    rate: float  # of the uid-hash sample that brackets each cut-off
    work: str
    seed: int = 0


def _join(args: JoinArgs, part: int, util_paths: Optional[List[str]]):
    """Join a partition's pool keys with its utility rows; write ``_work/joined/p=<p>``; return counts and samples."""
    import pandas as pd

    fs, util_fs, util_cols, rule_cols, work = args.fs, args.util_fs, args.util_cols, args.rule_cols, args.work
    keys = read_dir(fs, posixpath.join(work, "keys", f"p={part}"))
    left = keys.to_pandas() if keys is not None else pd.DataFrame({
        "uid_hi": np.zeros(0, np.uint64), "uid_lo": np.zeros(0, np.uint64), "split": np.zeros(0, object),
        "shard": np.zeros(0, np.int32), "row": np.zeros(0, np.int64), **{c: np.zeros(0) for c in rule_cols}})
    extra = 0
    if util_fs is not None:
        if util_paths:  # the bucket's parts (several for a bucket the aggregate split by uid)
            util = pa.concat_tables([read_parquet(util_fs, p, ["uid_hi", "uid_lo", *util_cols])
                                     for p in util_paths]).to_pandas()
        else:  # an empty bucket: nobody here was scored
            util = pd.DataFrame({"uid_hi": np.zeros(0, np.uint64), "uid_lo": np.zeros(0, np.uint64),
                                 **{c: np.zeros(0) for c in util_cols}})
        util["_scored"] = True
        left = left.drop(columns=[c for c in util_cols if c in left.columns])
        merged = left.merge(util, on=["uid_hi", "uid_lo"], how="left", sort=False)
        if len(merged) != len(left):
            raise InputError(f"partition {part}: a uid repeats in the utility or the pool")
        scored = merged["_scored"].eq(True).to_numpy()
        extra = int(len(util) - scored.sum())
        left = merged
    else:
        scored = np.ones(len(left), bool)
    n = len(left)
    in_scope = left["split"].isin(list(args.apply_to)).to_numpy() if n else np.zeros(0, bool)
    population = in_scope & scored
    cols = {"shard": left["shard"].to_numpy(np.int32), "row": left["row"].to_numpy(np.int64),
            "uid_hi": left["uid_hi"].to_numpy(np.uint64), "uid_lo": left["uid_lo"].to_numpy(np.uint64),
            "in_scope": in_scope, "scored": scored}
    for c in rule_cols:
        if c == kr.RANDOM and c not in left.columns:
            cols[f"v:{c}"] = uid_uniform(cols["uid_hi"], cols["uid_lo"], args.seed)
        else:
            cols[f"v:{c}"] = pd.to_numeric(left[c], errors="coerce").to_numpy(np.float64) if n else np.zeros(0)
    write_parquet(fs, posixpath.join(work, "joined", f"p={part}.parquet"), pa.table(cols))
    sample = _sampled(cols["uid_hi"], cols["uid_lo"], args.rate)
    out = {"rows": n, "in_scope": int(in_scope.sum()), "unscored": int((in_scope & ~scored).sum()),
           "not_in_pool": extra, "ranked": []}
    for clause in args.ranked:
        v = cols[f"v:{clause.column}"]
        ok = population & ~np.isnan(v)
        s = ok & sample
        out["ranked"].append((int(ok.sum()), kr.rank_key(clause, v[s]), cols["uid_hi"][s], cols["uid_lo"][s]))
    return out


def _bracket(fs, part: int, work: str, clause: kr.Clause, low, high, limit: int, rate: float = 0.0, salt: int = 0,
             most: int = 0):
    """``(before, inside, keys)``: rows of the population before ``low`` and in ``[low, high]`` (``None``:
    unbounded), and keys ``(key, uid_hi, uid_lo, every)`` of the inside rows: every one when there are at most
    ``limit`` (``every`` is then ``True``), else a uid-hash sample of them at ``rate`` (``salt``), at most ``most``
    of it (those with the smallest hashes: still a uniform sample)."""
    name = f"v:{clause.column}"
    t = read_parquet(fs, posixpath.join(work, "joined", f"p={part}.parquet"), ["uid_hi", "uid_lo", "in_scope",
                                                                               "scored", name])
    v = t[name].to_numpy()
    hi, lo = t["uid_hi"].to_numpy(), t["uid_lo"].to_numpy()
    ok = t["in_scope"].to_numpy() & t["scored"].to_numpy() & ~np.isnan(v)
    key = kr.rank_key(clause, v)
    before = ok & kr.key_lt(key, hi, lo, low) if low is not None else np.zeros(len(v), bool)
    at = np.flatnonzero(ok & ~before & (kr.key_le(key, hi, lo, high) if high is not None else True))
    count, every = len(at), len(at) <= limit
    if not every:
        u = uid_uniform(hi[at], lo[at], -salt - 1)
        at = at[u < rate]
        if len(at) > most:
            at = np.sort(at[np.argsort(u[u < rate], kind="stable")[:most]])
    return int(before.sum()), count, (key[at], hi[at], lo[at], every)


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
        t = read_dir(fs, posixpath.join(work, "decisions", f"g={group}"))
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
            tables.append(fp.with_reason(dropped, np.asarray(reasons, dtype=object)[reason[~keep]]))
    if tables:
        write_parquet(fs, out, pa.concat_tables(tables, promote_options="default"))
    return sum(t.num_rows for t in tables)


@dataclass(frozen=True)
class KeptArgs:
    """What every kept-shard task shares: where the decisions are, the pool's committed URL (``tar`` is resolved
    against it), the output directory, and whether images are copied (``reshard``) or pointed at."""

    fs: Any
    work: str
    group_of: np.ndarray  # pool shard -> its shard group (the decisions' layout)
    pool_url: str  # the pool stage's committed directory, as a URL
    out_dir: str
    has_tars: bool  # the pool's rows locate images in tars
    reshard: bool
    storage_options: Optional[Dict[str, Any]] = None


class _KeptSource:
    """The kept rows of one pool shard at a time (output shards are cut in pool order: each source is read once)."""

    def __init__(self, args: KeptArgs) -> None:
        self.args, self.shard, self.rows, self.decisions = args, None, None, None

    def get(self, shard: int, path: str) -> pa.Table:
        if shard != self.shard:
            group = int(self.args.group_of[shard])
            if self.decisions is None or self.decisions[0] != group:
                self.decisions = (group, Decisions(self.args.fs, self.args.work, group))
            rows, keep, _ = self.decisions[1].of(shard)
            self.shard, self.rows = shard, read_parquet(self.args.fs, path).take(rows[keep])
        return self.rows


def _write_kept(args: KeptArgs, jobs: List[Tuple[int, int, int]], sources):
    """Output shards ``jobs`` = ``(shard j, first, last)`` (global kept indices); ``sources`` the pool shards with
    their global offsets.  Rewrites ``shard`` / ``key``; ``tar`` becomes the full URL of the image's tar (an index:
    nothing copied), or, with ``reshard``, the images and captions are copied into the shard's own tar by ranged
    reads and ``tar`` / ``image*`` / ``text_offset`` / ``text_size`` point there."""
    import pyarrow.compute as pc

    source = _KeptSource(args)
    written = []
    for j, first, last in jobs:
        pieces = []
        for shard, path, start, count in sources:
            lo, hi = max(first, start), min(last, start + count)
            if lo < hi:
                pieces.append(source.get(shard, path).slice(lo - start, hi - lo))
        t = pa.concat_tables(pieces, promote_options="default")
        keys = [f"{i:09d}" for i in range(first, last)]
        where = None
        if args.has_tars:
            tars = fp.tar_urls(args.pool_url, pc.cast(t["tar"], pa.string()))
            t = t.set_column(t.column_names.index("tar"), "tar", tars)
            if args.reshard:
                where = fp.copy_samples(args.fs, t, keys, posixpath.join(args.out_dir, fp.shard_tar(j)),
                                        args.storage_options)
                written.append(fp.shard_tar(j))
        write_parquet(args.fs, posixpath.join(args.out_dir, fp.shard_parquet(j)), fp.reshard(t, j, keys, where))
        written.append(fp.shard_parquet(j))
    return written
