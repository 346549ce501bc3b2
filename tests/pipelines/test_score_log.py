"""The score log's exactly-once protocol: segments named by step range and rank, discarded past a resume point."""

from __future__ import annotations

import fsspec
import numpy as np

from pipelines.formats.score_log import ScoreLogWriter, discard_after, list_parts, read_score_log


def rows(step: int, n: int = 6):
    uid_lo = np.arange(n, dtype=np.uint64) * np.uint64(7) + np.uint64(step)
    return dict(uid_hi=np.zeros(n, np.uint64), uid_lo=uid_lo, scores=np.full(n, step, np.float32),
                weights=np.full(n, 1 / n, np.float32), losses=np.ones(n, np.float32))


def test_flush_partitions_by_bucket_and_resume_discards_what_never_registered(tmp_path):
    fs, root = fsspec.filesystem("file"), str(tmp_path / "scores")
    writer = ScoreLogWriter(fs, root, rank=1, num_buckets=4)
    for step in range(1, 11):
        writer.add(step, 0, batch_size=12, **rows(step))
        if step % 5 == 0:
            writer.flush(step)
    (tmp_path / "scores" / "bucket=0" / ".part-s000000011-000000015-r0001.parquet.abc.tmp").write_bytes(b"half")
    names = {p.rsplit("/", 2)[-2] + "/" + p.rsplit("/", 1)[-1] for p in list_parts(fs, root)}
    assert names == {f"bucket={b}/part-s{a:09d}-{z:09d}-r0001.parquet" for b in range(4) for a, z in ((1, 5), (6, 10))}
    log = read_score_log(fs, root).to_pandas()
    assert len(log) == 60
    for path in list_parts(fs, root):  # every row sits in its bucket's folder
        bucket = int(path.rsplit("bucket=", 1)[1].split("/")[0])
        part = read_score_log(fs, path.rsplit("/", 1)[0]).to_pandas()
        assert (part.uid_lo % 4 == bucket).all()
    # the checkpoint at step 10 never registered: resume from 5 drops segment 6-10 and the leftover temp file
    assert discard_after(fs, root, 5) == 5
    log = read_score_log(fs, root).to_pandas()
    assert sorted(log.step.unique()) == [1, 2, 3, 4, 5] and not list(tmp_path.rglob("*.tmp"))
    # rerunning 6-10 writes the same names: no duplicates whatever happened before
    writer = ScoreLogWriter(fs, root, rank=1, num_buckets=4, first_step=6)
    for step in range(6, 11):
        writer.add(step, 0, batch_size=12, **rows(step))
    writer.flush(10)
    log = read_score_log(fs, root).to_pandas()
    assert len(log) == 60 and not log.duplicated(["uid_hi", "uid_lo", "step"]).any()
