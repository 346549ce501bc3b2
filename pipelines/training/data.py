"""The train stage's data: a seeded plan of global batches, and Ray Data pipelines that decode them for each rank.

**The plan.**  Epoch ``e`` visits the training rows in the order of a permutation keyed by ``(seed, e)``; step
``s`` (1-based) takes the next ``batch_size`` rows of it (the epoch's last partial batch is dropped), and rank
``r`` takes its slice of that global batch (:func:`world_rank_sizes`: unequal when the
batch does not divide).  Everything is a pure function of the spec, so the same spec gives the same batches, a
one-process run sees the same global batches as a many-rank one, and a resumed run picks up at any step.  The
permutation is computed per position (:func:`permute`, a keyed Feistel network), never materialised: a step of a
billion-row pool costs what its batch costs.

**The pipelines.**  Each rank streams its own dataset (``train_<rank>``, built in the worker from the job's factory):
``range(steps) -> map_batches(decode)`` where each decoding actor turns a few steps into that rank's row numbers,
looks them up in the split's :class:`~pipelines.training.index.RowIndex` (fixed-width pieces in the object store:
the driver holds no row of the pool) and fetches every image, and every caption, with one ranged read from its tar,
resizing images to ``uint8`` on the cluster's CPUs (normalisation happens on the training device); a batch costs
what its rows cost, whatever the pool size.  A sample that does not decode never fails the stream: its row gets a
zero image and a ``reason`` code (:func:`decode_image`, :mod:`pipelines.formats.skipped`), and the worker skips it.  Evaluation and comparison sets are fixed-size chunks of a prefix or a
seeded sample of such an index.  The datasets are built by a factory the worker calls whenever it (re)starts the
stage; it starts at the step after the stage's registered checkpoint, so a resumed epoch skips what it already
consumed without decoding it again.  The worker still checks the ``step`` column of every batch.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa

from pipelines.formats import skipped
from pipelines.models.tokens import tokenize
from pipelines.run.storage import read_ranges

SAMPLES_PER_TASK = 1024  # decode work per Ray Data task: large enough to amortise a task, small enough to stream


def world_rank_sizes(batch: int, world: int) -> List[int]:
    """Local batch sizes when a global batch of ``batch`` is spread over ``world`` ranks (the first get one more)."""
    return [batch // world + (1 if r < batch % world else 0) for r in range(world)]


@dataclass(frozen=True)
class StepPlan:
    """Which training rows each rank sees at each step (a pure function of the numbers here)."""

    rows: int
    batch_size: int
    world: int
    seed: int
    total_steps: int

    @property
    def steps_per_epoch(self) -> int:
        return self.rows // self.batch_size

    @property
    def local_sizes(self) -> List[int]:
        return world_rank_sizes(self.batch_size, self.world)

    def epoch(self, step: int) -> int:
        return (step - 1) // self.steps_per_epoch

    def global_rows(self, step: int) -> np.ndarray:
        if not 1 <= step <= self.total_steps:
            raise IndexError(f"step {step} outside 1..{self.total_steps}")
        j = (step - 1) % self.steps_per_epoch
        positions = np.arange(j * self.batch_size, (j + 1) * self.batch_size)
        return permute(positions, self.rows, _key(self.seed, self.epoch(step)))

    def rank_rows(self, step: int, rank: int) -> np.ndarray:
        sizes = self.local_sizes
        start = sum(sizes[:rank])
        return self.global_rows(step)[start:start + sizes[rank]]


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective, well-mixing hash of uint64 values (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _key(seed: int, epoch: int) -> int:
    return int(_mix(np.array([seed], dtype=np.uint64))[0] ^ _mix(np.array([epoch + 1], dtype=np.uint64))[0])


def permute(positions: np.ndarray, n: int, key: int, rounds: int = 6) -> np.ndarray:
    """Where each position of a keyed random permutation of ``range(n)`` points, without building the permutation.

    A balanced Feistel network on ``2 * half`` bits (a bijection on ``[0, 4^half)``, with ``4^half < 4n``) walked
    until the value falls inside ``[0, n)`` (cycle walking keeps it a bijection on ``range(n)``).
    """
    half = max(1, (int(n - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)
    with np.errstate(over="ignore"):
        keys = [_mix(np.array([key], np.uint64) + np.uint64(r + 1) * np.uint64(0x9E3779B97F4A7C15))[0]
                for r in range(rounds)]
    x = np.asarray(positions, dtype=np.uint64).copy()
    todo = np.ones(len(x), dtype=bool)
    while todo.any():
        left, right = x[todo] >> np.uint64(half), x[todo] & mask
        for k in keys:
            left, right = right, left ^ (_mix(right ^ k) & mask)
        x[todo] = (left << np.uint64(half)) | right
        todo[todo] = x[todo] >= np.uint64(n)
    return x.astype(np.int64)


@dataclass(frozen=True)
class Decoder:
    """Turns pool rows into training arrays: ``image`` (uint8, ``3 x S x S``), ``tokens`` (CLIP) or ``label``."""

    image_size: int
    tokens: Optional[int] = None  # context length: tokenise the caption for CLIP
    arch: Optional[str] = None  # the open_clip architecture whose tokenizer to use
    labels: bool = False
    storage_options: Optional[Dict[str, Any]] = None
    max_pixels: int = skipped.MAX_PIXELS  # a larger image is rejected (``too_large``) before its pixels are decoded
    keep_text: bool = False  # also return the captions (``text``, an object array): retrieval's distinct captions
    features: Optional[Tuple[int, int]] = None  # (image, text) widths: rows point at cached tower features, which
    # come back as ``image`` and ``tokens`` (float32)

    def __call__(self, pool, idx: np.ndarray) -> Dict[str, np.ndarray]:
        """The arrays of rows ``idx`` of ``pool``: a :class:`~pipelines.training.index.RowIndex` (images and
        captions fetched by ranged reads), or a pool table whose ``tar`` is a full URL (as ``read_pool`` gives it)."""
        if not isinstance(pool, pa.Table):
            return self.decode_index(*pool.lookup(idx))
        rows = pool.take(pa.array(idx, type=pa.int64()))
        if self.features:  # the table's location columns point at the features (pool.features_as_location)
            return self.decode_features(*_index_rows(rows))
        images, reason = self.images(rows)
        out = {"uid_hi": rows["uid_hi"].to_numpy(), "uid_lo": rows["uid_lo"].to_numpy(), "image": images,
               "reason": reason}
        if self.tokens:
            self._add_text(out, rows["text"].to_pylist())
        if self.labels:
            out["label"] = rows["label"].to_numpy().astype(np.int64)
        return out

    def _add_text(self, out: Dict[str, np.ndarray], texts: List[str]) -> None:
        out["tokens"] = tokenize(self.arch, self.tokens, texts)
        if self.keep_text:
            out["text"] = np.array(texts, dtype=object)

    def decode_index(self, rows: np.ndarray, urls: List[str], captions: bytes = b"") -> Dict[str, np.ndarray]:
        """The arrays of index rows (:data:`~pipelines.training.index.INDEX_DTYPE`) whose ``tar`` numbers ``urls``:
        each image and (for CLIP) each caption one ranged read, all issued together; a caption no tar holds is in
        ``captions`` at ``-1 - text_offset``.  A row that does not decode gets a zero image and its ``reason``
        (:data:`~pipelines.formats.skipped.REASONS`; 0: decoded)."""
        if self.features:
            return self.decode_features(rows, urls)
        n = len(rows)
        tars = [urls[t] for t in rows["tar"].tolist()]
        starts, sizes = [rows["image_offset"]], [rows["image_size"]]
        in_tar = np.flatnonzero(rows["text_offset"] >= 0) if self.tokens else np.zeros(0, np.int64)
        starts.append(rows["text_offset"][in_tar])
        sizes.append(rows["text_size"][in_tar])
        first = np.concatenate(starts).astype(np.int64)
        blobs = read_ranges(tars + [tars[i] for i in in_tar], first, first + np.concatenate(sizes), self.storage_options)
        images, reason = self._resized(blobs[:n], rows["image_size"])
        out = {"uid_hi": np.ascontiguousarray(rows["uid_hi"]), "uid_lo": np.ascontiguousarray(rows["uid_lo"]),
               "image": images, "reason": reason}
        if self.tokens:
            texts: List[bytes] = [b""] * n
            for i, blob in zip(in_tar.tolist(), blobs[n:]):
                texts[i] = blob
            for i in np.flatnonzero(rows["text_offset"] < 0).tolist():
                start = -1 - int(rows["text_offset"][i])
                texts[i] = captions[start:start + int(rows["text_size"][i])]
            self._add_text(out, _captions(texts, rows["text_size"], reason))
        if self.labels:
            out["label"] = rows["label"].astype(np.int64)
        return out

    def decode_features(self, rows: np.ndarray, urls: List[str]) -> Dict[str, np.ndarray]:
        """Index rows pointing at cached tower features (:mod:`pipelines.stages.features`): one ranged read each;
        a row with none (``image_size`` 0) is ``no_features``, a short read ``short_read``."""
        image_dim, text_dim = self.features
        width = (image_dim + text_dim) * 4
        has = np.flatnonzero(rows["image_size"] > 0)  # no read for a row without (an empty range is no range)
        starts = rows["image_offset"][has].astype(np.int64)
        blobs = read_ranges([urls[t] for t in rows["tar"][has].tolist()], starts, starts + rows["image_size"][has],
                            self.storage_options)
        values = np.zeros((len(rows), image_dim + text_dim), np.float32)
        reason = np.full(len(rows), skipped.NO_FEATURES, np.uint8)
        for i, blob in zip(has.tolist(), blobs):
            if len(blob) != width or int(rows["image_size"][i]) != width:
                reason[i] = skipped.SHORT_READ
            else:
                values[i], reason[i] = np.frombuffer(blob, "<f4"), skipped.OK
        out = {"uid_hi": np.ascontiguousarray(rows["uid_hi"]), "uid_lo": np.ascontiguousarray(rows["uid_lo"]),
               "image": values[:, :image_dim].copy(), "tokens": values[:, image_dim:].copy(), "reason": reason}
        if self.labels:
            out["label"] = rows["label"].astype(np.int64)
        return out

    def images(self, rows: pa.Table) -> Tuple[np.ndarray, np.ndarray]:
        starts, sizes = rows["image_offset"].to_numpy(), rows["image_size"].to_numpy()
        return self._resized(read_ranges(rows["tar"].to_pylist(), starts, starts + sizes, self.storage_options), sizes)

    def _resized(self, blobs: Sequence[bytes], sizes: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """``(images, reasons)``: a row that does not decode (or whose read is short) is zeros and its reason."""
        out = np.zeros((len(blobs), 3, self.image_size, self.image_size), dtype=np.uint8)
        reason = np.zeros(len(blobs), np.uint8)
        for i, blob in enumerate(blobs):
            if len(blob) != int(sizes[i]):
                reason[i] = skipped.SHORT_READ
                continue
            image, reason[i] = decode_image(blob, self.image_size, self.max_pixels)
            if image is not None:
                out[i] = image
        return out, reason


def _captions(texts: List[bytes], sizes: np.ndarray, reason: np.ndarray) -> List[str]:
    """The captions as text; one whose read is short or that is not UTF-8 is empty, its row marked ``bad_caption``
    (unless its image already failed)."""
    out = []
    for i, t in enumerate(texts):
        try:
            if len(t) != int(sizes[i]):
                raise ValueError(t)
            out.append(t.decode("utf-8"))
        except ValueError:  # UnicodeDecodeError is one
            out.append("")
            reason[i] = reason[i] or skipped.BAD_CAPTION
    return out


def decode_image(data: bytes, size: int, max_pixels: int = skipped.MAX_PIXELS) -> Tuple[Optional[np.ndarray], int]:
    """``(image, 0)`` (:func:`resize_image`'s), or ``(None, reason)`` for bytes that do not decode: never raises for
    bad data.  An image of more than ``max_pixels`` pixels is ``too_large`` before its pixels are decoded."""
    return skipped.guarded(resize_image, data, size, max_pixels)


def resize_image(data: bytes, size: int, max_pixels: Optional[int] = None) -> np.ndarray:
    """Decode, resize the shorter side to ``size`` (bicubic), centre-crop: ``uint8 (3, size, size)`` (CLIP's own).
    With ``max_pixels``, a larger image raises as soon as its header is read, before any pixel is decoded (PIL's
    own ``MAX_IMAGE_PIXELS`` check, at twice its bound, applies too)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        if max_pixels is not None and img.size[0] * img.size[1] > max_pixels:
            raise skipped.TooLarge(img.size)
        img = _rgb(img)
        w, h = img.size
        scale = size / min(w, h)
        if (w, h) != (size, size):
            img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.BICUBIC)
            w, h = img.size
            left, top = (w - size) // 2, (h - size) // 2
            img = img.crop((left, top, left + size, top + size))
        return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)


def _rgb(img):
    """The image in RGB, transparent pixels over white (a cut-out's background, not whatever colour its invisible
    pixels happen to hold)."""
    from PIL import Image

    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return img.convert("RGB")


# ------------------------------------------------------------------------------------------------ Ray Data


def _index_rows(rows: pa.Table) -> Tuple[np.ndarray, List[str]]:
    """A table's rows (``tar`` a full URL) as index rows (:data:`~pipelines.training.index.INDEX_DTYPE`) and the
    URLs their ``tar`` numbers."""
    from pipelines.training.index import INDEX_DTYPE

    urls, tar = np.unique(np.asarray(rows["tar"].to_pylist(), dtype=object), return_inverse=True)
    out = np.zeros(rows.num_rows, INDEX_DTYPE)
    out["tar"] = tar
    for name in ("uid_hi", "uid_lo", "image_offset", "image_size", "label"):
        if name in rows.column_names:
            out[name] = rows[name].to_numpy()
    return out, urls.tolist()


def _decode_chunks(batch: Dict[str, np.ndarray], chunk_rows: int, index, decoder: Decoder):
    chunks = [int(c) for c in batch["id"]]
    idx = [np.arange(c * chunk_rows, min((c + 1) * chunk_rows, index.num_rows)) for c in chunks]
    out = decoder(index, np.concatenate(idx))
    out["chunk"] = np.repeat(np.array(chunks, dtype=np.int64), [len(i) for i in idx])
    return out


def _empty(decoder: Decoder) -> Dict[str, np.ndarray]:
    s = decoder.image_size
    out = {"uid_hi": np.zeros(0, np.uint64), "uid_lo": np.zeros(0, np.uint64),
           "image": np.zeros((0, 3, s, s), np.uint8), "reason": np.zeros(0, np.uint8), "step": np.zeros(0, np.int64),
           "epoch": np.zeros(0, np.int64)}
    if decoder.features:
        out["image"] = np.zeros((0, decoder.features[0]), np.float32)
        out["tokens"] = np.zeros((0, decoder.features[1]), np.float32)
    elif decoder.tokens:
        out["tokens"] = np.zeros((0, decoder.tokens), np.int64)
    if decoder.labels:
        out["label"] = np.zeros(0, np.int64)
    return out


class StepDecoder:
    """A decoding actor of one rank's stream: the tokenizer and filesystems are loaded once.

    Long-lived actors rather than tasks: a stream that pauses when its buffer is full would otherwise let Ray reap
    the idle task processes, and every new one would load the tokenizer (and with it torch) again.
    """

    def __init__(self, plan: StepPlan, rank: int, first: int, index, decoder: Decoder) -> None:
        self.plan, self.rank, self.first, self.decoder, self.index = plan, rank, first, decoder, index

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        steps = [int(i) + self.first for i in batch["id"] if int(i) + self.first <= self.plan.total_steps]
        if not steps:
            return _empty(self.decoder)
        idx = [self.plan.rank_rows(s, self.rank) for s in steps]
        out = self.decoder(self.index, np.concatenate(idx))
        counts = [len(i) for i in idx]
        out["step"] = np.repeat(np.array(steps, dtype=np.int64), counts)
        out["epoch"] = np.repeat(np.array([self.plan.epoch(s) for s in steps], dtype=np.int64), counts)
        return out


def steps_dataset(plan: StepPlan, rank: int, index, decoder: Decoder, first_step: Callable[[], int],
                  actors: int = 1, cpus: float = 0.5):
    """A factory for rank ``rank``'s training stream, from the step after ``first_step()`` to the end, decoded by
    up to ``actors`` actors of ``cpus`` CPUs each."""

    def build():
        from ray.data import ActorPoolStrategy

        first = first_step() + 1
        n = max(plan.total_steps - first + 1, 1)  # an empty range is not a dataset; steps past the end decode to nothing
        per_task = max(1, SAMPLES_PER_TASK // max(plan.local_sizes[rank], 1))
        ds = _ids_dataset(np.arange(n), per_task)
        return ds.map_batches(StepDecoder, batch_size=per_task, batch_format="numpy", num_cpus=cpus,
                              compute=ActorPoolStrategy(min_size=1, max_size=actors),
                              fn_constructor_kwargs=dict(plan=plan, rank=rank, first=first, index=index,
                                                         decoder=decoder))

    return build


def chunks_dataset(chunk_rows: int, chunks: Sequence[int], index, decoder: Decoder, cpus: float = 0.5):
    """A factory for the given fixed-size chunks of a :class:`~pipelines.training.index.RowIndex` (evaluation,
    comparison sets): a ``chunk`` column each.  Read once per worker (evaluation keeps what fits in memory), so
    tasks of ``cpus`` CPUs decode them."""

    def build():
        per_task = max(1, SAMPLES_PER_TASK // chunk_rows)
        ds = _ids_dataset(np.asarray(chunks, dtype=np.int64), per_task)
        return ds.map_batches(_decode_chunks, batch_size=per_task, batch_format="numpy", num_cpus=cpus,
                              fn_kwargs=dict(chunk_rows=chunk_rows, index=index, decoder=decoder))

    return build


def _ids_dataset(ids: np.ndarray, per_block: int):
    """An ``id`` column in blocks of ``per_block`` made here, with no read tasks: ``ray.data.range``'s reads ask for a
    whole CPU each, which a cluster whose CPUs are all held by training workers and decoders never has free."""
    import ray.data

    blocks = [ids[i:i + per_block] for i in range(0, len(ids), per_block)] or [ids]
    return ray.data.from_arrow([pa.table({"id": pa.array(b, pa.int64())}) for b in blocks])


def grouped(batches: Iterator[Dict[str, np.ndarray]], key: str) -> Iterator[Dict[str, np.ndarray]]:
    """Re-cut a stream of batches so each yielded batch holds exactly the consecutive rows sharing ``key``."""
    pending: List[Dict[str, np.ndarray]] = []
    for batch in batches:
        values = batch[key]
        if not len(values):
            continue
        cuts = np.flatnonzero(values[1:] != values[:-1]) + 1
        parts = np.split(np.arange(len(values)), cuts)
        for k, part in enumerate(parts):
            piece = {c: v[part] for c, v in batch.items()}
            if pending and pending[-1][key][0] != piece[key][0]:
                yield _concat(pending)
                pending = []
            pending.append(piece)
    if pending:
        yield _concat(pending)


def _concat(parts: List[Dict[str, np.ndarray]]) -> Dict[str, np.ndarray]:
    if len(parts) == 1:
        return parts[0]
    return {c: np.concatenate([p[c] for p in parts]) for c in parts[0]}
