"""``train``: data-parallel training on Ray Train with Grad-Mimic (or baseline) reweighting, and the score log.

The driver indexes the ingest stage's split with Ray tasks (:mod:`pipelines.training.index`: it holds row counts
and object refs, never rows or images), resolves weights (a previous stage, a local file, an
open_clip pretrained tag), checks everything it can before any worker starts, builds each rank's Ray Data stream
(:mod:`pipelines.training.data`) and hands it all, as a :class:`~pipelines.training.config.Job`, to a worker group
(:mod:`pipelines.training.groups`: a ``TorchTrainer`` running :func:`pipelines.training.loop.group_worker`; DDP:
NCCL on GPUs, gloo on CPUs), an idle one of the run's with the same resources or a new one.  The checkpoints live
in the stage's attempt directory (``checkpoints/``), so ``FailureConfig(max_failures)`` restarts resume from the
last registered one, and so does a ``gradmimic run`` rerun after the driver itself died (the runner reopens the
uncommitted attempt).  The stage's
fields and what each ``mode`` needs are :mod:`pipelines.training.config`; the checks from the spec alone
:mod:`pipelines.training.checks`.

Output, under the stage directory:

- ``model.safetensors`` (final weights) and ``model.json`` (how to rebuild the model: task, architecture, open_clip
  config, classes, image size and normalisation);
- ``metrics.parquet``: per step ``loss``, ``lr``, ``samples_per_s``, ``step_seconds``, ``weight_entropy``,
  ``direction_norm``, ``alignment``; on evaluation steps ``test_loss`` and ``test_accuracy``;
- ``scores/part-s<first>-<last>-r<rank>.parquet``: the score log, one file per rank per checkpoint
  (:mod:`pipelines.formats.score_log`);
- ``skipped/part-s<first>-<last>-r<rank>.parquet``: the samples a rank skipped because they did not decode, each
  ``(step, uid)`` once with its reason (:mod:`pipelines.formats.skipped`; counts in the manifest's ``skipped``,
  and ``rows_in = rows_out + rejected`` counts them);
- ``checkpoints/``: the stage's checkpoints and the registration of the latest (:mod:`pipelines.formats.model`).
"""

from __future__ import annotations

import contextlib
import math
import posixpath
import time
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Tuple

from pipelines.formats import model as fm
from pipelines.formats import skipped as fs_skipped
from pipelines.formats.manifest import DatasetManifest, ModelManifest
from pipelines.formats.score_log import DIR as SCORES
from pipelines.models.backbones import PACKAGED_WEIGHTS, packaged_weights_file
from pipelines.models.build import ModelSpec, fetch_pretrained, fit_state, match_names, meta_model, model_json, shapes
from pipelines.run.config import SpecError, ref_name
from pipelines.run.context import StageContext
from pipelines.run.errors import InputNotFound
from pipelines.run.storage import is_local
from pipelines.training.checks import spec_error
from pipelines.training.config import MODES, Job, TrainConfig, WeightsRef, mimic_params, model_spec

# ------------------------------------------------------------------------------------------------ the stage

CACHED_PARAMS = ("visual.proj", "text_projection", "logit_scale")  # a tower CLIP's parameters outside its towers


def load_weights_source(ctx: StageContext, source: WeightsRef, arch: str, field_name: str):
    """A state dict from a stage's final weights, a file or an open_clip pretrained tag."""
    from gradmimic import load_state_dict

    name = ref_name(source)
    try:
        if name is not None:
            stage = ctx.inputs[name]
            return load_state_dict(fm.read_weights(stage), name=stage.url + "/" + fm.WEIGHTS)
        if source.path is not None:
            return _load_path(source.path, ctx.storage_options)
        if source.pretrained in PACKAGED_WEIGHTS:
            return load_state_dict(packaged_weights_file(source.pretrained))
        return fetch_pretrained(arch, source.pretrained)
    except (OSError, ValueError, KeyError) as exc:
        sub = "stage" if name else ("path" if source.path is not None else "pretrained")
        raise spec_error(f"{field_name}.{sub}", exc) from None


def _load_path(path: str, options):
    from gradmimic import load_state_dict
    from pipelines.run.storage import open_storage

    if "://" not in path or path.startswith("file://"):
        return load_state_dict(path.replace("file://", ""))
    fs, p = open_storage(path, options)
    if not fs.exists(p):
        raise InputNotFound(f"weights not found: {path}")
    return load_state_dict(fs.cat_file(p), name=path)


@dataclass
class _Pool:
    """What the stage reads from its ingest stage: row indexes (counts and object refs, no rows on the driver)."""

    train: Any  # RowIndex of the training split, and of the test rows evaluated (at most eval_samples)
    test: Any
    class_names: List[str]
    templates: Tuple[str, ...]
    index: Any = None  # the stage's PoolIndex (a comparison set from the same stage reuses it)
    cached: bool = False  # the rows point at cached tower features (a features stage), which the model takes


def _read_inputs(cfg: TrainConfig, ctx: StageContext, sources=(None, None)) -> _Pool:
    from pipelines.training.index import build_index

    data = ctx.inputs[cfg.data]
    manifest = DatasetManifest.read(data)
    class_names = manifest.class_names or []
    if cfg.task == "classify" and not class_names:
        raise SpecError(f"task: classify needs a labelled pool; stage {cfg.data!r} has no classes")
    cached = _use_features(cfg, manifest, ctx, sources)
    try:
        index = build_index(ctx, data, labels=bool(class_names), text=cfg.task == "clip", features=cached)
    except ValueError as exc:
        raise spec_error("data", exc) from None
    train, test = index.split(cfg.split), index.split("test")
    if cfg.batch_size > train.num_rows:
        raise SpecError(f"batch_size: {cfg.batch_size} is larger than the training pool ({train.num_rows} "
                        f"{cfg.split} rows in stage {cfg.data!r})")
    if cfg.resources.num_workers > cfg.batch_size:
        raise SpecError(f"resources.num_workers: {cfg.resources.num_workers} workers cannot share a batch of "
                        f"{cfg.batch_size}")
    test = test.head(cfg.eval_samples)
    templates = tuple(manifest.templates or ("{}",))  # ingest and filter stages record them
    return _Pool(train, test, class_names, templates, index, cached)


def _use_features(cfg: TrainConfig, manifest: DatasetManifest, ctx: StageContext, sources=(None, None)) -> bool:
    """Whether to train on the data stage's cached tower features: it has them, of this model's towers and image
    size; none of the towers' parameters train or are re-initialised; the initial weights (and a whole-model
    reference's) carry no tower tensors (they would replace the packaged towers the features are of); a comparison
    set (if any) is drawn from the same stage."""
    from pipelines.models.build import apply_trainable

    if not manifest.features or cfg.task != "clip" or cfg.model.text_tower is None:
        return False
    spec, have = model_spec(cfg), manifest.features
    model = meta_model(spec)
    names = [n for n, _ in model.named_parameters()]
    towers = set(apply_trainable(model, cfg.trainable, cfg.freeze)) - set(CACHED_PARAMS)  # training
    reinit = set(match_names(names, cfg.reinit)) - set(CACHED_PARAMS)
    full = set(shapes(model)) - set(CACHED_PARAMS)
    carried = [(what, sorted(full & set(state))[0]) for what, state in zip(("init", "reference"), sources)
               if state is not None and full & set(state)]
    why = ""
    if not spec.features_of(have):
        why = (f"they are of {have['image_tower']} + {have['text_tower']} at {have['image_size']} px, this model's "
               f"of {spec.backbone} + {spec.text_tower} at {spec.image_size} px")
    elif towers:
        why = f"this stage trains tower parameters (e.g. {sorted(towers)[0]})"
    elif reinit:
        why = f"this stage re-initialises tower parameters (e.g. {sorted(reinit)[0]})"
    elif carried and (carried[0][0] == "init" or MODES[cfg.mode].full_reference):
        why = f"its {carried[0][0]} weights carry tower tensors (e.g. {carried[0][1]})"
    elif cfg.comparison is not None and cfg.comparison.data != cfg.data:
        why = "its comparison set comes from another stage"
    if why:
        ctx.note(f"stage {cfg.data!r} holds cached tower features, not used: {why}; training on the images")
        return False
    ctx.note(f"training the projections on the cached tower features of stage {cfg.data!r} (locked towers)")
    return True


def _weight_sources(cfg: TrainConfig, ctx: StageContext):
    """``(init, reference)`` state dicts as given (``None`` where not given, or a reference the mode does not use)."""
    init = load_weights_source(ctx, cfg.init, cfg.model.arch, "init") if cfg.init is not None else None
    reference = None
    if cfg.reference is not None and MODES[cfg.mode].needs_reference:
        reference = load_weights_source(ctx, cfg.reference, cfg.model.arch, "reference")
    return init, reference


def _resolve_weights(cfg: TrainConfig, spec: ModelSpec, params, reinit, sources):
    """``(init, reference)`` state dicts (or None) fitted to the model, checked before any worker starts.  A tower
    CLIP's tower tensors may be missing from a reference (a stage trained on cached features holds its projections
    only): the worker's model has the packaged towers."""
    model_shapes = shapes(meta_model(spec))
    init = reference = None
    if sources[0] is not None:
        try:
            init = fit_state(model_shapes, sources[0], skip=reinit)
        except ValueError as exc:
            raise spec_error("init", exc) from None
    mode = MODES[cfg.mode]
    if sources[1] is not None:
        wanted = model_shapes if mode.full_reference else {n: model_shapes[n] for n in params}
        try:
            reference = fit_state(wanted, sources[1])
        except ValueError as exc:
            raise spec_error("reference", exc) from None
        missing = [n for n in wanted if n not in reference and not (spec.towers and n not in CACHED_PARAMS)]
        if missing:
            raise SpecError(f"reference: the reference weights have no parameter {missing[0]!r}")
    return init, reference


def _datasets(cfg: TrainConfig, ctx: StageContext, pool: _Pool, plan, decoder,
              first_step) -> Tuple[Dict[str, Any], int]:
    """Every rank's training stream and held-out chunks, and the comparison set: factories Ray Train calls."""
    from pipelines.training.data import chunks_dataset, steps_dataset

    workers = plan.world
    res = cfg.resources
    datasets = {f"train_{r}": steps_dataset(plan, r, pool.train, decoder, first_step, res.decoders_per_worker,
                                            res.cpus_per_decoder) for r in range(workers)}
    eval_chunks = math.ceil(pool.test.num_rows / cfg.eval_batch_size)
    for r in range(workers if eval_chunks else 0):
        datasets[f"eval_{r}"] = chunks_dataset(cfg.eval_batch_size, list(range(r, eval_chunks, workers)), pool.test,
                                               decoder, res.cpus_per_decoder)
    if cfg.comparison is not None:
        comp = _comparison_rows(ctx, cfg, pool)
        rows = min(comp.num_rows, 1024)
        datasets["comparison"] = chunks_dataset(rows, list(range(math.ceil(comp.num_rows / rows))), comp,
                                                replace(decoder, labels=cfg.task == "classify"), res.cpus_per_decoder)
    return datasets, eval_chunks


def run_train(cfg: TrainConfig, ctx: StageContext) -> Dict[str, Any]:
    import ray

    from pipelines.training.board import ProgressBoard
    from pipelines.training.data import Decoder, StepPlan

    began = time.time()
    sources = _weight_sources(cfg, ctx)
    pool = _read_inputs(cfg, ctx, sources)
    spec = replace(model_spec(cfg, len(pool.class_names)), cached=pool.cached)  # cached: takes the towers' features
    params = mimic_params(cfg)
    reinit = tuple(match_names([n for n, _ in meta_model(spec).named_parameters()], cfg.reinit))  # globs to names
    init, reference = _resolve_weights(cfg, spec, params, reinit, sources)
    workers = cfg.resources.num_workers
    total = cfg.steps if cfg.steps is not None else (cfg.epochs or 1) * (pool.train.num_rows // cfg.batch_size)
    plan = StepPlan(pool.train.num_rows, cfg.batch_size, workers, cfg.seed, total)
    text = dict(tokens=spec.context_length, arch=spec.tokenizer) if cfg.task == "clip" else {}
    if pool.cached:
        text = dict(features=spec.feature_dims)
    decoder = Decoder(spec.image_size, labels=bool(pool.class_names), storage_options=ctx.storage_options, **text)
    attempt = ctx.out.join("").rstrip("/")
    first_step = _FirstStep(ctx.out.fs.unstrip_protocol(ctx.out.join(fm.CHECKPOINTS_DIR)), dict(ctx.storage_options))
    datasets, eval_chunks = _datasets(cfg, ctx, pool, plan, decoder, first_step)
    board_name = progress_board_name(ctx.out.path)
    board = ray.remote(ProgressBoard).options(name=board_name, num_cpus=0, get_if_exists=True).remote()
    job = Job(
        cfg=cfg, label=ctx.label, model=spec, plan=plan,
        scores_url=ctx.out.fs.unstrip_protocol(posixpath.join(attempt, SCORES)),
        storage_options=dict(ctx.storage_options),
        init=ray.put(init) if init is not None else None, reinit=reinit,
        reference=ray.put(reference) if reference is not None else None, params=tuple(params),
        precision=cfg.precision if cfg.precision != "auto" else ("bf16" if cfg.resources.use_gpu else "fp32"),
        eval_chunks=eval_chunks,
        zero_shot=(tuple(pool.class_names), pool.templates) if cfg.task == "clip" and pool.class_names else None,
        threads=max(1, int(cfg.resources.cpus_per_worker)), progress=board_name, datasets=datasets,
    )
    resumed = first_step()
    if resumed:
        ctx.note(f"resuming from the checkpoint at step {resumed}/{total}")
    fit_at = time.time()
    try:
        seen, group = _fit(job, cfg, board, ctx)
        fitted = time.time()
    finally:
        ray.kill(board)
    if seen["stopped"]:  # the workers gave up together (non-finite steps): not a failure a restart would fix
        from pipelines.run.errors import RunFailed

        raise RunFailed(seen["stopped"])  # the runner adds the file and the stage
    out = _finish(cfg, ctx, spec, plan, pool, resumed)
    # the last worker group's spread over Ray nodes (1 on one machine; a multi-node cluster shows its placement)
    out.restarts, out.worker_nodes = max(seen["starts"] - 1, 0), len(set(seen["nodes"].values()))
    out.worker_group = group
    out.phases = {k: round(v - began, 3) for k, v in
                  sorted({**seen["marks"], "fit": fit_at, "fitted": fitted, "finished": time.time()}.items(),
                         key=lambda kv: kv[1])}
    return out.to_json()


def progress_board_name(stage_path: str) -> str:
    """The named actor a running train stage reports progress (and worker pids) to."""
    return f"gradmimic-progress:{stage_path}"


class _FirstStep:
    """Picklable: the step of the stage's registered checkpoint, read when a worker (re)starts the stage."""

    def __init__(self, url: str, storage_options) -> None:
        self.url, self.storage_options = url, storage_options

    def __call__(self) -> int:
        from pipelines.run.storage import open_storage

        return fm.registered_step(*open_storage(self.url, self.storage_options))


def _ray_storage(fs, path: str):
    """Ray Train's ``(storage_path, storage_filesystem)`` for ``path`` on ``fs``."""
    if is_local(fs):
        return path.rstrip("/"), None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return path.rstrip("/"), PyFileSystem(FSSpecHandler(fs))


def _comparison_rows(ctx: StageContext, cfg: TrainConfig, pool: _Pool):
    """The comparison set: a seeded sample of its split's rows, drawn from the counts, as a RowIndex."""
    from pipelines.training.index import build_index

    comp_stage = ctx.inputs[cfg.comparison.data]
    labelled = bool(DatasetManifest.read(comp_stage).class_names)
    if cfg.task == "classify" and not labelled:
        raise SpecError(f"comparison.data: stage {cfg.comparison.data!r} has no labels")
    same = cfg.comparison.data == cfg.data and pool.index is not None  # the data stage's index serves it too
    index = pool.index if same else build_index(ctx, comp_stage, labels=labelled, text=cfg.task == "clip")
    rows = index.split(cfg.comparison.split)
    if rows.num_rows == 0:
        raise SpecError(f"comparison.split: stage {cfg.comparison.data!r} has no {cfg.comparison.split!r} rows")
    return rows.sample(cfg.comparison.samples, cfg.comparison.seed)


def _fit(job, cfg: TrainConfig, board, ctx: StageContext) -> Tuple[Dict[str, Any], str]:
    """Run the job on a worker group of its key (an idle one, or a new one); returns the board's record of it and
    the group's name."""
    import ray

    from pipelines.training import groups

    def trainer(slot, name: str):
        import tempfile

        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        from pipelines.training.loop import group_worker

        # Ray Train's run state (a storage marker, nothing a stage needs): where every node can reach it, the temp
        # folder when the storage is local (one node: the runner refuses local storage on a cluster)
        fs = ctx.out.fs
        groups_dir = posixpath.join(tempfile.gettempdir() if is_local(fs) else posixpath.dirname(ctx.out.path),
                                    fm.GROUPS_DIR)
        storage_path, storage_fs = _ray_storage(fs, groups_dir)

        def ended() -> None:
            with contextlib.suppress(OSError):
                fs.rm(posixpath.join(groups_dir, name), recursive=True)

        return TorchTrainer(
            group_worker, train_loop_config={"slot": slot},
            scaling_config=ScalingConfig(num_workers=cfg.resources.num_workers, use_gpu=cfg.resources.use_gpu,
                                         resources_per_worker={"CPU": cfg.resources.cpus_per_worker}),
            run_config=RunConfig(name=name, storage_path=storage_path, storage_filesystem=storage_fs,
                                 failure_config=FailureConfig(max_failures=cfg.max_failures))), ended

    group = groups.take(groups.group_key(cfg), trainer, ctx.name)
    seen: Dict[str, Any] = {}
    try:
        with ctx.watch_steps(lambda: ray.get(board.get.remote(), timeout=5)["state"]):
            group.run(job)
        seen = ray.get(board.get.remote())
    finally:  # a group that restarted (or failed) is not reused: every stage gets the restarts it asks for
        groups.give_back(group, reusable=seen.get("starts") == 1)
    return seen, group.name


def _finish(cfg, ctx: StageContext, spec: ModelSpec, plan, pool: _Pool, resumed: int):
    from pipelines.formats.score_log import list_parts

    root = ctx.out.join(fm.CHECKPOINTS_DIR)
    latest = fm.latest_checkpoint(ctx.out.fs, root)
    if latest is None:
        raise RuntimeError(f"{ctx.label}: training registered no checkpoint")
    state = latest["state"]
    if state["step"] != plan.total_steps:
        raise RuntimeError(f"{ctx.label}: training stopped at step {state['step']} of {plan.total_steps}")
    ctx.out.fs.copy(posixpath.join(root, latest["name"], fm.WEIGHTS), ctx.out.join(fm.WEIGHTS))
    # the per-checkpoint metrics segments and the score log's: one listing of each flat folder, here only
    parts = list_parts(ctx.out.fs, ctx.out.join(fm.METRICS_DIR))
    steps, last_eval = fm.concat_metrics(ctx.out.fs, parts, ctx.out.join(fm.METRICS))
    if steps != state["step"]:
        raise RuntimeError(f"{ctx.label}: the metrics segments hold {steps} steps of {state['step']}")
    ctx.out.write_bytes(fm.MODEL_JSON, model_json(spec, {"class_names": pool.class_names}))
    scores = [posixpath.relpath(p, ctx.out.join("")) for p in list_parts(ctx.out.fs, ctx.out.join(SCORES))]
    skips = list_parts(ctx.out.fs, ctx.out.join(fs_skipped.DIR))
    skipped = fs_skipped.total_counts(ctx.out.fs, skips)  # from the footers
    final = {k: last_eval[k] for k in ("test_loss", "test_accuracy") if last_eval.get(k) is not None}
    seen = state["samples_seen"]
    return ModelManifest(
        rows_in=seen + sum(skipped.values()), rows_out=seen, rejected=sum(skipped.values()), skipped=skipped,
        files=[fm.WEIGHTS, fm.MODEL_JSON, fm.METRICS, *scores,
               *(posixpath.relpath(p, ctx.out.join("")) for p in skips)],
        steps=state["step"], samples_seen=seen, score_rows=seen,
        samples_per_s=round(seen / max(state["train_seconds"], 1e-9), 1),
        train_rows=pool.train.num_rows, test_rows=pool.test.num_rows, workers=plan.world,
        resumed_from_step=resumed, final=final, mode=cfg.mode, task=cfg.task,
        nonfinite_steps=int(state.get("nonfinite_steps", 0)), class_names=pool.class_names,
    )
