"""Ingest of every source kind into the sample-shard contract, on a local Ray, with rejects that add up."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.support.ingest import check_contract, image_bytes, read_output, run_ingest


def test_caption_folder(tmp_path, ray_local):
    src = tmp_path / "imgs"
    (src / "nested").mkdir(parents=True)
    files = {"a.jpg": image_bytes("JPEG"), "b.png": image_bytes("PNG"), "nested/c.webp": image_bytes("WEBP"),
             "d.bmp": image_bytes("BMP"), "broken.jpg": b"not an image at all", "empty.png": image_bytes("PNG"),
             "nocap.png": image_bytes("PNG"), "glob[1].png": image_bytes("PNG"), "glob1.png": image_bytes("PNG")}
    for name, data in files.items():
        (src / name).write_bytes(data)
        if name != "nocap.png":
            (src / name).with_suffix(".txt").write_text("" if name == "empty.png" else f"caption of {name}\n")
    manifest, out = run_ingest(tmp_path, {"source": {"kind": "caption_folder", "path": str(src)}, "shard_size": 2})
    rows, members, rejects = read_output(out, manifest)
    check_contract(manifest, rows, members, rejects, out)
    assert manifest["rows_in"] == 9 and manifest["rows_out"] == 6
    reasons = {r["source"]: r["reason"] for r in rejects}
    assert reasons["empty.png"] == "empty caption" and reasons["nocap.png"] == "missing caption"
    assert reasons["broken.jpg"].startswith("unreadable image: UnidentifiedImageError")
    by_source = {r["source"]: r for r in rows}
    assert by_source["nested/c.webp"]["text"] == "caption of nested/c.webp"
    assert by_source["nested/c.webp"]["key"] + ".png" in members  # webp re-encoded as PNG
    assert by_source["a.jpg"]["key"] + ".jpg" in members
    assert members[by_source["a.jpg"]["key"] + ".jpg"] == files["a.jpg"]  # JPEG bytes kept as they are
    assert {r["shard"] for r in rows} == {0, 1, 2, 3}  # 7 listed, 2 per shard; broken.jpg dropped while writing
    assert by_source["glob[1].png"]["text"] == "caption of glob[1].png"  # a name that looks like a glob pattern
    # deterministic: a forced rerun gives the same uids and keys
    again, out2 = run_ingest(tmp_path, {"source": {"kind": "caption_folder", "path": str(src)}, "shard_size": 2}, name="t2")
    rows2, _, _ = read_output(out2, again)
    assert [(r["uid"], r["key"]) for r in rows2] == [(r["uid"], r["key"]) for r in rows]


def test_labelled_with_label_noise_and_split(tmp_path, ray_local):
    src = tmp_path / "set"
    for c, colour in (("tabby_cat", (9, 9, 9)), ("dog", (250, 250, 250)), ("owl", (100, 50, 0))):
        (src / c).mkdir(parents=True)
        for i in range(10):
            (src / c / f"{i}.png").write_bytes(image_bytes("PNG", colour))
    (src / "stray.png").write_bytes(image_bytes("PNG"))  # outside any class folder: not a sample
    stage = {"source": {"kind": "labelled", "path": str(src), "class_names": {"dog": "puppy"}},
             "noise": {"kind": "label", "rate": 0.5, "seed": 3},
             "split": {"test_fraction": 0.2, "reference_fraction": 0.2, "seed": 1}, "shard_size": 8}
    manifest, out = run_ingest(tmp_path, stage)
    rows, members, rejects = read_output(out, manifest)
    check_contract(manifest, rows, members, rejects, out)
    assert manifest["rows_in"] == 30 and not rejects
    test = [r for r in rows if r["split"] == "test"]
    train = [r for r in rows if r["split"] == "train"]
    reference = [r for r in rows if r["split"] == "reference"]
    assert len(test) == 6 and not any(r["corrupted"] for r in test)
    assert len(reference) == 6 == manifest["reference"] and not any(r["corrupted"] for r in reference)
    assert sum(r["corrupted"] for r in train) == 9 == manifest["corrupted"]  # round(0.5 * 18)
    names = {0: "dog", 1: "owl", 2: "tabby cat"}
    for r in rows:
        assert r["corrupted"] == (r["label"] != r["true_label"])
        assert r["class_name"] == {"dog": "puppy"}.get(names[r["label"]], names[r["label"]])
        assert r["class_name"] in r["text"]
        assert r["source"].split("/")[0].replace("_", " ").replace("dog", "puppy") == \
            {0: "puppy", 1: "owl", 2: "tabby cat"}[r["true_label"]]


def test_datacomp_pool(tmp_path, ray_local):
    root = tmp_path / "pool"
    (root / "metadata").mkdir(parents=True)
    (root / "shards").mkdir()
    uids = [f"{i:032x}" for i in range(1, 7)]
    pq.write_table(pa.table({"uid": uids[:5], "text": ["a red square", "a dog", "", "a cat", "a tree"],
                             "clip_b32_similarity_score": [0.31, 0.25, 0.1, 0.28, 0.22],
                             "source": ["web"] * 5}),  # collides with ingest's own column: kept as metadata_source
                   root / "metadata" / "part-0.parquet")
    samples = [("00000000a", uids[1], b""),  # no .jpg written below: its uid must not block the good copy
               ("000000000", uids[0], image_bytes("JPEG")), ("000000001", uids[1], image_bytes("PNG")),
               ("000000002", uids[2], image_bytes("JPEG")),  # empty text in metadata
               ("000000003", uids[3], b"garbage"),  # unreadable
               ("000000004", uids[5], image_bytes("JPEG")),  # uid not in metadata
               ("000000005", None, image_bytes("JPEG")),  # no json
               ("000000006", uids[0], image_bytes("JPEG"))]  # the same uid again
    with tarfile.open(root / "shards" / "00000000.tar", "w") as tf:
        for key, uid, img in samples:
            entries = [(f"{key}.jpg", img)] if img else []
            entries.append((f"{key}.txt", b"ignored: metadata wins"))
            if uid:
                entries.append((f"{key}.json", json.dumps({"uid": uid}).encode()))
            for name, data in entries:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    manifest, out = run_ingest(tmp_path, {"source": {"kind": "datacomp", "path": str(root)}})
    rows, members, rejects = read_output(out, manifest)
    check_contract(manifest, rows, members, rejects, out)
    assert manifest["rows_in"] == 8 and manifest["rows_out"] == 2
    assert [(r["uid"], r["text"], r["clip_b32_similarity_score"], r["metadata_source"]) for r in rows] == \
        [(uids[0], "a red square", 0.31, "web"), (uids[1], "a dog", 0.25, "web")]
    assert {r["source"] for r in rows} == {"00000000.tar/000000000", "00000000.tar/000000001"}
    reasons = sorted(r["reason"].split(":")[0] for r in rejects)
    assert reasons == ["duplicate uid", "empty caption", "no image in tar", "no uid in json", "uid not in metadata",
                       "unreadable image"]


def test_embedded_default_is_real_and_offline(tmp_path, ray_local):
    manifest, out = run_ingest(tmp_path, {"source": {"kind": "embedded", "limit": 40},
                                          "noise": {"kind": "caption", "rate": 0.5, "seed": 0}, "shard_size": 16})
    rows, members, rejects = read_output(out, manifest)
    check_contract(manifest, rows, members, rejects, out)
    assert manifest["rows_out"] == 40 and manifest["shards"] == 3
    from sklearn.datasets import load_digits

    target = load_digits().target[:40]
    assert [r["true_label"] for r in rows] == target.tolist()
    swapped = [r for r in rows if r["corrupted"]]
    assert 15 <= len(swapped) <= 20  # 20 chosen; a swap between two identical captions is not a corruption
    for r in rows:
        if not r["corrupted"]:
            assert r["class_name"] in r["text"]
    img = np.asarray(Image.open(io.BytesIO(members[rows[0]["key"] + ".png"])))
    assert img.shape == (32, 32, 3) and img.std() > 10  # a real digit, not a blank


def test_label_noise_needs_two_classes(tmp_path, ray_local):
    (tmp_path / "one" / "only").mkdir(parents=True)
    (tmp_path / "one" / "only" / "a.png").write_bytes(image_bytes("PNG"))
    with pytest.raises(ValueError, match="label noise needs at least 2 classes, the source has 1"):
        run_ingest(tmp_path, {"source": {"kind": "labelled", "path": str(tmp_path / "one")},
                              "noise": {"kind": "label", "rate": 0.5}})
