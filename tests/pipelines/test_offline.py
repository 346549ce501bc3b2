"""aggregate and filter through the runner: the filter's default index points every kept row at its image in the
pool's tars and ``reshard: true`` copies exactly the kept samples into new tars, both stages on S3 (moto on
loopback), an interrupted write commits nothing and a rerun completes, bad input is one line and exit 2."""

from __future__ import annotations

import io
import json
import pathlib
import subprocess
import sys
import tarfile

import numpy as np
import pyarrow as pa
import pytest

from pipelines.bench.scorelog import write_score_log
from pipelines.formats.pool import SUBSET, read_pool, read_subset, shard_parquets
from pipelines.formats.utility import read_utility
from pipelines.run.runner import committed_stage, run_spec
from pipelines.run.spec import parse_spec
from pipelines.run.storage import open_storage

pytestmark = pytest.mark.usefixtures("ray_local")
ROOT = pathlib.Path(__file__).resolve().parents[2]
POOL = {"stage": "ingest", "name": "pool", "source": {"kind": "embedded", "limit": 90}, "shard_size": 40,
        "split": {"test_fraction": 0.2, "seed": 0}}
KEEP = {"minus": [{"label": {"max": 6}}, {"true_label": {"top": 0.25}}]}


def spec(storage, *stages, name="o"):
    return parse_spec({"name": name, "storage": storage, "stages": [POOL, *stages]})


def filtered(storage, name="o", **options):
    s = spec(storage, {"stage": "filter", "name": "kept", "data": "pool", "keep": KEEP, "shard_size": 16, **options},
             name=name)
    return s, run_spec(s, stream=io.StringIO())


def tar_members(fs, path):
    with fs.open(path, "rb") as f:
        with tarfile.open(fileobj=io.BytesIO(f.read()), mode="r:") as tf:
            return {m.name: tf.extractfile(m).read() for m in tf}


def check_kept_index(s):
    """The default output: no tar written; each kept row's ``tar`` is the full URL of the pool's tar holding its
    image (the pool's own tars, written by ingest with relative names), its ranges unchanged."""
    pool, kept = committed_stage(s, "pool"), committed_stage(s, "kept")
    cols = ["uid", "text", "tar", "image", "image_offset", "image_size", "text_offset", "text_size", "split"]
    source = read_pool(pool, cols).to_pandas().set_index("uid")
    raw = pa.concat_tables([kept.read_table(f) for f in shard_parquets(kept.manifest()["files"])]).to_pandas()
    out = read_pool(kept, ["key", *cols]).to_pandas()
    m = kept.manifest()
    assert len(out) == m["rows_out"] and m["rows_in"] == 90 == m["rows_out"] + m["rejected"]
    assert not [f for f in m["files"] if f.endswith(".tar")] and m["shards"] == -(-len(out) // 16)
    assert list(raw["tar"]) == list(out["tar"])  # stored as full URLs: readers resolve nothing
    pool_url = pool.fs.unstrip_protocol(pool.join("shards"))
    for row in out.itertuples():
        assert row.tar.startswith(pool_url + "/shard-")
        assert (row.tar, row.image, row.image_offset, row.image_size, row.text_offset, row.text_size, row.text) == \
            tuple(source.loc[row.uid, ["tar", "image", "image_offset", "image_size", "text_offset", "text_size",
                                       "text"]])
    subset = read_subset(kept.fs, kept.join(SUBSET))
    assert len(subset) == m["kept_in_scope"] == int((out["split"] == "train").sum())
    return out


def check_kept_tars(s):
    """``reshard: true``: the kept samples copied into the stage's own tars, and nothing else."""
    pool, kept = committed_stage(s, "pool"), committed_stage(s, "kept")
    source = read_pool(pool, ["uid", "text", "tar", "image", "image_offset", "image_size", "split"]).to_pandas()
    out = read_pool(kept, ["uid", "key", "text", "tar", "image", "image_offset", "image_size", "split"]).to_pandas()
    fs = kept.fs
    m = kept.manifest()
    assert len(out) == m["rows_out"] and m["rows_in"] == 90 == m["rows_out"] + m["rejected"]
    tars = sorted(f for f in m["files"] if f.endswith(".tar"))
    assert len(tars) == m["shards"] == -(-len(out) // 16)
    members = {}
    for t in tars:
        members.update(tar_members(fs, kept.join(t)))
    # exactly the kept samples, each with its image, caption and uid, and nothing else
    assert len(members) == 3 * len(out)
    originals = {}
    for t in sorted(set(source["tar"])):
        originals.update(tar_members(fs, fs._strip_protocol(t)))
    by_uid = source.set_index("uid")
    for row in out.itertuples():
        image = members[row.image]
        assert row.image.startswith(row.key + ".")
        assert image == originals[by_uid.loc[row.uid, "image"]]
        assert members[f"{row.key}.txt"].decode() == row.text == by_uid.loc[row.uid, "text"]
        assert json.loads(members[f"{row.key}.json"]) == {"uid": row.uid}
        with fs.open(fs._strip_protocol(row.tar), "rb") as f:  # the parquet locates the image in the new tar
            f.seek(row.image_offset)
            assert f.read(row.image_size) == image
    subset = read_subset(fs, kept.join(SUBSET))
    assert len(subset) == m["kept_in_scope"] == int((out["split"] == "train").sum())
    return out


def test_resharded_tars_hold_exactly_the_kept_samples(tmp_path):
    s, manifests = filtered(str(tmp_path), reshard=True)
    out = check_kept_tars(s)
    index, _ = filtered(str(tmp_path), name="i")
    assert list(check_kept_index(index)["uid"]) == list(out["uid"])  # the same samples, in the same order
    pool = read_pool(committed_stage(s, "pool"), ["uid", "label", "true_label", "split", "tar"]).to_pandas()
    train = pool[pool["split"] == "train"]
    top = train.sort_values(["true_label", "uid"], ascending=[False, True])  # uid hex order = (hi, lo) order
    removed = set(top["uid"][:int(np.floor(0.25 * len(train) + 0.5))])
    want = set(train["uid"][train["label"] <= 6]) - removed
    assert set(out["uid"][out["split"] == "train"]) == want
    assert set(out["uid"][out["split"] == "test"]) == set(pool["uid"][pool["split"] == "test"])


def test_aggregate_and_filter_on_s3(s3_endpoint):
    fs, _ = open_storage("s3://gm-offline")
    fs.mkdir("gm-offline")
    info = write_score_log(fs, "gm-offline/logs/scores", uids=96, epochs=3, batch_size=16, num_buckets=4, seed=3)
    s = spec("s3://gm-offline/runs", {"stage": "aggregate", "name": "u", "scores": {"path": "s3://gm-offline/logs/scores"}})
    m = run_spec(s, stream=io.StringIO())["u"]
    assert m["rows_in"] == info["rows"] and m["samples"] == len(read_utility(committed_stage(s, "u")))
    s, _ = filtered("s3://gm-offline/runs", name="o2")
    check_kept_index(s)
    s, _ = filtered("s3://gm-offline/runs", name="o3", reshard=True)
    check_kept_tars(s)


def test_an_interrupted_filter_commits_nothing_and_a_rerun_completes(tmp_path):
    s, _ = filtered(str(tmp_path / "clean"), reshard=True)
    want = check_kept_tars(s)
    storage = str(tmp_path / "broken")
    run_spec(spec(storage), stream=io.StringIO())
    pool = committed_stage(spec(storage), "pool")
    tar = pathlib.Path(pool.join("shards/shard-00001.tar"))
    saved = tar.read_bytes()
    tar.unlink()  # the kept-shard writer fails halfway through its reads
    with pytest.raises(Exception):
        filtered(storage, reshard=True)
    s = spec(storage, {"stage": "filter", "name": "kept", "data": "pool", "keep": KEEP})
    assert committed_stage(s, "kept") is None
    tar.write_bytes(saved)
    s, manifests = filtered(storage, reshard=True)
    got = check_kept_tars(s)
    assert list(got["uid"]) == list(want["uid"])
    kept = committed_stage(s, "kept")
    leftovers = [p for p in kept.fs.ls(kept.path, detail=False) if "_attempt-" in p]
    assert len(leftovers) == 1  # the failed attempt was cleared at commit
    assert not kept.fs.exists(kept.join("_work"))


@pytest.mark.slow
def test_bad_input_is_one_line_and_exit_2(tmp_path):
    log = tmp_path / "log"
    fs, root = open_storage(str(log))
    write_score_log(fs, root, uids=32, epochs=1, batch_size=16, num_buckets=2, seed=0)
    part = next(log.rglob("*.parquet"))
    import pyarrow.parquet as pq

    pq.write_table(pq.read_table(part).drop(["score"]), part)
    spec_file = tmp_path / "s.yaml"
    spec_file.write_text(f"name: b\nstorage: {tmp_path / 'runs'}\nray: {{num_cpus: 2}}\nstages:\n"
                         f"  - {{stage: aggregate, name: u, scores: {{path: {log}}}}}\n")
    res = subprocess.run([sys.executable, "-m", "pipelines", "run", str(spec_file)], capture_output=True,
                         text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 2, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("gradmimic: error: s.yaml: stage 'u' (aggregate): scores: ") and \
        "the score log has no column 'score'" in last
    assert not (tmp_path / "runs" / "b" / "u").exists() or not list((tmp_path / "runs" / "b" / "u").glob("_attempt-*"))
