"""Bad train configs fail before anything runs: one line naming the stage and the field (exit code 2 from the CLI)."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest
import yaml

from pipelines.run.config import SpecError
from pipelines.run.spec import check_spec, parse_spec

ROOT = pathlib.Path(__file__).resolve().parents[2]
POOL = {"stage": "ingest", "name": "pool", "source": {"kind": "embedded", "limit": 40}}


def stages(*train: dict) -> dict:
    return {"name": "c", "storage": "./unused", "stages": [POOL, *train]}


def ref(**kw) -> dict:
    return {"stage": "train", "name": "ref", "data": "pool", **kw}


def mimic(**kw) -> dict:
    base = {"stage": "train", "name": "mimic", "data": "pool", "mode": "mimic", "reference": "ref"}
    return {**base, **kw}


def error_of(data: dict) -> str:
    with pytest.raises(SpecError) as err:
        check_spec(parse_spec(data, label="spec.yaml"))
    text = str(err.value)
    assert "\n" not in text
    return text


@pytest.fixture
def wide_config(tmp_path):
    """Another architecture: the tiny CLIP with a wider embedding."""
    cfg = json.loads((ROOT / "pipelines/models/model_configs/tiny-clip.json").read_text())
    cfg["embed_dim"] = 48
    path = tmp_path / "wide-clip.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def test_each_bad_config_names_its_stage_and_field(wide_config):
    cases = [
        (stages(ref(), mimic(mimic={"params": ["visual.projj"]})),
         "spec.yaml: stage 'mimic' (train): mimic.params: model has no parameter 'visual.projj' (similar: visual.proj"),
        (stages(ref(model={"arch": wide_config}), mimic()),
         "spec.yaml: stage 'mimic' (train): reference: stage 'ref' (" + wide_config + ") does not fit this tiny-clip "
         "model: parameter 'visual.proj' has shape (64, 48) in the weights but (64, 32) in this model"),
        (stages(ref(), mimic(mimic={"temperature": 0})),
         "spec.yaml: stage 'mimic' (train): mimic.temperature: must be > 0, got 0.0"),
        (stages(ref(), mimic(reference=None)),
         "spec.yaml: stage 'mimic' (train): reference: mode 'mimic' needs a reference model"),
        (stages(ref(), mimic(reference="pool")),
         "spec.yaml: stage 'mimic' (train): reference: stage 'pool' produces a dataset, not a model"),
        (stages(ref(), mimic(reference="later")),
         "spec.yaml: stage 'mimic' (train): reference: no earlier stage is named 'later'"),
        (stages(ref(model={"arch": "ViT-Nope"})),
         "spec.yaml: stage 'ref' (train): model.arch: unknown open_clip architecture 'ViT-Nope'"),
        (stages(ref(), mimic(trainable=["text_projection"])),
         "spec.yaml: stage 'mimic' (train): mimic.params: 'visual.proj' is frozen"),
        (stages(ref(freeze=["visual.nothing*"])),
         "spec.yaml: stage 'ref' (train): freeze: no parameter matches 'visual.nothing*'"),
        (stages(ref(), mimic(mimic={"params": ["visual.conv1.weight"]})),
         "spec.yaml: stage 'mimic' (train): mimic.params: CLIP scores its projections (text_projection, visual.proj)"),
        (stages(ref(task="classify", mode="mimic", reference={"path": "r.safetensors"},
                    mimic={"params": ["visual.proj"]})),
         "spec.yaml: stage 'ref' (train): mimic.params: 'visual.proj' is not the weight of an nn.Linear layer"),
        (stages(ref(mode="agra")),
         "spec.yaml: stage 'ref' (train): comparison: mode 'agra' needs a comparison set"),
        (stages(ref(steps=5, epochs=1)),
         "spec.yaml: stage 'ref' (train): steps: give steps or epochs, not both"),
        (stages(ref(init={"path": "a.safetensors", "pretrained": "openai"})),
         "spec.yaml: stage 'ref' (train): init: expected exactly one of stage, path, pretrained, got path, pretrained"),
        (stages(ref(resources={"num_workers": 0})),
         "spec.yaml: stage 'ref' (train): resources.num_workers: must be >= 1, got 0"),
        (stages(ref(optimizer={"betas": [0.9, 1.5]})),
         "spec.yaml: stage 'ref' (train): optimizer.betas: expected two numbers in [0, 1), got [0.9, 1.5]"),
        (stages(ref(optimizer={"grad_clip": -1})),
         "spec.yaml: stage 'ref' (train): optimizer.grad_clip: must be > 0 and <= 1e9 (or null to turn it off), got -1.0"),
        (stages(ref(optimizer={"eps": 0})),
         "spec.yaml: stage 'ref' (train): optimizer.eps: must be > 0, got 0.0"),
        (stages(ref(model={"image_size": 64})),
         "spec.yaml: stage 'ref' (train): model.image_size: only for backbones"),
        (stages(ref(), mimic(init="ref", reinit=["visual.transformer.nothing*"])),
         "spec.yaml: stage 'mimic' (train): reinit: no parameter matches 'visual.transformer.nothing*'"),
        # a CLIP of pretrained towers
        (stages(ref(model={"backbone": "efficientnet_lite0"})),
         "spec.yaml: stage 'ref' (train): model.backbone: for task classify, or the image tower of a clip with "
         "model.text_tower"),
        (stages(ref(model={"backbone": "efficientnet_lite0", "text_tower": "bert-huge"})),
         "spec.yaml: stage 'ref' (train): model.text_tower: unknown 'bert-huge' (known: all-minilm-l6-v2)"),
        (stages(ref(model={"backbone": "resnet18", "text_tower": "all-minilm-l6-v2"})),
         "spec.yaml: stage 'ref' (train): model.backbone: a tower CLIP's image tower, one of efficientnet_lite0 "
         "(got 'resnet18')"),
        (stages(ref(model={"backbone": "efficientnet_lite0", "text_tower": "all-minilm-l6-v2", "embed_dim": 0})),
         "spec.yaml: stage 'ref' (train): model.embed_dim: must be >= 1, got 0"),
        (stages(ref(task="classify", model={"backbone": "efficientnet_lite0", "text_tower": "all-minilm-l6-v2"})),
         "spec.yaml: stage 'ref' (train): model.text_tower: only for task clip"),
        (stages(ref(task="classify", model={"backbone": "efficientnet_lite0"}, init={"pretrained": "imagenet"})),
         "spec.yaml: stage 'ref' (train): init.pretrained: 'imagenet' is not a packaged tag for a backbone "
         "(efficientnet-lite0; other weights: give a path)"),
    ]
    for data, message in cases:
        got = error_of(data)
        assert got.startswith(message), f"\n got: {got}\nwant: {message}"


def test_a_good_spec_passes_and_the_shipped_debug_spec_validates():
    check_spec(parse_spec(stages(ref(), mimic(init="ref", reinit=["visual.proj"], trainable=["visual.proj"]))))
    res = subprocess.run([sys.executable, "-m", "pipelines", "validate", "pipelines/configs/debug.yaml"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr


def test_cli_exit_code_2_and_one_line(tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text(yaml.safe_dump(stages(ref(), mimic(mimic={"params": ["visual.projj"]}))))
    for command in ("validate", "run"):
        res = subprocess.run([sys.executable, "-m", "pipelines", command, str(spec), f"storage={tmp_path}/runs"],
                             capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert res.returncode == 2
        lines = [ln for ln in res.stderr.splitlines() if ln.startswith("gradmimic: error:")]
        assert len(lines) == 1 and "stage 'mimic' (train): mimic.params: model has no parameter 'visual.projj'" in lines[0]
        assert "Traceback" not in res.stderr
    assert not (tmp_path / "runs").exists()  # the run failed before writing anything, ingest included
