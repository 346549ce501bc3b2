"""The evaluate stage and its metrics against brute force: explicit loops over similarities and log-softmaxes."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from pipelines.models.build import ModelSpec, model_json
from pipelines.run.runner import Progress, StageContext, committed_stage, run_spec
from pipelines.run.spec import parse_spec
from pipelines.run.storage import StageDir
from pipelines.stages.evaluate import run_evaluate
from pipelines.training.evaluation import retrieval_recall


def brute_recall(img, txt, captions, k):
    """Image->text over the distinct captions (each embedded as its first row's text), text->image over the images."""
    sim = (img @ txt.T).numpy()
    distinct = list(dict.fromkeys(captions))
    first = [captions.index(c) for c in distinct]
    i2t = np.mean([captions[i] in [distinct[j] for j in np.argsort(-sim[i, first], kind="stable")[:k]]
                   for i in range(len(img))])
    t2i = np.mean([any(captions[j] == captions[i] for j in np.argsort(-sim[:, i], kind="stable")[:k])
                   for i in range(len(txt))])
    return i2t, t2i


def test_retrieval_recall_counts_duplicate_captions_as_found():
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(40, 8, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(img + 0.8 * torch.randn(40, 8, generator=g), dim=-1)
    captions = [f"digit {i % 7}" for i in range(40)]
    got = retrieval_recall(img, txt, captions, ks=(1, 5))
    for k in (1, 5):
        i2t, t2i = brute_recall(img, txt, captions, k)
        assert got[f"i2t_recall@{k}"] == pytest.approx(i2t) and got[f"t2i_recall@{k}"] == pytest.approx(t2i)


def test_image_to_text_recall_ranks_distinct_captions():
    """Six rows share caption "0", the nearest text of every image: by rows an image's 5 nearest texts would all be
    "0" (recall@5 = 6/15); among the distinct captions its own comes second (recall@5 = 1, recall@1 = 6/15)."""
    captions = ["0"] * 6 + [str(c) for c in range(1, 10)]
    txt = torch.eye(10)[[int(c) for c in captions]]
    img = torch.nn.functional.normalize(0.8 * torch.eye(10)[0] + 0.6 * txt, dim=-1)
    sim = (img @ txt.T).numpy()
    by_rows = np.mean([any(captions[j] == captions[i] for j in np.argsort(-sim[i], kind="stable")[:5])
                       for i in range(len(img))])
    assert by_rows == pytest.approx(6 / 15)  # what ranking rows instead of captions would report
    got = retrieval_recall(img, txt, captions, ks=(1, 5))
    for k in (1, 5):
        i2t, t2i = brute_recall(img, txt, captions, k)
        assert got[f"i2t_recall@{k}"] == pytest.approx(i2t) and got[f"t2i_recall@{k}"] == pytest.approx(t2i)
    assert got == pytest.approx({"i2t_recall@1": 6 / 15, "i2t_recall@5": 1.0, "t2i_recall@1": 1.0,
                                 "t2i_recall@5": 1.0})


def dense_recall(img, txt, captions, ks):
    """The full N x N matrix and a top-k per row (what the stage computed before it streamed)."""
    _, first, codes = np.unique(np.asarray(captions, dtype=object).astype(str), return_index=True,
                                return_inverse=True)
    codes = torch.from_numpy(codes.reshape(-1))
    sim = img.float() @ txt.float().T
    i2t_sim, t2i_sim = sim[:, torch.from_numpy(first)], sim.T
    out = {}
    for k in ks:
        i2t = i2t_sim.topk(min(k, i2t_sim.shape[1]), dim=1).indices
        t2i = t2i_sim.topk(min(k, t2i_sim.shape[1]), dim=1).indices
        out[f"i2t_recall@{k}"] = float((i2t == codes[:, None]).any(1).float().mean())
        out[f"t2i_recall@{k}"] = float((codes[t2i] == codes[:, None]).any(1).float().mean())
    return out


@pytest.mark.parametrize("chunk_rows", [1, 7, 50, 64, None])
def test_chunked_retrieval_recall_equals_the_full_matrix(chunk_rows):
    """Random embeddings, 57 rows of 19 captions (copies share their text embedding): the chunked recall finds the
    same rows as the full-matrix top-k and the explicit stable ranking, for chunk sizes that do and do not divide the rows."""
    g = torch.Generator().manual_seed(1)
    captions = [f"c{(i * 5) % 19}" for i in range(57)]
    base = torch.randn(19, 16, generator=g)
    txt = torch.nn.functional.normalize(base[[int(c[1:]) for c in captions]], dim=-1)
    img = torch.nn.functional.normalize(txt + 0.9 * torch.randn(57, 16, generator=g), dim=-1)
    ks = (1, 3, 5, 30)
    got = retrieval_recall(img, txt, captions, ks=ks, chunk_rows=chunk_rows)
    dense = dense_recall(img, txt, captions, ks)  # its fractions are float32 means: compare the counts
    assert got.keys() == dense.keys() and all(round(got[m] * 57) == round(dense[m] * 57) for m in got)
    assert got == pytest.approx(dense, rel=1e-6)
    for k in ks:
        assert (got[f"i2t_recall@{k}"], got[f"t2i_recall@{k}"]) == pytest.approx(brute_recall(img, txt, captions, k))


@pytest.mark.parametrize("chunk_rows", [1, 4, 9, 40])
def test_chunked_retrieval_recall_breaks_ties_by_position(chunk_rows):
    """Embeddings of small integers (every similarity exact, many equal), repeated images and captions: the chunked
    recall equals a stable ranking's (the first caption or image of equal similarity first), exactly."""
    rng = np.random.default_rng(2)
    names = rng.integers(0, 6, 40)
    captions = [f"t{c}" for c in names]
    txt = torch.from_numpy(rng.integers(-1, 2, (6, 3))[names].astype(np.float32))
    img = torch.from_numpy(rng.integers(-1, 2, (40, 3)).astype(np.float32))
    img[20:30] = img[:10]  # repeated images: equal similarities for every text
    for k in (1, 2, 3, 5, 8):
        got = retrieval_recall(img, txt, captions, ks=(k,), chunk_rows=chunk_rows)
        i2t, t2i = brute_recall(img, txt, captions, k)
        assert got[f"i2t_recall@{k}"] == i2t and got[f"t2i_recall@{k}"] == t2i, k


def test_a_diverged_model_finds_nothing():
    img, txt = torch.full((4, 2), float("nan")), torch.eye(2)[[0, 1, 0, 1]]
    assert retrieval_recall(img, txt, ["a", "b", "a", "b"], ks=(1, 5)) == {
        "i2t_recall@1": 0.0, "i2t_recall@5": 0.0, "t2i_recall@1": 0.0, "t2i_recall@5": 0.0}


@pytest.mark.usefixtures("ray_local")
def test_evaluate_stage_equals_brute_force(tmp_path, monkeypatch):
    """The stage's figures equal a brute-force evaluation of the same rows, and its driver reads no pool table
    (the rows are found by index tasks and decoded in the evaluation task)."""
    from safetensors.torch import save

    from pipelines.formats.pool import read_pool, split_rows
    from pipelines.models.tokens import tokenize
    from pipelines.training.batches import to_images
    from pipelines.training.data import Decoder

    spec_yaml = {"name": "e", "storage": str(tmp_path), "stages": [
        {"stage": "ingest", "name": "pool", "source": {"kind": "embedded", "limit": 60},
         "split": {"test_fraction": 0.5, "seed": 0}}]}
    run_spec(parse_spec(spec_yaml), stream=io.StringIO())
    pool = committed_stage(parse_spec(spec_yaml), "pool")
    spec = ModelSpec("clip", "tiny-clip")
    model = spec.build(seed=3)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(20.0))
    fs = pool.fs
    model_dir = StageDir(fs, f"{tmp_path}/e/model")
    model_dir.begin()
    model_dir.write_bytes("model.safetensors", save({k: v.contiguous() for k, v in model.state_dict().items()}))
    names = pool.manifest()["class_names"]
    model_dir.write_bytes("model.json", model_json(spec, {"class_names": names}))
    model_dir.commit({"files": ["model.safetensors", "model.json"]})
    cfg = parse_spec({**spec_yaml, "stages": spec_yaml["stages"] + [
        {"stage": "train", "name": "model", "data": "pool"},
        {"stage": "evaluate", "name": "ev", "model": "model", "data": "pool", "batch_size": 7}]}).stages[2].config
    out = StageDir(fs, f"{tmp_path}/e/ev")
    out.begin()
    from pipelines.formats import pool as fpool
    from pipelines.run import storage

    def refuse(*args, **kwargs):
        raise AssertionError("the driver read a pool table")

    with monkeypatch.context() as m:
        for module, name in ((fpool, "read_pool"), (fpool, "split_rows"), (storage, "read_parquet"),
                             (storage.StageDir, "read_table")):
            m.setattr(module, name, refuse)
        result = run_evaluate(cfg, StageContext(out, {"model": StageDir(fs, model_dir.path), "pool": pool}, "ev",
                                                Progress(io.StringIO())))
    got = result["metrics"]

    rows = split_rows(read_pool(pool, ["uid_hi", "uid_lo", "text", "split", "tar", "image_offset", "image_size",
                                       "label"]), "test")
    batch = Decoder(spec.image_size, spec.context_length, spec.arch, labels=True)(rows, np.arange(rows.num_rows))
    model.eval()
    with torch.no_grad():
        img = model.encode_image(to_images(batch, spec, torch.device("cpu"))).double()
        txt = model.encode_text(torch.from_numpy(batch["tokens"])).double()
        img, txt = torch.nn.functional.normalize(img, dim=-1), torch.nn.functional.normalize(txt, dim=-1)
        templates = pool.manifest()["templates"]
        cls = torch.stack([torch.nn.functional.normalize(torch.nn.functional.normalize(
            model.encode_text(torch.from_numpy(tokenize(spec.arch, spec.context_length, [t.format(n)]))).double(),
            dim=-1).mean(0), dim=0) for n in names for t in templates]).reshape(len(names), len(templates), -1)
    cls = torch.nn.functional.normalize(cls.mean(1), dim=-1)
    losses = []
    for start in range(0, len(img), 7):  # symmetric InfoNCE within each chunk, one sample at a time
        a, b = img[start:start + 7], txt[start:start + 7]
        for i in range(len(a)):
            li = -torch.log_softmax(20.0 * a[i] @ b.T, 0)[i]
            lt = -torch.log_softmax(20.0 * b[i] @ a.T, 0)[i]
            losses.append(float(li + lt) / 2)
    assert got["rows"] == rows.num_rows == 30
    assert got["test_loss"] == pytest.approx(np.mean(losses), rel=1e-4)
    pred = [int(torch.argmax(cls @ img[i])) for i in range(len(img))]
    assert got["zero_shot_accuracy"] == pytest.approx(np.mean(np.array(pred) == batch["label"]))
    captions = rows["text"].to_pylist()
    for k in (1, 5):
        i2t, t2i = brute_recall(img.float(), txt.float(), captions, k)
        assert got[f"i2t_recall@{k}"] == pytest.approx(i2t) and got[f"t2i_recall@{k}"] == pytest.approx(t2i)
