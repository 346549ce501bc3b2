"""The run report: ``<run>/report/report.json`` and a self-contained ``report.html`` (plots as embedded PNG).

Built from a run's committed stages only (``gradmimic report RUN_DIR``, local or ``s3://``; ``gradmimic run`` writes
it at the end of a run that evaluates).  Roles are read from the resolved spec: ``mimic`` is the first train stage
with ``mode: mimic``; ``vanilla`` a plain train stage on the same data with the same initialisation; ``filtered``
a train stage on a filter stage's output; ``utility`` the aggregate of the mimic run; each evaluate stage is
matched to its model.  Sections appear when their stages exist:

- learning curves (held-out loss and accuracy vs step) of vanilla, Grad-Mimic and the filtered run, and the mimic
  run's ``alignment`` (cosine of the batch's update direction with the task vector);
- where the pool records injected noise (``corrupted``): score histograms of clean vs corrupted samples, the
  detection ROC of ``mean_score`` (a low score flags a corrupted sample), and per binariser precision / recall /
  F1 for flagging the samples it does not keep (vote below ``min_vote``);
- the quality estimate (the aggregate's binariser, named) next to the true clean fraction;
- the evaluations side by side (filtered vs unfiltered); a gallery of the highest- and lowest-scored samples.

``steps_to_vanilla_final_loss_ratio``: the first step at which Grad-Mimic's held-out loss reaches vanilla's final
one (linear interpolation between evaluations), over vanilla's steps; ``null`` if it never does.
"""

from __future__ import annotations

import base64
import html
import io
import json
import posixpath
from typing import Any, Dict, List, Optional

import numpy as np
import yaml

from .storage import StageDir, open_storage, write_file

REPORT_DIR = "report"


def _stages(fs, run: str) -> Dict[str, Dict[str, Any]]:
    """``name -> {stage, config, dir, manifest}`` for the committed stages of the resolved spec, in order."""
    with fs.open(posixpath.join(run, "spec.resolved.yaml"), "rb") as f:
        spec = yaml.safe_load(f.read())
    out = {}
    for st in spec["stages"]:
        d = StageDir(fs, posixpath.join(run, st["name"]))
        m = d.manifest()
        if m is not None:
            out[st["name"]] = {"stage": st["stage"], "config": m.get("config", {}), "dir": d, "manifest": m}
    return out


def roles(stages: Dict[str, Dict[str, Any]]) -> Dict[str, str]:
    trains = {n: s for n, s in stages.items() if s["stage"] == "train"}
    out: Dict[str, str] = {}
    mimic = next((n for n, s in trains.items() if s["config"].get("mode") == "mimic"), None)
    if mimic:
        out["mimic"] = mimic
        mc = trains[mimic]["config"]
        vanilla = next((n for n, s in trains.items() if s["config"].get("mode") == "plain"
                        and s["config"].get("data") == mc.get("data") and s["config"].get("init") == mc.get("init")
                        and s["config"].get("split", "train") == mc.get("split", "train")), None)
        if vanilla:
            out["vanilla"] = vanilla
        util = next((n for n, s in stages.items() if s["stage"] == "aggregate" and s["config"].get("scores") == mimic),
                    None)
        if util:
            out["utility"] = util
    filters = {n for n, s in stages.items() if s["stage"] == "filter"}
    filtered = next((n for n, s in trains.items() if s["config"].get("data") in filters), None)
    if filtered:
        out["filtered"] = filtered
        out["filter"] = trains[filtered]["config"]["data"]
    return out


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _curves(stages, names: Dict[str, str]):
    import matplotlib.pyplot as plt
    import pandas as pd

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for label, name in names.items():
        m = stages[name]["dir"].read_table("metrics.parquet").to_pandas()
        ev = m[m["test_loss"].notna()] if "test_loss" in m else pd.DataFrame()
        if len(ev):
            axes[0].plot(ev["step"], ev["test_loss"], marker="o", ms=3, label=f"{label} ({name})")
            if "test_accuracy" in ev:
                axes[1].plot(ev["step"], ev["test_accuracy"], marker="o", ms=3, label=f"{label} ({name})")
        if label == "Grad-Mimic" and "alignment" in m:
            axes[2].plot(m["step"], m["alignment"], lw=1, label="alignment (mimic)")
    for ax, title in zip(axes, ("held-out loss", "held-out (zero-shot) accuracy", "alignment with the task vector")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    return _png(fig)


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
    """Corrupted-sample detection from the utilities (positive class: corrupted)."""
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


def _detection_plots(util_pool, det) -> str:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    bad = util_pool["corrupted"].to_numpy(bool)
    s = util_pool["mean_score"].to_numpy()
    bins = np.linspace(np.nanmin(s), np.nanmax(s), 40)
    axes[0].hist(s[~bad], bins=bins, alpha=0.6, label="clean")
    axes[0].hist(s[bad], bins=bins, alpha=0.6, label="corrupted")
    axes[0].set_title("mean mimic score")
    axes[0].legend(fontsize=7)
    if "_roc" in det:
        fpr, tpr = det["_roc"]
        axes[1].plot(fpr, tpr, label=f"AUROC {det['detection_auroc']:.3f}")
        axes[1].plot([0, 1], [0, 1], ls=":", c="grey")
        axes[1].set_xlabel("false positive rate")
        axes[1].set_ylabel("true positive rate")
        axes[1].set_title("detecting corrupted samples")
        axes[1].legend(fontsize=7)
    return _png(fig)


def _gallery(rows, storage_options) -> str:
    """Image cells for pool rows (``tar`` a full URL, as :func:`read_pool` gives it): one ranged read each."""
    cells = []
    for r in rows.itertuples():
        fs, tar = open_storage(r.tar, storage_options)
        data = fs.cat_file(tar, start=int(r.image_offset), end=int(r.image_offset) + int(r.image_size))
        mime = "image/png" if r.image.endswith(".png") else "image/jpeg"
        flag = " (corrupted)" if getattr(r, "corrupted", False) else ""
        cells.append(f'<figure><img src="data:{mime};base64,{base64.b64encode(data).decode()}" width="64" '
                     f'height="64"><figcaption>{html.escape(r.text)}<br>score {r.mean_score:.3g}{flag}'
                     f'</figcaption></figure>')
    return "".join(cells)


def build_report(run_url: str, storage_options: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Write ``<run>/report/report.json`` and ``report.html``; returns the report's figures."""
    import matplotlib

    matplotlib.use("Agg")

    fs, run = open_storage(run_url, storage_options)
    stages = _stages(fs, run)
    if not stages:
        raise FileNotFoundError(f"{run_url}: no committed stages (is it a run directory with spec.resolved.yaml?)")
    role = roles(stages)
    report: Dict[str, Any] = {"run": fs.unstrip_protocol(run), "roles": role}
    figures: Dict[str, str] = {}
    evals = {s["config"].get("model"): s["manifest"].get("metrics", {}) for s in stages.values()
             if s["stage"] == "evaluate"}
    acc_key = "zero_shot_accuracy"
    for r in ("vanilla", "mimic", "filtered"):
        if r in role and role[r] in evals:
            report[f"zero_shot_acc_{r}"] = evals[role[r]].get(acc_key, evals[role[r]].get("test_accuracy"))
            report[f"test_loss_{r}"] = evals[role[r]].get("test_loss")
    if "zero_shot_acc_vanilla" in report and "filtered" in role:
        report["zero_shot_acc_unfiltered"] = report["zero_shot_acc_vanilla"]
    report["evaluations"] = {name: metrics for name, metrics in evals.items()}
    curves = {label: role[r] for r, label in (("vanilla", "vanilla"), ("mimic", "Grad-Mimic"), ("filtered", "filtered"))
              if r in role}
    if curves:
        figures["curves"] = _curves(stages, curves)
    if "mimic" in role:
        mm = stages[role["mimic"]]["dir"].read_table("metrics.parquet").to_pandas()
        if "alignment" in mm:
            report["final_alignment"] = float(mm["alignment"].dropna().iloc[-1]) if mm["alignment"].notna().any() \
                else None
        if "vanilla" in role:
            vm = stages[role["vanilla"]]["dir"].read_table("metrics.parquet").to_pandas()
            report["steps_to_vanilla_final_loss_ratio"] = loss_steps_ratio(vm, mm)
    gallery = ""
    if "utility" in role:
        from .stages.aggregate import read_utility
        from .training.data import read_pool

        u = stages[role["utility"]]
        um, ucfg = u["manifest"], u["config"]
        util = read_utility(u["dir"]).to_pandas()
        report["quality_estimate"] = um.get("quality_estimate")
        report["quality_binariser"] = (um.get("quality") or {}).get("binariser")
        data = stages[role["mimic"]]["config"].get("data")
        pool_dir = stages[data]["dir"] if data in stages else None
        if pool_dir is not None:
            cols = ["uid_hi", "uid_lo", "text", "tar", "image", "image_offset", "image_size", "corrupted"]
            pool = read_pool(pool_dir, cols).to_pandas()
            joined = pool.merge(util, on=["uid_hi", "uid_lo"])
            report["true_clean_fraction"] = float(1 - joined["corrupted"].mean()) if len(joined) else None
            det = detection(joined, list(ucfg.get("binarisers") or []), float(ucfg.get("min_vote", 0.5)))
            figures["detection"] = _detection_plots(joined, det)
            report.update({k: v for k, v in det.items() if not k.startswith("_")})
            ranked = joined.sort_values("mean_score")
            gallery = ("<h3>highest scored</h3>" + _gallery(ranked.tail(8)[::-1], storage_options) +
                       "<h3>lowest scored</h3>" + _gallery(ranked.head(8), storage_options))
    if "filter" in role:
        report["filter"] = {k: stages[role["filter"]]["manifest"].get(k)
                            for k in ("rule", "kept_fraction", "kept_in_scope", "rejected", "reasons")}
    out = posixpath.join(run, REPORT_DIR)
    write_file(fs, posixpath.join(out, "report.json"), json.dumps(report, indent=2, sort_keys=True, default=float).encode())
    write_file(fs, posixpath.join(out, "report.html"), _html(report, figures, gallery).encode())
    report["html"] = fs.unstrip_protocol(posixpath.join(out, "report.html"))
    return report


def _html(report: Dict[str, Any], figures: Dict[str, str], gallery: str) -> str:
    keys = ["detection_auroc", "steps_to_vanilla_final_loss_ratio", "zero_shot_acc_vanilla", "zero_shot_acc_mimic",
            "zero_shot_acc_unfiltered", "zero_shot_acc_filtered", "quality_estimate", "quality_binariser",
            "true_clean_fraction", "final_alignment"] + sorted(k for k in report if k.startswith(("f1_", "precision_",
                                                                                                   "recall_")))
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(_fmt(report.get(k)))}</td></tr>"
                   for k in keys if k in report)
    metrics = sorted({k for m in report.get("evaluations", {}).values() for k in m})
    evals = "<tr><th>model</th>" + "".join(f"<th>{html.escape(k)}</th>" for k in metrics) + "</tr>" + "".join(
        f"<tr><th>{html.escape(str(name))}</th>" + "".join(f"<td>{html.escape(_fmt(m.get(k)))}</td>" for k in metrics)
        + "</tr>" for name, m in report.get("evaluations", {}).items())
    imgs = "".join(f'<h2>{html.escape(name)}</h2><img alt="{html.escape(name)}" src="data:image/png;base64,{b64}">'
                   for name, b64 in figures.items())
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>gradmimic report</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}}td,th{{padding:2px 8px;text-align:left}}
figure{{display:inline-block;width:150px;margin:4px;vertical-align:top;font-size:11px}}
figure img{{image-rendering:pixelated;width:64px;height:64px}}</style></head>
<body><h1>gradmimic report</h1><p>{html.escape(report.get("run", ""))}</p>
<p>roles: {html.escape(json.dumps(report.get("roles", {})))}</p>
<table>{rows}</table><h2>evaluations (clean test split)</h2><table>{evals}</table>
{imgs}<h2>gallery</h2>{gallery}
<script>window.addEventListener("load", () => {{  // for checks in a headless browser: images that decoded
  const all = Array.from(document.images);
  document.body.dataset.images = all.length;
  document.body.dataset.loaded = all.filter(i => i.complete && i.naturalWidth > 0).length;
}});</script></body></html>
"""


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "n/a" if v is None else str(v)


def show_stage(stage_url: str, storage_options: Optional[Dict[str, Any]] = None, top: int = 5) -> str:
    """A committed stage's manifest summary; for an aggregate stage also its top and bottom samples by mean score
    (with their captions when the run's pool is there)."""
    fs, path = open_storage(stage_url, storage_options)
    d = StageDir(fs, path)
    m = d.manifest()
    if m is None:
        raise FileNotFoundError(f"{stage_url}: not a committed stage (no _MANIFEST.json)")
    skip = {"files", "config", "attempt", "inputs", "class_names", "templates"}
    lines = [f"{m['name']} ({m['stage']}), config {m['config_hash']}, {len(m.get('files', []))} files"]
    lines += [f"  {k}: {json.dumps(v, default=str)}" for k, v in sorted(m.items())
              if k not in skip and k not in ("name", "stage", "config_hash")]
    if m["stage"] == "aggregate":
        from .stages.aggregate import read_utility

        util = read_utility(d).to_pandas().sort_values("mean_score", ascending=False)
        texts = _pool_texts(fs, posixpath.dirname(path), m)
        for title, rows in (("top", util.head(top)), ("bottom", util.tail(top)[::-1])):
            lines.append(f"  {title} {len(rows)} by mean_score:")
            for r in rows.itertuples():
                text = texts.get((r.uid_hi, r.uid_lo), "")
                lines.append(f"    {r.uid}  score {r.mean_score:+.4g}  steps {r.num_steps}  {text}")
    return "\n".join(lines)


def _pool_texts(fs, run: str, manifest: Dict[str, Any]) -> Dict[tuple, str]:
    """uid -> caption (and a corrupted mark) from the pool the scored run trained on, if it is in the run."""
    try:
        stages = _stages(fs, run)
        scores = manifest["config"].get("scores")
        data = stages[scores]["config"]["data"]
        from .training.data import read_pool

        pool = read_pool(stages[data]["dir"], ["uid_hi", "uid_lo", "text", "corrupted", "tar"]).to_pandas()
    except (KeyError, FileNotFoundError, TypeError, ValueError):
        return {}
    return {(h, lo): t + (" [corrupted]" if c else "")
            for h, lo, t, c in zip(pool["uid_hi"], pool["uid_lo"], pool["text"], pool["corrupted"])}
