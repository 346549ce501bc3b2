"""The benchmarks run from the CLI and print the keys the issues ask for (overhead: agreeing with its oracle)."""

import json
import subprocess
import sys

import pytest

KEYS = {"plain_ms", "mimic_ms", "vmap_ms", "mimic_over_plain", "vmap_over_plain", "max_abs_err_vs_oracle", "peak_rss_mb"}


def gradmimic(*args):
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], capture_output=True, text=True, timeout=300)


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
def test_bench_train_json():
    res = gradmimic("bench", "train", "--json", "--steps", "4", "--warmup", "1", "--rounds", "1", "--batch-size", "32")
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    keys = {"plain_samples_per_s", "mimic_samples_per_s", "bare_samples_per_s", "mimic_over_plain",
            "pipeline_efficiency", "workers"}
    assert keys <= set(out) and out["workers"] == 1
    # one round: the ratios are that round's
    ms = {k: out[f"{k}_step_ms_rounds"][0] for k in ("plain", "mimic", "bare")}
    assert out["mimic_over_plain"] == pytest.approx(ms["mimic"] / ms["plain"], abs=2e-3)
    assert out["pipeline_efficiency"] == pytest.approx(ms["bare"] / ms["plain"], abs=2e-3)


def test_bench_train_rejects_too_few_steps():
    res = gradmimic("bench", "train", "--steps", "3", "--warmup", "5")
    assert res.returncode == 2 and "--steps (3) must exceed --warmup (5)" in res.stderr
