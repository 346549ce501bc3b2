"""The run report: ``<run>/report/report.json`` and a self-contained ``report.html`` (plots as embedded PNG).

Built from a run's committed stages only (``gradmimic report RUN_DIR``, local or ``s3://``; ``gradmimic run`` writes
it at the end of a run that evaluates, or whose spec says ``report: true``).  Roles are read from the resolved spec: ``mimic`` is the first train stage
with ``mode: mimic`` that an aggregate stage scores (else the first with ``mode: mimic``); ``vanilla`` a plain train stage on the same data with the same initialisation; ``filtered``
a train stage on a filter stage's output; ``utility`` the aggregate of the mimic run; each evaluate stage is
matched to its model.  Sections appear when their stages exist:

- learning curves (held-out loss and accuracy vs step) of vanilla, Grad-Mimic and the filtered run, and the mimic
  run's ``alignment`` (cosine of the batch's update direction with the task vector);
- where the pool records injected noise (``corrupted``): score histograms of clean vs corrupted samples, the
  detection ROC of ``mean_score`` (a low score flags a corrupted sample), and per binariser precision / recall /
  F1 for flagging the samples it does not keep (vote below ``min_vote``);
- the quality estimate (the aggregate's binariser, named) next to the true clean fraction;
- the evaluations side by side (filtered vs unfiltered); a gallery of the highest- and lowest-scored samples;
- classifiers trained on noisy pools (the paper's Table 1): final test accuracy, mean and spread over seeds, per
  mode and label-noise rate, and which mode is best at each rate; classifiers trained plainly on a filter stage
  whose rule is one ``top`` clause: the data-efficiency curve, accuracy vs the kept fraction per ranking column
  (a utility column vs the filter's virtual ``random``).

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
    scored = [s["config"].get("scores") for s in stages.values() if s["stage"] == "aggregate"]
    mimic = next((n for n in scored if n in trains and trains[n]["config"].get("mode") == "mimic"), None)
    mimic = mimic or next((n for n, s in trains.items() if s["config"].get("mode") == "mimic"), None)
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


MODE_NAMES = {"plain": "plain", "grand": "GraND", "rho": "RHO-loss", "agra": "AGRA", "influence": "influence",
              "mimic": "Grad-Mimic"}


def _spread(values: List[float]) -> Dict[str, Any]:
    a = np.asarray(values, float)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0, "n": int(len(a)),
            "values": [float(v) for v in a]}


def label_noise(stages: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """Table 1 and the data-efficiency curve from the committed classify runs (see the module docstring)."""
    from .stages.keep_rule import Clause, parse_rule

    table: Dict[str, Dict[float, List[float]]] = {}
    curve: Dict[str, Dict[float, List[float]]] = {}
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
    out: Dict[str, Any] = {}
    if table:
        rates = sorted({r for by in table.values() for r in by})
        out["label_noise_accuracy"] = {m: {f"{r:g}": _spread(v) for r, v in sorted(by.items())}
                                       for m, by in table.items()}
        best = {f"{r:g}": max((m for m in table if r in table[m]), key=lambda m: np.mean(table[m][r]))
                for r in rates}
        out["label_noise_best_mode"] = best
        if "mimic" in table and len(table) > 1:
            out["mimic_best_at_every_noise"] = all(b == "mimic" for r, b in best.items() if float(r) > 0)
    if curve:
        out["data_efficiency"] = {c: {f"{p:g}": _spread(v) for p, v in sorted(by.items())} for c, by in curve.items()}
        if "random" in curve and len(curve) > 1:
            rnd = curve["random"]
            wins = {c: all(np.mean(by[p]) > np.mean(rnd[p]) for p in by if p in rnd)
                    for c, by in curve.items() if c != "random" and any(p in rnd for p in by)}
            out["utility_top_beats_random_at_every_p"] = wins
    return out


def _label_noise_html(ln: Dict[str, Any]) -> str:
    acc = ln.get("label_noise_accuracy")
    if not acc:
        return ""
    rates = sorted({r for by in acc.values() for r in by}, key=float)
    best = ln.get("label_noise_best_mode", {})
    head = "<tr><th>mode</th>" + "".join(f"<th>noise {float(r) * 100:g}%</th>" for r in rates) + "</tr>"
    body = ""
    for mode in [m for m in MODE_NAMES if m in acc] + [m for m in acc if m not in MODE_NAMES]:
        cells = ""
        for r in rates:
            c = acc[mode].get(r)
            text = "n/a" if c is None else f"{c['mean'] * 100:.1f} &plusmn; {c['std'] * 100:.1f} (n={c['n']})"
            cells += f"<td>{'<b>' + text + '</b>' if best.get(r) == mode else text}</td>"
        body += f"<tr><th>{html.escape(MODE_NAMES.get(mode, mode))}</th>{cells}</tr>"
    return ("<h2>label noise: test accuracy % (mean &plusmn; std over seeds; best in bold)</h2>"
            f"<table>{head}{body}</table>")


def _efficiency_plot(curves: Dict[str, Dict[str, Dict[str, Any]]]) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4))
    for column, by in curves.items():
        ps = sorted(by, key=float)
        ax.errorbar([float(p) * 100 for p in ps], [by[p]["mean"] for p in ps], yerr=[by[p]["std"] for p in ps],
                    marker="o", ms=4, capsize=3, label=f"{'random' if column == 'random' else 'top by ' + column} p%")
    ax.set_xlabel("training samples kept (p %)")
    ax.set_ylabel("test accuracy")
    ax.set_title("data efficiency")
    ax.legend(fontsize=7)
    return _png(fig)


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
    ln = label_noise(stages)
    report.update(ln)
    if "data_efficiency" in ln:
        figures["data efficiency"] = _efficiency_plot(ln["data_efficiency"])
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
    rows += "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(json.dumps(report[k]))}</td></tr>"
                    for k in ("label_noise_best_mode", "mimic_best_at_every_noise",
                              "utility_top_beats_random_at_every_p") if k in report)
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
{_label_noise_html(report)}
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
