"""``train``: data-parallel training on Ray Train with Grad-Mimic (or baseline) reweighting, and the score log.

The driver reads the ingest stage's table (not its images), resolves weights (a previous stage, a local file, an
open_clip pretrained tag), checks everything it can before any worker starts, builds each rank's Ray Data stream
(:mod:`pipelines.training.data`) and runs :func:`pipelines.training.loop.train_worker` on a ``TorchTrainer``
(DDP: NCCL on GPUs, gloo on CPUs).  Checkpoints and Ray Train's run state live in the stage's attempt directory
(``train/``), so ``FailureConfig(max_failures)`` restarts resume from the last checkpoint, and so does a
``gradmimic run`` rerun after the driver itself died (the runner reopens the uncommitted attempt).

Output, under the stage directory:

- ``model.safetensors`` (final weights) and ``model.json`` (how to rebuild the model: task, architecture, open_clip
  config, classes, image size and normalisation);
- ``metrics.parquet``: per step ``loss``, ``lr``, ``samples_per_s``, ``step_seconds``, ``weight_entropy``,
  ``direction_norm``, ``alignment``; on evaluation steps ``test_loss`` and ``test_accuracy``;
- ``scores/bucket=<b>/part-*.parquet``: the score log (:mod:`pipelines.score_log`);
- ``train/``: Ray Train's checkpoints.
"""

from __future__ import annotations

import math
import posixpath
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Literal, Optional, Tuple, Union

from ..backbones import PACKAGED_WEIGHTS, packaged_weights_file
from ..config import SpecError, doc, ref_name, require
from ..models import (
    ModelSpec,
    apply_trainable,
    fetch_pretrained,
    fit_state,
    match_names,
    meta_model,
    model_json,
    shapes,
)
from ..training.loop import OptimizerConfig

MODES = ("plain", "mimic", "grand", "rho", "agra", "influence")
WEIGHTS_FILE = "model.safetensors"


@dataclass(frozen=True)
class Weights:
    stage: Optional[str] = doc("a previous train stage: its final weights", default=None)
    path: Optional[str] = doc("a .safetensors or weights-only torch file (local path or URL)", default=None)
    pretrained: Optional[str] = doc("an open_clip pretrained tag, e.g. laion2b_s34b_b79k (needs the network), or "
                                     "efficientnet-lite0 (ImageNet weights from an installed package)", default=None)

    def validate(self) -> None:
        given = [k for k in ("stage", "path", "pretrained") if getattr(self, k) is not None]
        if len(given) != 1:
            raise SpecError(f"expected exactly one of stage, path, pretrained, got {', '.join(given) or 'none'}")


WeightsRef = Union[str, Weights]  # a bare string names a previous train stage


@dataclass(frozen=True)
class ModelConfig:
    arch: str = doc("open_clip architecture (e.g. ViT-B-32), the shipped 'tiny-clip', or a model-config .json",
                     default="tiny-clip")
    backbone: Optional[str] = doc("classify only: the image backbone instead of the open_clip visual tower: "
                                   "efficientnet_lite0, or a torchvision model (e.g. resnet18)", default=None)
    image_size: Optional[int] = doc("backbones: input size (open_clip: the architecture's)", default=None)


@dataclass(frozen=True)
class MimicConfig:
    params: Optional[Tuple[str, ...]] = doc("parameters scored and reweighted (default: visual.proj for clip, "
                                             "head.weight for classify)", default=None)
    method: Literal["proj", "cos", "normed_proj", "normed_cos"] = doc(
        "score: proj | cos of -g_i on T; normed_* reweight with a softmax over the global batch", default="normed_proj")
    temperature: float = doc("softmax temperature (also for grand and rho)", default=1.0)
    reweight: Literal["param", "all"] = doc("reweight the mimic parameters only, or every parameter", default="param")
    warmup_steps: int = doc("first steps with the plain mean's weights (scores still logged)", default=0)

    def validate(self) -> None:
        require(self, "temperature", 0, strict=True)
        require(self, "warmup_steps", 0)


@dataclass(frozen=True)
class ComparisonConfig:
    data: str = doc("a dataset stage holding the trusted / comparison samples", ref="dataset")
    split: Literal["train", "test", "reference"] = doc("which of its splits", default="train")
    samples: int = doc("how many (drawn with the seed)", default=256)
    every: int = doc("recompute the direction every this many steps", default=1)
    seed: int = doc("draw seed", default=0)

    def validate(self) -> None:
        require(self, "samples every", 1)


@dataclass(frozen=True)
class ResourcesConfig:
    num_workers: int = doc("training workers (DDP ranks)", default=1)
    use_gpu: bool = doc("one GPU per worker (NCCL); otherwise CPU (gloo)", default=False)
    cpus_per_worker: float = doc("CPUs reserved per worker (and its torch threads)", default=1.0)
    decoders_per_worker: int = doc("Ray Data actors decoding each worker's stream (more for large images)", default=1)
    cpus_per_decoder: float = doc("CPUs reserved per decoding actor (and per evaluation decoding task)", default=0.5)

    def validate(self) -> None:
        require(self, "num_workers decoders_per_worker", 1)
        require(self, "cpus_per_worker cpus_per_decoder", 0, strict=True)


@dataclass(frozen=True)
class TrainConfig:
    data: str = doc("the dataset stage to train on (its train split; its test split is held out)",
                     ref="dataset")
    split: Literal["train", "reference"] = doc("the split trained on: train (the pool), or reference (clean data "
                                               "set aside by ingest for a reference model)", default="train")
    task: Literal["clip", "classify"] = doc("clip: symmetric InfoNCE; classify: linear head, cross-entropy",
                                             default="clip")
    mode: Literal["plain", "mimic", "grand", "rho", "agra", "influence"] = doc(
        "plain training, Grad-Mimic, or a baseline weighting", default="plain")
    model: ModelConfig = doc("what to build", default=ModelConfig())
    init: Optional[WeightsRef] = doc("initial weights: a train stage, {path: ...} or {pretrained: ...} (default: "
                                      "random, from seed)", default=None, ref="model")
    reinit: Tuple[str, ...] = doc("parameters re-initialised after loading init (e.g. visual.proj)", default=())
    trainable: Optional[Tuple[str, ...]] = doc("train only parameters matching these names / globs", default=None)
    freeze: Tuple[str, ...] = doc("freeze parameters matching these names / globs", default=())
    reference: Optional[WeightsRef] = doc("reference weights for mimic (task vector) and rho (reference losses)",
                                           default=None, ref="model")
    mimic: MimicConfig = doc("scoring and reweighting", default=MimicConfig())
    comparison: Optional[ComparisonConfig] = doc("agra / influence: the comparison set", default=None)
    batch_size: int = doc("global batch (split over the workers)", default=256)
    steps: Optional[int] = doc("training steps (or give epochs)", default=None)
    epochs: Optional[int] = doc("passes over the train split (default 1 when steps is not given)", default=None)
    optimizer: OptimizerConfig = doc("AdamW with warm-up and cosine decay", default=OptimizerConfig())
    precision: Literal["auto", "fp32", "bf16"] = doc("auto: bf16 autocast on GPU, fp32 on CPU", default="auto")
    eval_every: int = doc("evaluate on the test split every this many steps (0: only at the end)", default=0)
    eval_batch_size: int = doc("rows per evaluation chunk (CLIP's held-out loss is over a chunk)", default=256)
    eval_samples: Optional[int] = doc("evaluate on at most this many test rows", default=None)
    checkpoint_every: int = doc("checkpoint (and make the score log durable) every this many steps", default=100)
    max_failures: int = doc("worker-group restarts from the last checkpoint before giving up (-1: unlimited)", default=3)
    max_nonfinite_steps: int = doc(
        "a step whose loss, scores, weights or gradients are not finite (NaN, inf) is skipped: no update and no "
        "score rows, counted in the metrics (nonfinite_steps); this many in a row stop the stage", default=5)
    resources: ResourcesConfig = doc("workers and devices", default=ResourcesConfig())
    num_buckets: int = doc("score-log partitions: bucket = uid_lo % num_buckets", default=64)
    seed: int = doc("model init and data order", default=0)

    def validate(self) -> None:
        if self.mode in ("mimic", "rho") and self.reference is None:
            raise SpecError(f"reference: mode {self.mode!r} needs a reference model (a previous train stage, "
                            "{path: ...} or {pretrained: ...})")
        if self.mode in ("agra", "influence") and self.comparison is None:
            raise SpecError(f"comparison: mode {self.mode!r} needs a comparison set ({{data: <dataset stage>, ...}})")
        if self.model.backbone and self.task != "classify":
            raise SpecError("model.backbone: only for task classify")
        if self.model.image_size is not None and not self.model.backbone:
            raise SpecError("model.image_size: only for backbones (open_clip models have their own)")
        require(self, "batch_size checkpoint_every num_buckets eval_batch_size", 1)
        if self.steps is not None and self.epochs is not None:
            raise SpecError("steps: give steps or epochs, not both")
        require(self, "steps epochs eval_samples", 1, allow_none=True)
        require(self, "eval_every", 0)
        require(self, "max_failures", -1)
        require(self, "max_nonfinite_steps", 1)
        for name in ("init", "reference"):
            w = getattr(self, name)
            if isinstance(w, Weights) and w.pretrained and self.model.backbone and w.pretrained not in PACKAGED_WEIGHTS:
                raise SpecError(f"{name}.pretrained: {w.pretrained!r} is not a packaged tag for a backbone "
                                f"({', '.join(PACKAGED_WEIGHTS)}; other weights: give a path)")


# ------------------------------------------------------------------------------------------------ checks


def model_spec(cfg: TrainConfig, num_classes: int = 2) -> ModelSpec:
    return ModelSpec(cfg.task, cfg.model.arch, cfg.model.backbone, num_classes, cfg.model.image_size)


def mimic_params(cfg: TrainConfig) -> Tuple[str, ...]:
    return cfg.mimic.params or tuple(model_spec(cfg).default_params)


def _spec_error(where: str, exc: BaseException) -> SpecError:
    msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    return SpecError(f"{where}: {msg}")


def check_train(cfg: TrainConfig, spec) -> None:
    """Everything checkable from the spec alone (run before any stage starts, and by ``gradmimic validate``)."""
    try:
        model = meta_model(model_spec(cfg))
    except (KeyError, FileNotFoundError, ValueError) as exc:
        raise _spec_error("model.arch" if not cfg.model.backbone else "model.backbone", exc) from None
    names = [n for n, _ in model.named_parameters()]
    for field_name in ("reinit", "trainable", "freeze"):
        for pattern in getattr(cfg, field_name) or ():
            if not match_names(names, [pattern]):
                raise SpecError(f"{field_name}: no parameter matches {pattern!r} (e.g. {', '.join(names[-3:])})")
    training = apply_trainable(model, cfg.trainable, cfg.freeze)
    if not training:
        raise SpecError("trainable: nothing left to train")
    if cfg.mode != "plain":
        _check_params(cfg, model, training)
    for field_name in ("init", "reference"):
        source = getattr(cfg, field_name)
        other = ref_name(source)
        if other is None:
            continue
        theirs = spec.stage(other).config
        if theirs.task != cfg.task and not (theirs.task == "clip" and cfg.task == "classify"):
            raise SpecError(f"{field_name}: stage {other!r} trains a {theirs.task} model, this stage a {cfg.task} one")
        wanted = list(shapes(model)) if (field_name == "init" or cfg.mode == "rho") else list(mimic_params(cfg))
        skip = set(match_names(names, cfg.reinit)) if field_name == "init" else set()
        theirs_meta = meta_model(model_spec(theirs)).state_dict()  # parameters and buffers: shapes, no memory
        mine = {n: s for n, s in shapes(model).items() if n in wanted and n not in skip}
        try:
            fit_state(mine, theirs_meta)
        except ValueError as exc:
            raise SpecError(f"{field_name}: stage {other!r} ({theirs.model.arch}) does not fit this "
                            f"{cfg.model.arch} model: {exc}") from None
        if field_name == "reference":
            missing = [n for n in wanted if n not in theirs_meta]
            if missing:
                raise SpecError(f"{field_name}: stage {other!r} has no parameter {missing[0]!r}")


def _check_params(cfg: TrainConfig, model, training) -> None:
    import torch

    from gradmimic import find_parameters
    from gradmimic.open_clip_sites import projection_params

    params = mimic_params(cfg)
    try:
        find_parameters(model, params)
    except KeyError as exc:
        raise _spec_error("mimic.params", exc) from None
    for name in params:
        if name not in training and cfg.mimic.reweight == "param":
            raise SpecError(f"mimic.params: {name!r} is frozen, so reweighting it changes nothing")
    if cfg.task == "clip":
        allowed = set(projection_params(model).values())
        bad = [n for n in params if n not in allowed]
        if bad:
            raise SpecError(f"mimic.params: CLIP scores its projections ({', '.join(sorted(allowed))}), not {bad[0]!r}")
    else:
        for name in params:
            owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            if not isinstance(owner, torch.nn.Linear) or not name.endswith(".weight"):
                raise SpecError(f"mimic.params: {name!r} is not the weight of an nn.Linear layer (e.g. head.weight)")


# ------------------------------------------------------------------------------------------------ the stage


def load_weights_source(ctx, source: WeightsRef, arch: str, field_name: str):
    """A state dict from a stage's final weights, a file or an open_clip pretrained tag."""
    from gradmimic import load_state_dict

    name = ref_name(source)
    try:
        if name is not None:
            stage = ctx.inputs[name]
            with stage.fs.open(stage.join(WEIGHTS_FILE), "rb") as f:
                return load_state_dict(f.read(), name=stage.url + "/" + WEIGHTS_FILE)
        if source.path is not None:
            return _load_path(source.path, ctx.storage_options)
        if source.pretrained in PACKAGED_WEIGHTS:
            return load_state_dict(packaged_weights_file(source.pretrained))
        return fetch_pretrained(arch, source.pretrained)
    except (OSError, ValueError, KeyError) as exc:
        sub = "stage" if name else ("path" if source.path is not None else "pretrained")
        raise _spec_error(f"{field_name}.{sub}", exc) from None


def _load_path(path: str, options):
    from gradmimic import load_state_dict

    from ..storage import open_storage

    if "://" not in path or path.startswith("file://"):
        return load_state_dict(path.replace("file://", ""))
    fs, p = open_storage(path, options)
    if not fs.exists(p):
        raise FileNotFoundError(f"weights not found: {path}")
    return load_state_dict(fs.cat_file(p), name=path)


def _pool_columns(stage_manifest: Dict[str, Any]) -> List[str]:
    from ..training.data import POOL_COLUMNS

    return list(POOL_COLUMNS) + (["label"] if stage_manifest.get("class_names") else [])


@dataclass
class _Pool:
    """What the stage reads from its ingest stage."""

    train: Any  # pyarrow tables of the train / test rows (no images)
    test: Any
    class_names: List[str]
    templates: Tuple[str, ...]


def _read_inputs(cfg: TrainConfig, ctx) -> _Pool:
    from ..training.data import read_pool, split_rows

    data = ctx.inputs[cfg.data]
    manifest = data.manifest()
    class_names = manifest.get("class_names") or []
    if cfg.task == "classify" and not class_names:
        raise SpecError(f"task: classify needs a labelled pool; stage {cfg.data!r} has no classes")
    try:
        pool = read_pool(data, _pool_columns(manifest))
    except ValueError as exc:
        raise _spec_error("data", exc) from None
    train, test = split_rows(pool, cfg.split), split_rows(pool, "test")
    if cfg.batch_size > train.num_rows:
        raise SpecError(f"batch_size: {cfg.batch_size} is larger than the training pool ({train.num_rows} "
                        f"{cfg.split} rows in stage {cfg.data!r})")
    if cfg.resources.num_workers > cfg.batch_size:
        raise SpecError(f"resources.num_workers: {cfg.resources.num_workers} workers cannot share a batch of "
                        f"{cfg.batch_size}")
    if cfg.eval_samples is not None:
        test = test.slice(0, cfg.eval_samples)
    templates = tuple(manifest.get("templates") or ("{}",))  # ingest and filter stages record them
    return _Pool(train, test, class_names, templates)


def _check_resources(cfg: TrainConfig, ctx) -> None:
    """On a Ray started here (nothing will join it), a stage asking for more than there is would wait forever."""
    import ray

    if ctx.ray_address != "local":
        return  # a cluster may autoscale to what the stage asks for
    have = ray.cluster_resources()
    res = cfg.resources
    if res.use_gpu and have.get("GPU", 0) < res.num_workers:
        raise SpecError(f"resources.use_gpu: {res.num_workers} workers need {res.num_workers} GPUs, this Ray has "
                        f"{int(have.get('GPU', 0))}")
    cpus = have.get("CPU", 0)
    need = res.num_workers * (res.cpus_per_worker + res.decoders_per_worker * res.cpus_per_decoder)
    if need + res.cpus_per_decoder > cpus:  # and room for a task decoding the evaluation set
        raise SpecError(f"resources: {res.num_workers} workers with their decoders need {need:g} CPUs (and "
                        f"{res.cpus_per_decoder:g} more to decode the evaluation set); this Ray has {cpus:g}: lower "
                        f"cpus_per_worker or cpus_per_decoder, or raise ray.num_cpus")


def _resolve_weights(cfg: TrainConfig, ctx, spec: ModelSpec, params, reinit):
    """``(init, reference)`` state dicts (or None), checked against the model before any worker starts."""
    model_shapes = shapes(meta_model(spec))
    init = reference = None
    if cfg.init is not None:
        state = load_weights_source(ctx, cfg.init, cfg.model.arch, "init")
        try:
            init = fit_state(model_shapes, state, skip=reinit)
        except ValueError as exc:
            raise _spec_error("init", exc) from None
    if cfg.reference is not None and cfg.mode in ("mimic", "rho"):
        state = load_weights_source(ctx, cfg.reference, cfg.model.arch, "reference")
        wanted = model_shapes if cfg.mode == "rho" else {n: model_shapes[n] for n in params}
        try:
            reference = fit_state(wanted, state)
        except ValueError as exc:
            raise _spec_error("reference", exc) from None
        missing = [n for n in wanted if n not in reference]
        if missing:
            raise SpecError(f"reference: the reference weights have no parameter {missing[0]!r}")
    return init, reference


def _datasets(cfg: TrainConfig, ctx, pool: _Pool, plan, decoder, first_step) -> Tuple[Dict[str, Any], int]:
    """Every rank's training stream and held-out chunks, and the comparison set: factories Ray Train calls."""
    import ray

    from ..training.data import chunks_dataset, steps_dataset

    workers = plan.world
    res = cfg.resources
    train_ref, test_ref = ray.put(pool.train), ray.put(pool.test)
    datasets = {f"train_{r}": steps_dataset(plan, r, train_ref, decoder, first_step, res.decoders_per_worker,
                                            res.cpus_per_decoder) for r in range(workers)}
    eval_chunks = math.ceil(pool.test.num_rows / cfg.eval_batch_size)
    for r in range(workers if eval_chunks else 0):
        datasets[f"eval_{r}"] = chunks_dataset(pool.test.num_rows, cfg.eval_batch_size,
                                               list(range(r, eval_chunks, workers)), test_ref, decoder,
                                               res.cpus_per_decoder)
    if cfg.comparison is not None:
        comp = _comparison_rows(ctx, cfg)
        rows = min(comp.num_rows, 1024)
        datasets["comparison"] = chunks_dataset(comp.num_rows, rows, list(range(math.ceil(comp.num_rows / rows))),
                                                ray.put(comp), replace(decoder, labels=cfg.task == "classify"),
                                                res.cpus_per_decoder)
    return datasets, eval_chunks


def run_train(cfg: TrainConfig, ctx) -> Dict[str, Any]:
    import ray

    from ..training.data import Decoder, StepPlan
    from ..training.loop import Job, ProgressBoard

    pool = _read_inputs(cfg, ctx)
    _check_resources(cfg, ctx)
    spec = model_spec(cfg, len(pool.class_names))
    params = mimic_params(cfg)
    reinit = tuple(match_names([n for n, _ in meta_model(spec).named_parameters()], cfg.reinit))  # globs to names
    init, reference = _resolve_weights(cfg, ctx, spec, params, reinit)
    workers = cfg.resources.num_workers
    total = cfg.steps if cfg.steps is not None else (cfg.epochs or 1) * (pool.train.num_rows // cfg.batch_size)
    plan = StepPlan(pool.train.num_rows, cfg.batch_size, workers, cfg.seed, total)
    text = dict(tokens=spec.context_length, arch=cfg.model.arch) if cfg.task == "clip" else {}
    decoder = Decoder(spec.image_size, labels=bool(pool.class_names), storage_options=ctx.storage_options, **text)
    attempt = ctx.out.join("").rstrip("/")
    storage_path, storage_fs = _ray_storage(ctx.out.fs, attempt)
    first_step = _FirstStep(posixpath.join(storage_path, "train"), storage_fs)
    datasets, eval_chunks = _datasets(cfg, ctx, pool, plan, decoder, first_step)
    board_name = progress_board_name(ctx.out.path)
    board = ray.remote(ProgressBoard).options(name=board_name, num_cpus=0, get_if_exists=True).remote()
    job = Job(
        label=ctx.label, task=cfg.task, mode=cfg.mode, model=spec, plan=plan,
        scores_url=ctx.out.fs.unstrip_protocol(posixpath.join(attempt, "scores")),
        storage_options=dict(ctx.storage_options),
        init=ray.put(init) if init is not None else None, reinit=reinit,
        trainable=cfg.trainable, freeze=tuple(cfg.freeze),
        reference=ray.put(reference) if reference is not None else None, params=tuple(params),
        method=cfg.mimic.method, temperature=cfg.mimic.temperature, reweight=cfg.mimic.reweight,
        mimic_warmup=cfg.mimic.warmup_steps, comparison_every=cfg.comparison.every if cfg.comparison else 0,
        optim=cfg.optimizer,
        precision=cfg.precision if cfg.precision != "auto" else ("bf16" if cfg.resources.use_gpu else "fp32"),
        eval_every=cfg.eval_every, eval_chunks=eval_chunks,
        zero_shot=(tuple(pool.class_names), pool.templates) if cfg.task == "clip" and pool.class_names else None,
        checkpoint_every=cfg.checkpoint_every, num_buckets=cfg.num_buckets, seed=cfg.seed,
        max_nonfinite=cfg.max_nonfinite_steps,
        threads=max(1, int(cfg.resources.cpus_per_worker)), progress=board_name,
    )
    resumed = first_step()
    if resumed:
        ctx.progress.stream.write(f"  {ctx.label}: resuming from the checkpoint at step {resumed}/{total}\n")
    try:
        result = _fit(job, cfg, datasets, storage_path, storage_fs, board, ctx)
        seen = ray.get(board.get.remote())
    finally:
        ray.kill(board)
    if seen["stopped"]:  # the workers gave up together (non-finite steps): not a failure a restart would fix
        from ..faults import RunFailed

        raise RunFailed(seen["stopped"])  # the runner adds the file and the stage
    out = _finish(cfg, ctx, spec, result, plan, pool, resumed)
    # the last worker group's spread over Ray nodes (1 on one machine; a multi-node cluster shows its placement)
    return {**out, "restarts": max(seen["starts"] - 1, 0), "worker_nodes": len(set(seen["nodes"].values()))}


def progress_board_name(stage_path: str) -> str:
    """The named actor a running train stage reports progress (and worker pids) to."""
    return f"gradmimic-progress:{stage_path}"


class _FirstStep:
    """Picklable: the step of the run's latest registered checkpoint, read when Ray Train (re)starts workers."""

    def __init__(self, experiment: str, filesystem) -> None:
        self.experiment, self.filesystem = experiment, filesystem

    def __call__(self) -> int:
        from ..training.data import latest_checkpoint_step

        return latest_checkpoint_step(self.experiment, self.filesystem)


def _ray_storage(fs, attempt: str):
    """Ray Train's ``(storage_path, storage_filesystem)`` for the stage's attempt directory on ``fs``."""
    from ..storage import is_local

    if is_local(fs):
        return attempt.rstrip("/"), None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return attempt.rstrip("/"), PyFileSystem(FSSpecHandler(fs))


def _comparison_rows(ctx, cfg: TrainConfig):
    import numpy as np
    import pyarrow as pa

    from ..training.data import read_pool, split_rows

    comp_stage = ctx.inputs[cfg.comparison.data]
    cols = _pool_columns(comp_stage.manifest())
    if cfg.task == "classify" and "label" not in cols:
        raise SpecError(f"comparison.data: stage {cfg.comparison.data!r} has no labels")
    rows = split_rows(read_pool(comp_stage, cols), cfg.comparison.split)
    if rows.num_rows == 0:
        raise SpecError(f"comparison.split: stage {cfg.comparison.data!r} has no {cfg.comparison.split!r} rows")
    n = min(cfg.comparison.samples, rows.num_rows)
    pick = np.sort(np.random.default_rng(cfg.comparison.seed).choice(rows.num_rows, n, replace=False))
    return rows.take(pa.array(pick))


def _fit(job, cfg: TrainConfig, datasets, storage_path: str, storage_fs, board, ctx):
    from ray.data import ExecutionOptions
    from ray.train import (
        CheckpointConfig,
        DataConfig,
        FailureConfig,
        RunConfig,
        ScalingConfig,
    )
    from ray.train.torch import TorchTrainer

    from ..training.loop import train_worker

    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"job": job},
        scaling_config=ScalingConfig(num_workers=cfg.resources.num_workers, use_gpu=cfg.resources.use_gpu,
                                     resources_per_worker={"CPU": cfg.resources.cpus_per_worker}),
        run_config=RunConfig(name="train", storage_path=storage_path, storage_filesystem=storage_fs,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=[], execution_options=ExecutionOptions(preserve_order=True)),
    )
    done = threading.Event()
    printer = threading.Thread(target=_print_progress, args=(board, ctx, done), daemon=True)
    printer.start()
    try:
        return trainer.fit()
    finally:
        done.set()
        printer.join(timeout=5)


def _print_progress(board, ctx, done: threading.Event) -> None:
    import ray

    from .. import faults

    stream = ctx.progress.stream
    live = ctx.progress.live
    last, printed, step = "", 0.0, 0
    while not done.wait(1.0):
        try:
            state = ray.get(board.get.remote(), timeout=5)["state"]
        except Exception:  # noqa: BLE001 - progress is best effort
            continue
        if not state:
            continue
        if state["step"] > step:
            step = state["step"]
            faults.hit(f"stage:{ctx.name}")
        if not live and time.monotonic() - printed < 10.0:  # a log file: a line every 10 s
            continue
        printed = time.monotonic()
        rate = state["samples_per_s"]
        left = (state["total"] - state["step"]) * state["batch_size"] / max(rate, 1e-9)
        line = (f"  {ctx.label}: step {state['step']}/{state['total']} | {rate:,.0f} samples/s | ETA {left:,.0f}s | "
                f"loss {state['loss']:.4f}" + (f" | alignment {state['alignment']:+.3f}"
                                               if state.get("alignment") is not None else ""))
        if line != last:
            stream.write(("\r" + line) if live else (line + "\n"))
            stream.flush()
            last = line
    if live and last:
        stream.write("\n")


def _finish(cfg, ctx, spec: ModelSpec, result, plan, pool: _Pool, resumed: int):
    import json

    import pyarrow as pa

    from ..score_log import DIR, list_parts

    ckpt = result.checkpoint
    if ckpt is None:
        raise RuntimeError(f"{ctx.label}: training reported no checkpoint")
    with ckpt.filesystem.open_input_stream(posixpath.join(ckpt.path, "state.json")) as f:  # not the optimiser's
        state = json.loads(f.read())
    if state["step"] != plan.total_steps:
        raise RuntimeError(f"{ctx.label}: training stopped at step {state['step']} of {plan.total_steps}")
    with ckpt.filesystem.open_input_stream(posixpath.join(ckpt.path, WEIGHTS_FILE)) as f:
        ctx.out.write_bytes(WEIGHTS_FILE, f.read())
    history = state.pop("metrics")
    columns = list(dict.fromkeys(k for row in history for k in row))  # evaluation columns appear on some rows only
    ctx.out.write_table("metrics.parquet", pa.table({k: [row.get(k) for row in history] for k in columns}))
    ctx.out.write_bytes("model.json", model_json(spec, {"class_names": pool.class_names}))
    scores = [posixpath.relpath(p, ctx.out.join("")) for p in list_parts(ctx.out.fs, ctx.out.join(DIR))]
    evals = [h for h in history if "test_loss" in h]
    final = {k: evals[-1][k] for k in ("test_loss", "test_accuracy") if evals and k in evals[-1]}
    seen = state["samples_seen"]
    return {
        "rows_in": seen, "rows_out": seen, "rejected": 0,
        "files": [WEIGHTS_FILE, "model.json", "metrics.parquet", *scores],
        "steps": state["step"], "samples_seen": seen, "score_rows": seen,
        "samples_per_s": round(seen / max(state["train_seconds"], 1e-9), 1),
        "train_rows": pool.train.num_rows, "test_rows": pool.test.num_rows, "workers": plan.world,
        "resumed_from_step": resumed, "final": final, "mode": cfg.mode, "task": cfg.task,
        "nonfinite_steps": int(state.get("nonfinite_steps", 0)),
        "class_names": pool.class_names,
    }
