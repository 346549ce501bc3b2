"""``ingest``: turn a source into sample shards (DESIGN.md section 4).

Sources: a folder of images with same-named ``.txt`` captions; a DataComp-layout pool (parquet metadata plus
webdataset tars whose ``.json`` holds the uid); a labelled image set (``<root>/<class>/*.jpg``) captioned from
class names with prompt templates; and the embedded default (real digits shipped in scikit-learn).

Output, under the stage directory:

- ``shards/shard-NNNNN.tar``: webdataset tars of ``<key>.jpg|png``, ``<key>.txt``, ``<key>.json`` (``{"uid": ...}``);
- ``shards/shard-NNNNN.parquet``: one row per kept sample: ``uid``, ``uid_hi``, ``uid_lo``, ``text``, ``key``,
  ``shard``, ``split``, ``corrupted``, ``source``, where its image is (``tar``: the tar's path relative to the
  stage directory, ``image``: the member's name, ``image_offset`` / ``image_size``: the member's bytes in the tar,
  so readers fetch one image with one ranged read) and the source's extra columns (``label``, ``true_label``,
  ``class_name``, DataComp metadata such as ``clip_b32_similarity_score``);
- ``rejects.parquet``: ``source``, ``uid``, ``reason`` for every sample left out (unreadable image, empty or
  missing caption, uid not in metadata).  The manifest's counts add up: ``rows_in = rows_out + rejected``.

Listing, noise and split run on the driver (captions and labels are small); reading, checking and writing images
runs as one Ray task per output shard.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import posixpath
import tarfile
from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Optional, Tuple, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..config import SpecError, doc, require
from ..storage import open_storage, read_parquet, write_file

RESERVED = ("uid", "uid_hi", "uid_lo", "text", "key", "shard", "split", "corrupted", "source", "tar", "image",
            "image_offset", "image_size", "label", "true_label", "class_name")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
PHOTO_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a close-up photo of a {}.")
DIGIT_TEMPLATES = ("a handwritten digit {}.", "a scan of the number {}, written by hand.", "the digit {}.")


@dataclass(frozen=True)
class EmbeddedSource:
    kind: Literal["embedded"] = "embedded"
    dataset: Literal["digits"] = doc("the packaged dataset: 'digits' (1,797 real handwritten digits)", default="digits")
    templates: Tuple[str, ...] = doc("caption templates, '{}' is the class name", default=DIGIT_TEMPLATES)
    limit: Optional[int] = doc("keep only the first N samples", default=None)


@dataclass(frozen=True)
class CaptionFolderSource:
    kind: Literal["caption_folder"]
    path: str = doc("folder (local or URL) searched recursively for images with same-named .txt captions")


@dataclass(frozen=True)
class LabelledSource:
    kind: Literal["labelled"]
    path: str = doc("folder with one sub-folder of images per class")
    templates: Tuple[str, ...] = doc("caption templates, '{}' is the class name", default=PHOTO_TEMPLATES)
    class_names: Dict[str, str] = doc("folder name -> class name used in captions", default_factory=dict)


@dataclass(frozen=True)
class DataCompSource:
    kind: Literal["datacomp"]
    path: str = doc("pool root holding the metadata parquet and the webdataset tars")
    metadata: str = doc("metadata folder under path (parquet with uid, text, ...)", default="metadata")
    shards: str = doc("tar folder under path", default="shards")


Source = Union[EmbeddedSource, CaptionFolderSource, LabelledSource, DataCompSource]


@dataclass(frozen=True)
class NoiseConfig:
    kind: Literal["label", "caption"] = doc("label: relabel to another class; caption: swap captions")
    rate: float = doc("fraction of training samples to corrupt")
    seed: int = doc("random seed", default=0)

    def validate(self) -> None:
        if not 0.0 <= self.rate <= 1.0:
            raise SpecError(f"rate: expected a fraction in [0, 1], got {self.rate}")


@dataclass(frozen=True)
class SplitConfig:
    test_fraction: float = doc("fraction of samples held out as split='test' (never corrupted)")
    reference_fraction: float = doc("fraction set aside as split='reference': clean data, disjoint from the "
                                    "training pool and the test split, to train a reference on", default=0.0)
    seed: int = doc("random seed", default=0)

    def validate(self) -> None:
        if not 0.0 <= self.test_fraction < 1.0:
            raise SpecError(f"test_fraction: expected a fraction in [0, 1), got {self.test_fraction}")
        if not 0.0 <= self.reference_fraction < 1.0 - self.test_fraction:
            raise SpecError(f"reference_fraction: expected a fraction in [0, 1 - test_fraction), got "
                            f"{self.reference_fraction}")


@dataclass(frozen=True)
class IngestConfig:
    source: Source = doc("where samples come from: kind embedded | caption_folder | labelled | datacomp",
                          default=EmbeddedSource())
    noise: Optional[NoiseConfig] = doc("inject label or caption noise into the training split", default=None)
    split: Optional[SplitConfig] = doc("hold out a test split", default=None)
    shard_size: int = doc("samples per output shard (one Ray task each)", default=1000)

    def validate(self) -> None:
        require(self, "shard_size", 1)
        if self.noise and self.noise.kind == "label" and self.source.kind not in ("labelled", "embedded"):
            raise SpecError(f"noise.kind: label noise needs a labelled source, not {self.source.kind!r}")


# ------------------------------------------------------------------------------------------------ uids


def uid_of(identity: str) -> str:
    """A deterministic 128-bit uid (32 lowercase hex chars) for a source without one."""
    return hashlib.md5(identity.encode("utf-8")).hexdigest()


def uid_halves(uids: List[str]) -> Tuple[np.ndarray, np.ndarray]:
    """``(uid_hi, uid_lo)`` as uint64: the two halves of the 128-bit uid."""
    hi = np.array([int(u[:16], 16) for u in uids], dtype=np.uint64)
    lo = np.array([int(u[16:], 16) for u in uids], dtype=np.uint64)
    return hi, lo


def _is_uid(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 32 and all(c in "0123456789abcdef" for c in value)


# ------------------------------------------------------------------------------------------------ listing


@dataclass
class Listing:
    """Every sample the source offers: how to fetch its image, its caption, and its extra columns."""

    refs: List[str] = field(default_factory=list)  # "file:<url>" | "tar:<url>::<member>" | "digits:<i>"
    texts: List[Optional[str]] = field(default_factory=list)
    uids: List[str] = field(default_factory=list)
    sources: List[str] = field(default_factory=list)
    reasons: List[Optional[str]] = field(default_factory=list)  # rejected before reading the image
    extras: Dict[str, list] = field(default_factory=dict)
    class_names: Optional[List[str]] = None

    def add(self, ref: str, text: Optional[str], uid: str, source: str, reason: Optional[str] = None, **extra) -> None:
        self.refs.append(ref)
        self.texts.append(text)
        self.uids.append(uid)
        self.sources.append(source)
        self.reasons.append(reason)
        for k, v in extra.items():
            self.extras.setdefault(k, []).append(v)

    def __len__(self) -> int:
        return len(self.refs)


def _template(templates: Tuple[str, ...], uid: str, name: str) -> str:
    return templates[int(uid[:8], 16) % len(templates)].format(name)


def list_embedded(src: EmbeddedSource, ctx=None) -> Listing:
    from ..embedded import CLASS_NAMES, load_digits_arrays

    _, labels = load_digits_arrays()
    n = len(labels) if src.limit is None else min(src.limit, len(labels))
    out = Listing(class_names=list(CLASS_NAMES))
    for i in range(n):
        uid = uid_of(f"sklearn-digits:{i}")
        label = int(labels[i])
        out.add(f"digits:{i}", _template(src.templates, uid, CLASS_NAMES[label]), uid, f"digits/{i}", label=label)
    return out


def _find_files(url: str) -> Tuple[Any, str, List[str]]:
    """Every file under a folder, in one recursive listing (one request per page on object stores)."""
    fs, root = open_storage(url)
    if not fs.isdir(root):
        raise FileNotFoundError(f"source folder not found: {url}")
    return fs, root, sorted(fs.find(root))


def _images(files: List[str]) -> List[str]:
    return [p for p in files if posixpath.splitext(p)[1].lower() in IMAGE_EXTS]


def list_caption_folder(src: CaptionFolderSource, ctx=None) -> Listing:
    fs, root, files = _find_files(src.path)
    present = set(files)
    captions = [posixpath.splitext(p)[0] + ".txt" for p in _images(files)]
    wanted = [c for c in captions if c in present]
    # cat_ranges: concurrent on object stores, and no glob expansion of names such as "a[1].txt"
    texts = dict(zip(wanted, fs.cat_ranges(wanted, [None] * len(wanted), [None] * len(wanted)))) if wanted else {}
    out = Listing()
    for path, txt in zip(_images(files), captions):
        rel = posixpath.relpath(path, root)
        text = texts[txt].decode("utf-8", errors="replace").strip() if txt in present else None
        reason = "missing caption" if text is None else (None if text else "empty caption")
        out.add(f"file:{fs.unstrip_protocol(path)}", text, uid_of(f"caption_folder:{rel}"), rel, reason)
    return out


def list_labelled(src: LabelledSource, ctx=None) -> Listing:
    fs, root, files = _find_files(src.path)
    files = _images(files)
    dirs = sorted({posixpath.relpath(p, root).split("/")[0] for p in files if "/" in posixpath.relpath(p, root)})
    if not dirs:
        raise FileNotFoundError(f"labelled source {src.path}: expected one sub-folder of images per class")
    names = [src.class_names.get(d, d.replace("_", " ")) for d in dirs]
    index = {d: i for i, d in enumerate(dirs)}
    out = Listing(class_names=names)
    for path in files:
        rel = posixpath.relpath(path, root)
        if "/" not in rel:
            continue  # an image outside any class folder has no label
        label = index[rel.split("/")[0]]
        uid = uid_of(f"labelled:{rel}")
        out.add(f"file:{fs.unstrip_protocol(path)}", _template(src.templates, uid, names[label]), uid, rel, label=label)
    return out


def scan_tar(fs, tar_path: str) -> Dict[str, Dict[str, Any]]:
    """``{key: {"image": member, "uid": ...}}`` of one webdataset tar, reading only headers and ``.json`` members."""
    members: Dict[str, Dict[str, Any]] = {}
    with fs.open(tar_path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tf:
        for m in tf:
            unsafe = unsafe_member(m)
            if unsafe:  # never followed nor used as a name: recorded as a reject of its own
                members.setdefault(f"{m.name}\0unsafe", {})["unsafe"] = unsafe
                continue
            if not m.isfile():
                continue
            key, ext = posixpath.splitext(m.name)
            entry = members.setdefault(key, {})
            if ext.lower() in IMAGE_EXTS:
                entry["image"] = m.name
            elif ext == ".json":
                try:
                    entry["uid"] = json.loads(tf.extractfile(m).read()).get("uid")
                except (ValueError, AttributeError):
                    entry["uid"] = None
    return members


def unsafe_member(m: tarfile.TarInfo) -> Optional[str]:
    """Why a tar member must not be read (a link, or a name that would leave a directory it were extracted to)."""
    if m.issym() or m.islnk():
        return f"link member {m.name!r} -> {m.linkname!r}"
    parts = m.name.replace("\\", "/").split("/")
    if m.name.startswith(("/", "\\")) or ".." in parts or "\0" in m.name or (parts[0][1:2] == ":"):
        return f"unsafe member name {m.name!r}"
    if not (m.isfile() or m.isdir()):
        return f"special member {m.name!r}"
    return None


def list_datacomp(src: DataCompSource, ctx) -> Listing:

    fs, root = open_storage(src.path)
    meta_files = sorted(p for p in fs.find(posixpath.join(root, src.metadata)) if p.endswith(".parquet"))
    tars = sorted(p for p in fs.find(posixpath.join(root, src.shards)) if p.endswith(".tar"))
    if not meta_files:
        raise FileNotFoundError(f"datacomp source {src.path}: no parquet under {src.metadata}/")
    if not tars:
        raise FileNotFoundError(f"datacomp source {src.path}: no .tar under {src.shards}/")
    tables = []
    for p in meta_files:
        tables.append(read_parquet(fs, p))
        for col in ("uid", "text"):
            if col not in tables[-1].column_names:
                raise ValueError(f"datacomp metadata {fs.unstrip_protocol(p)}: missing column {col!r}")
    meta = pa.concat_tables(tables, promote_options="default")
    rows: Dict[Any, int] = {}
    file_of = np.repeat(np.arange(len(tables)), [t.num_rows for t in tables])
    for i, u in enumerate(meta.column("uid").to_pylist()):
        if u in rows:  # which sample would a score belong to? refuse, naming both places
            first, again = meta_files[file_of[rows[u]]], meta_files[file_of[i]]
            raise ValueError(f"datacomp metadata {fs.unstrip_protocol(again)}: uid {u!r} appears twice (also in "
                             f"{posixpath.basename(first)}); a pool's uids must be unique")
        rows[u] = i
    extra_cols = [c for c in meta.column_names if c not in ("uid", "text", "key", "shard")]
    # metadata columns keep their data but never shadow a column ingest computes
    extra_data = {(f"metadata_{c}" if c in RESERVED else c): meta.column(c).to_pylist() for c in extra_cols}
    extra_cols = list(extra_data)
    texts = meta.column("text").to_pylist()
    out = Listing()
    seen = set()
    scans = ctx.map(scan_tar, [(fs, t) for t in tars], unit="tars scanned")
    for tar_path, members in zip(tars, scans):
        tar_url = fs.unstrip_protocol(tar_path)
        for key in sorted(members):
            entry = members[key]
            uid = entry.get("uid")
            source = f"{posixpath.basename(tar_path)}/{key.split(chr(0))[0]}"
            row = rows.get(uid)
            reason = entry.get("unsafe")
            if reason:
                uid = uid_of(f"datacomp:{source}")
            elif not _is_uid(uid):
                reason, uid = "no uid in json", uid_of(f"datacomp:{source}")
            elif "image" not in entry:
                reason = "no image in tar"
            elif row is None:
                reason = "uid not in metadata"
            elif uid in seen:
                reason = "duplicate uid"
            text = texts[row] if row is not None else None
            if reason is None and not (text or "").strip():
                reason = "empty caption"
            if reason is None:
                seen.add(uid)  # only a kept copy makes later ones duplicates
            extras = {c: (extra_data[c][row] if row is not None else None) for c in extra_cols}
            out.add(f"tar:{tar_url}::{entry.get('image', '')}", text, uid, source, reason, **extras)
    return out


LISTERS = {"embedded": list_embedded, "caption_folder": list_caption_folder, "labelled": list_labelled,
           "datacomp": list_datacomp}


# ------------------------------------------------------------------------------------------------ noise, split


def assign_split(n: int, split: Optional[SplitConfig]) -> np.ndarray:
    out = np.array(["train"] * n, dtype=object)
    if split is not None and n:
        order = np.random.default_rng(split.seed).permutation(n)
        n_test = int(round(split.test_fraction * n))
        n_ref = int(round(split.reference_fraction * n))
        out[order[:n_test]] = "test"
        out[order[n_test:n_test + n_ref]] = "reference"
    return out


def inject_noise(listing: Listing, eligible: np.ndarray, noise: NoiseConfig, templates: Tuple[str, ...]) -> np.ndarray:
    """Corrupt ``rate`` of the eligible samples in place; returns the ``corrupted`` flags (the truth)."""
    n = len(listing)
    if noise.kind == "label" and len(listing.class_names) < 2:
        raise ValueError(f"label noise needs at least 2 classes, the source has {len(listing.class_names)}")
    corrupted = np.zeros(n, dtype=bool)
    candidates = np.flatnonzero(eligible)
    k = int(round(noise.rate * len(candidates)))
    if k == 0:
        return corrupted
    rng = np.random.default_rng(noise.seed)
    chosen = np.sort(rng.choice(candidates, size=k, replace=False))
    if noise.kind == "label":
        num_classes = len(listing.class_names)
        for i in chosen:
            old = listing.extras["label"][i]
            new = (old + int(rng.integers(1, num_classes))) % num_classes  # uniformly one of the other classes
            listing.extras["label"][i] = new
            listing.texts[i] = _template(templates, listing.uids[i], listing.class_names[new])
            corrupted[i] = True
    else:
        if k < 2:
            return corrupted
        originals = [listing.texts[i] for i in chosen]
        for j, i in enumerate(chosen):  # a rotation: every chosen sample gets another's caption
            listing.texts[i] = originals[(j + 1) % k]
            corrupted[i] = listing.texts[i] != originals[j]
    return corrupted


# ------------------------------------------------------------------------------------------------ shard writing


class ImageReader:
    """Fetches image bytes by reference, keeping each source tar open (and indexed once) while a shard is written."""

    def __init__(self) -> None:
        self._tars: Dict[str, Tuple[Any, tarfile.TarFile]] = {}

    def read(self, ref: str) -> bytes:
        kind, _, where = ref.partition(":")
        if kind == "digits":
            from ..embedded import digit_png

            return digit_png(_digits()[int(where)])
        if kind == "file":
            fs, path = open_storage(where)
            return fs.cat_file(path)
        if kind == "tar":
            url, _, member = where.rpartition("::")
            if url not in self._tars:
                fs, path = open_storage(url)
                handle = fs.open(path, "rb")
                self._tars[url] = (handle, tarfile.open(fileobj=handle, mode="r:"))
            return self._tars[url][1].extractfile(member).read()
        raise ValueError(f"unknown image reference {ref!r}")

    def close(self) -> None:
        for handle, tf in self._tars.values():
            tf.close()
            handle.close()
        self._tars.clear()


_DIGITS: Optional[np.ndarray] = None


def _digits() -> np.ndarray:
    global _DIGITS
    if _DIGITS is None:
        from ..embedded import load_digits_arrays

        _DIGITS = load_digits_arrays()[0]
    return _DIGITS


# what a corrupt or truncated file raises while decoding (UnidentifiedImageError is an OSError)
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError)


def checked_image(data: bytes) -> Tuple[bytes, str]:
    """``(bytes, ext)``: JPEG and PNG kept as they are, other formats re-encoded as PNG; raises if unreadable."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        img.load()
        fmt = (img.format or "").upper()
        if fmt in ("JPEG", "PNG"):
            return data, "jpg" if fmt == "JPEG" else "png"
        buf = io.BytesIO()
        img.convert("RGB").save(buf, format="PNG")
        return buf.getvalue(), "png"


def tar_records(records: List[Tuple[str, str, bytes, str, str]]) -> Tuple[bytes, Dict[str, Tuple[str, int, int]]]:
    """A webdataset tar of ``(key, ext, image bytes, text, uid)`` records: ``<key>.<ext>``, ``<key>.txt``,
    ``<key>.json``.  Returns the tar's bytes and ``{key: (member, offset, size)}`` locating each image in it."""
    buf = io.BytesIO()
    images = {}
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for key, ext, image, text, uid in records:
            images[f"{key}.{ext}"] = key
            for name, data in ((f"{key}.{ext}", image), (f"{key}.txt", text.encode("utf-8")),
                               (f"{key}.json", json.dumps({"uid": uid}).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:  # where each image's bytes landed
        index = {images[m.name]: (m.name, m.offset_data, m.size) for m in tf if m.name in images}
    return data, index


def write_shard(fs, path: str, records: List[Tuple[str, str, str, str]]):
    """Write one webdataset tar of ``(key, ref, text, uid)`` records.

    Returns ``(rejects, index)``: ``(key, reason)`` of the samples left out, and ``{key: (member, offset, size)}``
    locating each written image's bytes in the tar.
    """
    rejects = []
    good = []
    reader = ImageReader()
    with contextlib.closing(reader):
        for key, ref, text, uid in records:
            data = reader.read(ref)  # I/O errors fail the task (Ray retries it), they are not the sample's fault
            try:
                image, ext = checked_image(data)
            except DECODE_ERRORS as exc:
                rejects.append((key, f"unreadable image: {type(exc).__name__}: {str(exc)[:200]}"))
                continue
            good.append((key, ext, image, text, uid))
    data, index = tar_records(good)
    write_file(fs, path, data)
    return rejects, index


# ------------------------------------------------------------------------------------------------ the stage


def run_ingest(cfg: IngestConfig, ctx) -> Dict[str, Any]:
    listing = LISTERS[cfg.source.kind](cfg.source, ctx)
    n = len(listing)
    split = assign_split(n, cfg.split)
    corrupted = np.zeros(n, dtype=bool)
    if listing.class_names is not None and n:
        listing.extras["true_label"] = list(listing.extras["label"])  # before any noise: the truth
    if cfg.noise is not None:
        eligible = (split == "train") & np.array([r is None for r in listing.reasons], dtype=bool)
        corrupted = inject_noise(listing, eligible, cfg.noise, getattr(cfg.source, "templates", ()))
    ok = [i for i in range(n) if listing.reasons[i] is None]
    keys = {i: f"{j:09d}" for j, i in enumerate(ok)}
    shard_of = {i: j // cfg.shard_size for j, i in enumerate(ok)}
    num_shards = (len(ok) + cfg.shard_size - 1) // cfg.shard_size
    tasks = []
    for s in range(num_shards):
        members = ok[s * cfg.shard_size:(s + 1) * cfg.shard_size]
        records = [(keys[i], listing.refs[i], listing.texts[i], listing.uids[i]) for i in members]
        tasks.append((ctx.out.fs, ctx.out.join(shard_tar(s)), records))
    written = ctx.map(write_shard, tasks, unit="shards", rows=[len(t[2]) for t in tasks])
    late = {key: reason for rej, _ in written for key, reason in rej}
    located = {key: where for _, index in written for key, where in index.items()}
    reasons = list(listing.reasons)
    for i in ok:
        if keys[i] in late:
            reasons[i] = late[keys[i]]
    kept = [i for i in ok if reasons[i] is None]
    table = pa.table(_columns(listing, kept, keys, shard_of, split, corrupted, located))
    files = []
    for s in range(num_shards):
        shard_rows = table.filter(pc.equal(table["shard"], s))
        rel = f"shards/shard-{s:05d}.parquet"
        ctx.out.write_table(rel, shard_rows)
        files += [rel, shard_tar(s)]
    rejected = [i for i in range(n) if reasons[i] is not None]
    ctx.out.write_table("rejects.parquet", pa.table({
        "source": pa.array([listing.sources[i] for i in rejected], type=pa.string()),
        "uid": pa.array([listing.uids[i] for i in rejected], type=pa.string()),
        "reason": pa.array([reasons[i] for i in rejected], type=pa.string()),
    }))
    files.append("rejects.parquet")
    return {
        "rows_in": n, "rows_out": len(kept), "rejected": len(rejected), "files": files,
        "shards": num_shards, "corrupted": int(corrupted[kept].sum()) if kept else 0,
        "test": int(sum(split[i] == "test" for i in kept)),
        "reference": int(sum(split[i] == "reference" for i in kept)),
        "class_names": listing.class_names, "templates": list(getattr(cfg.source, "templates", ()) or ()) or None,
    }


def shard_tar(shard: int) -> str:
    return f"shards/shard-{shard:05d}.tar"


def _columns(listing: Listing, kept: List[int], keys, shard_of, split, corrupted, located) -> Dict[str, pa.Array]:
    uids = [listing.uids[i] for i in kept]
    where = [located[keys[i]] for i in kept]
    hi, lo = uid_halves(uids)
    cols: Dict[str, pa.Array] = {
        "uid": pa.array(uids, type=pa.string()),
        "uid_hi": pa.array(hi, type=pa.uint64()),
        "uid_lo": pa.array(lo, type=pa.uint64()),
        "text": pa.array([listing.texts[i] for i in kept], type=pa.string()),
        "key": pa.array([keys[i] for i in kept], type=pa.string()),
        "shard": pa.array([shard_of[i] for i in kept], type=pa.int32()),
        "split": pa.array([split[i] for i in kept], type=pa.string()),
        "corrupted": pa.array([bool(corrupted[i]) for i in kept], type=pa.bool_()),
        "source": pa.array([listing.sources[i] for i in kept], type=pa.string()),
        "tar": pa.array([shard_tar(shard_of[i]) for i in kept], type=pa.string()),
        "image": pa.array([w[0] for w in where], type=pa.string()),
        "image_offset": pa.array([w[1] for w in where], type=pa.int64()),
        "image_size": pa.array([w[2] for w in where], type=pa.int64()),
    }
    for name, values in listing.extras.items():
        cols[name] = pa.array([values[i] for i in kept])
    if listing.class_names is not None:
        cols["class_name"] = pa.array([listing.class_names[listing.extras["label"][i]] for i in kept], type=pa.string())
    return cols
