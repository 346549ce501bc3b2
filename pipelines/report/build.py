"""The run report: ``<run>/report/report.json`` and a self-contained ``report.html`` (plots as embedded PNG).

Built from a run's committed stages only (``gradmimic report RUN_DIR``, local or ``s3://``; ``gradmimic run`` writes
it at the end of a run that evaluates, or whose spec says ``report: true``).  Which stage plays which role
(``mimic``, ``vanilla``, ``filtered``, ``utility``, ``filter``) is read from the resolved spec
(:mod:`pipelines.report.roles`); each evaluate stage is matched to its model.  Sections appear when their stages
exist:

- learning curves (held-out loss and accuracy vs step) of vanilla, Grad-Mimic and the filtered run, and the mimic
  run's ``alignment`` (cosine of the batch's update direction with the task vector);
- where the pool records injected noise (``corrupted``): score histograms of clean vs corrupted samples, the
  detection ROC of ``mean_score`` (a low score flags a corrupted sample), and per binariser precision / recall /
  F1 for flagging the samples it does not keep (vote below ``min_vote``);
- the quality estimate (the aggregate's binariser, named) next to the true clean fraction;
- the evaluations side by side (filtered vs unfiltered); a gallery of the highest- and lowest-scored samples;
- classifiers trained on noisy pools (the paper's Table 1) and the data-efficiency curve of classifiers trained on
  a one-``top``-clause filter stage.

The figures are computed in :mod:`pipelines.report.metrics`, plotted in :mod:`pipelines.report.figures` and laid
out in :mod:`pipelines.report.page`.
"""

from __future__ import annotations

import json
import posixpath
from typing import Any, Dict, Optional

import pandas as pd

from pipelines.formats import report as fr
from pipelines.formats.model import read_metrics
from pipelines.report import figures as plots
from pipelines.report.metrics import label_noise, loss_steps_ratio
from pipelines.report.page import gallery, page
from pipelines.report.roles import committed_stages, roles
from pipelines.run.errors import InputNotFound
from pipelines.run.storage import open_storage, write_file

Stages = Dict[str, Dict[str, Any]]


def build_report(run_url: str, storage_options: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Write ``<run>/report/report.json`` and ``report.html``; returns the report's figures."""
    import matplotlib

    matplotlib.use("Agg")

    fs, run = open_storage(run_url, storage_options)
    stages = committed_stages(fs, run)
    if not stages:
        raise InputNotFound(f"{run_url}: no committed stages (is it a run directory with spec.resolved.yaml?)")
    role = roles(stages)
    report: Dict[str, Any] = {"run": fs.unstrip_protocol(run), "roles": role}
    figures: Dict[str, str] = {}
    _evaluations(stages, role, report)
    curves = {label: role[r] for r, label in (("vanilla", "vanilla"), ("mimic", "Grad-Mimic"), ("filtered", "filtered"))
              if r in role}
    if curves:
        figures["curves"] = plots.learning_curves(stages, curves)
    if "mimic" in role:
        _mimic_vs_vanilla(stages, role, report)
    cells = _utility(stages, role, report, figures, storage_options) if "utility" in role else ""
    ln = label_noise(stages)
    report.update(ln)
    if "data_efficiency" in ln:
        figures["data efficiency"] = plots.efficiency_plot(ln["data_efficiency"])
    if "filter" in role:
        report["filter"] = {k: stages[role["filter"]]["manifest"].get(k)
                            for k in ("rule", "kept_fraction", "kept_in_scope", "rejected", "reasons")}
        kept = stages[role["filter"]]["dir"]  # its files are in the committed attempt the manifest names
        report["filter"]["dataset"] = kept.fs.unstrip_protocol(kept.join("").rstrip("/"))
    out = posixpath.join(run, fr.DIR)
    write_file(fs, posixpath.join(out, fr.JSON), json.dumps(report, indent=2, sort_keys=True, default=float).encode())
    write_file(fs, posixpath.join(out, fr.HTML), page(report, figures, cells).encode())
    report["html"] = fs.unstrip_protocol(posixpath.join(out, fr.HTML))
    return report


def _evaluations(stages: Stages, role: Dict[str, str], report: Dict[str, Any]) -> None:
    """Each evaluate stage's metrics under its model's name; the role models' accuracy and loss as headlines."""
    evals = {s["config"].get("model"): s["manifest"].get("metrics", {}) for s in stages.values()
             if s["stage"] == "evaluate"}
    for r in ("vanilla", "mimic", "filtered"):
        if r in role and role[r] in evals:
            report[f"zero_shot_acc_{r}"] = evals[role[r]].get("zero_shot_accuracy", evals[role[r]].get("test_accuracy"))
            report[f"test_loss_{r}"] = evals[role[r]].get("test_loss")
    if "zero_shot_acc_vanilla" in report and "filtered" in role:
        report["zero_shot_acc_unfiltered"] = report["zero_shot_acc_vanilla"]
    report["evaluations"] = dict(evals)


def _mimic_vs_vanilla(stages: Stages, role: Dict[str, str], report: Dict[str, Any]) -> None:
    """The mimic run's final alignment, and the steps it takes to reach vanilla's final held-out loss."""
    mm = read_metrics(stages[role["mimic"]]["dir"]).to_pandas()
    if "alignment" in mm:
        report["final_alignment"] = float(mm["alignment"].dropna().iloc[-1]) if mm["alignment"].notna().any() \
            else None
    if "vanilla" in role:
        vm = read_metrics(stages[role["vanilla"]]["dir"]).to_pandas()
        report["steps_to_vanilla_final_loss_ratio"] = loss_steps_ratio(vm, mm)


def _utility(stages: Stages, role: Dict[str, str], report: Dict[str, Any], figures: Dict[str, str],
             storage_options) -> str:
    """The aggregate's quality estimate; with the scored pool in the run, detection figures and plots; returns the
    gallery's HTML (the 8 highest- and 8 lowest-scored samples) or ``""``.  Bounded reads
    (:mod:`pipelines.report.samples`): utility files one at a time, and pool rows only of the samples shown."""
    from pipelines.report.samples import detection_figures, detection_stream, extremes, pool_rows

    u = stages[role["utility"]]
    um, ucfg = u["manifest"], u["config"]
    report["quality_estimate"] = um.get("quality_estimate")
    report["quality_binariser"] = (um.get("quality") or {}).get("binariser")
    data = stages[role["mimic"]]["config"].get("data")
    if data not in stages:
        return ""
    # read what is shown: the 8 highest and lowest utilities, file by file, then only those samples' pool rows
    high, low = extremes(u["dir"], "mean_score", 8, ["uid_hi", "uid_lo", "mean_score"])
    cols = ["text", "tar", "image", "image_offset", "image_size", "corrupted"]
    shown, corrupted = pool_rows(stages[data]["dir"], pd.concat([high, low]), cols)
    binarisers = list(ucfg.get("binarisers") or [])
    counts = detection_stream(u["dir"], corrupted, binarisers, float(ucfg.get("min_vote", 0.5)))
    report["true_clean_fraction"] = float(1 - counts.bad / counts.rows) if counts.rows else None
    det = detection_figures(counts)
    figures["detection"] = plots.detection_plots(counts, det)
    report.update({k: v for k, v in det.items() if not k.startswith("_")})
    return ("<h3>highest scored</h3>" + gallery(high.merge(shown, on=["uid_hi", "uid_lo"]), storage_options) +
            "<h3>lowest scored</h3>" + gallery(low.merge(shown, on=["uid_hi", "uid_lo"]), storage_options))
