"""The report's figures against brute force, and the quickstart spec end to end (shrunk) through the CLI."""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from pipelines.report import detection, loss_steps_ratio

ROOT = pathlib.Path(__file__).resolve().parents[2]


def check_renders_in_chromium(page: pathlib.Path, images: int) -> None:
    """Open the page in headless Chromium: every image decodes, the console stays clean.  ``.ci/run`` installs
    Debian's chromium (and says so if it cannot); without a browser the check is skipped, unless
    GRADMIMIC_REQUIRE_CHROMIUM is set."""
    import os
    import shutil

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        if os.environ.get("GRADMIMIC_REQUIRE_CHROMIUM"):
            pytest.fail("chromium is not installed")
        pytest.skip("chromium is not installed (CI installs it)")
    res = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                          "--enable-logging=stderr",
                          "--v=0", "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f'data-images="{images}"' in res.stdout and f'data-loaded="{images}"' in res.stdout, res.stdout[:500]
    console = [line for line in res.stderr.splitlines() if "CONSOLE" in line]
    assert not console, console


def test_steps_to_vanilla_final_loss_interpolates_between_evaluations():
    vanilla = pd.DataFrame({"step": [10, 20, 30, 40], "test_loss": [5.0, 4.5, 4.2, 4.0]})
    mimic = pd.DataFrame({"step": [10, 20, 30, 40], "test_loss": [4.8, 4.2, 3.9, 3.8]})
    # 4.0 is reached between step 20 (4.2) and 30 (3.9): 20 + 10 * 0.2 / 0.3
    assert loss_steps_ratio(vanilla, mimic) == pytest.approx((20 + 10 * 0.2 / 0.3) / 40)
    assert loss_steps_ratio(vanilla, mimic.assign(test_loss=[3.0, 2.0, 1.0, 1.0])) == pytest.approx(10 / 40)
    assert loss_steps_ratio(vanilla, mimic.assign(test_loss=[9.0, 8.0, 7.0, 6.0])) is None


def test_detection_figures_equal_counting():
    rng = np.random.default_rng(0)
    bad = rng.random(300) < 0.3
    score = np.where(bad, -0.5, 0.5) + rng.normal(0, 0.6, 300)
    votes = {b: np.clip(0.5 + score * s + rng.normal(0, 0.2, 300), 0, 1) for b, s in (("threshold", 0.5), ("gmm", 1))}
    df = pd.DataFrame({"corrupted": bad, "mean_score": score, **{f"vote_{b}": v for b, v in votes.items()}})
    got = detection(df, ["threshold", "gmm"], 0.5)
    pairs = [(s_bad, s_ok) for s_bad in score[bad] for s_ok in score[~bad]]
    auroc = np.mean([1.0 if b < o else 0.5 if b == o else 0.0 for b, o in pairs])  # a low score flags
    assert got["detection_auroc"] == pytest.approx(auroc)
    for b, v in votes.items():
        flagged = v < 0.5
        tp = sum(f and c for f, c in zip(flagged, bad))
        p, r = tp / flagged.sum(), tp / bad.sum()
        assert got[f"precision_{b}"] == pytest.approx(p) and got[f"recall_{b}"] == pytest.approx(r)
        assert got[f"f1_{b}"] == pytest.approx(2 * p * r / (p + r))


@pytest.mark.slow
def test_quickstart_end_to_end_shrunk(tmp_path):
    """README command 1's spec on 300 digits and a few steps: every stage, the report and `show`."""
    shrink = ["stages.pool.source.limit=300", "stages.ref.epochs=3", "stages.ref.batch_size=32"]
    for st in ("vanilla", "mimic", "filtered"):
        shrink += [f"stages.{st}.steps=8", f"stages.{st}.eval_every=4", f"stages.{st}.checkpoint_every=8",
                   f"stages.{st}.batch_size=32"]
    res = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", "pipelines/configs/quickstart.yaml",
                          f"storage={tmp_path}", *shrink], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last == f"report: file://{tmp_path}/quickstart/report/report.html"
    report = json.loads((tmp_path / "quickstart/report/report.json").read_text())
    for key in ("detection_auroc", "steps_to_vanilla_final_loss_ratio", "zero_shot_acc_vanilla", "zero_shot_acc_mimic",
                "zero_shot_acc_unfiltered", "zero_shot_acc_filtered", "quality_estimate", "quality_binariser",
                "true_clean_fraction", "f1_threshold", "f1_kmeans", "f1_gmm"):
        assert key in report, key
    assert report["roles"] == {"mimic": "mimic", "vanilla": "vanilla", "utility": "utility", "filtered": "filtered",
                               "filter": "kept"}
    assert 0.5 < report["true_clean_fraction"] < 0.9 and 0 <= report["quality_estimate"] <= 1
    page = (tmp_path / "quickstart/report/report.html").read_text()
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) >= 2 + 16 and all(s.startswith("data:image/") for s in sources)  # plots + gallery, inline
    assert "http" not in page.replace(str(tmp_path), "")

    check_renders_in_chromium(tmp_path / "quickstart/report/report.html", len(sources))

    again = subprocess.run([sys.executable, "-m", "pipelines.cli", "report", str(tmp_path / "quickstart")],
                           capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads((tmp_path / "quickstart/report/report.json").read_text()) == report
    shown = subprocess.run([sys.executable, "-m", "pipelines.cli", "show", str(tmp_path / "quickstart/utility")],
                           capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "top 5 by mean_score:" in shown.stdout and "bottom 5 by mean_score:" in shown.stdout
    assert "quality_estimate" in shown.stdout
    listed = [line for line in shown.stdout.splitlines() if re.search(r"score [+-]", line)]
    assert len(listed) == 10 and all(re.search(r"steps \d+  \S", line) for line in listed)  # with captions
