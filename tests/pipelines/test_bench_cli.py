"""The overhead benchmark runs from the CLI, prints the keys the issue asks for, and agrees with its oracle."""

import json
import subprocess
import sys

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
    assert out["mimic_over_plain"] == round(out["mimic_ms"] / out["plain_ms"], 3)  # one round: the plain ratio
    assert {"plain_step_mb", "mimic_step_mb", "vmap_step_mb"} <= set(out)


def test_bench_rejects_unknown_method():
    res = gradmimic("bench", "overhead", "--method", "sharpe")
    assert res.returncode == 2
    assert "invalid choice: 'sharpe'" in res.stderr
