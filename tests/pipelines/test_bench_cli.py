"""The benchmarks run from the CLI and print the keys the issues ask for (overhead: agreeing with its oracle)."""

import json
import subprocess
import sys

import pytest

KEYS = {"plain_ms", "mimic_ms", "vmap_ms", "mimic_over_plain", "vmap_over_plain", "max_abs_err_vs_oracle", "peak_rss_mb"}


def gradmimic(*args):
    return subprocess.run([sys.executable, "-m", "pipelines", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_bench_overhead_json():
    res = gradmimic("bench", "overhead", "--json", "--batch-size", "24", "--repeats", "1", "--warmup", "0",
                    "--method", "normed_cos")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert KEYS <= set(out)
    assert out["max_abs_err_vs_oracle"] <= 1e-4
    # one round: the plain ratio (of unrounded times, so up to the rounding of the printed milliseconds)
    assert out["mimic_over_plain"] == pytest.approx(out["mimic_ms"] / out["plain_ms"], abs=2e-3)
    assert {"plain_step_mb", "mimic_step_mb", "vmap_step_mb"} <= set(out)


def test_bench_rejects_unknown_method():
    res = gradmimic("bench", "overhead", "--method", "sharpe")
    assert res.returncode == 2
    assert "invalid choice: 'sharpe'" in res.stderr


@pytest.mark.slow
@pytest.mark.long  # two train stages and a bare loop (100 s on 2 cores); the stage itself is test_train.py's
def test_bench_train_json():
    res = gradmimic("bench", "train", "--json", "--steps", "4", "--warmup", "1", "--rounds", "1", "--batch-size", "32")
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    keys = {"plain_samples_per_s", "mimic_samples_per_s", "bare_samples_per_s", "mimic_over_plain",
            "pipeline_efficiency", "workers"}
    assert keys <= set(out) and out["workers"] == 1
    # the fixed cost, from the manifests' phases: the round's mimic ran on the group its plain stage started
    assert 0 < out["startup_s"] and 0 < out["group_startup_s"] and 0 < out["teardown_s"]
    # one round: the ratios are that round's
    ms = {k: out[f"{k}_step_ms_rounds"][0] for k in ("plain", "mimic", "bare")}
    assert out["mimic_over_plain"] == pytest.approx(ms["mimic"] / ms["plain"], abs=2e-3)
    assert out["pipeline_efficiency"] == pytest.approx(ms["bare"] / ms["plain"], abs=2e-3)


@pytest.mark.slow
@pytest.mark.long  # a smoke test of the bench's plumbing (40 s): the stage itself is test_clipscore.py's
def test_bench_clipscore_json(tmp_path):
    res = gradmimic("bench", "clipscore", "--json", "--rows", "2500", "--rounds", "1", "--batch-size", "128",
                    "--cache", str(tmp_path))
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["rows"] == 2500 and out["model"] == "tiny-clip" and out["actors"] >= 1
    # one round: the ratio is that round's
    # (the ratio is rounded to 3 decimals, the rates to 0.1 rows/s)
    assert out["stage_over_bare"] == pytest.approx(out["stage_rows_per_s"] / out["bare_rows_per_s"], abs=6e-4)


def test_bench_train_rejects_too_few_steps():
    res = gradmimic("bench", "train", "--steps", "3", "--warmup", "5")
    assert res.returncode == 2 and "--steps (3) must exceed --warmup (5)" in res.stderr


AGGREGATE_KEYS = {"rows", "gradmimic_rows_per_s", "duckdb_rows_per_s", "ray_groupby_rows_per_s", "ratio_vs_duckdb",
                  "ratio_vs_ray_groupby", "driver_peak_mb", "gradmimic_all_binarisers_rows_per_s", "agree"}


@pytest.mark.slow
def test_bench_aggregate_json():
    res = gradmimic("bench", "aggregate", "--rows", "50000", "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 1, res.stdout[-2000:]  # Ray's own console lines go to stderr
    out = json.loads(lines[0])
    assert AGGREGATE_KEYS <= set(out)
    assert out["agree"] is True and out["max_abs_diff_vs_duckdb"] < 1e-6
    assert out["rows"] == out["ray_groupby_rows"] and abs(out["rows"] - 50_000) <= 50_000 * 0.05
    assert out["uids"] % 256 == 0 and out["driver_peak_mb"] > 0
    # the ratio of unrounded times, printed to 3 decimals
    assert out["ratio_vs_duckdb"] == pytest.approx(out["gradmimic_rows_per_s"] / out["duckdb_rows_per_s"], abs=1e-3)


def test_bench_aggregate_compare():
    """The agreement check: same uids (in any order) and mean scores within 1e-6."""
    import numpy as np

    from pipelines.bench.aggregate import compare, log_shape, prefix_files

    hi, lo, mean = np.array([1, 1, 2], np.uint64), np.array([5, 3, 5], np.uint64), np.array([0.5, -1.0, 2.0])
    order = np.array([2, 0, 1])
    assert compare((hi, lo, mean), (hi[order], lo[order], mean[order]))[0]
    assert not compare((hi, lo, mean), (hi, lo, mean + np.array([0, 0, 1e-5])))[0]
    assert compare((hi, lo, mean), (hi[:2], lo[:2], mean[:2]))[2] == "3 uids vs 2"
    assert compare((hi, lo, mean), (hi, lo + np.uint64(1), mean))[2] == "different uids"
    assert log_shape(20_000_000) == (199_936, 100)  # 781 batches of 256 uids, 100 epochs: 19,993,600 rows
    files = [(f"log/part-s{s:09d}-{s + 9:09d}-r{r:04d}.parquet", 100) for s in (1, 11, 21) for r in range(4)]
    assert prefix_files(files, 500) == files[:8]  # whole segments: every rank's file of each


@pytest.mark.slow
def test_bench_filter_json_agrees_with_duckdb():
    res = gradmimic("bench", "filter", "--rows", "30000", "--shard-rows", "7000", "--reshard-rows", "2000",
                    "--image-bytes", "2000", "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 1, res.stdout[-2000:]
    out = json.loads(lines[0])
    assert out["agree"] is True  # the same kept uids as one DuckDB query of the rule
    assert out["rows"] == 30000 == out["kept"] + out["rejected"] and out["shards"] == 5
    # the paper's rule on train rows (99%): top 30% by CLIP score, less the mimic bottom 20% among them (~ 30% x 80%)
    assert 0.2 < out["kept"] / out["rows"] < 0.3
    assert out["gradmimic_rows_per_core_s"] == pytest.approx(out["gradmimic_rows_per_s"] / out["cores"], rel=1e-3)
    # reshard: the kept samples of the 2,000-row pool copied, each image at least 1,000 bytes (and its caption)
    assert out["reshard_rows"] == 2000 and 0.2 < out["reshard_kept"] / 2000 < 0.3
    assert out["reshard_bytes_copied"] > 1000 * out["reshard_kept"] and out["reshard_mb_per_s"] > 0


def test_bench_scale_pool_is_datacomp_shaped_deterministic_and_reused(tmp_path):
    """The generated pool: every tar sample's uid once in the metadata, the failed downloads only there, the same
    bytes for the same seed, and a complete pool reused as it is."""
    import pyarrow.parquet as pq

    from pipelines.bench.poolgen import PoolShape, ensure_pool
    from pipelines.run.storage import open_storage
    from pipelines.stages.ingest.tarscan import read_tar

    shape = PoolShape(25, per_tar=10, tars_per_file=2, missing=0.2)
    root, reused = ensure_pool(str(tmp_path / "a"), shape, 2)
    assert not reused and (shape.tars, shape.files, shape.missing_rows) == (3, 2, 5)  # round(20 * .2), round(5 * .2)
    fs, _ = open_storage(root)
    in_tars = []
    for t in range(3):
        entries, unsafe = read_tar(fs, f"{root}/shards/{t:08d}.tar", validate=True)
        assert not unsafe and len(entries) == shape.tar_rows(t)
        assert all(e["image"][2] > 0 and e.get("problem") is None for e in entries.values())  # real JPEGs
        in_tars += [(e["uid"], e["text"][0]) for e in entries.values()]
    meta = pq.read_table(f"{root}/metadata").to_pylist()
    assert len(meta) == 25 + 5 and {"clip_b32_similarity_score", "face_bboxes", "url"} <= set(meta[0])
    by_uid = {r["uid"]: r["text"] for r in meta}
    assert len(by_uid) == 30 and all(by_uid[u] == text for u, text in in_tars)  # captions agree with .txt
    again, _ = ensure_pool(str(tmp_path / "b"), shape, 1)
    for rel in ("shards/00000002.tar", "metadata/00000001.parquet"):
        assert (tmp_path / "a" / again.rsplit("/", 1)[1] / rel).read_bytes() == open(f"{again}/{rel}", "rb").read()
    assert ensure_pool(str(tmp_path / "a"), shape, 2) == (root, True)


SCALE_STAGE_KEYS = {"wall_s", "rows", "rows_per_core_s", "driver_peak_mb", "driver_growth_mb", "worker_peak_mb",
                    "worker_peak_task", "cpu_s"}


@pytest.mark.slow
@pytest.mark.long  # a Ray of its own and every stage (about a minute): conservation is also test_driver_rows'
def test_bench_scale_json_conserves_rows(tmp_path):
    res = gradmimic("bench", "scale", "--rows", "2000", "--per-tar", "2000", "--steps", "2", "--batch-size", "32",
                    "--cache", str(tmp_path / "cache"), "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 1, res.stdout[-2000:]
    out = json.loads(lines[0])
    assert out["rows"] == 2000 and out["metadata_rows"] == 2020 and out["tars"] == 1 and not out["pool_reused"]
    stages = out["stages"]
    assert list(stages) == ["pool", "train", "utility", "kept"]
    for name, row in stages.items():
        assert SCALE_STAGE_KEYS <= set(row), name
        assert row["driver_peak_mb"] >= row["driver_base_mb"] > 0 and row["worker_peak_mb"] > 0
    pool, kept = stages["pool"], stages["kept"]
    # 2000 samples in the tar + 20 metadata rows whose download "failed": rejected as no image in the shards
    assert (pool["rows_in"], pool["rows_out"], pool["rejected"]) == (2020, 2000, 20)
    assert stages["train"]["rows"] == 2 * 32 and stages["utility"]["rows"] == 2 * 32  # one log row per drawn sample
    assert kept["rows_in"] == pool["rows_out"] == kept["rows_out"] + kept["rejected"]
    assert stages["utility"]["rows_out"] <= 64 and kept["rows_out"] < 64 + 20  # the scored, less the rule's cut;
    # plus the test split passing through
