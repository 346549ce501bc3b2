"""``clipscore``: a CLIP's image-text cosine for every row of a dataset, by batch inference on a pool of Ray Data
actors (one model each; a GPU each with ``use_gpu``).

Output: the dataset again, its index shards rewritten one to one with every column carried, ``tar`` made a full
URL (as the filter's index output does: no image is copied) and the score in ``column`` (``clip_score``: the
cosine of the normalised image and text embeddings; null for a row whose image or caption does not decode, counted
in the manifest's ``skipped``).  With ``embeddings: true`` the normalised embeddings too (``image_embedding``,
``text_embedding``: fixed-size lists of float32).  A later ``filter`` reads it as a dataset, so the paper's combined
rule (CLIP-score top 30% minus mimic bottom 20%) works on any pool: ``data: <this stage>, utility: <aggregate>,
keep: {minus: [{column: clip_score, top: 0.3}, {column: mean_score, bottom: 0.2}]}``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Dict, List, Optional

import numpy as np

from pipelines.formats import model as fm
from pipelines.formats import pool as fp
from pipelines.formats.manifest import DatasetManifest
from pipelines.run.config import MAX_BATCH, MAX_CPUS, MAX_WORKERS, SpecError, doc, require
from pipelines.run.context import StageContext, cluster_cpus
from pipelines.run.storage import parquet_schema, read_parquet, write_parquet
from pipelines.stages.evaluate import model_spec_of
from pipelines.training.config import WeightsRef

EMBEDDINGS = ("image_embedding", "text_embedding")


@dataclass(frozen=True, kw_only=True)
class ActorPoolConfig:
    """How a stage that maps shards with a model (:class:`ShardMapper`) runs: its batches and its actors."""

    batch_size: int = doc("rows per forward pass", default=256)
    actors: int = doc("model replicas (Ray Data actors); 0: one per CPU (per GPU with use_gpu) the cluster has",
                      default=0)
    cpus_per_actor: float = doc("CPUs per actor (its decoding and, without a GPU, its forward passes)", default=1.0)
    use_gpu: bool = doc("a GPU per actor", default=False)

    def validate(self) -> None:
        require(self, "batch_size", 1, high=MAX_BATCH)
        require(self, "actors", 0, high=MAX_WORKERS)
        require(self, "cpus_per_actor", 0, strict=True, high=MAX_CPUS)


@dataclass(frozen=True)
class ClipScoreConfig(ActorPoolConfig):
    data: str = doc("the dataset stage (ingest, filter or clipscore) whose rows to score", ref="dataset")
    model: WeightsRef = doc("the CLIP that scores them: a train stage (its final weights), or the weights of an "
                            "open_clip architecture ({path: w.safetensors} or {pretrained: tag}, with arch)",
                            ref="model")
    arch: Optional[str] = doc("the open_clip architecture (or model-config .json) of weights given by path or "
                              "pretrained", default=None)
    column: str = doc("the score's column in the output", default="clip_score")
    embeddings: bool = doc("also write each row's normalised image and text embeddings", default=False)

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.model, str):
            self.model.validate()
            if self.model.stage is None and self.arch is None:
                raise SpecError("arch: weights given by path or pretrained need their open_clip architecture")
        if not self.column or self.column in EMBEDDINGS or self.column in fp.RESERVED:
            raise SpecError(f"column: {self.column!r} is a column the pool or this stage already uses")


@dataclass
class ClipScoreManifest(DatasetManifest):
    scored: int = 0
    skipped: int = 0
    column: str = "clip_score"


class ShardMapper:
    """One actor: a model built once, then whole shards mapped (``__call__`` takes a batch of shard names; a
    subclass's :meth:`map_shard` writes one and returns ``(rows, skipped)``)."""

    def __init__(self, spec, weights, data, out, storage_options: Dict[str, Any], cfg) -> None:
        import ray
        import torch

        from gradmimic import load_state_dict
        from pipelines.models.build import load_weights
        from pipelines.training.data import Decoder

        self.spec = spec
        self.device = torch.device("cuda" if cfg.use_gpu else "cpu")
        model = self.spec.build(0, self.device)
        if weights is not None:  # a stage's weights file, or a state dict already checked against the model
            state = ray.get(weights)
            load_weights(model, load_state_dict(state) if isinstance(state, bytes) else state)
        self.model = model.eval()
        text = dict(features=self.spec.feature_dims) if self.spec.cached else dict(
            tokens=self.spec.context_length, arch=self.spec.tokenizer)
        self.decoder = Decoder(self.spec.image_size, storage_options=storage_options, **text)
        self.data, self.out, self.cfg = data, out, cfg
        self.base = data.fs.unstrip_protocol(data.join(""))

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, List[int]]:
        names = [str(n) for n in batch["shard"]]
        counts = [self.map_shard(name) for name in names]
        return {"shard": names, "rows": [n for n, _ in counts], "skipped": [s for _, s in counts]}

    def read_shard(self, name: str):
        """Shard ``name`` with ``tar`` made a full URL (the output points where the images already are)."""
        table = read_parquet(self.data.fs, self.data.join(name))
        return table.set_column(table.schema.get_field_index("tar"), "tar", fp.tar_urls(self.base, table["tar"]))

    def decoded(self, table):
        """Per ``batch_size`` rows: ``(rows, images, tokens)`` of those that decode (model inputs on the device)."""
        import torch

        from pipelines.training.batches import to_images

        source = fp.features_as_location(table) if self.spec.cached else table
        for start in range(0, table.num_rows, self.cfg.batch_size):
            idx = np.arange(start, min(table.num_rows, start + self.cfg.batch_size))
            batch = self.decoder(source, idx)
            ok = batch["reason"] == 0
            if ok.any():
                yield (idx[ok], to_images({"image": batch["image"][ok]}, self.spec, self.device),
                       torch.from_numpy(batch["tokens"][ok]).to(self.device))

    def map_shard(self, name: str):
        raise NotImplementedError


class ShardScorer(ShardMapper):
    """A shard scored: its rows with the cosine (and the embeddings) as columns, written under the same name."""

    def map_shard(self, name: str):
        import pyarrow as pa

        table = self.read_shard(name)
        score, embeddings = self.scores(table)
        out = table.append_column(self.cfg.column, pa.array(score, mask=np.isnan(score)))
        if self.cfg.embeddings:
            for column, values in zip(EMBEDDINGS, embeddings):
                out = out.append_column(column, pa.FixedSizeListArray.from_arrays(
                    pa.array(values.reshape(-1)), values.shape[1]))
        write_parquet(self.out.fs, self.out.join(name), out)
        return table.num_rows, int(np.isnan(score).sum())

    def scores(self, table):
        """The cosine per row (NaN: not decoded) and the normalised image and text embeddings (zeros there)."""
        import torch
        import torch.nn.functional as F

        n = table.num_rows
        score = np.full(n, np.nan, np.float32)
        embeddings: List[np.ndarray] = []
        with torch.no_grad():
            for idx, images, tokens in self.decoded(table):
                image = F.normalize(self.model.encode_image(images).float(), dim=-1)
                text = F.normalize(self.model.encode_text(tokens).float(), dim=-1)
                score[idx] = (image * text).sum(1).cpu().numpy()
                if self.cfg.embeddings:
                    if not embeddings:
                        embeddings = [np.zeros((n, image.shape[1]), np.float32) for _ in EMBEDDINGS]
                    embeddings[0][idx], embeddings[1][idx] = image.cpu().numpy(), text.cpu().numpy()
        return score, embeddings


def actor_count(cfg) -> int:
    """``cfg.actors``, or one per GPU (``use_gpu``) or per ``cpus_per_actor`` CPUs of the cluster."""
    import ray

    if cfg.actors:
        return cfg.actors
    if cfg.use_gpu:
        return max(1, int(ray.cluster_resources().get("GPU", 0)))
    return max(1, int((cluster_cpus() or 1) // cfg.cpus_per_actor))


def _scoring_model(cfg: ClipScoreConfig, ctx: StageContext):
    """``(model spec, weights)`` of the CLIP: a train stage's (its model.json and weights file), or an open_clip
    architecture's with weights from a file or a pretrained tag (checked against it here, on the driver)."""
    from pipelines.models.build import ModelSpec, fit_state, meta_model, shapes
    from pipelines.run.config import ref_name
    from pipelines.stages.train import load_weights_source

    name = ref_name(cfg.model)
    if name is not None:
        model_json = fm.read_model_json(ctx.inputs[name])
        if model_json["task"] != "clip":
            raise SpecError(f"model: stage {name!r} trains a {model_json['task']} model; clipscore needs a CLIP")
        return model_spec_of(model_json), fm.read_weights(ctx.inputs[name])
    try:
        spec = ModelSpec("clip", cfg.arch)
        model_shapes = shapes(meta_model(spec))
    except ValueError as exc:
        raise SpecError(f"arch: {exc}") from None
    state = fit_state(model_shapes, load_weights_source(ctx, cfg.model, cfg.arch, "model"))
    missing = [n for n in model_shapes if n not in state]
    if missing:
        raise SpecError(f"model: the weights have no {missing[0]!r} ({len(missing)} of {cfg.arch}'s tensors missing)")
    return spec, state


def _takes_features(spec, weights, features) -> bool:
    """Whether the CLIP scores the dataset's cached tower features exactly: they are of its towers at its image size,
    and its weights (a train stage's file) hold nothing of the towers (those come from their packages, as the
    features did)."""
    from gradmimic import load_state_dict
    from pipelines.stages.train import CACHED_PARAMS

    return (spec.features_of(features) and isinstance(weights, bytes)
            and set(load_state_dict(weights)) <= set(CACHED_PARAMS))


def run_clipscore(cfg: ClipScoreConfig, ctx: StageContext) -> Dict[str, Any]:
    """One Ray Data map over the dataset's shards on an actor pool; the driver holds shard names and counts."""
    import ray

    data = ctx.inputs[cfg.data]
    spec, weights = _scoring_model(cfg, ctx)
    dm = DatasetManifest.read(data)
    if _takes_features(spec, weights, dm.features):
        spec = replace(spec, cached=True)
        ctx.note(f"scoring on the cached tower features of stage {cfg.data!r} (locked towers)")
    shards = fp.shard_parquets(dm.files)
    if not shards:
        raise SpecError(f"data: stage {cfg.data!r} has no rows")
    taken = set(parquet_schema(data.fs, data.join(shards[0])).names) & {cfg.column, *EMBEDDINGS}
    if taken:
        raise SpecError(f"column: stage {cfg.data!r} already has a column {sorted(taken)[0]!r}")
    rows = ctx.map_actors(ShardScorer, [{"shard": s} for s in shards], "shards scored",
                          min(actor_count(cfg), len(shards)),
                          dict(spec=spec, weights=ray.put(weights), data=data, out=ctx.out,
                               storage_options=dict(ctx.storage_options), cfg=cfg),
                          num_cpus=cfg.cpus_per_actor, num_gpus=1 if cfg.use_gpu else 0, rows="rows")
    total, skipped = sum(r["rows"] for r in rows), sum(r["skipped"] for r in rows)
    return ClipScoreManifest(rows_in=total, rows_out=total, rejected=0, files=list(shards), shards=len(shards),
                             class_names=dm.class_names, templates=dm.caption_templates(), scored=total - skipped,
                             skipped=skipped, column=cfg.column, features=dm.features).to_json()
