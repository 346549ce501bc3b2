"""Nothing per row on the driver, for a whole run: ingest (in place) -> train -> aggregate -> filter -> evaluate ->
report in this process, with every parquet read on the driver capped at fewer rows than the pool has.  Each shard
and each score-log or utility file is under the cap, the pool, its split and the log are over it: a stage that
reads a whole table on the driver fails here (its tasks run in their own processes, uncapped)."""

from __future__ import annotations

import io
import json

import pyarrow.parquet as pq
import pytest

from pipelines.formats import pool as fp
from pipelines.run.runner import run_spec
from pipelines.run.spec import parse_spec
from tests.support.ingest import image_bytes, sample_members, write_tar
from tests.support.train import reference_file

ROWS, PER_TAR, CAP = 1200, 300, 400  # the pool's rows, per source tar, and the most rows one driver read may give


def webdataset_pool(root) -> None:
    colours = [(30 * (i % 8), 255 - 30 * (i % 8), 60 * (i % 4)) for i in range(ROWS)]
    for t in range(ROWS // PER_TAR):
        entries = []
        for i in range(t * PER_TAR, (t + 1) * PER_TAR):
            entries += sample_members(f"{i:09d}", fp.uid_of(f"s{i}"), image_bytes("JPEG", colours[i], (8, 8)),
                                      f"a photo of thing {i % 37}")
        write_tar(root / f"{t:05d}.tar", entries)


@pytest.mark.slow
def test_a_whole_run_reads_no_table_of_the_pool_on_the_driver(tmp_path, ray_local, monkeypatch):
    from pipelines.report.build import build_report

    webdataset_pool(tmp_path / "wds")
    ref = reference_file(tmp_path / "ref.safetensors", "clip")
    spec = parse_spec({"name": "w", "storage": str(tmp_path / "runs"), "stages": [
        {"stage": "ingest", "name": "pool", "shard_size": 150, "split": {"test_fraction": 0.4, "seed": 0},
         "source": {"kind": "webdataset", "path": str(tmp_path / "wds")}},
        {"stage": "train", "name": "mimic", "data": "pool", "mode": "mimic", "reference": {"path": ref},
         "batch_size": 16, "steps": 3, "checkpoint_every": 3, "num_buckets": 8, "eval_samples": 32,
         "resources": {"num_workers": 1}},
        {"stage": "aggregate", "name": "utility", "scores": "mimic"},
        {"stage": "filter", "name": "kept", "data": "pool", "utility": "utility", "unscored": "keep",
         "keep": {"mean_score": {"top": 0.5}}, "shard_size": 100},
        {"stage": "evaluate", "name": "eval", "model": "mimic", "data": "pool"}]})
    reads = []

    def capped(read):
        def wrapper(*args, **kwargs):
            table = read(*args, **kwargs)
            reads.append(table.num_rows)
            if table.num_rows > CAP:
                raise AssertionError(f"the driver read {table.num_rows} rows at once")
            return table
        return wrapper

    for owner, name in ((pq, "read_table"), (pq.ParquetFile, "read"), (pq.ParquetFile, "read_row_groups")):
        monkeypatch.setattr(owner, name, capped(getattr(owner, name)))
    manifests = run_spec(spec, stream=io.StringIO())
    report = build_report(str(tmp_path / "runs" / "w"))
    monkeypatch.undo()
    assert manifests["pool"]["rows_out"] == ROWS and manifests["pool"]["shards"] >= ROWS // 150
    assert manifests["eval"]["rows_in"] == manifests["pool"]["test"] > CAP  # the split is over the cap too
    kept = manifests["kept"]
    assert kept["rows_in"] == ROWS == kept["rows_out"] + kept["rejected"]
    assert reads and max(reads) <= CAP  # the driver did read files (manifests, footers, shown rows): small ones
    assert json.loads((tmp_path / "runs" / "w" / "report" / "report.json").read_text())["run"] == report["run"]
