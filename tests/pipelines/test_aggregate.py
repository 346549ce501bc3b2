"""The aggregate stage against a pandas reference with exact per-step binarisers, on generated score logs."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest

from gradmimic.binarize import exact_summary, gmm_fit, gmm_keep
from pipelines.bench.scorelog import write_score_log
from pipelines.formats.score_log import read_score_log
from pipelines.formats.utility import read_utility
from pipelines.run.config import SpecError
from pipelines.run.runner import committed_stage, run_spec
from pipelines.run.spec import parse_spec
from pipelines.run.storage import open_storage
from tests.support.binarize import brute_kmeans

pytestmark = pytest.mark.usefixtures("ray_local")


def reference(log: pd.DataFrame, first_step=1, last_epochs=None, decay=None, cluster_on="score", **_) -> pd.DataFrame:
    """Per-step exact binarisers (brute-force k-means, EM on every value), then a pandas group-by per uid."""
    log = log[log["step"] >= first_step]
    if last_epochs:
        log = log[log["epoch"] > log["epoch"].max() - last_epochs]
    log = log.copy()
    log["w"] = decay ** (log["step"].max() - log["step"]) if decay else 1.0
    log["vote_threshold"] = log["weight"].astype(np.float32) > (1.0 / log["batch_size"]).astype(np.float32)
    kmeans, gmm = {}, {}
    for step, g in log.groupby("step"):
        v = g[cluster_on].to_numpy(np.float64)
        kmeans[step] = brute_kmeans(v)
        gmm[step] = gmm_fit(*exact_summary(v[None]))[0]
    log["vote_kmeans"] = log[cluster_on] > log["step"].map(kmeans)
    params = np.stack([gmm[s] for s in log["step"]])
    log["vote_gmm"] = gmm_keep(log[cluster_on].to_numpy(np.float64), params)
    for c in ("score", "weight", "loss", "vote_threshold", "vote_kmeans", "vote_gmm"):
        log[c + "_w"] = log[c].astype(np.float64) * log["w"]
    g = log.sort_values("step").groupby(["uid_hi", "uid_lo"])
    out = pd.DataFrame({"num_steps": g.size(), "wsum": g["w"].sum(), "last_weight": g["weight"].last()})
    for c in ("score", "weight", "loss"):
        out[f"mean_{c}"] = g[c + "_w"].sum() / out["wsum"]
    for c in ("threshold", "kmeans", "gmm"):
        out[f"vote_{c}"] = g[f"vote_{c}_w"].sum() / out["wsum"]
    return out


def aggregate(tmp_path, log_dir, name="agg", **options):
    spec = parse_spec({"name": "r", "storage": str(tmp_path / "runs"), "stages": [
        {"stage": "aggregate", "name": name, "scores": {"path": str(log_dir)}, **options}]})
    manifest = run_spec(spec, stream=io.StringIO())[name]
    table = read_utility(committed_stage(spec, name)).to_pandas().set_index(["uid_hi", "uid_lo"])
    return manifest, table


@pytest.fixture(scope="module")
def small_log(tmp_path_factory):
    root = tmp_path_factory.mktemp("log") / "scores"
    fs, path = open_storage(str(root))
    info = write_score_log(fs, path, uids=200, epochs=4, batch_size=24, num_buckets=8, ranks=3, steps_per_file=5,
                           seed=1)
    return root, info, read_score_log(fs, path).to_pandas()


@pytest.mark.parametrize("options", [
    {},
    {"decay": 0.9},
    {"last_epochs": 2, "first_step": 5},
    {"cluster_on": "weight", "chunk_rows": 50},  # many chunks per bucket: partial sums merged
])
def test_aggregate_equals_reference(tmp_path, small_log, options):
    root, info, log = small_log
    manifest, got = aggregate(tmp_path, root, bins=4096, **options)
    want = reference(log, **options)
    assert len(got) == len(want) == manifest["samples"] and manifest["rows_in"] == info["rows"] == len(log)
    got = got.loc[want.index]
    assert (got["num_steps"].to_numpy() == want["num_steps"].to_numpy()).all()
    for c in ("mean_score", "mean_weight", "mean_loss", "last_weight", "vote_threshold", "vote_kmeans", "vote_gmm"):
        np.testing.assert_allclose(got[c].to_numpy(), want[c].to_numpy(), rtol=1e-9, atol=1e-12, err_msg=c)
    assert (got["uid"].str.len() == 32).all()
    assert got["uid"].iloc[0] == f"{got.index[0][0]:016x}{got.index[0][1]:016x}"
    kept = (want["vote_threshold"] >= 0.5).mean()
    assert manifest["quality_estimate"] == pytest.approx(kept)
    assert manifest["mean_score"] == pytest.approx(want["mean_score"].mean())


def test_default_bins_approximate_the_exact_fits(tmp_path, small_log):
    root, _, log = small_log
    _, got = aggregate(tmp_path, root)
    want = reference(log)
    got = got.loc[want.index]
    for c in ("vote_kmeans", "vote_gmm"):
        assert np.abs(got[c].to_numpy() - want[c].to_numpy()).mean() < 0.02, c


def test_votes_separate_corrupted_samples(tmp_path, small_log):
    root, info, _ = small_log
    _, got = aggregate(tmp_path, root)
    bad = pd.Series(info["corrupted"], index=pd.MultiIndex.from_arrays([info["uid_hi"], info["uid_lo"]]))
    bad = bad.loc[got.index].to_numpy()
    for c in ("mean_score", "vote_threshold", "vote_kmeans", "vote_gmm"):
        assert got[c][~bad].mean() > got[c][bad].mean() + 0.2, c


def test_outputs_on_demand_read_only_their_columns(tmp_path, small_log):
    """Means only, no binarisers: a log holding just the uids and scores is enough, and the figures are the same."""
    import pyarrow.parquet as pq

    root, _, log = small_log
    lean = tmp_path / "lean"
    lean.mkdir()
    for part in root.glob("*.parquet"):  # the schema's metadata (the bucket index) goes along
        pq.write_table(pq.read_table(part, columns=["uid_hi", "uid_lo", "score"]), lean / part.name)
    manifest, got = aggregate(tmp_path, lean, outputs=["mean_score"], binarisers=[], quality=None)
    want = reference(log)
    assert list(got.columns) == ["uid", "num_steps", "mean_score"] and manifest["quality_estimate"] is None
    got = got.loc[want.index]
    assert (got["num_steps"].to_numpy() == want["num_steps"].to_numpy()).all()
    np.testing.assert_allclose(got["mean_score"].to_numpy(), want["mean_score"].to_numpy(), rtol=1e-12)
    assert manifest["mean_score"] == pytest.approx(want["mean_score"].mean())


def test_bad_logs_are_refused(tmp_path, small_log):
    import pyarrow.parquet as pq

    root, _, _ = small_log
    with pytest.raises(SpecError, match=r"scores: no score-log files \(scores/part-s<first>-<last>-r<rank>\.parquet\) "
                                        r"under "):
        aggregate(tmp_path, tmp_path / "empty")
    broken = tmp_path / "broken"
    part = next(root.glob("*.parquet"))
    broken.mkdir()
    pq.write_table(pq.read_table(part).drop(["weight"]), broken / part.name)
    with pytest.raises(SpecError, match=r"scores: .*part-.*\.parquet: the score log has no column 'weight' "
                                        r"\(expected uid_hi, uid_lo, step, score, weight, batch_size\)"):
        aggregate(tmp_path, broken)


def test_the_utility_does_not_depend_on_the_task_plan(tmp_path, small_log):
    """More tasks than buckets (a bucket over ``task_rows`` split by uid into parts) or fewer: the same utility,
    bit for bit, as the same sums are added in the same order."""
    root, info, _ = small_log
    options = dict(decay=0.9, chunk_rows=40, bins=64)
    runs = {}
    for name, task_rows in (("plain", 10**9), ("split", 50)):
        manifest, got = aggregate(tmp_path, root, name=name, task_rows=task_rows, **options)
        runs[name] = (manifest, got.sort_index())
    (m1, a), (m2, b) = runs["plain"], runs["split"]
    assert m1["tasks"] != m2["tasks"] and m2["tasks"] > m2["num_buckets"] == m1["num_buckets"] == 8
    assert any("part-00001" in f for f in m2["files"]) and not any("part-00001" in f for f in m1["files"])
    assert m1["rows_in"] == m2["rows_in"] == info["rows"] and m1["samples"] == m2["samples"] == len(a)
    assert a.index.equals(b.index) and list(a.columns) == list(b.columns)
    for c in a.columns:
        assert (a[c].to_numpy() == b[c].to_numpy()).all(), c  # exact, not close
    assert m1["kept_fraction"] == m2["kept_fraction"]


def test_plan_follows_the_rows_not_the_buckets():
    from pipelines.stages.aggregate.stage import plan_tasks

    counts = np.array([5, 0, 3, 40, 2])
    assert plan_tasks(counts, task_rows=10, target=6) == [
        (0, 1, 0, 1), (2, 3, 0, 1), (3, 4, 0, 4), (3, 4, 1, 4), (3, 4, 2, 4), (3, 4, 3, 4), (4, 5, 0, 1)]
    assert plan_tasks(counts, task_rows=100, target=100) == [(0, 5, 0, 1)]  # fewer tasks than buckets
    assert plan_tasks(counts, task_rows=10, target=100) == [
        (0, 3, 0, 1), (3, 4, 0, 4), (3, 4, 1, 4), (3, 4, 2, 4), (3, 4, 3, 4), (4, 5, 0, 1)]
    assert plan_tasks(np.zeros(4, np.int64), 10, 10) == []


@pytest.mark.parametrize("options, message", [
    ({"quality": "gmm", "binarisers": ["threshold"]}, "quality: 'gmm' is not one of the binarisers (threshold)"),
    ({"decay": 0}, "decay: must be in (0, 1], got 0.0"),
    ({"bins": 1}, "bins: must be >= 2, got 1"),
    ({"binarisers": ["median"]}, "binarisers[0]: expected one of"),
])
def test_bad_options_name_the_field(options, message):
    with pytest.raises(SpecError) as err:
        parse_spec({"name": "r", "storage": "x", "stages": [
            {"stage": "aggregate", "name": "a", "scores": {"path": "x"}, **options}]}, label="s.yaml")
    assert str(err.value).startswith(f"s.yaml: stage 'a' (aggregate): {message}")


def test_plain_runs_have_no_scores():
    from pipelines.run.spec import check_spec

    spec = parse_spec({"name": "r", "storage": "x", "stages": [
        {"stage": "ingest", "name": "pool", "source": {"kind": "embedded"}},
        {"stage": "train", "name": "ref", "data": "pool", "steps": 1, "batch_size": 8},
        {"stage": "aggregate", "name": "a", "scores": "ref"}]}, label="s.yaml")
    with pytest.raises(SpecError, match=r"^s.yaml: stage 'a' \(aggregate\): scores: stage 'ref' trains with mode "
                                        r"plain: its log has no scores to aggregate$"):
        check_spec(spec)
