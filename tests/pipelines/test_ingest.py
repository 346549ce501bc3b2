"""Ingest of every source kind into the sample-shard contract, on a local Ray, with rejects that add up."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.formats.pool import uid_of
from tests.support.ingest import (
    check_contract,
    check_index,
    image_bytes,
    read_output,
    run_ingest,
    sample_members,
    write_tar,
)


def caption_folder(src):
    """A caption folder with planted defects; returns ``{source: (image bytes, caption)}``."""
    (src / "nested" / "deeper").mkdir(parents=True)
    files = {"a.jpg": image_bytes("JPEG"), "b.png": image_bytes("PNG"), "nested/c.webp": image_bytes("WEBP"),
             "nested/deeper/d.bmp": image_bytes("BMP"), "broken.jpg": b"not an image at all",
             "empty.png": image_bytes("PNG"), "nocap.png": image_bytes("PNG"), "glob[1].png": image_bytes("PNG"),
             "glob1.png": image_bytes("PNG")}
    originals = {}
    for name, data in files.items():
        (src / name).write_bytes(data)
        caption = None if name == "nocap.png" else "" if name == "empty.png" else f"caption of {name}"
        if caption is not None:
            (src / name).with_suffix(".txt").write_text(caption + "\n")
        originals[name] = (data, caption)
    (src / "notes.md").write_text("not a sample")
    return originals


def test_caption_folder_indexed_in_place(tmp_path, ray_local):
    """Images stay where they are: each row points at its file; folders are found by tasks at every depth; the
    broken image is a reject only when images are validated (else the train stage finds it)."""
    src = tmp_path / "imgs"
    originals = caption_folder(src)
    stage = {"source": {"kind": "caption_folder", "path": str(src), "validate_images": True}, "shard_size": 2}
    manifest, out = run_ingest(tmp_path, stage)
    rows, members, rejects = read_output(out, manifest)
    check_index(manifest, rows, rejects, originals)
    assert manifest["rows_in"] == 9 and manifest["rows_out"] == 6 and manifest["shards"] <= 5
    assert {r["reason"] for r in rejects if r["source"] in ("empty.png", "nocap.png")} == {"empty caption",
                                                                                           "missing caption"}
    assert {r["source"]: r["reason"] for r in rejects}["broken.jpg"] == "unreadable image: not_an_image"
    assert {r["source"] for r in rows} == {"a.jpg", "b.png", "nested/c.webp", "nested/deeper/d.bmp", "glob[1].png",
                                           "glob1.png"}  # a name that looks like a glob pattern is read as it is
    assert all(r["image_offset"] == 0 and r["text_offset"] == -1 for r in rows)
    # deterministic: a forced rerun gives the same rows in the same order; without validation broken.jpg is a row;
    # first_line takes a caption file's first line (translations after it, as Tux Paint's stamps have)
    (src / "a.txt").write_text("caption of a.jpg\nfr.utf8=légende de a\nde.utf8=Bildunterschrift\n")
    again, out2 = run_ingest(tmp_path, {**stage, "source": {**stage["source"], "validate_images": False,
                                                            "first_line": True}}, name="t2")
    rows2, _, rejects2 = read_output(out2, again)
    assert [r["uid"] for r in rows2 if r["source"] != "broken.jpg"] == [r["uid"] for r in rows]
    assert "broken.jpg" in {r["source"] for r in rows2} and len(rejects2) == 2
    assert [r["text"] for r in rows2 if r["source"] != "broken.jpg"] == [r["text"] for r in rows]


def test_caption_folder_resharded(tmp_path, ray_local):
    """``reshard: true`` copies the kept samples into tars of the stage's own, byte for byte."""
    src = tmp_path / "imgs"
    originals = caption_folder(src)
    manifest, out = run_ingest(tmp_path, {"source": {"kind": "caption_folder", "path": str(src),
                                                     "validate_images": True, "reshard": True}, "shard_size": 2})
    rows, members, rejects = read_output(out, manifest)
    assert manifest["rows_in"] == manifest["rows_out"] + manifest["rejected"] == 9 and len(rejects) == 3
    assert sorted(r["source"] for r in rows) == sorted(s for s, (_, c) in originals.items() if c and s != "broken.jpg")
    assert len(members) == 3 * len(rows)  # image, caption, json: nothing else
    for r in rows:  # every pointer reads the original bytes from the stage's own tar
        image, caption = originals[r["source"]]
        assert r["tar"] == f"shards/shard-{r['shard']:05d}.tar" and members[r["image"]] == image
        assert out.fs.cat_file(out.join(r["tar"]), r["image_offset"], r["image_offset"] + r["image_size"]) == image
        assert out.fs.cat_file(out.join(r["tar"]), r["text_offset"], r["text_offset"] + r["text_size"]).decode() \
            == r["text"] == caption


def test_labelled_with_label_noise_and_split(tmp_path, ray_local):
    """Labels from the class folders (at any depth), captions from the templates, split and label noise per uid
    partition (each partition exact, seeded by the spec and the partition)."""
    src = tmp_path / "set"
    for c, colour in (("tabby_cat", (9, 9, 9)), ("dog", (250, 250, 250)), ("owl", (100, 50, 0))):
        (src / c / "more").mkdir(parents=True)
        for i in range(10):
            (src / c / ("more" if i % 4 == 0 else "") / f"{i}.png").write_bytes(image_bytes("PNG", colour))
    (src / "stray.png").write_bytes(image_bytes("PNG"))  # outside any class folder: not a sample
    stage = {"source": {"kind": "labelled", "path": str(src), "class_names": {"dog": "puppy"}},
             "noise": {"kind": "label", "rate": 0.5, "seed": 3},
             "split": {"test_fraction": 0.2, "reference_fraction": 0.2, "seed": 1}, "shard_size": 8}
    manifest, out = run_ingest(tmp_path, stage)
    rows, members, rejects = read_output(out, manifest)
    check_index(manifest, rows, rejects, {r["source"]: ((src / r["source"]).read_bytes(), r["text"]) for r in rows})
    assert manifest["rows_in"] == 30 and not rejects and manifest["class_names"] == ["puppy", "owl", "tabby cat"]
    for shard in {r["shard"] for r in rows}:  # one uid partition each
        part = [r for r in rows if r["shard"] == shard]
        test = [r for r in part if r["split"] == "test"]
        reference = [r for r in part if r["split"] == "reference"]
        train = [r for r in part if r["split"] == "train"]
        assert len(test) == round(0.2 * len(part)) and len(reference) == round(0.2 * len(part))
        assert not any(r["corrupted"] for r in test + reference)
        assert sum(r["corrupted"] for r in train) == round(0.5 * len(train))
    assert manifest["test"] == sum(r["split"] == "test" for r in rows)
    assert manifest["corrupted"] == sum(r["corrupted"] for r in rows) > 0
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
    uids = [f"{i:032x}" for i in range(1, 7)]
    texts = ["a red square", "a dog", "", "a cat", "a tree"]
    pq.write_table(pa.table({"uid": uids[:5], "text": texts,
                             "clip_b32_similarity_score": [0.31, 0.25, 0.1, 0.28, 0.22],
                             # nested, as DataComp's: never a join's payload (Acero joins no list columns)
                             "face_bboxes": [[[0.1, 0.2, 0.3, 0.4]], [], [], [], [[0.5, 0.5, 0.6, 0.6]]],
                             "source": ["web"] * 5}),  # collides with ingest's own column: kept as metadata_source
                   root / "metadata" / "part-0.parquet")
    samples = [("00000000a", uids[1], b""),  # no .jpg written below: its uid must not block the good copy
               ("000000000", uids[0], image_bytes("JPEG")), ("000000001", uids[1], image_bytes("PNG")),
               ("000000002", uids[2], image_bytes("JPEG")),  # empty text in metadata
               ("000000003", uids[3], b"garbage"),  # unreadable
               ("000000004", uids[5], image_bytes("JPEG")),  # uid not in metadata
               ("000000005", None, image_bytes("JPEG")),  # no json
               ("000000006", uids[0], image_bytes("JPEG"))]  # the same uid again
    entries = [m for key, uid, img in samples for m in sample_members(key, uid, img, "ignored: metadata wins")]
    write_tar(root / "shards" / "00000000.tar", entries)
    originals = {f"00000000.tar/{key}": (img, texts[uids.index(uid)] if uid in uids[:5] else None)
                 for key, uid, img in samples}
    manifest, out = run_ingest(tmp_path, {"source": {"kind": "datacomp", "path": str(root), "validate_images": True}})
    rows, members, rejects = read_output(out, manifest)
    check_index(manifest, rows, rejects, originals)
    assert manifest["rows_in"] == 9 and manifest["rows_out"] == 2  # 8 samples in the tar, 1 metadata row without
    assert [(r["uid"], r["text"], r["clip_b32_similarity_score"], r["metadata_source"], r["face_bboxes"])
            for r in rows] == [(uids[0], "a red square", 0.31, "web", [[0.1, 0.2, 0.3, 0.4]]),
                               (uids[1], "a dog", 0.25, "web", [])]
    assert {r["source"] for r in rows} == {"00000000.tar/000000000", "00000000.tar/000000001"}
    assert all(r["text_offset"] == -1 for r in rows)  # the tar's .txt is not the metadata's caption
    reasons = sorted(r["reason"] for r in rejects)
    assert reasons == ["duplicate uid", "empty caption", "no image in tar", "no image in the shards",
                       "no uid in json", "uid not in metadata",
                       "unreadable image: not_an_image"]
    assert {r["source"] for r in rejects if r["reason"] == "no image in the shards"} == {"metadata/part-0.parquet#4"}


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


def planted_pool(root):
    """A DataComp pool of two tars and two metadata files with planted defects; returns the samples' originals
    ``{source: (image, caption)}``."""
    uids = [f"{i:032x}" for i in range(100, 113)]
    captions = [f"caption number {i}" for i in range(13)]
    colours = [(20 * i, 255 - 20 * i, 7 * i) for i in range(13)]
    tars = {"a/00000000.tar": list(range(0, 6)), "b/00000001.tar": list(range(6, 12))}
    originals, n = {}, 0
    for name, members in tars.items():
        entries = []
        for i in members:
            key, image = f"{n:09d}", image_bytes("JPEG" if i % 2 else "PNG", colours[i])
            n += 1
            if i == 9:
                image = b"\xff\xd8 not a jpeg"  # corrupt: rejected only with validate_images
            entries += sample_members(key, uids[i], image, captions[i], "jpg" if i % 2 else "png")
            originals[f"{name}/{key}"] = (image, captions[i])
        if name.startswith("b"):
            dup = f"{n:09d}"  # uid 0 again, in the second tar: the first copy (tar a) is kept
            entries += sample_members(dup, uids[0], image_bytes("PNG"), captions[0], "png")
            originals[f"{name}/{dup}"] = (entries[-3][1], captions[0])
            entries.append(("../evil.jpg", image_bytes("JPEG")))  # unsafe: never read
        write_tar(root / "shards" / name, entries)
    # uid 11 (in tar b) has no metadata row; uid 12 has a metadata row but no image anywhere
    meta = [i for i in range(13) if i != 11]
    for f, rows in enumerate((meta[:6], meta[6:])):
        (root / "metadata").mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"uid": [uids[i] for i in rows], "text": [captions[i] for i in rows],
                                 "clip_b32_similarity_score": [i / 100 for i in rows]}),
                       root / "metadata" / f"part-{f}.parquet")
    return uids, originals


def test_datacomp_index_in_place_with_planted_defects(tmp_path, ray_local, monkeypatch):
    root = tmp_path / "pool"
    uids, originals = planted_pool(root)
    stage = {"source": {"kind": "datacomp", "path": str(root), "validate_images": True}, "shard_size": 3,
             "split": {"test_fraction": 0.25, "seed": 2}, "noise": {"kind": "caption", "rate": 1.0, "seed": 1}}
    manifest, out = run_ingest(tmp_path, stage)
    rows, members, rejects = read_output(out, manifest)
    check_index(manifest, rows, rejects, originals)
    assert manifest["shards"] > 1 and manifest["shards"] == len([f for f in manifest["files"] if "shard-" in f])
    # 13 samples in the tars (12 + the duplicate) + the unsafe member + 1 metadata row without an image
    assert (manifest["rows_in"], manifest["rows_out"], manifest["rejected"]) == (15, 10, 5)
    assert sorted((r["source"], r["reason"]) for r in rejects) == [
        ("b/00000001.tar/../evil.jpg", "unsafe member name '../evil.jpg'"),
        ("b/00000001.tar/000000009", "unreadable image: not_an_image"),
        ("b/00000001.tar/000000011", "uid not in metadata"),
        ("b/00000001.tar/000000012", "duplicate uid"),
        ("metadata/part-1.parquet#5", "no image in the shards")]
    assert sorted(r["uid"] for r in rows) == sorted(uids[i] for i in range(11) if i != 9)
    assert {r["uid"]: r["source"] for r in rows}[uids[0]] == "a/00000000.tar/000000000"
    assert {r["uid"]: r["clip_b32_similarity_score"] for r in rows}[uids[3]] == 0.03
    assert manifest["corrupted"] == sum(r["corrupted"] for r in rows) > 0
    assert manifest["test"] == sum(r["split"] == "test" for r in rows)
    assert not any(r["corrupted"] for r in rows if r["split"] != "train")
    for r in rows:  # a corrupted caption is another sample's, its pointers into this tar or none
        assert r["corrupted"] == (r["text"] != originals[r["source"]][1])
    # without validation the corrupt image is indexed (the train stage checks it when it decodes it)
    plain, _ = run_ingest(tmp_path, {**stage, "source": {"kind": "datacomp", "path": str(root)}}, name="plain")
    assert (plain["rows_out"], plain["rejected"]) == (11, 4)
    # the same spec again, its two tars indexed by one task (as a large pool's are): the same shards, row for row
    from pipelines.stages.ingest import index

    monkeypatch.setattr(index, "MIN_TAR_TASKS", 1)
    monkeypatch.setattr(index, "TASKS_PER_CPU", 0)
    assert index.tar_groups(2, 4) == 2
    again, out2 = run_ingest(tmp_path, stage, name="again")
    assert again["files"] == manifest["files"]
    for f in manifest["files"]:
        assert out2.read_table(f).equals(out.read_table(f)), f


def test_webdataset_index_in_place(tmp_path, ray_local):
    root = tmp_path / "wds"
    uid = "ab" * 16
    samples = {"x/0.tar": [("s0", uid, "a red square"), ("s1", None, "  a dog\n"), ("s2", None, None)],
               "x/y/1.tar": [("s0", None, ""), ("s9", uid, "the same uid again"), ("s3", None, "a cat")]}
    originals = {}
    for name, entries in samples.items():
        members = []
        for key, u, caption in entries:
            image = image_bytes("PNG", (len(originals) * 30, 9, 9))
            members += sample_members(key, u, image, caption, "png")
            originals[f"{name}/{key}"] = (image, caption.strip() if caption else caption)
        write_tar(root / name, members)
    manifest, out = run_ingest(tmp_path, {"source": {"kind": "webdataset", "path": str(root)}})
    rows, _, rejects = read_output(out, manifest)
    check_index(manifest, rows, rejects, originals)
    assert (manifest["rows_in"], manifest["rows_out"]) == (6, 3)
    assert sorted((r["source"], r["reason"]) for r in rejects) == [
        ("x/0.tar/s2", "missing caption"), ("x/y/1.tar/s0", "empty caption"), ("x/y/1.tar/s9", "duplicate uid")]
    by_source = {r["source"]: r for r in rows}
    assert by_source["x/0.tar/s0"]["uid"] == uid  # from its .json
    assert by_source["x/0.tar/s1"]["uid"] == uid_of("webdataset:x/0.tar/s1")  # none: from where it is
    assert by_source["x/0.tar/s1"]["text"] == "a dog" and by_source["x/0.tar/s1"]["text_size"] == 5
    assert all(r["text_offset"] >= 0 for r in rows)


@pytest.mark.slow
def test_train_reads_an_index_in_place(tmp_path, ray_local):
    """A train stage runs on a DataComp pool indexed in place: its images and captions read from the source tars."""
    from pipelines.run.runner import run_spec
    from pipelines.run.spec import parse_spec

    planted_pool(tmp_path / "pool")
    spec = parse_spec({"name": "t", "storage": str(tmp_path / "runs"), "stages": [
        {"stage": "ingest", "name": "pool", "shard_size": 3,
         "source": {"kind": "datacomp", "path": str(tmp_path / "pool"), "validate_images": True}},
        {"stage": "train", "name": "clip", "data": "pool", "batch_size": 4, "steps": 2, "checkpoint_every": 2,
         "optimizer": {"lr": 1e-3}, "resources": {"num_workers": 1}}]})
    manifests = run_spec(spec, stream=io.StringIO())
    assert manifests["pool"]["rows_out"] == 10 and manifests["clip"]["steps"] == 2


def test_datacomp_index_on_s3(tmp_path, s3_endpoint, ray_local):
    """The pool and the run both on object storage: the index points at the source tars by their s3:// URLs."""
    from pipelines.run.storage import open_storage

    uids, originals = planted_pool(tmp_path / "pool")
    fs, _ = open_storage("s3://gm-index")
    fs.mkdir("gm-index")
    fs.put(str(tmp_path / "pool"), "gm-index/pool", recursive=True)
    manifest, out = run_ingest(tmp_path, {"source": {"kind": "datacomp", "path": "s3://gm-index/pool"},
                                          "shard_size": 4}, storage="s3://gm-index/runs")
    rows, _, rejects = read_output(out, manifest)
    check_index(manifest, rows, rejects, originals)
    assert (manifest["rows_in"], manifest["rows_out"]) == (15, 11)
    assert all(r["tar"].startswith("s3://gm-index/pool/shards/") for r in rows)
    assert not fs.exists(out.join("_index"))  # the scratch partitions are gone


def test_caption_folder_on_s3(tmp_path, s3_endpoint, ray_local):
    """A caption folder on object storage, indexed in place: rows point at the s3:// objects, same rows as local."""
    from pipelines.run.storage import open_storage

    originals = caption_folder(tmp_path / "imgs")
    fs, _ = open_storage("s3://gm-folder")
    fs.mkdir("gm-folder")
    fs.put(str(tmp_path / "imgs"), "gm-folder/imgs", recursive=True)
    stage = {"source": {"kind": "caption_folder", "path": "s3://gm-folder/imgs", "validate_images": True},
             "shard_size": 2}
    manifest, out = run_ingest(tmp_path, stage, storage="s3://gm-folder/runs")
    rows, _, rejects = read_output(out, manifest)
    check_index(manifest, rows, rejects, originals)
    assert all(r["tar"] == "s3://gm-folder/imgs/" + r["source"] for r in rows)
    local, out2 = run_ingest(tmp_path, {**stage, "source": {**stage["source"], "path": str(tmp_path / "imgs")}})
    assert [(r["uid"], r["split"]) for r in rows] == [(r["uid"], r["split"]) for r in read_output(out2, local)[0]]


def test_image_validation_reasons_are_the_train_stages_codes(monkeypatch):
    """Ingest's validation gives the train stage's reason for a bad image (its code's name, no exception text):
    not an image, truncated, over the decoders' pixel bound (checked from the header) or PIL's (no Ray here)."""
    from PIL import Image

    from pipelines.formats import skipped
    from pipelines.stages.ingest.writer import image_problem
    from pipelines.training.data import decode_image

    good, short = image_bytes("PNG", size=(20, 20)), image_bytes("JPEG")[:40]
    assert image_problem(good) is None
    assert image_problem(b"garbage") == "unreadable image: not_an_image"
    assert image_problem(short) == "unreadable image: " + skipped.REASONS[decode_image(short, 8)[1]]
    assert image_problem(short) in ("unreadable image: truncated", "unreadable image: corrupt")
    assert skipped.load_image(good, 400) is None and skipped.guarded(skipped.load_image, good, 399)[1] == \
        skipped.TOO_LARGE
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    assert image_problem(image_bytes("PNG", size=(15, 10))) == "unreadable image: too_large"  # PIL only warns
    assert image_problem(image_bytes("PNG", size=(20, 20))) == "unreadable image: too_large"  # PIL raises


def test_datacomp_reshard_copies_into_tars(tmp_path, ray_local):
    """``reshard: true``: the kept samples copied into the stage's own tars, the same rows as the index."""
    planted_pool(tmp_path / "pool")
    src = {"kind": "datacomp", "path": str(tmp_path / "pool"), "validate_images": True}
    index, out_i = run_ingest(tmp_path, {"source": src, "shard_size": 3})
    manifest, out = run_ingest(tmp_path, {"source": {**src, "reshard": True}, "shard_size": 3}, name="re")
    rows, members, rejects = read_output(out, manifest)
    check_contract(manifest, rows, members, rejects, out)
    indexed, _, _ = read_output(out_i, index)
    drop = ("key", "tar", "image", "image_offset", "image_size", "text_offset", "text_size")
    assert [{k: v for k, v in r.items() if k not in drop} for r in rows] == \
        [{k: v for k, v in r.items() if k not in drop} for r in indexed]
    assert manifest["shards"] == index["shards"] and manifest["rejected"] == index["rejected"]


def test_tar_scan_agrees_with_tarfile_or_defers_to_it(tmp_path):
    """The header scan gives tarfile's members (name, data offset, size, the .json / .txt bytes) on plain tars,
    and ``None`` (tarfile decides) on anything else."""
    import tarfile

    from pipelines.stages.ingest.tarscan import scan_tar

    def tarfile_members(path):
        with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tf:
            return [(m.name, m.offset_data, m.size, tf.extractfile(m).read() if m.name.endswith((".json", ".txt"))
                     else None) for m in tf if m.isfile()]

    big = bytes(range(256)) * 300  # seeked over, not read
    plain = [m for i in range(3) for m in sample_members(f"d/{i:03d}", "ab" * 16, image_bytes("JPEG"), f"cap {i}")]
    write_tar(tmp_path / "plain.tar", plain + [("big.png", big), ("empty.txt", b"")])  # pax format, short names
    got = scan_tar(open(tmp_path / "plain.tar", "rb"))
    assert got == tarfile_members(tmp_path / "plain.tar") and len(got) == 11
    with tarfile.open(tmp_path / "ustar.tar", "w", format=tarfile.USTAR_FORMAT) as tf:  # a name in prefix + name
        info = tarfile.TarInfo("x" * 90 + "/" + "y" * 60 + ".txt")
        info.size = 4
        tf.addfile(info, io.BytesIO(b"long"))
    got = scan_tar(open(tmp_path / "ustar.tar", "rb"))
    assert got == tarfile_members(tmp_path / "ustar.tar") and got[0][3] == b"long"
    with tarfile.open(tmp_path / "dir.tar", "w") as tf:  # a directory member: skipped, as tarfile's isfile() does
        info = tarfile.TarInfo("d")
        info.type = tarfile.DIRTYPE
        tf.addfile(info)
    assert scan_tar(open(tmp_path / "dir.tar", "rb")) == []
    odd = {"gnu": ("n" * 120 + ".txt", tarfile.GNU_FORMAT), "pax": ("é" * 120 + ".txt", tarfile.PAX_FORMAT),
           "unsafe": ("../evil.txt", tarfile.USTAR_FORMAT)}
    for label, (name, fmt) in odd.items():
        with tarfile.open(tmp_path / f"{label}.tar", "w", format=fmt) as tf:
            info = tarfile.TarInfo(name)
            info.size = 2
            tf.addfile(info, io.BytesIO(b"hi"))
        assert scan_tar(open(tmp_path / f"{label}.tar", "rb")) is None, label
    with tarfile.open(tmp_path / "link.tar", "w") as tf:
        info = tarfile.TarInfo("a.jpg")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(info)
    data = (tmp_path / "plain.tar").read_bytes()
    (tmp_path / "bad.tar").write_bytes(data[:148] + b"0000000\0" + data[156:])  # a wrong checksum
    (tmp_path / "short.tar").write_bytes(data[:1000])
    (tmp_path / "empty.tar").write_bytes(b"")
    for name in ("link", "bad", "short", "empty"):
        assert scan_tar(open(tmp_path / f"{name}.tar", "rb")) is None, name
    # a checksum written as seven digits and a NUL (not tarfile's six, NUL, space) is still a valid checksum
    field = data[148:156]
    (tmp_path / "seven.tar").write_bytes(data[:148] + b"0" + field[:6] + b"\0" + data[156:])
    assert scan_tar(open(tmp_path / "seven.tar", "rb")) == tarfile_members(tmp_path / "plain.tar")


def test_tar_scan_reads_on_and_seeks_across_its_buffer(tmp_path, monkeypatch):
    """Members larger than the read-on step are seeked over, and a caption that straddles a buffer's end is read
    whole: the members are tarfile's, whatever the step sizes."""
    import tarfile

    from pipelines.stages.ingest import tarscan

    huge = bytes(range(256)) * 5000  # 1.28 MB: beyond a 1 MB read-on step
    members = [("a.jpg", huge), ("a.txt", b"x" * 3000), ("b.jpg", b"j" * 700), ("b.txt", b"y" * 2000),
               ("c.jpg", huge[:9000]), ("c.json", b'{"uid": "' + b"cd" * 16 + b'"}')]
    write_tar(tmp_path / "t.tar", members)
    with open(tmp_path / "t.tar", "rb") as f, tarfile.open(fileobj=f, mode="r:") as tf:
        want = [(m.name, m.offset_data, m.size, tf.extractfile(m).read() if m.name.endswith((".json", ".txt"))
                 else None) for m in tf if m.isfile()]
    for near, far in ((16 << 10, 1 << 20), (512, 1024), (1000, 3000)):
        monkeypatch.setattr(tarscan, "NEAR", near)
        monkeypatch.setattr(tarscan, "FAR", far)
        assert tarscan.scan_tar(open(tmp_path / "t.tar", "rb")) == want, (near, far)
    # large images are seeked over, not read: a tar of 40 KB images is read well under half
    monkeypatch.undo()
    write_tar(tmp_path / "big.tar", [(f"{k:03d}{ext}", data) for k in range(40) for ext, data in (
        (".jpg", bytes(range(256)) * 160), (".txt", b"a caption"), (".json", b'{"uid": "' + b"ef" * 16 + b'"}'))])

    class Counted(io.BytesIO):
        bytes_read = 0

        def read(self, size=-1):
            data = super().read(size)
            Counted.bytes_read += len(data)
            return data

    whole = (tmp_path / "big.tar").read_bytes()
    assert len(tarscan.scan_tar(Counted(whole))) == 120 and Counted.bytes_read < 0.5 * len(whole)
