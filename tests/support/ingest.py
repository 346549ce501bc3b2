"""Ingest helpers: images in a format, a one-stage ingest run, its output read back, and the sample-shard contract."""

from __future__ import annotations

import io
import json
import tarfile

import pyarrow as pa
from PIL import Image

from pipelines.formats.pool import rejects_files
from pipelines.run.runner import run_spec
from pipelines.run.spec import parse_spec
from pipelines.run.storage import StageDir, open_storage


def image_bytes(fmt: str, colour=(200, 30, 30), size=(12, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format=fmt)
    return buf.getvalue()


def run_ingest(tmp_path, stage: dict, storage=None, name="t"):
    spec = parse_spec({"name": name, "storage": storage or str(tmp_path / "runs"),
                       "stages": [{"stage": "ingest", "name": "pool", **stage}]})
    manifest = run_spec(spec, stream=io.StringIO())["pool"]
    fs, root = open_storage(spec.storage)
    return manifest, StageDir(fs, f"{root}/{name}/pool")


def read_output(out: StageDir, manifest):
    tables = [out.read_table(f) for f in manifest["files"] if f.startswith("shards/") and f.endswith(".parquet")]
    rows = pa.concat_tables(tables).to_pylist() if tables else []
    members = {}
    for f in manifest["files"]:
        if f.endswith(".tar"):
            with out.fs.open(out.join(f), "rb") as fh, tarfile.open(fileobj=io.BytesIO(fh.read())) as tf:
                for m in tf.getmembers():
                    members[m.name] = tf.extractfile(m).read()
    rejects = [r for f in rejects_files(manifest["files"]) for r in out.read_table(f).to_pylist()]
    return rows, members, rejects


def check_contract(manifest, rows, members, rejects, out=None):
    assert manifest["rows_in"] == manifest["rows_out"] + manifest["rejected"]
    assert manifest["rows_out"] == len(rows) and manifest["rejected"] == len(rejects)
    assert len({r["uid"] for r in rows}) == len(rows)
    for r in rows:
        assert (r["uid_hi"] << 64 | r["uid_lo"]) == int(r["uid"], 16) and len(r["uid"]) == 32
        image = [n for n in members if n.startswith(r["key"] + ".") and n.rsplit(".", 1)[1] in ("jpg", "png")]
        assert len(image) == 1, r["key"]
        Image.open(io.BytesIO(members[image[0]])).load()
        assert r["image"] == image[0] and r["tar"] == f"shards/shard-{r['shard']:05d}.tar"
        if out is not None:  # the parquet locates the image: one ranged read gives exactly its bytes
            start = r["image_offset"]
            assert out.fs.cat_file(out.join(r["tar"]), start, start + r["image_size"]) == members[image[0]]
        assert members[r["key"] + ".txt"].decode() == r["text"]
        if out is not None:  # and the caption's bytes, in the same tar
            start = r["text_offset"]
            assert out.fs.cat_file(out.join(r["tar"]), start, start + r["text_size"]).decode() == r["text"]
        assert json.loads(members[r["key"] + ".json"]) == {"uid": r["uid"]}
    assert len(members) == 3 * len(rows)  # nothing in the tars that the table does not list


def write_tar(path, entries) -> None:
    """A tar of ``(name, bytes)`` members, in order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def sample_members(key: str, uid=None, image=b"", caption=None, ext="jpg"):
    """A webdataset sample's members: ``<key>.<ext>`` (unless no image), ``.txt``, ``.json`` (where given)."""
    out = [(f"{key}.{ext}", image)] if image else []
    if caption is not None:
        out.append((f"{key}.txt", caption.encode("utf-8")))
    if uid is not None:
        out.append((f"{key}.json", json.dumps({"uid": uid}).encode()))
    return out


def check_index(manifest, rows, rejects, originals):
    """An ingest indexed in place: counts add up, every uid once, no tar written, and each row's pointers give
    exactly the source's bytes: ``originals`` is ``{source: (image bytes, caption)}`` (``source`` = ``<tar>/<key>``)."""
    assert manifest["rows_in"] == manifest["rows_out"] + manifest["rejected"]
    assert manifest["rows_out"] == len(rows) and manifest["rejected"] == len(rejects)
    assert len({r["uid"] for r in rows}) == len(rows)
    assert not [f for f in manifest["files"] if f.endswith(".tar")]
    for r in rows:
        assert (r["uid_hi"] << 64 | r["uid_lo"]) == int(r["uid"], 16) and len(r["uid"]) == 32
        assert "://" in r["tar"]  # an absolute URL: the source tar, in place
        fs, path = open_storage(r["tar"])
        image, caption = originals[r["source"]]
        start = r["image_offset"]
        assert fs.cat_file(path, start=start, end=start + r["image_size"]) == image
        assert r["image"] == r["key"] + "." + r["image"].rsplit(".", 1)[1]
        if r["text_offset"] >= 0:
            start = r["text_offset"]
            assert fs.cat_file(path, start=start, end=start + r["text_size"]).decode() == r["text"]
        if not r["corrupted"]:
            assert r["text"] == caption
