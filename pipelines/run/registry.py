"""The stage registry: ``stage:`` names in a spec -> typed config, implementation, and what the stage produces.

A stage is registered when its implementation exists.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

from pipelines.stages.aggregate import AggregateConfig
from pipelines.stages.clipscore import ClipScoreConfig
from pipelines.stages.evaluate import EvaluateConfig
from pipelines.stages.features import FeaturesConfig
from pipelines.stages.filter.stage import FilterConfig
from pipelines.stages.ingest.stage import IngestConfig
from pipelines.training.config import TrainConfig


def _late(path: str) -> Callable[..., Any]:
    """``module:function``, imported at its first call: what a stage runs (and most of its checks) imports torch,
    Ray or open_clip, which ``validate``, ``show`` and ``report`` of other stages never need."""

    def call(*args: Any) -> Any:
        module, _, name = path.partition(":")
        return getattr(importlib.import_module(module), name)(*args)

    call.__qualname__ = path
    return call


@dataclass(frozen=True)
class StageDef:
    config: type
    run: Callable[[Any, Any], Dict[str, Any]]
    description: str
    produces: str  # what later stages may reference it as: dataset | model | scores | utility
    check: Optional[Callable[[Any, Any], None]] = None  # spec-only checks, before any stage runs
    resumable: bool = False  # a rerun continues an uncommitted attempt with the same config (from its checkpoints)
    # the (CPUs, GPUs) it holds while it runs, so independent stages run at once only where both fit; None (or a
    # None result): the whole cluster (it fans out over every CPU)
    needs: Optional[Callable[[Any], Optional[Tuple[float, float]]]] = None
    needs_field: str = ""  # the config field those come from (named when the cluster is too small for them)
    # what kind of Ray processes it can reuse from an earlier stage of the run (train: a worker group's key); before
    # it starts the stage, the runner reserves it an idle one of that kind, if any, and releases idle ones holding
    # CPUs or GPUs it gave the stage
    reuses: Optional[Callable[[Any], Any]] = None


def _train_needs(cfg: TrainConfig) -> Tuple[float, float]:
    """The workers and their decoding actors, and the evaluation's decoding tasks."""
    r = cfg.resources
    return (r.num_workers * (r.cpus_per_worker + r.decoders_per_worker * r.cpus_per_decoder) + r.cpus_per_decoder,
            float(r.num_workers) if r.use_gpu else 0.0)


def _actor_pool_needs(cfg: Any) -> Optional[Tuple[float, float]]:
    """A given number of actors (0: one per CPU or GPU, the whole cluster)."""
    return (cfg.actors * cfg.cpus_per_actor, float(cfg.actors) if cfg.use_gpu else 0.0) if cfg.actors else None


STAGES: Dict[str, StageDef] = {
    "ingest": StageDef(
        IngestConfig, _late("pipelines.stages.ingest.stage:run_ingest"),
        "turn a source (image folder, DataComp pool, labelled set, embedded digits) into sample shards",
        "dataset",
    ),
    "train": StageDef(
        TrainConfig, _late("pipelines.stages.train:run_train"),
        "train CLIP or a classifier on Ray Train (DDP), plain or reweighted by Grad-Mimic / a baseline; "
        "writes the final weights, metrics and the score log",
        "model", check=_late("pipelines.training.checks:check_train"), resumable=True, needs=_train_needs,
        needs_field="resources", reuses=_late("pipelines.training.groups:group_key"),
    ),
    "aggregate": StageDef(
        AggregateConfig, _late("pipelines.stages.aggregate:run_aggregate"),
        "reduce a train stage's score log to one utility row per sample (means, per-step binariser votes) on Ray "
        "Data, by ranges of uid buckets; the manifest holds the dataset quality estimate",
        "utility", check=_late("pipelines.stages.aggregate:check_aggregate"),
    ),
    "filter": StageDef(
        FilterConfig, _late("pipelines.stages.filter.stage:run_filter"),
        "join utilities with the pool by uid, keep by a rule (thresholds, exact top / bottom fractions, and / or / "
        "minus); writes kept shards (resharded tars), rejected rows with reasons and a DataComp subset file",
        "dataset",
    ),
    "clipscore": StageDef(
        ClipScoreConfig, _late("pipelines.stages.clipscore:run_clipscore"),
        "a CLIP's image-text cosine for every row of a dataset (batch inference on Ray Data actors); writes the "
        "dataset again with the score (and optionally the embeddings) as columns",
        "dataset", needs=_actor_pool_needs, needs_field="actors",
    ),
    "features": StageDef(
        FeaturesConfig, _late("pipelines.stages.features:run_features"),
        "pretrained towers' features of every row of a dataset, computed once on Ray Data actors, so train stages "
        "with locked towers (LiT) train the projections on them; writes the dataset again with where they are",
        "dataset", needs=_actor_pool_needs, needs_field="actors",
    ),
    "evaluate": StageDef(
        EvaluateConfig, _late("pipelines.stages.evaluate:run_evaluate"),
        "a trained model on a dataset's held-out split: loss, zero-shot accuracy and retrieval recall@1/5 (CLIP), "
        "or accuracy (classifier)",
        "evaluation", needs=lambda cfg: (cfg.cpus, 1.0 if cfg.use_gpu else 0.0), needs_field="cpus",
    ),
}
