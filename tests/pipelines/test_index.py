"""The train stage's row index: the same rows, arrays and global batches as the pool table read whole, and a driver
that never reads that table (nor fetches an index piece)."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.formats.pool import read_pool, split_rows
from pipelines.run.config import SpecError
from pipelines.run.runner import Progress, StageContext, committed_stage, run_spec
from pipelines.run.spec import parse_spec
from pipelines.run.storage import StageDir
from pipelines.training import index
from pipelines.training.data import Decoder, StepPlan
from pipelines.training.index import build_index

COLUMNS = ["uid_hi", "uid_lo", "split", "text", "tar", "image_offset", "image_size", "label"]
POOL = {"stage": "ingest", "name": "pool", "source": {"kind": "embedded", "limit": 60},
        "noise": {"kind": "label", "rate": 0.4, "seed": 0}, "split": {"test_fraction": 0.25, "seed": 0},
        "shard_size": 16}


def spec(root, *stages):
    return parse_spec({"name": "t", "storage": str(root), "stages": [POOL, *stages]})


@pytest.fixture(scope="module")
def pool(tmp_path_factory, ray_local):
    s = spec(tmp_path_factory.mktemp("index") / "runs")
    run_spec(s, stream=io.StringIO())
    return committed_stage(s, "pool")


def decoder(labels=True):
    return Decoder(32, tokens=77, arch="tiny-clip", labels=labels)


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k


def copy_stage(pool: StageDir, to) -> StageDir:
    shutil.copytree(pool.path, to)
    return StageDir(pool.fs, str(to))


def edit_shard(stage: StageDir, edit) -> None:
    path = stage.join("shards/shard-00001.parquet")
    pq.write_table(edit(pq.read_table(path)), path)


@pytest.mark.parametrize("min_rows,pieces", [(1, 4), (20, 2), (index.MIN_ROWS, 1)])  # 4 shards of 16 rows or fewer
def test_the_index_gives_the_rows_arrays_and_batches_of_the_table(pool, monkeypatch, min_rows, pieces):
    monkeypatch.setattr(index, "MIN_ROWS", min_rows)  # shards per index task: 1, 2, all
    whole = build_index(None, pool, labels=True, text=True)
    found = {s: whole.split(s) for s in ("train", "test")}
    assert whole.splits == ("test", "train") and whole.split("reference").num_rows == 0
    assert len(whole.pieces) == pieces and whole.counts.sum() == 60
    table = read_pool(pool, COLUMNS)
    for split, rows_index in found.items():
        rows = split_rows(table, split)
        assert rows_index.num_rows == rows_index.total == rows.num_rows > 0
        got, _, _ = rows_index.lookup(np.arange(rows.num_rows))  # global order: shards in manifest order, file order
        assert np.array_equal(got["uid_hi"], rows["uid_hi"].to_numpy())
        assert np.array_equal(got["uid_lo"], rows["uid_lo"].to_numpy())
        idx = np.random.default_rng(1).integers(0, rows.num_rows, 20)  # unsorted, repeats, across every shard
        assert_same(decoder()(rows_index, idx), decoder()(rows, idx))
    train, rows = found["train"], split_rows(table, "train")
    plan = StepPlan(train.num_rows, 8, 2, 3, 12)
    for step in range(1, 13):  # the same global batches (the plan is a function of the row count)
        for r in range(2):
            idx = plan.rank_rows(step, r)
            assert np.array_equal(train.lookup(idx)[0]["uid_lo"], rows["uid_lo"].to_numpy()[idx])
    head = found["test"].head(7)
    assert head.num_rows == 7 and found["test"].head(None) is found["test"]
    assert_same(decoder()(head, np.arange(7)), decoder()(split_rows(table, "test").slice(0, 7), np.arange(7)))
    with pytest.raises(IndexError):
        head.lookup(np.array([7]))
    sample = train.sample(10, seed=4)  # the comparison set: as drawn from the table before
    pick = np.sort(np.random.default_rng(4).choice(rows.num_rows, 10, replace=False))
    assert_same(decoder()(sample, np.arange(10)), decoder()(rows.take(pa.array(pick)), np.arange(10)))
    assert train.sample(1000, seed=4).num_rows == train.num_rows
    empty = decoder()(train, np.zeros(0, np.int64))
    assert empty["image"].shape == (0, 3, 32, 32) and len(empty["uid_lo"]) == 0


def test_captions_no_tar_holds_are_kept_in_the_index(pool, tmp_path, monkeypatch):
    """A pool row whose tar holds no caption (``text_offset`` -1) gets its ``text`` column's caption."""
    monkeypatch.setattr(index, "MIN_ROWS", 20)
    stage = copy_stage(pool, tmp_path / "pool")
    table = pq.read_table(stage.join("shards/shard-00001.parquet"))
    n = table.num_rows
    odd = pa.array(np.arange(n) % 2 == 1)
    texts = [f"caption ünïcode {i}" if i % 4 == 1 else t for i, t in enumerate(table["text"].to_pylist())]
    edit_shard(stage, lambda t: t.set_column(t.column_names.index("text"), "text", pa.array(texts)).set_column(
        t.column_names.index("text_offset"), "text_offset",
        pa.compute.if_else(odd, pa.scalar(-1, pa.int64()), t["text_offset"])))
    whole = build_index(None, stage, labels=True, text=True)
    found = {s: whole.split(s) for s in ("train", "test")}
    for split, rows_index in found.items():
        rows = split_rows(read_pool(stage, COLUMNS), split)
        idx = np.arange(rows.num_rows)[::-1]
        assert_same(decoder()(rows_index, idx), decoder()(rows, idx))
    got = decoder(labels=False)(found["train"], np.arange(found["train"].num_rows))
    assert "label" not in got and got["tokens"].shape == (found["train"].num_rows, 77)


def test_a_pool_without_caption_offsets_is_refused_by_name(pool, tmp_path, ray_local):
    from pipelines.stages.train import _read_inputs

    stage = copy_stage(pool, tmp_path / "pool")
    edit_shard(stage, lambda t: t.drop_columns(["text_offset"]))
    cfg = spec(tmp_path, {"stage": "train", "name": "m", "data": "pool", "batch_size": 8, "steps": 2}).stages[1].config
    ctx = StageContext(stage, {"pool": stage}, "m", Progress(io.StringIO()))
    with pytest.raises(SpecError, match=r"^data: .*: the pool has no column 'text_offset' \(rerun its ingest stage\)$"):
        _read_inputs(cfg, ctx)
    cls = spec(tmp_path, {"stage": "train", "name": "m", "data": "pool", "task": "classify", "batch_size": 8,
                          "steps": 2}).stages[1].config
    assert _read_inputs(cls, ctx).train.num_rows == 45  # a classifier reads no captions


def test_the_train_driver_reads_no_pool_table_and_fetches_no_piece(pool, monkeypatch):
    """Nothing per row on the driver: no pool table read, no index piece fetched (the decoders fetch them)."""
    import ray

    from pipelines.formats import pool as fp
    from pipelines.run import storage
    from pipelines.stages.train import _datasets, _read_inputs

    def refuse(*args, **kwargs):
        raise AssertionError("the driver read a pool table")

    monkeypatch.setattr(index, "MIN_ROWS", 1)  # a piece per shard
    for module, name in ((fp, "read_pool"), (fp, "split_rows"), (storage, "read_parquet"),
                         (storage.StageDir, "read_table")):
        monkeypatch.setattr(module, name, refuse)
    fetched = []
    real_get = ray.get
    monkeypatch.setattr(ray, "get", lambda refs, *a, **k: fetched.append(refs) or real_get(refs, *a, **k))
    cfg = spec(pool.path, {"stage": "train", "name": "m", "data": "pool", "mode": "agra", "batch_size": 8,
                           "steps": 3, "eval_samples": 11, "eval_batch_size": 4,
                           "comparison": {"data": "pool", "split": "test", "samples": 5}}).stages[1].config
    ctx = StageContext(pool, {"pool": pool}, "m", Progress(io.StringIO()))
    got = _read_inputs(cfg, ctx)
    assert (got.train.num_rows, got.test.num_rows, got.test.total) == (45, 11, 15)
    plan = StepPlan(got.train.num_rows, cfg.batch_size, 2, cfg.seed, 3)
    datasets, chunks = _datasets(cfg, ctx, got, plan, decoder(), lambda: 0)
    assert chunks == 3 and sorted(datasets) == ["comparison", "eval_0", "eval_1", "train_0", "train_1"]
    pieces = {r.hex() for r in got.index.pieces}
    assert len(pieces) == 4 and datasets["comparison"] is not None
    asked = {r.hex() for refs in fetched for r in (refs if isinstance(refs, list) else [refs])}
    assert pieces and not pieces & asked
    monkeypatch.undo()
    rows = datasets["eval_1"]().take_all()  # chunk 1 of the 11 rows evaluated: rows 4..7
    test = split_rows(read_pool(pool, COLUMNS), "test")
    assert [r["uid_lo"] for r in rows] == test["uid_lo"].to_pylist()[4:8] and {r["chunk"] for r in rows} == {1}
    pick = np.sort(np.random.default_rng(0).choice(test.num_rows, 5, replace=False))  # the comparison set's draw
    assert [r["uid_lo"] for r in datasets["comparison"]().take_all()] == test["uid_lo"].to_numpy()[pick].tolist()
