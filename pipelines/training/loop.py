"""The loop every training worker runs: one process's data-parallel share of each global batch.

It is the ordinary PyTorch loop (forward, per-sample losses, one backward, AdamW step) with four additions, each a
few lines: Ray Train's ``get_dataset_shard`` / ``get_checkpoint`` / ``report``; the collectives of
:class:`~pipelines.training.dist.Comm` (DDP, the global-batch gathers), which are identities for one worker;
:class:`gradmimic.GradMimic` for every mode but ``plain``; and the score log.

Per step ``s``: the rank's rows of the global batch arrive decoded from its Ray Data stream; for CLIP the embeddings
of every rank are gathered with gradient so each rank's per-sample InfoNCE is over the global batch; scores and
weights are computed (softmax over the global batch) and the one backward leaves the reweighted gradient, which
DDP averages into the single-process update; each sample's ``(score, weight, loss)`` joins the rank's score-log
buffer.  Every ``eval_every`` steps every rank evaluates its share of the held-out chunks; every
``checkpoint_every`` steps (and at the end) the score-log buffers are flushed and a checkpoint (model, optimiser,
scheduler, step, RNG, metrics so far) is reported: both become durable together.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Literal, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from gradmimic import (
    ClipSites,
    GradMimic,
    Weighting,
    capture_linear_sites,
    clip_per_sample_loss,
)

from .. import faults
from ..config import SpecError, doc, require
from ..models import ModelSpec, apply_trainable, load_weights, train_mode
from ..score_log import ScoreLogWriter, discard_after
from ..storage import open_storage
from .data import StepPlan, grouped
from .dist import Comm, maybe_ddp

NO_DECAY = ("bias", "logit_scale", "ln", "bn", "norm")  # gains, biases and the temperature: no weight decay


@dataclass(frozen=True)
class OptimizerConfig:
    lr: float = doc("peak learning rate (AdamW)", default=5e-4)
    weight_decay: float = doc("AdamW weight decay (not on gains, biases, logit_scale)", default=0.1)
    betas: Tuple[float, float] = doc("AdamW betas", default=(0.9, 0.98))
    eps: float = doc("AdamW epsilon", default=1e-6)
    warmup_steps: int = doc("linear learning-rate warm-up steps", default=0)
    schedule: Literal["cosine", "constant"] = doc("after warm-up", default="cosine")
    grad_clip: Optional[float] = doc("clip the gradient norm to this (null: off)", default=1.0)

    def validate(self) -> None:
        require(self, "lr eps", 0, strict=True)
        require(self, "weight_decay warmup_steps", 0)
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise SpecError(f"betas: expected two numbers in [0, 1), got {list(self.betas)}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise SpecError(f"grad_clip: must be > 0 (or null to turn it off), got {self.grad_clip}")


@dataclass(frozen=True)
class Job:
    """Everything a worker needs, as plain data and object refs (built by the train stage on the driver)."""

    label: str
    task: str  # clip | classify
    mode: str  # plain | mimic | grand | rho | agra | influence
    model: ModelSpec
    plan: StepPlan
    scores_url: str
    storage_options: Dict[str, Any] = field(default_factory=dict)
    init: Any = None  # object ref of a state dict
    reinit: Tuple[str, ...] = ()
    trainable: Optional[Tuple[str, ...]] = None
    freeze: Tuple[str, ...] = ()
    reference: Any = None  # object ref: the mimic parameters' reference tensors, or the whole reference model (rho)
    params: Tuple[str, ...] = ()
    method: str = "normed_proj"
    temperature: float = 1.0
    reweight: str = "param"
    mimic_warmup: int = 0
    comparison_every: int = 0  # agra / influence: recompute the direction every this many steps
    optim: OptimizerConfig = OptimizerConfig()
    precision: str = "fp32"
    eval_every: int = 0
    eval_chunks: int = 0
    zero_shot: Optional[Tuple[Tuple[str, ...], Tuple[str, ...]]] = None  # (class names, templates)
    checkpoint_every: int = 100
    num_buckets: int = 64
    seed: int = 0
    threads: int = 0
    progress: Optional[str] = None  # name of the ProgressBoard actor
    max_nonfinite: int = 5  # non-finite steps in a row before the workers stop


# ------------------------------------------------------------------------------------------------ optimiser


def make_optimizer(model: torch.nn.Module, optim: OptimizerConfig, total_steps: int):
    """AdamW without weight decay on gains, biases and ``logit_scale``; linear warm-up then cosine (or constant)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or any(k in name for k in NO_DECAY) else decay).append(p)
    groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    try:  # the fused kernel: on CPU too, several times faster than the per-tensor loop for many small tensors
        opt = torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps, fused=True)
    except (RuntimeError, TypeError, ValueError):
        opt = torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps, foreach=True)

    def factor(step: int) -> float:  # LambdaLR calls it with the number of steps taken
        if step < optim.warmup_steps:
            return (step + 1) / optim.warmup_steps
        if optim.schedule == "constant":
            return 1.0
        progress = (step - optim.warmup_steps) / max(1, total_steps - optim.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def prepare_model(job: Job, device: torch.device) -> torch.nn.Module:
    """Build, load the initial weights, re-initialise the chosen parameters, freeze, move to the device."""
    import ray

    model = job.model.build(seed=job.seed)
    if job.init is not None:
        load_weights(model, ray.get(job.init))
    if job.reinit:
        fresh = dict(job.model.build(seed=job.seed + 7919).named_parameters())
        load_weights(model, {n: fresh[n].detach() for n in job.reinit})
    apply_trainable(model, job.trainable, job.freeze)
    return train_mode(model.to(device))


# ------------------------------------------------------------------------------------------------ batches


def to_images(batch: Dict[str, np.ndarray], spec: ModelSpec, device: torch.device) -> torch.Tensor:
    """``uint8`` images to normalised floats on the device (normalising here keeps transfers 4x smaller)."""
    mean, std = spec.normalisation
    x = torch.from_numpy(batch["image"]).to(device, non_blocking=True).float().div_(255)
    m = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=device).view(1, 3, 1, 1)
    return (x - m) / s


def step_batches(stream: Iterator[Dict[str, np.ndarray]], first: int) -> Iterator[Tuple[int, Dict[str, np.ndarray]]]:
    """``(step, batch)`` from a rank's stream from step ``first`` on; earlier steps (a stream started too early)
    are skipped, a gap is an error."""
    expect = first
    for batch in grouped(stream, "step"):
        step = int(batch["step"][0])
        if step < expect:
            continue
        if step != expect:
            raise RuntimeError(f"data stream jumped from step {expect} to {step}")
        yield step, batch
        expect += 1


class Replayable:
    """A dataset shard read many times (evaluation): decoded once and kept if it fits ``budget`` bytes, else
    streamed through Ray Data again on every pass."""

    def __init__(self, shard, budget: int = 2 << 30) -> None:
        self.shard, self.budget = shard, budget
        self.kept: Optional[List[Dict[str, np.ndarray]]] = None

    def batches(self) -> Iterator[Dict[str, np.ndarray]]:
        if self.kept is not None:
            yield from self.kept
            return
        kept: Optional[List[Dict[str, np.ndarray]]] = []
        size = 0
        for batch in self.shard.iter_batches(batch_size=None, batch_format="numpy"):
            if kept is not None:
                size += sum(v.nbytes for v in batch.values())
                if size <= self.budget:
                    kept.append(batch)
                else:
                    kept = None
            yield batch
        self.kept = kept


class ProgressBoard:
    """A tiny actor the driver polls for the progress line, the workers' nodes (for the manifest) and their pids
    (for the fault tests)."""

    def __init__(self) -> None:
        self.state: Dict[str, Any] = {}
        self.pids: Dict[int, int] = {}
        self.nodes: Dict[int, str] = {}
        self.starts = 0  # worker-group starts: 1 + the restarts after failures
        self.stopped = ""  # why the workers stopped early, together (non-finite steps)

    def update(self, state: Dict[str, Any]) -> None:
        self.state = state

    def register(self, rank: int, pid: int, node: str = "") -> None:
        self.pids[rank] = pid
        self.nodes[rank] = node
        self.starts += rank == 0

    def stop(self, reason: str) -> None:
        self.stopped = reason

    def get(self) -> Dict[str, Any]:
        return {"state": self.state, "pids": dict(self.pids), "nodes": dict(self.nodes), "starts": self.starts,
                "stopped": self.stopped}


# ------------------------------------------------------------------------------------------------ the worker


class Worker:
    def __init__(self, job: Job, comm: Comm, device: torch.device) -> None:
        self.job, self.comm, self.device = job, comm, device
        self.model = prepare_model(job, device)
        self.clip = job.task == "clip"
        module = ClipSites(self.model) if self.clip else self.model
        self.net = maybe_ddp(module, comm, device)
        self.opt, self.sched = make_optimizer(self.model, job.optim, job.plan.total_steps)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]  # fixed once the model is prepared
        self.mimic = self.warm = None
        self.ref_model = None
        if job.mode != "plain":
            self.mimic, self.warm = self._weightings()
        self.step = 0
        self.samples = 0
        self.nonfinite = 0  # steps skipped for a non-finite value (checkpointed)
        self.train_seconds = 0.0
        self.history: List[Dict[str, Any]] = []
        self.comparison: List[Dict[str, np.ndarray]] = []
        self.direction: Optional[Dict[str, torch.Tensor]] = None  # agra / influence: the comparison direction
        self.direction_step: Optional[int] = None  # and the step it was computed at (both are checkpointed)

    def _weightings(self) -> Tuple[GradMimic, GradMimic]:
        import ray

        job = self.job
        rule = job.mode
        reference = None
        if job.reference is not None:
            tensors = ray.get(job.reference)
            if job.mode == "rho":
                self.ref_model = job.model.build(seed=job.seed)
                load_weights(self.ref_model, tensors)
                self.ref_model.to(self.device).eval().requires_grad_(False)
            if job.mode == "mimic":
                reference = {n: tensors[n] for n in job.params}
        weighting = Weighting(rule, job.method, job.temperature)
        # warm-up: the same scores (raw methods observe only) with the plain mean's weights
        warm_rule = rule if rule in ("mimic", "influence") else "uniform"
        warm = Weighting(warm_rule, job.method.replace("normed_", ""), job.temperature)
        make = lambda w: GradMimic(self.model, list(job.params), reference=reference, weighting=w,  # noqa: E731
                                   reweight=job.reweight)
        return make(weighting), make(warm)

    @contextlib.contextmanager
    def autocast(self):
        if self.job.precision == "bf16":
            with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16):
                yield
        else:
            yield

    # -------------------------------------------------------------------------------------------- one step

    def forward(self, batch: Dict[str, np.ndarray], net=None, gather: bool = True):
        """``(loss_B, sites, sqnorms_fn, sizes)``: this rank's per-sample losses over the (global) batch."""
        net = net or self.net
        images = to_images(batch, self.job.model, self.device)
        sizes = self.job.plan.local_sizes if gather else [len(images)]  # every rank's share: known, not exchanged
        if len(images) != sizes[self.comm.rank if gather else 0]:
            raise RuntimeError(f"rank {self.comm.rank} got {len(images)} samples, its share is {sizes[self.comm.rank]}")
        with self.autocast():
            if self.clip:
                tokens = torch.from_numpy(batch["tokens"]).to(self.device)
                cb = net(images, tokens)
                if gather and self.comm.distributed:
                    cb = cb.gathered(lambda t: self.comm.gather_rows(t, sizes), self.comm.offset(sizes))
                return cb.loss(), cb.sites, cb.sqnorms_fn(self.job.params), sizes
            labels = torch.from_numpy(batch["label"]).to(self.device)
            with capture_linear_sites(self.model, self.job.params) as sites:
                logits = net(images)
            return F.cross_entropy(logits.float(), labels, reduction="none"), dict(sites), None, sizes

    def reference_losses(self, batch: Dict[str, np.ndarray], sizes: List[int]) -> torch.Tensor:
        """The rho rule's reference losses for this rank's samples (over the global batch for CLIP)."""
        images = to_images(batch, self.job.model, self.device)
        with torch.no_grad(), self.autocast():
            if not self.clip:
                labels = torch.from_numpy(batch["label"]).to(self.device)
                return F.cross_entropy(self.ref_model(images).float(), labels, reduction="none")
            tokens = torch.from_numpy(batch["tokens"]).to(self.device)
            img = self.comm.gather_rows(self.ref_model.encode_image(images), sizes)
            txt = self.comm.gather_rows(self.ref_model.encode_text(tokens), sizes)
            rows = slice(self.comm.offset(sizes), self.comm.offset(sizes) + len(images))
            return clip_per_sample_loss(img.float(), txt.float(), self.ref_model.logit_scale.exp(), rows)

    def comparison_direction(self) -> Dict[str, torch.Tensor]:
        """Minus the mean gradient of the mimic parameters over the comparison set (the same on every rank)."""
        module = ClipSites(self.model) if self.clip else self.model
        total: Dict[str, torch.Tensor] = {}
        count = 0
        for batch in self.comparison:
            loss, sites, _, _ = self.forward(batch, net=module, gather=False)
            grads = torch.autograd.grad(loss.sum(), [sites[n].outputs for n in self.job.params])
            for name, g in zip(self.job.params, grads):
                pg = sites[name].param_grad(g).float()
                total[name] = total.get(name, 0) + pg
            count += len(loss)
        return {n: (-g / count).to(self.model.get_parameter(n).dtype) for n, g in total.items()}

    def set_direction(self, direction: Dict[str, torch.Tensor], step: int) -> None:
        self.direction, self.direction_step = direction, step
        self.mimic.set_direction(direction)
        self.warm.set_direction(direction)

    def train_step(self, batch: Dict[str, np.ndarray], step: int = 0) -> Dict[str, Any]:
        """One step; ``finite`` is False (on every rank alike) when it was skipped for a non-finite loss, score,
        weight or gradient on any rank: no update, and the caller logs no score rows for it."""
        job = self.job
        self.opt.zero_grad(set_to_none=True)
        loss_B, sites, sqnorms, sizes = self.forward(batch)
        if faults.hit(f"nonfinite:step{step}"):
            loss_B = loss_B * float("nan")
        global_b = sum(sizes)
        stats: Dict[str, Any] = {}
        if self.mimic is None:
            (self.comm.world * loss_B.sum() / global_b).backward()
            scores = torch.zeros_like(loss_B.detach())
            weights = torch.full_like(scores, 1.0 / global_b)
        else:
            mimic = self.warm if self.step < job.mimic_warmup else self.mimic
            due = self.direction_step is None or self.step - self.direction_step >= job.comparison_every
            if job.mode in ("agra", "influence") and due:
                self.set_direction(self.comparison_direction(), self.step)
            ref_loss = self.reference_losses(batch, sizes) if job.mode == "rho" else None
            dist = {}
            if self.comm.distributed:
                dist = dict(gather=functools.partial(self.comm.gather_1d, sizes=sizes), all_sum=self.comm.all_sum)
            out = mimic.step(loss_B, sites, coupled=self.clip, sqnorms_fn=sqnorms, ref_loss_B=ref_loss,
                             rank=self.comm.rank, sizes=sizes, **dist)
            scores, weights = out.scores, out.weights
            stats.update(direction_norm=out.direction_norm, alignment=out.alignment)
        # the gradient norm (clipping if asked): one reduction that is non-finite if any gradient entry is
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, job.optim.grad_clip or float("inf"))
        ok = torch.isfinite(grad_norm.to(self.device))
        for t in (loss_B.detach(), scores, weights):
            ok = ok & torch.isfinite(t).all()
        bad = self.comm.all_sum((~ok).to(torch.float64).reshape(1))  # one exchange: any rank's verdict is all's
        lr = self.opt.param_groups[0]["lr"]
        if float(bad[0]) > 0:
            self.opt.zero_grad(set_to_none=True)
            nan = float("nan")
            stats.update(loss=nan, weight_entropy=nan, lr=lr, batch_size=global_b)
            return {"stats": stats, "finite": False}
        self.opt.step()
        self.sched.step()
        w = weights.double()
        sums = self.comm.all_sum(torch.stack([loss_B.detach().double().sum(), -(w * w.clamp_min(1e-300).log()).sum()]))
        stats.update(loss=float(sums[0]) / global_b, weight_entropy=float(sums[1]), lr=lr, batch_size=global_b)
        return {"stats": stats, "scores": scores.float().cpu().numpy(), "weights": weights.float().cpu().numpy(),
                "losses": loss_B.detach().float().cpu().numpy(), "finite": True}

    # -------------------------------------------------------------------------------------------- evaluation

    def evaluate(self, chunks) -> Dict[str, float]:
        """Held-out loss (and accuracy where the pool has labels) over this rank's chunks, summed over ranks."""
        self.model.eval()
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss, correct, count
        labelled = False
        with torch.no_grad(), self.autocast():
            classes = self.class_embeddings() if self.clip and self.job.zero_shot else None
            for batch in grouped(chunks, "chunk"):
                images = to_images(batch, self.job.model, self.device)
                if self.clip:
                    img = self.model.encode_image(images).float()
                    txt = self.model.encode_text(torch.from_numpy(batch["tokens"]).to(self.device)).float()
                    loss = clip_per_sample_loss(img, txt, self.model.logit_scale.exp().float())
                    pred = (F.normalize(img, dim=-1) @ classes.T).argmax(1) if classes is not None else None
                else:
                    logits = self.model(images).float()
                    pred = logits.argmax(1)
                    loss = F.cross_entropy(logits, torch.from_numpy(batch["label"]).to(self.device), reduction="none")
                sums[0] += loss.double().sum()
                sums[2] += len(loss)
                if pred is not None and "label" in batch:
                    labelled = True
                    sums[1] += (pred.cpu() == torch.from_numpy(batch["label"])).sum()
        train_mode(self.model)
        sums = self.comm.all_sum(sums)
        out = {"test_loss": float(sums[0] / sums[2]) if sums[2] else float("nan")}
        if labelled:
            out["test_accuracy"] = float(sums[1] / sums[2]) if sums[2] else float("nan")
        return out

    def class_embeddings(self) -> torch.Tensor:
        """Zero-shot classifier: each class's mean normalised text embedding over the prompt templates."""
        from ..evaluation import zero_shot_classifier
        from .data import tokenize

        names, templates = self.job.zero_shot
        spec = self.job.model
        return zero_shot_classifier(self.model, lambda texts: tokenize(spec.arch, spec.context_length, texts),
                                    names, templates, self.device)

    # -------------------------------------------------------------------------------------------- checkpoints

    def state_dict_cpu(self) -> Dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous().clone() for k, v in self.model.state_dict().items()}

    def save(self, directory: str) -> None:
        from safetensors.torch import save_file

        save_file(self.state_dict_cpu(), os.path.join(directory, "model.safetensors"))
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        direction = None if self.direction is None else {n: t.cpu() for n, t in self.direction.items()}
        torch.save({"optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(), "rng": rng,
                    "direction": direction, "direction_step": self.direction_step},
                   os.path.join(directory, "trainer.pt"))
        with open(os.path.join(directory, "state.json"), "w") as f:
            json.dump({"step": self.step, "samples_seen": self.samples, "nonfinite_steps": self.nonfinite,
                       "train_seconds": self.train_seconds,
                       "world_size": self.comm.world, "metrics": self.history}, f)

    def restore(self, directory: str) -> None:
        from gradmimic import load_state_dict

        load_weights(self.model, load_state_dict(os.path.join(directory, "model.safetensors")))
        saved = load_state_dict(os.path.join(directory, "trainer.pt"), flat=False)
        self.opt.load_state_dict(saved["optimizer"])
        self.sched.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["rng"]["cpu"])
        if "cuda" in saved["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state(saved["rng"]["cuda"])
        if saved.get("direction") is not None:
            self.set_direction({n: t.to(self.device) for n, t in saved["direction"].items()}, saved["direction_step"])
        with open(os.path.join(directory, "state.json")) as f:
            state = json.load(f)
        self.step, self.samples = state["step"], state["samples_seen"]
        self.nonfinite = state.get("nonfinite_steps", 0)
        self.train_seconds, self.history = state["train_seconds"], state["metrics"]


def checkpoint_and_report(worker: Worker, writer: ScoreLogWriter, metrics: Dict[str, Any]) -> None:
    """Flush this rank's score rows, then report the checkpoint (rank 0 writes it): durable together."""
    import ray.train
    from ray.train import Checkpoint

    writer.flush(worker.step)
    name = f"checkpoint_{worker.step:09d}"
    if worker.comm.rank != 0:
        ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=name)
        return
    with tempfile.TemporaryDirectory() as d:
        worker.save(d)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d), checkpoint_dir_name=name)


def train_worker(config: Dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker``."""
    import ray
    import ray.train
    import ray.train.torch

    job: Job = config["job"]
    comm = Comm.current()
    if job.threads:
        torch.set_num_threads(job.threads)
    device = ray.train.torch.get_device()
    torch.manual_seed(job.seed)
    board = ray.get_actor(job.progress) if job.progress else None
    if board is not None:
        board.register.remote(comm.rank, os.getpid(), ray.get_runtime_context().get_node_id())
    worker = Worker(job, comm, device)
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            worker.restore(d)
    fs, scores_root = open_storage(job.scores_url, job.storage_options)
    if comm.rank == 0:
        discard_after(fs, scores_root, worker.step)  # rows of a checkpoint that never registered
    comm.barrier()
    writer = ScoreLogWriter(fs, scores_root, comm.rank, job.num_buckets, first_step=worker.step + 1)
    if job.mode in ("agra", "influence"):
        shard = ray.train.get_dataset_shard("comparison")
        worker.comparison = list(grouped(shard.iter_batches(batch_size=None, batch_format="numpy"), "chunk"))
    evaluator = Replayable(ray.train.get_dataset_shard(f"eval_{comm.rank}")) if job.eval_chunks else None
    stream = ray.train.get_dataset_shard(f"train_{comm.rank}").iter_batches(
        batch_size=job.plan.local_sizes[comm.rank], batch_format="numpy", prefetch_batches=4)
    plan = job.plan
    t_prev, cpu_prev = time.perf_counter(), time.process_time()
    last_report = 0.0
    batches = step_batches(stream, worker.step + 1) if worker.step < plan.total_steps else iter(())
    in_a_row = 0
    for step, batch in batches:
        out = worker.train_step(batch, step)
        worker.step = step
        stats = out["stats"]
        if not out["finite"]:  # skipped on every rank alike: nothing trained, nothing logged
            worker.nonfinite += 1
            in_a_row += 1
            if in_a_row >= job.max_nonfinite:
                if board is not None and comm.rank == 0:
                    ray.get(board.stop.remote(
                        f"{in_a_row} training steps in a row had a non-finite loss, score, weight or gradient "
                        f"(steps {step - in_a_row + 1}-{step}); each was skipped; lower the learning rate or check "
                        f"the data and the reference (max_nonfinite_steps: {job.max_nonfinite})"))
                return
        else:
            in_a_row = 0
            worker.samples += stats["batch_size"]
            writer.add(step, plan.epoch(step), batch["uid_hi"], batch["uid_lo"], out["scores"], out["weights"],
                       out["losses"], stats["batch_size"])
        stats["nonfinite_steps"] = worker.nonfinite
        now = time.perf_counter()
        seconds, t_prev = now - t_prev, now  # data wait + compute: what the stage delivers
        cpu = time.process_time() - cpu_prev  # this process's CPU (all threads): robust to a busy machine
        worker.train_seconds += seconds
        row = {"step": step, "epoch": plan.epoch(step), **stats, "step_seconds": seconds, "step_cpu_seconds": cpu,
               "samples_per_s": stats["batch_size"] / seconds}
        if evaluator is not None and ((job.eval_every and step % job.eval_every == 0) or step == plan.total_steps):
            row.update(worker.evaluate(evaluator.batches()))
        if comm.rank == 0:
            worker.history.append(row)
            if board is not None and (now - last_report > 0.25 or step == plan.total_steps):
                # fire and forget, a few times a second: the driver polls it for the progress line
                board.update.remote({**row, "total": plan.total_steps, "train_seconds": worker.train_seconds})
                last_report = now
        if step % job.checkpoint_every == 0 or step == plan.total_steps:
            checkpoint_and_report(worker, writer, {"step": step, "loss": stats["loss"]})
        t_prev, cpu_prev = time.perf_counter(), time.process_time()  # evaluation and checkpoints are not step time
    if worker.step != plan.total_steps:
        raise RuntimeError(f"rank {comm.rank}'s data ended at step {worker.step} of {plan.total_steps}")
