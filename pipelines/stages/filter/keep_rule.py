"""The filter stage's keep rule: thresholds and exact top / bottom fractions on columns, combined with
``and`` / ``or`` / ``minus``.

YAML forms (``keep:`` in a filter stage)::

    {column: clip_b32_similarity_score, top: 0.3}          # a clause: one of min, max, top, bottom
    {mean_score: {min: 0.1, max: 2}}                       # shorthand: column -> clauses (all must hold)
    {and: [rule, rule, ...]}   {or: [rule, rule, ...]}   {minus: [rule, rule]}

``min`` / ``max`` are inclusive thresholds.  ``top: f`` keeps the ``round(f * n)`` rows with the largest values of
the ``n`` rows in the filter's population that have a value (``bottom``: the smallest), ranked over the whole pool
with ties broken by uid (ascending), so the count is exact and the result deterministic.  A row without a value
(null or NaN) never satisfies a clause.  Every fraction is over the whole population: in
``{minus: [{clip: {top: 0.3}}, {mean_score: {bottom: 0.2}}]}`` both fractions count every row.

The virtual column ``random`` (unless the pool or the utility has a column of that name) is uniform in [0, 1) per
uid, from the filter's ``seed``: ``{random: {top: 0.7}}`` keeps a random 70%, the baseline a utility's top 70% is
compared with.

Evaluation returns, per row, whether it is kept and else the reason: the clause that dropped it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Tuple, Union

import numpy as np

from pipelines.run.config import SpecError

OPS = ("min", "max", "top", "bottom")
RANDOM = "random"
COMBINATORS = ("and", "or", "minus")


@dataclass(frozen=True)
class Clause:
    column: str
    op: str
    value: float
    where: str  # the field path, for errors

    @property
    def ranked(self) -> bool:
        return self.op in ("top", "bottom")

    @property
    def label(self) -> str:
        if self.ranked:
            return f"{self.column} {self.op} {self.value * 100:g}%"
        return f"{self.column} {'>=' if self.op == 'min' else '<='} {self.value:g}"


@dataclass(frozen=True)
class Node:
    op: str
    children: Tuple["Rule", ...]

    @property
    def label(self) -> str:
        return "(" + f" {self.op} ".join(c.label for c in self.children) + ")"


Rule = Union[Clause, Node]


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SpecError(f"{where}: expected a number, got {value!r}")
    return float(value)


def _clause(column: Any, op: str, value: Any, where: str) -> Clause:
    if not isinstance(column, str) or not column:
        raise SpecError(f"{where}: expected a column name, got {column!r}")
    v = _number(value, f"{where}.{op}")
    if op in ("top", "bottom") and not 0 < v <= 1:
        raise SpecError(f"{where}.{op}: a fraction must be in (0, 1], got {value!r}")
    return Clause(column, op, v, where)


def parse_rule(value: Any, where: str = "keep") -> Rule:
    if not isinstance(value, dict) or not value:
        raise SpecError(f"{where}: expected a rule (a mapping: a column clause, and, or, minus), got {value!r}")
    if len(value) == 1 and next(iter(value)) in COMBINATORS:
        op, items = next(iter(value.items()))
        if not isinstance(items, list) or len(items) < 2 or (op == "minus" and len(items) != 2):
            want = "two rules: [kept, removed]" if op == "minus" else "a list of at least two rules"
            raise SpecError(f"{where}.{op}: expected {want}, got {items!r}")
        return Node(op, tuple(parse_rule(item, f"{where}.{op}[{i}]") for i, item in enumerate(items)))
    if "column" in value:
        ops = [k for k in value if k != "column"]
        bad = [k for k in ops if k not in OPS]
        if bad or len(ops) != 1:
            raise SpecError(f"{where}: a clause has 'column' and exactly one of {', '.join(OPS)}, got "
                            f"{', '.join(sorted(value))}")
        return _clause(value["column"], ops[0], value[ops[0]], where)
    if len(value) == 1:  # shorthand {column: {op: value, ...}}
        column, ops = next(iter(value.items()))
        sub = f"{where}.{column}"
        if not isinstance(ops, dict) or not ops or any(k not in OPS for k in ops):
            raise SpecError(f"{sub}: expected clauses ({', '.join(OPS)}), got {ops!r}")
        clauses = tuple(_clause(column, op, v, sub) for op, v in ops.items())
        return clauses[0] if len(clauses) == 1 else Node("and", clauses)
    raise SpecError(f"{where}: unknown rule keys {', '.join(sorted(map(str, value)))} (expected one of column, "
                    f"{', '.join(COMBINATORS)}, or a single column name)")


def clauses(rule: Rule) -> List[Clause]:
    if isinstance(rule, Clause):
        return [rule]
    return [c for child in rule.children for c in clauses(child)]


def columns(rule: Rule) -> List[str]:
    return list(dict.fromkeys(c.column for c in clauses(rule)))


def reasons(rule: Rule) -> List[str]:
    """Every reason evaluation can give, in a fixed order (rejects store an index into it)."""
    out: List[str] = []

    def walk(r: Rule) -> None:
        if isinstance(r, Clause):
            out.append(f"not {r.label}")
            return
        for child in r.children:
            walk(child)
        if r.op == "or":
            out.append(f"none of {r.label}")
        if r.op == "minus":
            out.append(f"removed by {r.children[1].label}")

    walk(rule)
    return list(dict.fromkeys(out))


def evaluate(rule: Rule, holds: Dict[Clause, np.ndarray], n: int) -> Tuple[np.ndarray, np.ndarray]:
    """``(keep, reason)`` per row: ``reason`` indexes :func:`reasons` (``-1`` where kept).  ``holds`` gives each
    clause's truth per row (computed by the caller: thresholds directly, ranked clauses from their cutoffs)."""
    table = {r: i for i, r in enumerate(reasons(rule))}

    def ev(r: Rule):
        if isinstance(r, Clause):
            ok = holds[r]
            return ok, np.where(ok, -1, table[f"not {r.label}"]).astype(np.int32)
        results = [ev(c) for c in r.children]
        if r.op == "and":
            keep = np.logical_and.reduce([k for k, _ in results])
            reason = np.full(n, -1, np.int32)
            for k, why in reversed(results):  # the first failing child names the reason
                reason = np.where(k, reason, why)
            return keep, np.where(keep, -1, reason)
        if r.op == "or":
            keep = np.logical_or.reduce([k for k, _ in results])
            return keep, np.where(keep, -1, table[f"none of {r.label}"]).astype(np.int32)
        (a, why_a), (b, _) = results  # minus
        keep = a & ~b
        return keep, np.where(keep, -1, np.where(~a, why_a, table[f"removed by {r.children[1].label}"])).astype(np.int32)

    return ev(rule)


def clause_holds(clause: Clause, values: np.ndarray, uid_hi: np.ndarray, uid_lo: np.ndarray, cutoff) -> np.ndarray:
    """Whether each row satisfies a clause; ranked clauses need their ``cutoff`` key (see :func:`rank_key`)."""
    v = np.asarray(values, dtype=np.float64)
    has = ~np.isnan(v)
    if clause.op == "min":
        return has & (v >= clause.value)
    if clause.op == "max":
        return has & (v <= clause.value)
    if cutoff is None:  # nobody (k = 0)
        return np.zeros(len(v), bool)
    key = rank_key(clause, v)
    return has & key_le(key, uid_hi, uid_lo, cutoff)


def rank_key(clause: Clause, values: np.ndarray) -> np.ndarray:
    """The value as ranked: ascending order of ``(key, uid_hi, uid_lo)`` is the clause's order of preference."""
    v = np.asarray(values, dtype=np.float64)
    return -v if clause.op == "top" else v


def key_le(key, hi, lo, cutoff) -> np.ndarray:
    """``(key, hi, lo) <= cutoff`` lexicographically, vectorised."""
    ck, chi, clo = cutoff
    return (key < ck) | ((key == ck) & ((hi < chi) | ((hi == chi) & (lo <= clo))))


def key_lt(key, hi, lo, cutoff) -> np.ndarray:
    ck, chi, clo = cutoff
    return (key < ck) | ((key == ck) & ((hi < chi) | ((hi == chi) & (lo < clo))))
