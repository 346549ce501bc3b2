"""The README stays true: its Python examples run, and CI runs its test command."""

import os
import pathlib
import re
import subprocess

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_python_examples_run(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert len(blocks) >= 2
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - our own documentation
    out = namespace["out"]
    assert abs(out.weights.sum().item() - 1) < 1e-5 and out.grad_norms is not None
    assert namespace["model"].visual.proj.grad is not None


def test_ci_runs_the_readme_test_command():
    lines = README.splitlines()
    step = lines[lines.index(next(ln for ln in lines if ln.startswith("# 2. set up and run the tests"))) + 1]
    assert "pytest" in step
    res = subprocess.run(["bash", str(ROOT / ".ci/run")], env={**os.environ, "CI_DRY_RUN": "1"},
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == f"+ {step}"
