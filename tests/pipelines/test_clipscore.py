"""The clipscore stage against a direct computation: every row kept with every column, the cosine of its own
image and caption embeddings, null (and counted) for a row that does not decode, the embeddings when asked; a
filter reads its output as a dataset."""

from __future__ import annotations

import io
import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipelines.models.build import ModelSpec, model_json
from pipelines.run.context import Progress, StageContext
from pipelines.run.runner import committed_stage, run_spec
from pipelines.run.spec import parse_spec
from pipelines.run.storage import StageDir

pytestmark = pytest.mark.slow


def _model_stage(fs, path: str, spec: ModelSpec, model, class_names):
    from safetensors.torch import save

    d = StageDir(fs, path)
    d.begin()
    d.write_bytes("model.safetensors", save({k: v.contiguous() for k, v in model.state_dict().items()}))
    d.write_bytes("model.json", model_json(spec, {"class_names": class_names}))
    d.commit({"files": ["model.safetensors", "model.json"]})
    return StageDir(fs, path)


def test_clipscore_equals_a_direct_computation(tmp_path, ray_local):
    import torch.nn.functional as F

    from pipelines.formats import pool as fp
    from pipelines.stages.clipscore import run_clipscore
    from pipelines.training.batches import to_images
    from pipelines.training.data import Decoder

    stages = [{"stage": "ingest", "name": "pool", "source": {"kind": "embedded", "limit": 50}, "shard_size": 20,
               "split": {"test_fraction": 0.2, "seed": 0}}]
    spec_yaml = {"name": "c", "storage": str(tmp_path), "stages": stages}
    run_spec(parse_spec(spec_yaml), stream=io.StringIO())
    pool = committed_stage(parse_spec(spec_yaml), "pool")
    shards = fp.shard_parquets(pool.manifest()["files"])
    broken = pool.read_table(shards[1])  # one row pointing at its tar's first header: not an image
    offsets = broken["image_offset"].to_numpy().copy()
    offsets[3] = 0
    pool.write_table(shards[1], broken.set_column(broken.schema.get_field_index("image_offset"), "image_offset",
                                                  pa.array(offsets)))
    spec = ModelSpec("clip", "tiny-clip")
    model = spec.build(seed=3)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(20.0))
    model_dir = _model_stage(pool.fs, f"{tmp_path}/c/model", spec, model, pool.manifest()["class_names"])
    cfg = parse_spec({**spec_yaml, "stages": stages + [
        {"stage": "train", "name": "model", "data": "pool"},
        {"stage": "clipscore", "name": "scored", "model": "model", "data": "pool", "batch_size": 7,
         "embeddings": True, "actors": 2}]}).stages[2].config
    out = StageDir(pool.fs, f"{tmp_path}/c/scored")
    out.begin()
    log = io.StringIO()
    got = run_clipscore(cfg, StageContext(out, {"model": model_dir, "pool": pool}, "scored", Progress(log)))
    assert (got["rows_in"], got["rows_out"], got["skipped"], got["scored"]) == (50, 50, 1, 49)
    assert got["files"] == shards and got["class_names"] == pool.manifest()["class_names"]
    assert "shards scored: 3/3 (50 rows" in log.getvalue()

    base = pool.fs.unstrip_protocol(pool.join(""))
    decoder = Decoder(spec.image_size, spec.context_length, spec.tokenizer)
    model.eval()
    for name in shards:
        source, scored = pool.read_table(name), out.read_table(name)
        assert scored.column_names == source.column_names + ["clip_score", "image_embedding", "text_embedding"]
        assert scored["tar"].to_pylist() == fp.tar_urls(base, source["tar"]).to_pylist()
        for column in source.column_names:
            if column != "tar":
                assert scored[column].equals(source[column]), column
        table = source.set_column(source.schema.get_field_index("tar"), "tar", scored["tar"])
        batch = decoder(table, np.arange(table.num_rows))
        ok = batch["reason"] == 0
        with torch.no_grad():
            img = F.normalize(model.encode_image(to_images(batch, spec, torch.device("cpu"))), dim=-1)
            txt = F.normalize(model.encode_text(torch.from_numpy(batch["tokens"])), dim=-1)
        want = (img * txt).sum(1).numpy()
        score = scored["clip_score"].to_numpy(zero_copy_only=False)
        assert np.array_equal(np.isnan(score), ~ok) and scored["clip_score"].null_count == int((~ok).sum())
        np.testing.assert_allclose(score[ok], want[ok], rtol=1e-5, atol=1e-6)
        emb = np.stack(scored["image_embedding"].to_numpy(zero_copy_only=False))
        np.testing.assert_allclose(emb[ok], img.numpy()[ok], rtol=1e-5, atol=1e-6)
        assert not emb[~ok].any()

    # the same CLIP given as an open_clip architecture and a weights file scores the same
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    pcfg = parse_spec({**spec_yaml, "stages": stages + [
        {"stage": "clipscore", "name": "by_path", "model": {"path": str(tmp_path / "w.safetensors")},
         "arch": "tiny-clip", "data": "pool", "actors": 1}]}).stages[1].config
    by_path = StageDir(pool.fs, f"{tmp_path}/c/by_path")
    by_path.begin()
    got = run_clipscore(pcfg, StageContext(by_path, {"pool": pool}, "by_path", Progress(io.StringIO())))
    assert (got["scored"], got["skipped"]) == (49, 1)
    for name in shards:
        assert by_path.read_table(name)["clip_score"].equals(out.read_table(name)["clip_score"]), name

    # a filter reads it as a dataset: the top half by CLIP score, exactly, the row without a score dropped
    from pipelines.stages.filter.stage import run_filter

    out.commit(got)
    fcfg = parse_spec({**spec_yaml, "stages": stages + [
        {"stage": "train", "name": "model", "data": "pool"},
        {"stage": "clipscore", "name": "scored", "model": "model", "data": "pool"},
        {"stage": "filter", "name": "kept", "data": "scored", "keep": {"column": "clip_score", "top": 0.5},
         "apply_to": ["train", "test"]}]}).stages[3].config
    kept_dir = StageDir(pool.fs, f"{tmp_path}/c/kept")
    kept_dir.begin()
    kept = run_filter(fcfg, StageContext(kept_dir, {"scored": StageDir(pool.fs, out.path)}, "kept",
                                         Progress(io.StringIO())))
    scores = pa.concat_tables([out.read_table(f).select(["uid", "clip_score"]) for f in shards]).to_pylist()
    ranked = sorted((r for r in scores if r["clip_score"] is not None), key=lambda r: -r["clip_score"])
    want = {r["uid"] for r in ranked[:kept["clauses"]["clip_score top 50%"]["kept"]]}
    assert kept["clauses"]["clip_score top 50%"]["population"] == 49 and kept["rows_out"] == len(want) == 25
    assert set(kept_dir.read_table("shards/shard-00000.parquet")["uid"].to_pylist()) == want


@pytest.mark.parametrize("fields, message", [
    ({"column": "tar"}, "column: 'tar' is a column the pool or this stage already uses"),
    ({"column": "image_embedding"}, "column: 'image_embedding' is a column the pool or this stage already uses"),
    ({"model": {"path": "w.safetensors"}}, "arch: weights given by path or pretrained need their open_clip "
                                           "architecture"),
    ({"model": {"path": "w.safetensors", "pretrained": "x"}}, "model: expected exactly one of stage, path, "
                                                              "pretrained, got path, pretrained")])
def test_clipscore_config_errors_name_the_field(tmp_path, fields, message):
    from pipelines.run.config import SpecError

    stages = [{"stage": "ingest", "name": "pool"}, {"stage": "train", "name": "model", "data": "pool"},
              {"stage": "clipscore", "name": "scored", "model": "model", "data": "pool", **fields}]
    with pytest.raises(SpecError) as caught:
        parse_spec({"name": "c", "storage": str(tmp_path), "stages": stages})
    assert str(caught.value).endswith(f"stage 'scored' (clipscore): {message}")
