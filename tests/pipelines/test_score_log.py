"""The score log: one file per rank per checkpoint, rows sorted by bucket with the bucket index in the footer, and
the exactly-once protocol (segments named by step range and rank, discarded past a resume point); the train
stage's per-checkpoint metrics segments under the same rules."""

from __future__ import annotations

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.formats import model as fm
from pipelines.formats.score_log import (
    SCHEMA,
    ScoreLogWriter,
    bucket_index,
    buckets_of,
    discard_after,
    encode,
    is_log_file,
    list_parts,
    log_files,
    open_part,
    read_bucket_rows,
    read_score_log,
)
from pipelines.run.errors import InputError


def rows(step: int, n: int = 6):
    uid_lo = np.arange(n, dtype=np.uint64) * np.uint64(7) + np.uint64(step)
    return dict(uid_hi=np.zeros(n, np.uint64), uid_lo=uid_lo, scores=np.full(n, step, np.float32),
                weights=np.full(n, 1 / n, np.float32), losses=np.ones(n, np.float32))


def names(fs, root):
    return sorted(p.rsplit("/", 1)[-1] for p in list_parts(fs, root))


def test_one_file_per_rank_per_flush_and_resume_discards_what_never_registered(tmp_path):
    fs, root = fsspec.filesystem("file"), str(tmp_path / "scores")
    writers = [ScoreLogWriter(fs, root, rank=r, num_buckets=4) for r in range(3)]
    for step in range(1, 11):
        for w in writers:
            w.add(step, 0, batch_size=18, **rows(step))
        if step % 5 == 0:
            assert [len(w.flush(step)) for w in writers] == [1, 1, 1]  # one file per rank, whatever the buckets
    want = [f"part-s{a:09d}-{z:09d}-r{r:04d}.parquet" for a, z in ((1, 5), (6, 10)) for r in range(3)]
    assert names(fs, root) == want and not list((tmp_path / "scores").glob("*/"))  # one flat folder
    (tmp_path / "scores" / ".part-s000000011-000000015-r0001.parquet.abc.tmp").write_bytes(b"half")
    log = read_score_log(fs, root).to_pandas()
    assert len(log) == 180 and sorted(log["rank"].unique()) == [0, 1, 2]
    # the checkpoint at step 10 never registered: resume from 5 drops segment 6-10 (every rank's) and the temp file
    assert discard_after(fs, root, 5) == 4
    assert names(fs, root) == want[:3] and not list(tmp_path.rglob("*.tmp"))
    assert sorted(read_score_log(fs, root).to_pandas().step.unique()) == [1, 2, 3, 4, 5]
    assert discard_after(fs, root, 5) == 0 and discard_after(fs, str(tmp_path / "nothing"), 0) == 0
    # rerunning 6-10 writes the same names: no duplicates whatever happened before
    for r in range(3):
        w = ScoreLogWriter(fs, root, rank=r, num_buckets=4, first_step=6)
        for step in range(6, 11):
            w.add(step, 0, batch_size=18, **rows(step))
        w.flush(10)
    log = read_score_log(fs, root).to_pandas()
    assert names(fs, root) == want
    assert len(log) == 180 and not log.duplicated(["uid_hi", "uid_lo", "step", "rank"]).any()
    # a rank with nothing buffered writes nothing (its steps were all skipped)
    assert ScoreLogWriter(fs, root, rank=0, num_buckets=4, first_step=11).flush(15) == []


def test_the_manifest_names_the_log():
    files = ["model.json", "scores/part-s000000006-000000010-r0000.parquet", "metrics.parquet",
             "scores/part-s000000001-000000005-r0001.parquet", "scores/part-s000000001-000000005-r0000.parquet",
             "scores/x.parquet", "metrics/part-s000000001-000000005.parquet"]
    assert log_files(files) == [files[4], files[3], files[1]]
    assert not is_log_file("scores/bucket=1/part-s000000001-000000005-r0000.parquet") and not is_log_file("model.json")


@pytest.mark.parametrize("num_buckets, group_rows", [(8, 1 << 20), (5, 3), (1, 4)])
def test_bucket_rows_read_back_equal_the_brute_force_filter(tmp_path, num_buckets, group_rows):
    rng = np.random.default_rng(num_buckets)
    n = 200
    cols = {"uid_hi": rng.integers(0, 2**63, n).astype(np.uint64),
            "uid_lo": rng.integers(0, 2**63, n).astype(np.uint64),
            "step": np.repeat(np.arange(1, 11), 20), "epoch": np.zeros(n, np.int32), "rank": np.ones(n, np.int32),
            "score": rng.normal(size=n).astype(np.float32), "weight": rng.random(n).astype(np.float32),
            "loss": rng.random(n).astype(np.float32), "batch_size": np.full(n, 40, np.int32)}
    path = tmp_path / "part-s000000001-000000010-r0001.parquet"
    path.write_bytes(encode(cols, num_buckets, row_group_rows=group_rows))
    whole = pq.read_table(path)  # plain parquet, the log's columns
    assert whole.schema.names == SCHEMA.names and whole.num_rows == n
    bucket = buckets_of(cols["uid_lo"], num_buckets)
    meta = pq.read_metadata(path)
    index = bucket_index(meta, str(path))
    assert index.num_buckets == num_buckets
    assert index.counts().tolist() == np.bincount(bucket, minlength=num_buckets).tolist()
    start = 0
    for i in range(meta.num_row_groups):  # row groups never straddle two buckets
        rg = pq.ParquetFile(path).read_row_group(i)
        assert len(set(buckets_of(rg["uid_lo"].to_numpy(), num_buckets))) == 1 and rg.num_rows <= group_rows
        start += rg.num_rows
    fs = fsspec.filesystem("file")
    with open_part(fs, str(path)) as pf:
        for b in range(num_buckets):
            got = dict(read_bucket_rows(pf, str(path), b, b + 1))
            want = pa.table({c: v[bucket == b] for c, v in cols.items()}, schema=SCHEMA)  # in step order, stable
            assert list(got) == ([b] if (bucket == b).any() else [])
            if got:
                assert got[b].equals(want)
        lo, hi = max(0, num_buckets // 2 - 1), num_buckets  # a range of buckets, some columns only
        got = dict(read_bucket_rows(pf, str(path), lo, hi, ["uid_lo", "score"]))
        assert sorted(got) == sorted(set(bucket[(bucket >= lo) & (bucket < hi)].tolist()))
        for b, t in got.items():
            assert t.column_names == ["uid_lo", "score"]
            assert t["score"].to_numpy().tolist() == cols["score"][bucket == b].tolist()
    # rewritten with fewer columns and other row groups, the index still holds (it counts rows)
    lean = tmp_path / "lean.parquet"
    pq.write_table(pq.read_table(path, columns=["uid_lo", "score"]), lean, row_group_size=7)
    with open_part(fs, str(lean)) as pf:
        for b, t in read_bucket_rows(pf, str(lean), 0, num_buckets):
            assert t["score"].to_numpy().tolist() == cols["score"][bucket == b].tolist()


def test_a_file_without_a_bucket_index_is_refused(tmp_path):
    path = tmp_path / "part-s000000001-000000002-r0000.parquet"
    pq.write_table(SCHEMA.empty_table(), path)
    with open_part(fsspec.filesystem("file"), str(path)) as pf:
        with pytest.raises(InputError, match=r"part-s000000001-000000002-r0000\.parquet: not a score-log file: its "
                                             r"footer has no bucket index"):
            list(read_bucket_rows(pf, str(path), 0, 4))
    path.write_bytes(b"PAR1 not parquet PAR1")
    with pytest.raises(InputError, match=r"not a readable parquet file"):
        with open_part(fsspec.filesystem("file"), str(path)):
            pass


def test_metrics_segments_concatenate_to_the_whole_history(tmp_path):
    """Rank 0 writes each checkpoint's own metrics rows; the stage's end concatenates them into the table the whole
    history gives (columns in order of first appearance, evaluation columns on some rows only)."""
    fs = fsspec.filesystem("file")
    root = fm.metrics_root(str(tmp_path / "attempt" / "scores"))
    assert root == str(tmp_path / "attempt" / fm.METRICS_DIR)
    history = [{"step": s, "epoch": 0, "loss": None if s == 2 else 1.0 / s, "lr": 0.1, "alignment": None,
                "nonfinite_steps": int(s >= 2), **({"test_loss": 0.5 / s, "test_accuracy": 0.25} if s % 3 == 0 else {})}
               for s in range(1, 9)]
    for first, last in ((1, 2), (3, 4), (5, 6), (7, 8)):
        fm.write_metrics_part(fs, root, first, last, history[first - 1:last])
    fm.write_metrics_part(fs, root, 9, 10, [{"step": 9}])  # a checkpoint that never registered
    assert discard_after(fs, root, 8) == 1
    out = str(tmp_path / "metrics.parquet")
    steps, last_eval = fm.concat_metrics(fs, list_parts(fs, root), out)
    got, want = pq.read_table(out), fm.metrics_table(history)
    assert steps == 8 and got.column_names == want.column_names
    assert got.to_pydict() == want.to_pydict()
    assert last_eval["step"] == 6 and last_eval["test_loss"] == 0.5 / 6 and last_eval["test_accuracy"] == 0.25


def test_a_checkpoint_counts_once_it_is_registered(tmp_path):
    """The stage's checkpoints sit next to its score log; a worker resumes from the registered one only (one written
    but never registered does not count), and registering keeps the two latest, dropping older and unregistered
    ones."""
    fs = fsspec.filesystem("file")
    root = fm.checkpoints_root(str(tmp_path / "attempt" / "scores"))
    assert root == str(tmp_path / "attempt" / fm.CHECKPOINTS_DIR)
    assert fm.latest_checkpoint(fs, root) is None and fm.registered_step(fs, root) == 0

    def write(step: int) -> None:
        fs.makedirs(f"{root}/{fm.checkpoint_name(step)}", exist_ok=True)
        fs.pipe_file(f"{root}/{fm.checkpoint_name(step)}/{fm.WEIGHTS}", b"w%d" % step)

    for step in (5, 10, 15):
        write(step)
        fm.register_checkpoint(fs, root, {"step": step, "samples_seen": 4 * step})
    write(20)  # the group died before registering it
    assert fm.registered_step(fs, root) == 15
    assert fm.latest_checkpoint(fs, root) == {"name": "step-000000015", "state": {"step": 15, "samples_seen": 60}}
    assert sorted(fs.ls(root, detail=False)) == [f"{root}/{n}" for n in (fm.CHECKPOINT_LATEST, "step-000000010",
                                                                         "step-000000015", "step-000000020")]
    write(20)  # the restarted group writes it again, and registers it
    fm.register_checkpoint(fs, root, {"step": 20, "samples_seen": 80})
    assert sorted(fs.ls(root, detail=False)) == [f"{root}/{n}" for n in (fm.CHECKPOINT_LATEST, "step-000000015",
                                                                         "step-000000020")]
    assert fs.cat_file(f"{root}/step-000000020/{fm.WEIGHTS}") == b"w20" and fm.registered_step(fs, root) == 20
    assert not [p for p in fs.ls(root, detail=False) if p.endswith(".tmp")]  # the registration was written aside
