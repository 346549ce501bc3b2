"""Spec parsing: every error names the file, the stage and the field; overrides; shipped specs validate."""

from __future__ import annotations

import pathlib
import subprocess
import sys
from dataclasses import dataclass, field

import pytest
import yaml

from pipelines.run.config import SpecError
from pipelines.run.registry import STAGES, StageDef
from pipelines.run.spec import load_spec, parse_spec

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "pipelines" / "configs").glob("*.yaml"))


@dataclass(frozen=True)
class UseConfig:
    data: str = field(metadata={"ref": "dataset"})
    lr: float = 0.1


@pytest.fixture
def with_consumer(monkeypatch):
    """A stage that references another's output, to exercise reference checks (no such stage is shipped yet)."""
    monkeypatch.setitem(STAGES, "use", StageDef(UseConfig, lambda cfg, ctx: {}, "test consumer", "model"))


def spec(*stages, **top):
    return {"name": "t", "storage": "./runs", "stages": list(stages), **top}


POOL = {"stage": "ingest", "name": "pool", "source": {"kind": "embedded", "limit": 10}}


def err(data, overrides=()):
    with pytest.raises(SpecError) as info:
        parse_spec(data, overrides, "s.yaml")
    return str(info.value)


def test_defaults_and_types():
    s = parse_spec(spec(POOL), label="s.yaml")
    cfg = s.stage("pool").config
    assert cfg.source.kind == "embedded" and cfg.source.limit == 10 and cfg.shard_size == 1000
    assert s.ray.address == "local" and cfg.noise is None
    assert s.to_plain()["stages"][0]["source"]["templates"]  # resolved: defaults filled in


@pytest.mark.parametrize(
    "data, message",
    [
        (spec({"stage": "trian", "name": "x"}), "s.yaml: stages[0]: stage: unknown stage 'trian' (known: ingest"),
        (spec({"name": "x"}), "s.yaml: stages[0]: stage: missing required field"),
        (spec({"stage": "ingest"}), "s.yaml: stages[0] (ingest): name: missing required field"),
        (spec({**POOL, "shards": 3}), "s.yaml: stage 'pool' (ingest): shards: unknown key (expected one of source, noise, split, shard_size)"),
        (spec({**POOL, "shard_size": "big"}), "s.yaml: stage 'pool' (ingest): shard_size: expected an integer, got 'big'"),
        (spec({**POOL, "shard_size": 0}), "s.yaml: stage 'pool' (ingest): shard_size: must be >= 1, got 0"),
        (spec({**POOL, "source": {"kind": "folder"}}), "s.yaml: stage 'pool' (ingest): source.kind: expected one of 'embedded', 'caption_folder', 'labelled', 'datacomp', 'webdataset', got 'folder'"),
        (spec({**POOL, "source": {"kind": "caption_folder"}}), "s.yaml: stage 'pool' (ingest): source.path: missing required field (a string)"),
        (spec({**POOL, "noise": {"kind": "label", "rate": 1.5}}), "s.yaml: stage 'pool' (ingest): noise.rate: expected a fraction in [0, 1], got 1.5"),
        (spec({**POOL, "noise": {"kind": "label"}}), "s.yaml: stage 'pool' (ingest): noise.rate: missing required field (a number)"),
        (spec({**POOL, "source": {"kind": "caption_folder", "path": "x"}, "noise": {"kind": "label", "rate": 0.1}}),
         "s.yaml: stage 'pool' (ingest): noise.kind: label noise needs a labelled source, not 'caption_folder'"),
        (spec(POOL, POOL), "s.yaml: stage 'pool': name: another stage is already named 'pool'"),
        (spec(POOL, colour="red"), "s.yaml: colour: unknown key"),
        ({"name": "t", "stages": [POOL]}, "s.yaml: storage: missing required field"),
        (spec(POOL, ray={"address": "yarn"}), "s.yaml: ray.address: expected local, auto, host:port or ray://host:port, got 'yarn'"),
        (spec(POOL, storage_options={"secret": "x"}), "s.yaml: storage_options.secret: credentials belong in the environment"),
        (spec(POOL, storage_options={"client_kwargs": {"aws_secret_access_key": "x"}}),
         "s.yaml: storage_options.client_kwargs.aws_secret_access_key: credentials belong in the environment"),
        (spec(POOL, ray=[]), "s.yaml: ray: expected a mapping, got []"),
        (spec({**POOL, "name": "pool.v2"}), "s.yaml: stages[0] (ingest): name: 'pool.v2' must be letters, digits, '_' or '-' (at most 100)"),
        (spec(), "s.yaml: stages: expected a non-empty list of stages"),
        (["not", "a", "mapping"], "s.yaml: expected a mapping"),
    ],
)
def test_errors_name_file_stage_and_field(data, message):
    assert err(data).startswith(message)


def test_references(with_consumer):
    ok = parse_spec(spec(POOL, {"stage": "use", "name": "m", "data": "pool"}))
    assert ok.stage("m").config.data == "pool"
    assert err(spec(POOL, {"stage": "use", "name": "m", "data": "pol"})) == \
        "s.yaml: stage 'm' (use): data: no earlier stage is named 'pol'"
    assert err(spec({"stage": "use", "name": "m", "data": "pool"}, POOL)).endswith("no earlier stage is named 'pool'")
    assert err(spec(POOL, {"stage": "use", "name": "m", "data": "pool"}, {"stage": "use", "name": "n", "data": "m"})) == \
        "s.yaml: stage 'n' (use): data: stage 'm' produces a model, not a dataset"


def test_overrides(with_consumer):
    data = spec(POOL, {"stage": "use", "name": "m", "data": "pool"})
    s = parse_spec(data, ["stages.m.lr=1e-4", "stages.pool.source.limit=5", "storage=s3://b/p", "ray.address=auto",
                          "stages.pool.noise={kind: caption, rate: 0.5}"])
    assert s.stage("m").config.lr == 1e-4 and s.stage("pool").config.source.limit == 5
    assert s.storage == "s3://b/p" and s.ray.address == "auto"
    assert s.stage("pool").config.noise.kind == "caption"
    assert data["stages"][1].get("lr") is None  # the caller's data is untouched
    assert err(data, ["stages.nope.lr=1"]) == "s.yaml: override stages.nope.lr: no stage named 'nope' (stages: pool, m)"
    assert err(data, ["stages.m.lrr=1"]).startswith("s.yaml: stage 'm' (use): lrr: unknown key")
    assert err(data, ["stages.m.lr=fast"]) == "s.yaml: stage 'm' (use): lr: expected a number, got 'fast'"
    assert err(data, ["storage"]) == "override 'storage': expected key=value"


def test_yaml_exponent_numbers_are_numbers(tmp_path):
    p = tmp_path / "e.yaml"
    p.write_text("name: t\nstorage: x\nstages:\n  - {stage: ingest, name: p, noise: {kind: caption, rate: 4e-1}}\n")
    assert load_spec(p).stage("p").config.noise.rate == 0.4


def test_malformed_yaml_names_the_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: t\nstages:\n  - {stage: ingest, name: [\n")
    with pytest.raises(SpecError, match=r"^bad.yaml: malformed YAML at line \d+, column \d+"):
        load_spec(p)
    with pytest.raises(SpecError, match="no such spec file"):
        load_spec(tmp_path / "missing.yaml")


def test_yaml_is_loaded_safely(tmp_path):
    p = tmp_path / "evil.yaml"
    p.write_text("name: !!python/object/apply:os.system ['echo pwned']\nstorage: x\nstages: []\n")
    with pytest.raises(SpecError, match="malformed YAML"):
        load_spec(p)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_spec_validates_and_says_how_to_run_it(path):
    assert path.read_text().splitlines()[0] == f"# gradmimic run pipelines/configs/{path.name}"
    load_spec(path)


def test_shipped_specs_exist():
    assert any(p.name == "debug.yaml" for p in CONFIGS)


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "pipelines", *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd)


def test_cli_validate_errors_are_one_line_exit_2(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(spec({**POOL, "shard_size": -1})))
    res = cli("validate", str(p))
    assert res.returncode == 2
    assert res.stderr.strip() == "gradmimic: error: s.yaml: stage 'pool' (ingest): shard_size: must be >= 1, got -1"
    assert "Traceback" not in res.stderr
    res = cli("--debug", "validate", str(p))
    assert res.returncode != 0 and "Traceback" in res.stderr
    res = cli("validate", str(ROOT / "pipelines/configs/debug.yaml"), "stages.pool.shard_size=7")
    assert res.returncode == 0 and "ok" in res.stdout


def test_cli_list_stages_shows_fields_and_defaults():
    res = cli("list-stages")
    assert res.returncode == 0
    assert "ingest: turn a source" in res.stdout
    assert "shard_size: an integer, default 1000" in res.stdout
    assert "kind: datacomp" in res.stdout and "path: a string, required" in res.stdout


def test_matrix_expands_to_one_stage_per_combination():
    s = parse_spec(spec(POOL, {
        "stage": "train", "matrix": {"mode": ["plain", "grand"], "seed": [0, 1],
                                     "cut": [{"pct": 50, "lr": 0.01}, {"pct": 90, "lr": 0.02}]},
        "name": "{mode}_s{seed}_p{cut.pct}", "data": "pool", "mode": "{mode}", "seed": "{seed}",
        "optimizer": {"lr": "{cut.lr}"}, "batch_size": 8}), label="s.yaml")
    trains = s.stages[1:]
    assert [t.name for t in trains] == [f"{m}_s{sd}_p{p}" for m in ("plain", "grand") for sd in (0, 1)
                                        for p in (50, 90)]  # the first variable outermost
    first, last = trains[0].config, trains[-1].config
    assert (first.mode, first.seed, first.optimizer.lr) == ("plain", 0, 0.01)  # whole-string values keep their type
    assert (last.mode, last.seed, last.optimizer.lr) == ("grand", 1, 0.02)
    assert "matrix" not in s.to_plain()["stages"][1]


@pytest.mark.parametrize("matrix, name, message", [
    ([1, 2], "x{a}", "s.yaml: stages[1]: matrix: expected a mapping of variable -> list of values"),
    ({"a": []}, "x{a}", "s.yaml: stages[1]: matrix.a: expected a non-empty list of scalars, or of mappings of scalars"),
    ({"a": [[1]]}, "x{a}", "s.yaml: stages[1]: matrix.a: expected a non-empty list of scalars, or of mappings of scalars"),
    ({"a": [{"k": 1}]}, "x{a.j}", "s.yaml: stages[1]: matrix: {a.j}: a has no key 'j'"),
    ({"a": [{"k": 1}]}, "x{a}", "s.yaml: stages[1]: matrix: {a} is a mapping; name one of its keys (k)"),
    ({"a": [1, 2]}, "same", "s.yaml: stage 'same': name: another stage is already named 'same'"),
])
def test_matrix_errors_are_one_line(matrix, name, message):
    assert err(spec(POOL, {"stage": "train", "matrix": matrix, "name": name, "data": "pool"})) == message


def test_a_spec_can_live_in_object_storage(s3_endpoint):
    """``gradmimic run s3://bucket/specs/x.yaml`` (KubeRay's RayJob entrypoint): read through fsspec."""
    import fsspec

    fs = fsspec.filesystem("s3")
    fs.mkdir("specs-bucket")
    fs.pipe("specs-bucket/specs/debug.yaml", (ROOT / "pipelines/configs/debug.yaml").read_bytes())
    s = load_spec("s3://specs-bucket/specs/debug.yaml", ["stages.pool.shard_size=7"])
    assert s.name == "debug" and s.source == "debug.yaml" and s.stage("pool").config.shard_size == 7
    with pytest.raises(SpecError, match="s3://specs-bucket/specs/nope.yaml: no such spec file"):
        load_spec("s3://specs-bucket/specs/nope.yaml")
