"""``report.html``: one self-contained page (plots and gallery images inline as ``data:`` URLs)."""

from __future__ import annotations

import base64
import html
import json
import posixpath
from typing import Any, Dict, Tuple

from pipelines.formats import report as fr
from pipelines.report.roles import MODE_NAMES, ROLE_NAMES
from pipelines.run.storage import open_storage

# the headline figures, in the order of the page's first table (then every per-binariser f1 / precision / recall)
HEADLINE = ["detection_auroc", "steps_to_vanilla_final_loss_ratio", "zero_shot_acc_vanilla", "zero_shot_acc_mimic",
            "zero_shot_acc_unfiltered", "zero_shot_acc_filtered", "quality_estimate", "quality_binariser",
            "true_clean_fraction", "final_alignment"]
VERDICTS = ("label_noise_best_mode", "mimic_best_at_every_noise", "utility_top_beats_random_at_every_p")
# what each figure is, for a person: its name and one line on how to read it
FIGURES: Dict[str, Tuple[str, str]] = {
    "detection_auroc": ("Detection AUROC", "how well a low mean mimic score flags the corrupted samples (0.5: chance, "
                                           "1: every corrupted sample below every clean one)"),
    "steps_to_vanilla_final_loss_ratio": ("Steps to vanilla's loss", "the share of vanilla's steps Grad-Mimic needs "
                                                                     "to reach vanilla's final held-out loss (< 1: "
                                                                     "fewer)"),
    "zero_shot_acc_vanilla": ("Accuracy, vanilla", "the vanilla run's held-out (zero-shot) accuracy"),
    "zero_shot_acc_mimic": ("Accuracy, Grad-Mimic", "the Grad-Mimic run's held-out (zero-shot) accuracy"),
    "zero_shot_acc_unfiltered": ("Accuracy, unfiltered pool", "a model trained on the whole noisy pool"),
    "zero_shot_acc_filtered": ("Accuracy, filtered pool", "the same training on the samples the filter kept"),
    "quality_estimate": ("Quality estimate", "the share of samples the aggregate's binariser keeps: the estimated "
                                             "clean fraction of the pool"),
    "quality_binariser": ("Quality binariser", "the per-step binariser the estimate uses (fixed in the spec)"),
    "true_clean_fraction": ("True clean fraction", "the share of the scored samples that ingest did not corrupt"),
    "final_alignment": ("Final alignment", "cosine of the last step's update with the task vector (towards the "
                                           "reference)"),
}
# each plot's heading and one line on how to read it
PLOTS: Dict[str, Tuple[str, str]] = {
    "curves": ("Learning curves", "held-out loss and (zero-shot) accuracy on the clean test split as the runs train, "
                                  "and how well each Grad-Mimic update points towards the reference"),
    "detection": ("Detecting the corrupted samples", "the mean mimic score of clean and corrupted samples, and the "
                                                     "ROC of flagging the low-scored ones (the dotted line: chance)"),
    "data efficiency": ("Data efficiency", "accuracy of classifiers trained on the top p% of samples by utility, "
                                           "next to a random p%"),
}
# the goals a run is compared with: (figure, label, met?) where the figures it needs are in the report
GOALS = (
    ("detection_auroc", "detection AUROC >= 0.95", lambda r: r["detection_auroc"] >= 0.95),
    ("best_f1", "F1 >= 0.9 for the best binariser", lambda r: r["best_f1"] >= 0.9),
    ("quality_estimate", "quality estimate within 0.05 of the true clean fraction",
     lambda r: abs(r["quality_estimate"] - r["true_clean_fraction"]) <= 0.05),
    ("zero_shot_acc_filtered", "the filtered pool's model at least as accurate as the unfiltered one's",
     lambda r: r["zero_shot_acc_filtered"] >= r["zero_shot_acc_unfiltered"]),
)


def fmt(v: Any) -> str:
    """A figure for a table cell: floats to 4 significant digits, ``None`` as ``n/a``."""
    if isinstance(v, float):
        return f"{v:.4g}"
    return "n/a" if v is None else str(v)


def label_noise_table(ln: Dict[str, Any]) -> str:
    """Table 1 as HTML (mean &plusmn; std over seeds, the best mode per rate in bold); empty without it."""
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


def gallery(rows, storage_options) -> str:
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


def _figure_label(key: str) -> Tuple[str, str]:
    """A figure's name and one line on it; per-binariser scores are named by their binariser."""
    if key in FIGURES:
        return FIGURES[key]
    what, _, binariser = key.partition("_")
    names = {"f1": "F1", "precision": "Precision", "recall": "Recall"}
    return (f"{names.get(what, what)}, {binariser}", f"flagging as corrupted the samples the {binariser} binariser "
                                                     "does not keep (its vote below min_vote)")


def _figure_rows(report: Dict[str, Any]) -> str:
    keys = HEADLINE + sorted(k for k in report if k.startswith(("f1_", "precision_", "recall_")))
    rows = ""
    for k in (k for k in keys if k in report):
        label, line = _figure_label(k)
        rows += (f"<tr><th>{html.escape(label)}</th><td>{html.escape(fmt(report.get(k)))}</td>"
                 f"<td class=why>{html.escape(line)}</td></tr>")
    return rows + "".join(f"<tr><th>{html.escape(k.replace('_', ' '))}</th><td colspan=2>"
                          f"{html.escape(json.dumps(report[k]))}</td></tr>" for k in VERDICTS if k in report)


def goal_rows(report: Dict[str, Any]) -> str:
    """Each goal the report has the figures for, with the figure and whether it is met."""
    r = dict(report)
    f1s = [v for k, v in report.items() if k.startswith("f1_") and isinstance(v, (int, float))]
    if f1s:
        r["best_f1"] = max(f1s)
    rows = ""
    for key, label, met in GOALS:
        try:
            ok = bool(met(r))
        except (KeyError, TypeError):  # a figure this run does not have (or n/a)
            continue
        rows += (f"<tr><th>{html.escape(label)}</th><td>{html.escape(fmt(r[key]))}</td>"
                 f"<td>{'met' if ok else '<b>not met</b>'}</td></tr>")
    return f"<h2>goals</h2><table>{rows}</table>" if rows else ""


def _about(report: Dict[str, Any]) -> str:
    """Which stage played which part, where the filtered dataset is, and the commands that regenerate the page."""
    run = report.get("run", "")
    parts = "; ".join(f"{ROLE_NAMES.get(r, r)} is stage <code>{html.escape(name)}</code>"
                      for r, name in report.get("roles", {}).items())
    out = f"<p>Run <code>{html.escape(run)}</code>{': ' + parts if parts else ''}.</p>"
    flt = report.get("filter") or {}
    if flt.get("dataset"):
        kept = flt.get("kept_fraction")
        out += (f"<p>The filtered dataset (rule <code>{html.escape(str(flt.get('rule')))}</code>, "
                f"{'' if kept is None else f'{kept:.1%} of the scored samples kept'}) is "
                f"<code>{html.escape(flt['dataset'])}</code>: its shards (a train stage's <code>data</code>), the "
                "rejected rows with their reasons, and <code>subset.npy</code> (the kept uids, as DataComp's "
                "resharder reads them).</p>")
    local = run[len("file://"):] if run.startswith("file://") else run
    out += (f"<p>Regenerate this page: <code>gradmimic report {html.escape(run)}</code>. Rerun the run (committed "
            f"stages are skipped): <code>gradmimic run {html.escape(local)}/{fr.RESOLVED_SPEC} "
            f"storage={html.escape(posixpath.dirname(run.rstrip('/')))}</code>.</p>")
    return out


def _evaluation_rows(evaluations: Dict[str, Dict[str, Any]]) -> str:
    metrics = sorted({k for m in evaluations.values() for k in m})
    return "<tr><th>model</th>" + "".join(f"<th>{html.escape(k)}</th>" for k in metrics) + "</tr>" + "".join(
        f"<tr><th>{html.escape(str(name))}</th>" + "".join(f"<td>{html.escape(fmt(m.get(k)))}</td>" for k in metrics)
        + "</tr>" for name, m in evaluations.items())


def page(report: Dict[str, Any], figures: Dict[str, str], gallery_cells: str) -> str:
    """The whole page: the figures, the evaluations, Table 1, the plots (``name -> base64 PNG``), the gallery."""
    rows = _figure_rows(report)
    evals = _evaluation_rows(report.get("evaluations", {}))
    imgs = ""
    for name, b64 in figures.items():
        heading, line = PLOTS.get(name, (name, ""))
        imgs += (f'<h2>{html.escape(heading)}</h2><p>{html.escape(line)}</p><img alt="{html.escape(heading)}" '
                 f'src="data:image/png;base64,{b64}">')
    if report.get("evaluations"):
        evals = f"<h2>evaluations (clean test split)</h2><table>{evals}</table>"
    else:
        evals = ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>gradmimic report</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}}td,th{{padding:2px 8px;text-align:left}}
figure{{display:inline-block;width:150px;margin:4px;vertical-align:top;font-size:11px}}
figure img{{image-rendering:pixelated;width:64px;height:64px}}td.why{{color:#555;font-size:90%}}</style></head>
<body><h1>gradmimic report</h1>
{_about(report)}
<h2>figures</h2><table>{rows}</table>{goal_rows(report)}
{evals}
{label_noise_table(report)}
{imgs}<h2>gallery</h2>{gallery_cells}
<script>window.addEventListener("load", () => {{  // for checks in a headless browser: images that decoded
  const all = Array.from(document.images);
  document.body.dataset.images = all.length;
  document.body.dataset.loaded = all.filter(i => i.complete && i.naturalWidth > 0).length;
}});</script></body></html>
"""
