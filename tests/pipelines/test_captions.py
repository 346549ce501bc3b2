"""The real-caption spec (``pipelines/configs/captions.yaml``) end to end, where Debian's tuxpaint-stamps-default
is installed (``-m long``: about 9 minutes on 2 cores)."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
STAMPS = pathlib.Path("/usr/share/tuxpaint/stamps")  # where the Debian package puts them


@pytest.mark.slow
@pytest.mark.long
@pytest.mark.skipif(not STAMPS.is_dir(), reason="needs Debian's tuxpaint-stamps-default")
def test_the_captions_spec_runs_the_method_on_real_captions(tmp_path):
    res = subprocess.run([sys.executable, "-m", "pipelines", "run", "pipelines/configs/captions.yaml",
                          f"storage={tmp_path}"], capture_output=True, text=True, timeout=2400, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    # locked towers: every train stage and the clip score on the cached features
    assert res.stderr.count("training the projections on the cached tower features of stage") == 6
    assert "scoring on the cached tower features of stage 'feats'" in res.stderr
    run = tmp_path / "captions"
    report = json.loads((run / "report/report.json").read_text())
    assert report["detection_auroc"] > 0.65  # far from chance, far from the digits' (see the README)
    assert abs(report["quality_estimate"] - report["true_clean_fraction"]) < 0.05
    manifests = {n: json.loads((run / n / "_MANIFEST.json").read_text()) for n in ("kept", "kept_clip", "kept_both")}
    for m in manifests.values():  # every pool row kept or rejected with its reason
        assert m["rows_in"] == m["rows_out"] + m["rejected"] == manifests["kept"]["rows_in"]
    # the combined rule removes what the CLIP score's share does, and the mimic bottom 20% on top
    assert manifests["kept_both"]["rows_out"] < manifests["kept_clip"]["rows_out"]
    assert set(report["evaluations"]) == {"vanilla", "mimic", "filtered", "filtered_clip", "filtered_both"}
