"""Which committed stage of a run plays which role in its report.

Roles are read from the resolved spec: ``mimic`` is the first train stage with ``mode: mimic`` that an aggregate
stage scores (else the first with ``mode: mimic``); ``vanilla`` a plain train stage on the same data with the same
initialisation and split; ``utility`` the aggregate of the mimic run; ``filtered`` a train stage on a filter stage's
output, and ``filter`` that filter stage.
"""

from __future__ import annotations

import posixpath
from typing import Any, Dict

import yaml

from pipelines.formats import report as fr
from pipelines.run.storage import StageDir

# a train stage's ``mode`` as the report names it, in the order of the label-noise table's rows
MODE_NAMES = {"plain": "plain", "grand": "GraND", "rho": "RHO-loss", "agra": "AGRA", "influence": "influence",
              "mimic": "Grad-Mimic"}
# each role as the report's page names it
ROLE_NAMES = {"mimic": "the Grad-Mimic run", "vanilla": "the vanilla run", "filtered": "the run on the filtered pool",
              "utility": "the aggregated utilities", "filter": "the filter"}


def committed_stages(fs, run: str) -> Dict[str, Dict[str, Any]]:
    """``name -> {stage, config, dir, manifest}`` for the committed stages of the resolved spec, in order."""
    with fs.open(posixpath.join(run, fr.RESOLVED_SPEC), "rb") as f:
        spec = yaml.safe_load(f.read())
    out = {}
    for st in spec["stages"]:
        d = StageDir(fs, posixpath.join(run, st["name"]))
        m = d.manifest()
        if m is not None:
            out[st["name"]] = {"stage": st["stage"], "config": m.get("config", {}), "dir": d, "manifest": m}
    return out


def roles(stages: Dict[str, Dict[str, Any]]) -> Dict[str, str]:
    """``role -> stage name`` for the roles of the module docstring that the run has."""
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
