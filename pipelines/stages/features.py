"""``features``: pretrained towers' features of every row of a dataset, computed once (LiT: locked towers).

A tower CLIP (:mod:`pipelines.models.towers`) whose towers are frozen trains only its projections and logit scale:
every step would run both towers forward on its batch again, and every train stage of a run (reference, vanilla,
mimic) would again.  This stage runs them once per row, on Ray Data actors (one model each, a GPU each with
``use_gpu``), and writes the dataset again (its shards rewritten one to one, ``tar`` made a full URL, every column
carried) with, per shard, a file of fixed-width float32 rows (``features/shard-NNNNN.f32``: image features then
text features) and where each row's are (``features``, ``features_offset``, ``features_size``;
:mod:`pipelines.formats.pool`).  A train stage on this dataset with the same towers, none of whose parameters
train, reads those bytes with one ranged read per row instead of decoding images and tokenising captions, and
runs a :class:`~pipelines.models.towers.TowerCLIP` without its towers (``cached``): the projections are still the
mimic sites, so the scores, weights and updates are the full model's (the features are computed in float32: under
bf16 autocast the towers' outputs are these, more exact than a bf16 forward of the full model would give).  A row whose image or caption does not
decode has ``features_size`` 0 (counted in the manifest's ``skipped``); the train stage skips it as
``no_features``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

import numpy as np

from pipelines.formats import pool as fp
from pipelines.formats.manifest import DatasetManifest
from pipelines.run.config import SpecError, doc, require
from pipelines.run.context import StageContext
from pipelines.run.storage import parquet_schema, write_parquet
from pipelines.stages.clipscore import ActorPoolConfig, ShardMapper, actor_count

TOWER_KEYS = ("image_tower", "text_tower", "image_size")  # what must match between the features and a model


@dataclass(frozen=True)
class FeaturesConfig(ActorPoolConfig):
    data: str = doc("the dataset stage (ingest, filter or clipscore) whose rows to embed", ref="dataset")
    image_tower: str = doc("the pretrained image tower (efficientnet_lite0)", default="efficientnet_lite0")
    text_tower: str = doc("the pretrained text tower (all-minilm-l6-v2)", default="all-minilm-l6-v2")
    image_size: Optional[int] = doc("the image tower's input size (default: its own)", default=None)

    def validate(self) -> None:
        from pipelines.models.towers import IMAGE_WEIGHTS, TEXT_TOWERS

        super().validate()
        if self.image_tower not in IMAGE_WEIGHTS:
            raise SpecError(f"image_tower: unknown {self.image_tower!r} (known: {', '.join(IMAGE_WEIGHTS)})")
        if self.text_tower not in TEXT_TOWERS:
            raise SpecError(f"text_tower: unknown {self.text_tower!r} (known: {', '.join(TEXT_TOWERS)})")
        require(self, "image_size", 1, allow_none=True, high=4096)

    def spec(self):
        """The tower CLIP whose towers run (its projections are not used)."""
        from pipelines.models.build import ModelSpec

        return ModelSpec("clip", backbone=self.image_tower, image_size_override=self.image_size,
                         text_tower=self.text_tower, embed_dim=1)

    def towers(self) -> Dict[str, Any]:
        """The manifest's ``features``: the towers, image size and widths a train stage checks its model against."""
        spec = self.spec()
        image_dim, text_dim = spec.feature_dims
        return {"image_tower": self.image_tower, "text_tower": self.text_tower, "image_size": spec.image_size,
                "image_dim": image_dim, "text_dim": text_dim}


@dataclass
class FeaturesManifest(DatasetManifest):
    embedded: int = 0
    skipped: int = 0


class ShardFeatures(ShardMapper):
    """A shard's rows' tower features in a file of their own, and the shard with where each row's are."""

    def map_shard(self, name: str):
        import pyarrow as pa
        import torch

        table = self.read_shard(name)
        image_dim, text_dim = self.spec.feature_dims
        values = np.zeros((table.num_rows, image_dim + text_dim), fp.FEATURE_DTYPE)
        ok = np.zeros(table.num_rows, bool)
        with torch.no_grad():
            for idx, images, tokens in self.decoded(table):
                values[idx, :image_dim] = self.model.visual.trunk(images).float().cpu().numpy()
                values[idx, image_dim:] = self.model.text(tokens).float().cpu().numpy()
                ok[idx] = True
        path = fp.features_file(name)
        self.out.write_bytes(path, values.tobytes())
        width = values.shape[1] * fp.FEATURE_DTYPE.itemsize
        columns = {"features": pa.array([self.out.fs.unstrip_protocol(self.out.join(path))] * table.num_rows),
                   "features_offset": pa.array(np.arange(table.num_rows, dtype=np.int64) * width),
                   "features_size": pa.array(np.where(ok, width, 0).astype(np.int64))}
        for column, array in columns.items():
            table = table.append_column(column, array)
        write_parquet(self.out.fs, self.out.join(name), table)
        return table.num_rows, int((~ok).sum())


def run_features(cfg: FeaturesConfig, ctx: StageContext) -> Dict[str, Any]:
    """One Ray Data map over the dataset's shards on an actor pool; the driver holds shard names and counts."""
    data = ctx.inputs[cfg.data]
    dm = DatasetManifest.read(data)
    shards = fp.shard_parquets(dm.files)
    if not shards:
        raise SpecError(f"data: stage {cfg.data!r} has no rows")
    if set(parquet_schema(data.fs, data.join(shards[0])).names) & set(fp.FEATURE_COLUMNS):
        raise SpecError(f"data: stage {cfg.data!r} already holds tower features")
    rows = ctx.map_actors(ShardFeatures, [{"shard": s} for s in shards], "shards embedded",
                          min(actor_count(cfg), len(shards)),
                          dict(spec=cfg.spec(), weights=None, data=data, out=ctx.out,
                               storage_options=dict(ctx.storage_options), cfg=cfg),
                          num_cpus=cfg.cpus_per_actor, num_gpus=1 if cfg.use_gpu else 0, rows="rows")
    total, skipped = sum(r["rows"] for r in rows), sum(r["skipped"] for r in rows)
    files = [f for s in shards for f in (s, fp.features_file(s))]
    return FeaturesManifest(rows_in=total, rows_out=total, rejected=0, files=files, shards=len(shards),
                            class_names=dm.class_names, templates=dm.caption_templates(), features=cfg.towers(),
                            embedded=total - skipped, skipped=skipped).to_json()
