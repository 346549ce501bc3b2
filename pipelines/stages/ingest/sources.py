"""Ingest's sources: what each offers.

Indexed in place by tasks (:mod:`.index`, :mod:`.folders`), nothing per row on the driver, no image copied:

- ``caption_folder``: images with same-named ``.txt`` captions, searched recursively;
- ``labelled``: ``<root>/<class>/**/*.jpg``, captioned from class names with prompt templates;
- ``datacomp``: a DataComp-layout pool, parquet metadata plus webdataset tars whose ``.json`` holds the uid;
- ``webdataset``: webdataset tars alone (uid from ``.json`` where there is one, caption from ``.txt``).

Of a tar only the headers and ``.json`` / ``.txt`` members are read; unsafe members (:func:`unsafe_member`) are
recorded as rejects, never followed.  The embedded default (the real digits shipped in scikit-learn, captioned
from templates: 1,797 samples) is listed on the driver and its images written into tars by :mod:`.writer`.
"""

from __future__ import annotations

import re
import string
import tarfile
from dataclasses import dataclass, field
from typing import Dict, List, Literal, Optional, Tuple, Union

from pipelines.formats.pool import uid_of
from pipelines.run.config import MAX_COUNT, SpecError, doc, require, show
from pipelines.run.context import StageContext

MAX_TEMPLATE = 500  # characters of a caption template
MAX_CLASS_NAME = 200  # characters of a class name (so a templated caption is at most 700)
MAX_IMAGE_BYTES = 256 << 20  # an image file or tar member larger than this is a reject, never read
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
PHOTO_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a close-up photo of a {}.")
DIGIT_TEMPLATES = ("a handwritten digit {}.", "a scan of the number {}, written by hand.", "the digit {}.")


@dataclass(frozen=True)
class EmbeddedSource:
    kind: Literal["embedded"] = "embedded"
    dataset: Literal["digits"] = doc("the packaged dataset: 'digits' (1,797 real handwritten digits)", default="digits")
    templates: Tuple[str, ...] = doc("caption templates, '{}' is the class name", default=DIGIT_TEMPLATES)
    limit: Optional[int] = doc("keep only the first N samples", default=None)

    def validate(self) -> None:
        check_templates(self.templates)
        require(self, "limit", 1, allow_none=True, high=MAX_COUNT)


_VALIDATE = ("decode every image while indexing (in parallel) and reject those that do not decode; otherwise "
             "images are checked when the train stage decodes them")
_RESHARD = ("also copy the kept samples into new webdataset tars, one per index shard (the index then points at "
            "those); by default the index points at the source's images where they are")


@dataclass(frozen=True)
class CaptionFolderSource:
    kind: Literal["caption_folder"]
    path: str = doc("folder (local or URL) searched recursively for images with same-named .txt captions")
    first_line: bool = doc("the caption is the .txt's first line (files that hold translations or other captions "
                           "after it, as Tux Paint's stamps do); otherwise the whole file", default=False)
    validate_images: bool = doc(_VALIDATE, default=False)
    reshard: bool = doc(_RESHARD, default=False)


@dataclass(frozen=True)
class LabelledSource:
    kind: Literal["labelled"]
    path: str = doc("folder with one sub-folder of images per class (searched recursively)")
    templates: Tuple[str, ...] = doc("caption templates, '{}' is the class name", default=PHOTO_TEMPLATES)
    class_names: Dict[str, str] = doc("folder name -> class name used in captions", default_factory=dict)
    validate_images: bool = doc(_VALIDATE, default=False)
    reshard: bool = doc(_RESHARD, default=False)

    def validate(self) -> None:
        check_templates(self.templates)
        for folder, name in self.class_names.items():
            if len(name) > MAX_CLASS_NAME:
                raise SpecError(f"class_names.{folder[:60]}: {len(name):,} characters, more than {MAX_CLASS_NAME}")


@dataclass(frozen=True)
class DataCompSource:
    kind: Literal["datacomp"]
    path: str = doc("pool root holding the metadata parquet and the webdataset tars")
    metadata: str = doc("metadata folder under path (parquet with uid, text, ...)", default="metadata")
    shards: str = doc("tar folder under path", default="shards")
    validate_images: bool = doc(_VALIDATE, default=False)
    reshard: bool = doc(_RESHARD, default=False)


@dataclass(frozen=True)
class WebDatasetSource:
    kind: Literal["webdataset"]
    path: str = doc("folder (local or URL) searched recursively for webdataset .tar files, or one .tar; a "
                    "sample's uid is its .json member's 'uid' where it has one, its caption its .txt member")
    validate_images: bool = doc(_VALIDATE, default=False)
    reshard: bool = doc(_RESHARD, default=False)


Source = Union[EmbeddedSource, CaptionFolderSource, LabelledSource, DataCompSource, WebDatasetSource]
INDEXED = ("caption_folder", "labelled", "datacomp", "webdataset")  # indexed in place (:mod:`.index`)


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


def check_templates(templates: Tuple[str, ...]) -> None:
    """Templates are data: each holds exactly one ``{}`` (the class name) and literal text (``{{`` and ``}}`` for
    braces), nothing a format string could also do (fields, indexing, attributes, conversions, format specs)."""
    if not templates:
        raise SpecError("templates: expected at least one template")
    for i, text in enumerate(templates):
        where = f"templates[{i}]"
        if len(text) > MAX_TEMPLATE:
            raise SpecError(f"{where}: {len(text):,} characters, more than {MAX_TEMPLATE}")
        try:
            fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(text) if name is not None]
        except ValueError as exc:
            raise SpecError(f"{where}: {show(text)}: {exc} (write '{{{{' and '}}}}' for literal braces)") from None
        if fields != [("", "", None)]:
            raise SpecError(f"{where}: {show(text)}: a template holds exactly one '{{}}' (the class name) and no "
                            "other placeholder, field, conversion or format")


def template(templates: Tuple[str, ...], uid: str, name: str) -> str:
    return templates[int(uid[:8], 16) % len(templates)].format(name)


def list_embedded(src: EmbeddedSource, ctx: Optional[StageContext] = None) -> Listing:
    from pipelines.stages.ingest.embedded import CLASS_NAMES, load_digits_arrays

    _, labels = load_digits_arrays()
    n = len(labels) if src.limit is None else min(src.limit, len(labels))
    out = Listing(class_names=list(CLASS_NAMES))
    for i in range(n):
        uid = uid_of(f"sklearn-digits:{i}")
        label = int(labels[i])
        out.add(f"digits:{i}", template(src.templates, uid, CLASS_NAMES[label]), uid, f"digits/{i}", label=label)
    return out


MAX_CAPTION_CHARS = 10_000  # a caption longer than this is a reject (the text towers read the first few dozen words)
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")  # control characters but tab, newline, return


def caption_problem(text: Optional[str], kind: str) -> Optional[str]:
    """Why a sample's caption is rejected, or ``None``: captions are text, whatever their source (``.txt`` files,
    tar members, metadata cells).  Missing, empty, over :data:`MAX_CAPTION_CHARS`, or holding a NUL or another
    control character (tab, newline and carriage return are whitespace, kept); bytes that are not UTF-8 are
    rejected where they are read, never replaced by U+FFFD."""
    if text is None:
        return "empty caption" if kind == "datacomp" else "missing caption"
    if not text.strip():
        return "empty caption"
    if len(text) > MAX_CAPTION_CHARS:
        return f"caption longer than {MAX_CAPTION_CHARS:,} characters"
    if _CONTROL.search(text):
        return "caption holds control characters"
    return None


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


LISTERS = {"embedded": list_embedded}  # the sources listed on the driver and copied
