"""The loop every training worker runs: one process's data-parallel share of each global batch.

It is the ordinary PyTorch loop (forward, per-sample losses, one backward, AdamW step) with four additions, each a
few lines: the rank's Ray Data streams, built in the worker; the stage's checkpoints; the collectives of
:class:`~pipelines.training.dist.Comm` (DDP, the global-batch gathers), which are identities for one worker;
:class:`gradmimic.GradMimic` for every mode but ``plain``; and the score log.  A worker runs the stages of its group
(:mod:`pipelines.training.groups`) one after another, each as a :class:`~pipelines.training.config.Job`.

Per step ``s``: the rank's rows of the global batch arrive decoded from its Ray Data stream; the rows that did not
decode are dropped and recorded (:mod:`pipelines.formats.skipped`) and the ranks exchange their actual shares; for CLIP the embeddings
of every rank are gathered with gradient so each rank's per-sample InfoNCE is over the global batch; scores and
weights are computed (softmax over the global batch) and the one backward leaves the reweighted gradient, which
DDP averages into the single-process update; each sample's ``(score, weight, loss)`` joins the rank's score-log
buffer.  Every ``eval_every`` steps every rank evaluates its share of the held-out chunks; every
``checkpoint_every`` steps (and at the end) the score-log buffers are flushed and a checkpoint (model, optimiser,
scheduler, step, RNG, counters) is written and registered, rank 0 writing the segment's metrics rows beside the
score log: all become durable together.

The step is :class:`~pipelines.training.step.Worker`'s, the held-out loop
:func:`~pipelines.training.evaluation.heldout`, the checkpoints :mod:`pipelines.training.checkpoint`.
"""

from __future__ import annotations

import os
import time
from typing import Any, Dict, Optional, Tuple

import torch

from pipelines.formats.model import metrics_root
from pipelines.formats.score_log import ScoreLogWriter, discard_after
from pipelines.formats.skipped import SkippedWriter, skipped_root
from pipelines.run.storage import open_storage
from pipelines.training.batches import Ahead, Replayable, step_batches
from pipelines.training.board import marker
from pipelines.training.checkpoint import checkpoint, restore_latest
from pipelines.training.config import Job
from pipelines.training.data import grouped
from pipelines.training.dist import Comm
from pipelines.training.step import Worker

# ------------------------------------------------------------------------------------------------ the loop


def group_worker(config: Dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker`` for a worker group (:mod:`pipelines.training.groups`): the stages' jobs
    from the group's slot, one after another, until the driver stops the group."""
    import gc

    import ray

    slot, comm, done, first = config["slot"], Comm.current(), 0, True
    while True:
        taken = ray.get(slot.next.remote(done))
        if taken is None:
            return
        done, job = taken
        train_job(job, comm, first)
        if comm.rank == 0:
            ray.get(slot.finish.remote(done))
        first = False
        gc.collect()  # the stage's model, optimiser and streams, before the next one's


def train_job(job: Job, comm: Comm, first: bool = True) -> None:
    """One train stage's share of this rank, resumed from the stage's registered checkpoint, if any.  ``first``: the
    process's first job (its start is a phase of this stage)."""
    entered = time.time()
    evaluator, stream = rank_streams(job, comm)
    stream = Ahead(stream)  # the decoders start while the model builds
    worker, board = start_worker(job, comm)
    mark = marker(board if comm.rank == 0 else None)
    if first:
        mark("process", _process_started())
    mark("loop", entered)
    mark("model")
    if job.mode.comparison:
        worker.comparison = list(grouped(stage_dataset(job, "comparison").iter_batches(
            batch_size=None, batch_format="numpy"), "chunk"))
    writer, skips = score_writer(job, comm, worker)
    plan = job.plan
    t_prev, cpu_prev = time.perf_counter(), time.process_time()
    last_report = 0.0
    batches = step_batches(stream, worker.step + 1) if worker.step < plan.total_steps else iter(())
    in_a_row, first = 0, worker.step + 1
    for step, batch in batches:
        if step == first:
            mark("first_step")
        batch, bad, sizes = worker.share(batch)  # the rows that decoded; the skipped ones are recorded
        skips.add(step, plan.epoch(step), bad["uid_hi"], bad["uid_lo"], bad["reason"])
        out = worker.train_step(batch, step, sizes)
        worker.step = step
        stats = out["stats"]
        if not out["finite"]:  # skipped on every rank alike: nothing trained, nothing logged
            worker.nonfinite += 1
            in_a_row += 1
            if in_a_row >= job.cfg.max_nonfinite_steps:
                stop_nonfinite(job, comm, board, step, in_a_row)
                return
        else:
            in_a_row = 0
            worker.samples += stats["batch_size"]
            if len(batch["uid_lo"]):
                writer.add(step, plan.epoch(step), batch["uid_hi"], batch["uid_lo"], out["scores"], out["weights"],
                           out["losses"], stats["batch_size"])
        stats["nonfinite_steps"] = worker.nonfinite
        now = time.perf_counter()
        seconds, t_prev = now - t_prev, now  # data wait + compute: what the stage delivers
        cpu = time.process_time() - cpu_prev  # this process's CPU (all threads): robust to a busy machine
        worker.train_seconds += seconds
        if step == plan.total_steps:
            mark("last_step")
        row = {"step": step, "epoch": plan.epoch(step), **stats, "step_seconds": seconds, "step_cpu_seconds": cpu,
               "samples_per_s": stats["batch_size"] / seconds}
        if evaluator is not None and ((job.cfg.eval_every and step % job.cfg.eval_every == 0)
                                      or step == plan.total_steps):
            row.update(worker.evaluate(evaluator.batches()))
        if comm.rank == 0:
            worker.history.append(row)
            if board is not None and (now - last_report > 0.25 or step == plan.total_steps):
                # fire and forget, a few times a second: the driver polls it for the progress line
                board.update.remote({**row, "total": plan.total_steps, "train_seconds": worker.train_seconds})
                last_report = now
        if step % job.cfg.checkpoint_every == 0 or step == plan.total_steps:
            checkpoint(worker, writer, skips)
            if step == plan.total_steps:
                mark("reported", flush=True)
        t_prev, cpu_prev = time.perf_counter(), time.process_time()  # evaluation and checkpoints are not step time
    if worker.step != plan.total_steps:
        raise RuntimeError(f"rank {comm.rank}'s data ended at step {worker.step} of {plan.total_steps}")


def _process_started() -> float:
    import psutil

    return psutil.Process().create_time()


def start_worker(job: Job, comm: Comm) -> Tuple[Worker, Any]:
    """This rank's :class:`Worker` (restored from the stage's registered checkpoint, if any) and the progress board."""
    import ray
    import ray.train.torch

    if job.threads:
        torch.set_num_threads(job.threads)
    device = ray.train.torch.get_device()
    torch.manual_seed(job.cfg.seed)
    board = ray.get_actor(job.progress) if job.progress else None
    if board is not None:
        board.register.remote(comm.rank, os.getpid(), ray.get_runtime_context().get_node_id())
    worker = Worker(job, comm, device)
    restore_latest(worker, *open_storage(job.scores_url, job.storage_options))
    return worker, board


def score_writer(job: Job, comm: Comm, worker: Worker) -> Tuple[ScoreLogWriter, SkippedWriter]:
    """This rank's score-log writer and skipped-sample writer, after rank 0 discarded the score, skipped and
    metrics rows of a checkpoint that never registered."""
    fs, scores_root = open_storage(job.scores_url, job.storage_options)
    if comm.rank == 0:
        for root in (scores_root, skipped_root(scores_root), metrics_root(scores_root)):
            discard_after(fs, root, worker.step)
    comm.barrier()
    return (ScoreLogWriter(fs, scores_root, comm.rank, job.cfg.num_buckets, first_step=worker.step + 1),
            SkippedWriter(fs, skipped_root(scores_root), comm.rank, first_step=worker.step + 1))


def stage_dataset(job: Job, name: str):
    """One of the stage's Ray Data streams (:attr:`Job.datasets`), built here (the factory reads where the stage
    resumes), its rows in order."""
    ds = job.datasets[name]()
    ds.context.execution_options.preserve_order = True
    return ds


def rank_streams(job: Job, comm: Comm) -> Tuple[Optional[Replayable], Any]:
    """``(held-out chunks or None, training batches)`` of this rank."""
    evaluator = Replayable(stage_dataset(job, f"eval_{comm.rank}")) if job.eval_chunks else None
    stream = stage_dataset(job, f"train_{comm.rank}").iter_batches(
        batch_size=job.plan.local_sizes[comm.rank], batch_format="numpy", prefetch_batches=4)
    return evaluator, stream


def stop_nonfinite(job: Job, comm: Comm, board, step: int, in_a_row: int) -> None:
    """Tell the driver (rank 0, through the board) why every worker stops: too many non-finite steps in a row."""
    import ray

    if board is not None and comm.rank == 0:
        ray.get(board.stop.remote(
            f"{in_a_row} training steps in a row had a non-finite loss, score, weight or gradient "
            f"(steps {step - in_a_row + 1}-{step}); each was skipped; lower the learning rate or check "
            f"the data and the reference (max_nonfinite_steps: {job.cfg.max_nonfinite_steps})"))
