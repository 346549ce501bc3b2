"""``gradmimic show STAGE_DIR``: a committed stage's manifest in a few lines, and an aggregate's extremes."""

from __future__ import annotations

import json
import posixpath
from typing import Any, Dict, Optional

import pandas as pd

from pipelines.report.roles import committed_stages
from pipelines.run.errors import InputNotFound
from pipelines.run.storage import MANIFEST, StageDir, open_storage


def show_stage(stage_url: str, storage_options: Optional[Dict[str, Any]] = None, top: int = 5) -> str:
    """A committed stage's manifest summary; for an aggregate stage also its top and bottom samples by mean score
    (with their captions when the run's pool is there)."""
    fs, path = open_storage(stage_url, storage_options)
    d = StageDir(fs, path)
    m = d.manifest()
    if m is None:
        raise InputNotFound(f"{stage_url}: not a committed stage (no {MANIFEST})")
    skip = {"files", "config", "attempt", "inputs", "class_names", "templates"}
    lines = [f"{m['name']} ({m['stage']}), config {m['config_hash']}, {len(m.get('files', []))} files"]
    lines += [f"  {k}: {json.dumps(v, default=str)}" for k, v in sorted(m.items())
              if k not in skip and k not in ("name", "stage", "config_hash")]
    if m["stage"] == "aggregate":
        from pipelines.report.samples import extremes

        high, low = extremes(d, "mean_score", top, ["uid", "uid_hi", "uid_lo", "mean_score", "num_steps"])
        texts = _pool_texts(fs, posixpath.dirname(path), m, pd.concat([high, low]))
        for title, rows in (("top", high), ("bottom", low)):
            lines.append(f"  {title} {len(rows)} by mean_score:")
            for r in rows.itertuples():
                text = texts.get((r.uid_hi, r.uid_lo), "")
                lines.append(f"    {r.uid}  score {r.mean_score:+.4g}  steps {r.num_steps}  {text}")
    return "\n".join(lines)


def _pool_texts(fs, run: str, manifest: Dict[str, Any], uids) -> Dict[tuple, str]:
    """uid -> caption (and a corrupted mark) of ``uids`` in the pool the scored run trained on, if it is in the run
    (only those rows read: :func:`pipelines.report.samples.pool_rows`)."""
    try:
        stages = committed_stages(fs, run)
        scores = manifest["config"].get("scores")
        data = stages[scores]["config"]["data"]
        from pipelines.report.samples import pool_rows

        pool, _ = pool_rows(stages[data]["dir"], uids, ["text", "corrupted"])
    except (KeyError, FileNotFoundError, TypeError, ValueError):
        return {}
    return {(h, lo): t + (" [corrupted]" if c else "")
            for h, lo, t, c in zip(pool["uid_hi"], pool["uid_lo"], pool["text"], pool["corrupted"])}
