"""``ingest``: turn a source into sample shards (docs/architecture.md, "Formats").

Sources: a folder of images with same-named ``.txt`` captions; a DataComp-layout pool (parquet metadata plus
webdataset tars whose ``.json`` holds the uid); webdataset tars alone; a labelled image set
(``<root>/<class>/*.jpg``) captioned from class names with prompt templates; and the embedded default (real
digits shipped in scikit-learn).

Output, under the stage directory, the sample-shard contract of :mod:`pipelines.formats.pool`: parquet shards of
the kept samples (``label``, ``true_label`` and ``class_name`` for labelled sources, the DataComp metadata columns
for a DataComp pool), and the rejects with their reasons (unreadable image, empty or missing caption, uid not in
metadata, duplicate uid).  The manifest's counts add up: ``rows_in = rows_out + rejected``.

Every source but the embedded default is indexed in place (:mod:`.index`, :mod:`.folders`): its shards point at
the images where they are (a tar's member, or an image file) and no image is copied unless ``reshard``; every row
of work, noise and split included, runs in tasks.  The embedded digits (1,797 samples) are listed, and their noise
and split decided (:mod:`.noise`), on the driver; their images are written into webdataset tars (:mod:`.writer`)
by one Ray task per output shard.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import numpy as np
import pyarrow.compute as pc

from pipelines.formats import pool as fp
from pipelines.formats.manifest import IngestManifest
from pipelines.run.config import MAX_BATCH, SpecError, doc, require
from pipelines.run.context import StageContext
from pipelines.run.errors import InputError
from pipelines.stages.ingest.index import run_index
from pipelines.stages.ingest.noise import NoiseConfig, SplitConfig, assign_split, inject_noise
from pipelines.stages.ingest.sources import INDEXED, LISTERS, EmbeddedSource, Listing, Source
from pipelines.stages.ingest.writer import write_shard


@dataclass(frozen=True)
class IngestConfig:
    source: Source = doc("where samples come from: kind embedded | caption_folder | labelled | datacomp | "
                         "webdataset", default=EmbeddedSource())
    noise: Optional[NoiseConfig] = doc("inject label or caption noise into the training split", default=None)
    split: Optional[SplitConfig] = doc("hold out a test split", default=None)
    shard_size: int = doc("samples per output shard (one Ray task each); for a pool indexed in place, the rows "
                          "per uid partition aimed at (at most 1024 partitions)", default=1000)

    def validate(self) -> None:
        require(self, "shard_size", 1, high=MAX_BATCH)
        if self.noise and self.noise.kind == "label" and self.source.kind not in ("labelled", "embedded"):
            raise SpecError(f"noise.kind: label noise needs a labelled source, not {self.source.kind!r}")


# ------------------------------------------------------------------------------------------------ the stage


def run_ingest(cfg: IngestConfig, ctx: StageContext) -> Dict[str, Any]:
    manifest = IngestManifest(**run_index(cfg, ctx)) if cfg.source.kind in INDEXED else _ingest_listed(cfg, ctx)
    if not manifest.rows_out:  # nothing to train on, filter or score: the source is wrong, not the run
        path = getattr(cfg.source, "path", None)
        where = f"source.path: {path}" if path else f"source: {cfg.source.kind}"
        raise InputError(f"{where}: no samples to keep ({manifest.rows_in} found, {manifest.rejected} rejected)")
    return manifest.to_json()


def _ingest_listed(cfg: IngestConfig, ctx: StageContext) -> IngestManifest:
    """A source listed on the driver (the embedded default): its samples copied into tars by tasks."""
    listing, split, corrupted = _listing(cfg, ctx)
    n = len(listing)
    ok = [i for i in range(n) if listing.reasons[i] is None]
    keys = {i: f"{j:09d}" for j, i in enumerate(ok)}
    shard_of = {i: j // cfg.shard_size for j, i in enumerate(ok)}
    num_shards = (len(ok) + cfg.shard_size - 1) // cfg.shard_size
    reasons, located = _write_tars(listing, ok, keys, cfg.shard_size, num_shards, ctx)
    kept = [i for i in ok if reasons[i] is None]
    files = _write_shards(listing, kept, keys, shard_of, split, corrupted, located, num_shards, ctx)
    rejected = [i for i in range(n) if reasons[i] is not None]
    ctx.out.write_table(fp.REJECTS, fp.rejects_table([listing.sources[i] for i in rejected],
                                                     [listing.uids[i] for i in rejected],
                                                     [reasons[i] for i in rejected]))
    files.append(fp.REJECTS)
    return IngestManifest(
        rows_in=n, rows_out=len(kept), rejected=len(rejected), files=files,
        shards=num_shards, corrupted=int(corrupted[kept].sum()) if kept else 0,
        test=int(sum(split[i] == "test" for i in kept)),
        reference=int(sum(split[i] == "reference" for i in kept)),
        class_names=listing.class_names, templates=list(getattr(cfg.source, "templates", ()) or ()) or None,
    )


def _listing(cfg: IngestConfig, ctx: StageContext):
    """``(listing, split, corrupted)``: every sample the source offers, its split, and the noise injected."""
    listing = LISTERS[cfg.source.kind](cfg.source, ctx)
    n = len(listing)
    split = assign_split(n, cfg.split)
    corrupted = np.zeros(n, dtype=bool)
    if listing.class_names is not None and n:
        listing.extras["true_label"] = list(listing.extras["label"])  # before any noise: the truth
    if cfg.noise is not None:
        eligible = (split == "train") & np.array([r is None for r in listing.reasons], dtype=bool)
        corrupted = inject_noise(listing, eligible, cfg.noise, getattr(cfg.source, "templates", ()))
    return listing, split, corrupted


def _write_tars(listing: Listing, ok: List[int], keys, shard_size: int, num_shards: int, ctx: StageContext):
    """The shards' tars, one task each; returns every sample's reason to be left out (``None``: kept) and where
    each kept sample's image landed."""
    tasks = []
    for s in range(num_shards):
        members = ok[s * shard_size:(s + 1) * shard_size]
        records = [(keys[i], listing.refs[i], listing.texts[i], listing.uids[i]) for i in members]
        tasks.append((ctx.out.fs, ctx.out.join(fp.shard_tar(s)), records))
    written = ctx.map(write_shard, tasks, unit="shards", rows=[len(t[2]) for t in tasks])
    late = {key: reason for rej, _ in written for key, reason in rej}
    located = {key: where for _, index in written for key, where in index.items()}
    reasons = list(listing.reasons)
    for i in ok:
        if keys[i] in late:
            reasons[i] = late[keys[i]]
    return reasons, located


def _write_shards(listing: Listing, kept: List[int], keys, shard_of, split, corrupted, located, num_shards: int,
                  ctx: StageContext) -> List[str]:
    """The kept samples' parquet shards; returns every shard file (parquet and tar) written."""
    extras = {name: [values[i] for i in kept] for name, values in listing.extras.items()}
    table = fp.shard_table(
        [listing.uids[i] for i in kept], [listing.texts[i] for i in kept], [keys[i] for i in kept],
        [shard_of[i] for i in kept], [split[i] for i in kept], [corrupted[i] for i in kept],
        [listing.sources[i] for i in kept], [located[keys[i]] for i in kept], extras, listing.class_names)
    files = []
    for s in range(num_shards):
        ctx.out.write_table(fp.shard_parquet(s), table.filter(pc.equal(table["shard"], s)))
        files += [fp.shard_parquet(s), fp.shard_tar(s)]
    return files
