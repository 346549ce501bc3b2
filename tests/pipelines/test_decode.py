"""The decoders never raise for one bad sample: each undecodable row gets a zero image and a stable reason code."""

from __future__ import annotations

import io

import numpy as np
import pytest

from pipelines.formats import skipped
from pipelines.training.data import Decoder, decode_image, resize_image
from pipelines.training.index import INDEX_DTYPE
from tests.support.ingest import image_bytes
from tests.support.train import bomb_png, corrupt_png, random_bytes, truncated_jpeg

GOOD = image_bytes("JPEG", size=(40, 30))


@pytest.mark.parametrize("data, reason", [
    (GOOD, skipped.OK),
    (truncated_jpeg(), skipped.TRUNCATED),
    (random_bytes(), skipped.NOT_AN_IMAGE),
    (bomb_png(), skipped.TOO_LARGE),
    (corrupt_png(), skipped.CORRUPT),
    (b"", skipped.NOT_AN_IMAGE),
])
def test_reason_codes(data, reason):
    image, code = decode_image(data, 16)
    assert code == reason, skipped.REASONS.get(code)
    if reason == skipped.OK:
        assert np.array_equal(image, resize_image(GOOD, 16))  # a good image decodes exactly as before
    else:
        assert image is None


def test_transparent_pixels_decode_as_white():
    """A cut-out's transparent background is white, whatever its invisible pixels hold (RGBA, LA and palette)."""
    from PIL import Image

    rgba = np.zeros((8, 8, 4), np.uint8)  # black and fully transparent...
    rgba[2:6, 2:6] = (200, 10, 10, 255)  # ...around an opaque red square
    palette = Image.fromarray(rgba[..., :3], "RGB").quantize(4)
    palette.info["transparency"] = int(np.asarray(palette)[0, 0])  # the background's index is transparent
    for image in (Image.fromarray(rgba, "RGBA"), Image.fromarray(rgba, "RGBA").convert("LA"), palette):
        buf = io.BytesIO()
        image.save(buf, "PNG")
        out, reason = decode_image(buf.getvalue(), 8)
        assert reason == 0 and out.shape == (3, 8, 8), image.mode
        assert (out[:, 0, 0] == 255).all() and (out[:, 7, 7] == 255).all(), image.mode  # transparent: white
        assert out[0, 4, 4] > 100 or image.mode == "LA", image.mode  # the opaque square keeps its colour


def test_pixel_bound_is_a_reject_not_a_decode():
    big = image_bytes("PNG", size=(300, 200))
    assert decode_image(big, 16, max_pixels=300 * 200)[1] == skipped.OK
    assert decode_image(big, 16, max_pixels=300 * 200 - 1)[1] == skipped.TOO_LARGE


def test_decode_index_marks_bad_rows_and_keeps_good_ones(tmp_path):
    blobs = [GOOD, truncated_jpeg(), random_bytes(), bomb_png(), GOOD, GOOD]
    captions = [b"a dog", b"a cat", b"x", b"y", b"\xff\xfe not utf-8", b"short"]
    path = tmp_path / "pool.bin"
    data, rows = b"", np.zeros(len(blobs), INDEX_DTYPE)
    for i, (blob, cap) in enumerate(zip(blobs, captions)):
        rows[i]["uid_lo"], rows[i]["image_offset"], rows[i]["image_size"] = i, len(data), len(blob)
        data += blob
        rows[i]["text_offset"], rows[i]["text_size"] = len(data), len(cap)
        data += cap
    rows[5]["image_size"] += len(data)  # the index claims more bytes than the file holds: a short read
    path.write_bytes(data)
    out = Decoder(16, tokens=77, arch="tiny-clip", labels=True).decode_index(rows, [str(path)])
    assert skipped.reason_names(out["reason"][1:]) == ["truncated", "not_an_image", "too_large", "bad_caption",
                                                       "short_read"]
    assert out["reason"][0] == skipped.OK and np.array_equal(out["image"][0], resize_image(GOOD, 16))
    assert not out["image"][1:4].any() and not out["image"][5].any()
    assert out["tokens"].shape == (6, 77) and out["uid_lo"].tolist() == list(range(6))


def test_decode_features_reads_each_row_once_and_marks_the_rest(tmp_path, monkeypatch):
    """Cached tower features: a row's float32 values from one ranged read; a row without (size 0) is
    ``no_features`` and never read (an empty range would fetch the whole object on some stores); a short read is
    ``short_read``."""
    from pipelines.training import data as data_module

    values = np.arange(4 * 5, dtype="<f4").reshape(4, 5)  # 4 rows of 3 image + 2 text features
    path = tmp_path / "shard.f32"
    path.write_bytes(values.tobytes())
    rows = np.zeros(4, INDEX_DTYPE)
    rows["uid_lo"], rows["image_offset"], rows["image_size"] = range(4), np.arange(4) * 20, [20, 0, 20, 40]
    reads = []
    real = data_module.read_ranges
    monkeypatch.setattr(data_module, "read_ranges", lambda urls, s, e, o: reads.append(list(e - s)) or real(urls, s,
                                                                                                          e, o))
    out = Decoder(16, features=(3, 2), labels=True).decode_index(rows, [str(path)])
    assert reads == [[20, 20, 40]]
    assert out["reason"].tolist() == [skipped.OK, skipped.NO_FEATURES, skipped.OK, skipped.SHORT_READ]
    assert np.array_equal(out["image"][[0, 2]], values[[0, 2], :3]) and np.array_equal(out["tokens"][2], values[2, 3:])
    assert not out["image"][[1, 3]].any() and out["image"].dtype == np.float32 and out["tokens"].shape == (4, 2)


def test_a_failed_read_raises_rather_than_skips(tmp_path):
    rows = np.zeros(1, INDEX_DTYPE)
    rows[0]["image_size"], rows[0]["text_offset"] = 10, -1
    with pytest.raises(FileNotFoundError):
        Decoder(16).decode_index(rows, [str(tmp_path / "missing.tar")])


def test_heldout_leaves_undecodable_rows_out_and_counts_them():
    import torch

    from pipelines.models.build import ModelSpec
    from pipelines.training.evaluation import heldout

    spec = ModelSpec("clip", "tiny-clip")
    model = spec.build(seed=0).eval()
    rng = np.random.default_rng(0)
    chunk = {"image": rng.integers(0, 256, (5, 3, spec.image_size, spec.image_size), dtype=np.uint8),
             "tokens": rng.integers(1, 100, (5, spec.context_length)), "uid_lo": np.arange(5, dtype=np.uint64),
             "reason": np.array([0, skipped.TRUNCATED, 0, 0, skipped.TOO_LARGE], np.uint8)}
    ok = chunk["reason"] == 0
    bad = heldout(model, spec, [chunk], torch.device("cpu"), keep_embeddings=True)
    good = heldout(model, spec, [{k: v[ok] for k, v in chunk.items()}], torch.device("cpu"), keep_embeddings=True)
    assert bad.sums[:3].tolist() == good.sums[:3].tolist() and bad.sums[2] == 3
    assert bad.sums[3] == 2 and good.sums[3] == 0
    assert np.array_equal(np.concatenate(bad.kept), ok)  # evaluate keeps the captions of these rows
    assert torch.equal(torch.cat(bad.images), torch.cat(good.images))
    all_bad = heldout(model, spec, [{**chunk, "reason": np.full(5, skipped.CORRUPT, np.uint8)}], torch.device("cpu"))
    assert all_bad.sums.tolist() == [0, 0, 0, 5]  # a chunk with nothing decodable runs nothing


def test_the_decoders_tokenizer_is_open_clips_exactly():
    """The decoders load open_clip's BPE tokenizer module alone (not the package: seconds of every decoder's start);
    its ids equal open_clip's own tokenizer's for the same architecture, in a process that had not imported
    open_clip until the comparison."""
    import pathlib
    import subprocess
    import sys

    script = """
import sys, numpy as np
from pipelines.models.tokens import bpe_tokenizer, tokenize
archs = [None, "tiny-clip", "ViT-B-32", "RN50", "ViT-B-32-quickgelu", "ViT-L-14"]
texts = ["a photo of a cat.", "Caf\u00e9 &amp; cr\u00e8me br\u00fbl\u00e9e!", "", "x " * 200, "\u4e2d\u6587 \U0001f600"]
ours = {a: tokenize(a, 16, texts) for a in archs}
assert all(bpe_tokenizer(a, 16) is not None for a in archs)
assert "open_clip" not in sys.modules
import open_clip
from pipelines.models.build import open_clip_name
for a in archs:
    ref = (open_clip.get_tokenizer(open_clip_name(a), context_length=16) if a
           else lambda t: open_clip.tokenize(t, context_length=16))(texts).numpy()
    assert np.array_equal(ours[a], ref), (a, ours[a], ref)
print("ok")
"""
    root = pathlib.Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


@pytest.mark.parametrize("arch", ["ViT-B-16-SigLIP", "xlm-roberta-base-ViT-B-32", "no-such-arch", "cfg.json"])
def test_a_tokenizer_the_bpe_module_cannot_mirror_goes_to_open_clip(arch):
    from pipelines.models.tokens import bpe_tokenizer

    assert bpe_tokenizer(arch, 16) is None
