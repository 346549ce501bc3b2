"""The version is read once, from the installed distribution, or for shipped source from the submitting machine."""

import argparse
import os
import subprocess
import sys

import gradmimic

NOT_INSTALLED = ("import importlib.metadata as m\n"
                 "def missing(name):\n    raise m.PackageNotFoundError(name)\n"
                 "m.version = missing\n"
                 "import gradmimic\nprint(gradmimic.__version__)\n")


def _run(env_version):
    env = {k: v for k, v in os.environ.items() if k != gradmimic.VERSION_ENV}
    if env_version:
        env[gradmimic.VERSION_ENV] = env_version
    return subprocess.run([sys.executable, "-c", NOT_INSTALLED], capture_output=True, text=True, env=env, timeout=60)


def test_the_installed_version_is_the_package_version():
    import importlib.metadata

    assert gradmimic.__version__ == importlib.metadata.version("gradmimic")


def test_shipped_source_takes_the_version_it_was_given_and_refuses_without_one():
    res = _run("9.9.9")
    assert res.returncode == 0 and res.stdout.strip() == "9.9.9"
    res = _run(None)
    assert res.returncode != 0 and f"gradmimic is not installed here and {gradmimic.VERSION_ENV} is not set" in res.stderr


def test_a_shipped_package_carries_the_version_to_the_job(tmp_path):
    from pipelines.ops.submit import job_runtime_env

    args = argparse.Namespace(runtime_env=None, ship_package=True, env=[])
    env = job_runtime_env(args, str(tmp_path))
    assert env["env_vars"][gradmimic.VERSION_ENV] == gradmimic.__version__
    assert len(env["py_modules"]) == 2
    args = argparse.Namespace(runtime_env=None, ship_package=False, env=[])
    assert "env_vars" not in job_runtime_env(args, str(tmp_path))
