"""The report's figures, computed from committed stages' tables and manifests (no plotting here).

- ``loss_steps_ratio``: the first step at which Grad-Mimic's held-out loss reaches vanilla's final one (linear
  interpolation between evaluations), over vanilla's steps; ``None`` if it never does;
- ``detection``: how well the utilities flag the samples the pool marks ``corrupted``: the ROC AUC of
  ``mean_score`` (a low score flags) and per binariser precision / recall / F1 of the samples it does not keep
  (vote below ``min_vote``);
- ``label_noise``: classifiers trained on noisy pools (the paper's Table 1: final test accuracy, mean and spread
  over seeds, per mode and label-noise rate, the best mode per rate) and classifiers trained plainly on a filter
  stage whose rule is one ``top`` clause (the data-efficiency curve: accuracy vs the kept fraction per ranking
  column, a utility column vs the filter's virtual ``random``).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import numpy as np

Runs = Dict[str, Dict[float, List[float]]]  # group (a mode, a ranking column) -> x (noise rate, kept fraction) -> accs


def loss_steps_ratio(vanilla, mimic) -> Optional[float]:
    """First (interpolated) step where mimic's held-out loss reaches vanilla's final one, over vanilla's steps."""
    v = vanilla[vanilla["test_loss"].notna()]
    g = mimic[mimic["test_loss"].notna()]
    if not len(v) or not len(g):
        return None
    target, total = float(v["test_loss"].iloc[-1]), float(v["step"].iloc[-1])
    steps, losses = g["step"].to_numpy(float), g["test_loss"].to_numpy(float)
    for i in range(len(steps)):
        if losses[i] <= target:
            if i == 0:
                return steps[0] / total
            s0, s1, l0, l1 = steps[i - 1], steps[i], losses[i - 1], losses[i]
            return (s0 + (s1 - s0) * (l0 - target) / (l0 - l1)) / total
    return None


def detection(util_pool, binarisers: List[str], min_vote: float) -> Dict[str, Any]:
    """Corrupted-sample detection from the utilities (positive class: corrupted); ``_roc`` is the curve to plot."""
    from sklearn.metrics import roc_auc_score, roc_curve

    bad = util_pool["corrupted"].to_numpy(bool)
    out: Dict[str, Any] = {}
    if bad.any() and (~bad).any():
        out["detection_auroc"] = float(roc_auc_score(bad, -util_pool["mean_score"]))
        fpr, tpr, _ = roc_curve(bad, -util_pool["mean_score"])
        out["_roc"] = (fpr, tpr)
    for b in binarisers:
        flagged = util_pool[f"vote_{b}"].to_numpy() < min_vote
        tp = int((flagged & bad).sum())
        p = tp / flagged.sum() if flagged.sum() else 0.0
        r = tp / bad.sum() if bad.sum() else 0.0
        out[f"precision_{b}"], out[f"recall_{b}"] = p, r
        out[f"f1_{b}"] = 2 * p * r / (p + r) if p + r else 0.0
    return out


def spread(values: List[float]) -> Dict[str, Any]:
    """Mean, sample standard deviation (0 for one value), count and the values."""
    a = np.asarray(values, float)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0, "n": int(len(a)),
            "values": [float(v) for v in a]}


def classify_runs(stages: Dict[str, Dict[str, Any]]) -> Tuple[Runs, Runs]:
    """Final test accuracies of the committed classify runs on the training split: ``(by mode and label-noise rate
    of an ingest stage, by ranking column and kept fraction of a one-``top``-clause filter stage)``."""
    from pipelines.stages.filter.keep_rule import Clause, parse_rule

    table: Runs = {}
    curve: Runs = {}
    for s in stages.values():
        cfg, acc = s["config"], (s["manifest"].get("final") or {}).get("test_accuracy")
        if s["stage"] != "train" or cfg.get("task") != "classify" or cfg.get("split", "train") != "train" \
                or acc is None or cfg.get("data") not in stages:
            continue
        data = stages[cfg["data"]]
        if data["stage"] == "ingest":
            noise = data["config"].get("noise") or {}
            rate = float(noise.get("rate", 0.0)) if noise.get("kind") == "label" else 0.0
            table.setdefault(cfg.get("mode", "plain"), {}).setdefault(rate, []).append(acc)
        elif data["stage"] == "filter" and cfg.get("mode", "plain") == "plain":
            rule = parse_rule(data["config"].get("keep"))
            if isinstance(rule, Clause) and rule.op == "top":
                curve.setdefault(rule.column, {}).setdefault(rule.value, []).append(acc)
    return table, curve


def label_noise(stages: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """Table 1 and the data-efficiency curve from the committed classify runs (see the module docstring)."""
    table, curve = classify_runs(stages)
    out: Dict[str, Any] = {}
    if table:
        rates = sorted({r for by in table.values() for r in by})
        out["label_noise_accuracy"] = {m: {f"{r:g}": spread(v) for r, v in sorted(by.items())}
                                       for m, by in table.items()}
        best = {f"{r:g}": max((m for m in table if r in table[m]), key=lambda m: np.mean(table[m][r]))
                for r in rates}
        out["label_noise_best_mode"] = best
        if "mimic" in table and len(table) > 1:
            out["mimic_best_at_every_noise"] = all(b == "mimic" for r, b in best.items() if float(r) > 0)
    if curve:
        out["data_efficiency"] = {c: {f"{p:g}": spread(v) for p, v in sorted(by.items())} for c, by in curve.items()}
        if "random" in curve and len(curve) > 1:
            rnd = curve["random"]
            wins = {c: all(np.mean(by[p]) > np.mean(rnd[p]) for p in by if p in rnd)
                    for c, by in curve.items() if c != "random" and any(p in rnd for p in by)}
            out["utility_top_beats_random_at_every_p"] = wins
    return out
