"""A worker's checkpoints: everything a restarted worker group needs to continue from the last one.

Rank 0 writes the checkpoint (the ranks hold the same model, optimiser and direction) into the stage's
``checkpoints/`` folder; every rank flushes its score rows and skipped samples first (rank 0 also the segment's
metrics rows: :func:`pipelines.formats.model.write_metrics_part`), and rank 0 registers the checkpoint
(:func:`pipelines.formats.model.register_checkpoint`) only once every rank has passed the barrier after that, so
the score log, the metrics and the checkpoint become durable together.  The registration holds counters only: a
checkpoint's cost does not grow with the run.  Ray Train restarts the worker group; where it resumes is ours, read
from the stage's attempt, so a rerun after the driver died resumes the same way.
"""

from __future__ import annotations

import io
import posixpath
from typing import TYPE_CHECKING, Any, Dict, Optional

import torch

from pipelines.formats.model import (
    CHECKPOINT_TRAINER,
    WEIGHTS,
    checkpoint_name,
    checkpoints_root,
    latest_checkpoint,
    metrics_root,
    register_checkpoint,
    write_metrics_part,
)
from pipelines.formats.score_log import ScoreLogWriter
from pipelines.formats.skipped import SkippedWriter
from pipelines.models.build import load_weights
from pipelines.run.storage import write_file

if TYPE_CHECKING:
    from pipelines.training.step import Worker


def state_dict_cpu(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def counters(worker: Worker) -> Dict[str, Any]:
    """What the registration holds (and the driver reads back): the step and the counters."""
    return {"step": worker.step, "samples_seen": worker.samples, "nonfinite_steps": worker.nonfinite,
            "train_seconds": worker.train_seconds, "world_size": worker.comm.world}


def save(worker: Worker, fs, directory: str) -> None:
    """The model's weights, and the optimiser, scheduler, RNG and comparison direction, into ``directory``."""
    from safetensors.torch import save as safetensors_bytes

    write_file(fs, posixpath.join(directory, WEIGHTS), safetensors_bytes(state_dict_cpu(worker.model)))
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    direction = None if worker.direction is None else {n: t.cpu() for n, t in worker.direction.items()}
    buf = io.BytesIO()
    torch.save({"optimizer": worker.opt.state_dict(), "scheduler": worker.sched.state_dict(), "rng": rng,
                "direction": direction, "direction_step": worker.direction_step}, buf)
    write_file(fs, posixpath.join(directory, CHECKPOINT_TRAINER), buf.getvalue())


def restore_latest(worker: Worker, fs, scores_root: str) -> Optional[int]:
    """The worker as the registered checkpoint of its stage left it (the step), or ``None``: none registered."""
    root = checkpoints_root(scores_root)
    latest = latest_checkpoint(fs, root)
    if latest is None:
        return None
    restore(worker, fs, posixpath.join(root, latest["name"]), latest["state"])
    return worker.step


def restore(worker: Worker, fs, directory: str, state: Dict[str, Any]) -> None:
    """The worker as :func:`save` left it, with the registered ``state``'s counters."""
    from gradmimic import load_state_dict

    def read(name: str):
        path = posixpath.join(directory, name)
        return fs.cat_file(path), fs.unstrip_protocol(path)

    data, url = read(WEIGHTS)
    load_weights(worker.model, load_state_dict(data, name=url))
    data, url = read(CHECKPOINT_TRAINER)
    saved = load_state_dict(data, flat=False, name=url)
    worker.opt.load_state_dict(saved["optimizer"])
    worker.sched.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["rng"]["cpu"])
    if "cuda" in saved["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(saved["rng"]["cuda"])
    if saved.get("direction") is not None:
        worker.set_direction({n: t.to(worker.device) for n, t in saved["direction"].items()}, saved["direction_step"])
    worker.step, worker.samples = state["step"], state["samples_seen"]
    worker.nonfinite = state.get("nonfinite_steps", 0)
    worker.train_seconds, worker.history = state["train_seconds"], []  # the metrics rows are in their segments


def checkpoint(worker: Worker, writer: ScoreLogWriter, skipped: Optional[SkippedWriter] = None) -> None:
    """Flush this rank's score rows and skipped samples (rank 0: and the segment's metrics rows, and the
    checkpoint), then, once every rank has, register the checkpoint (rank 0): durable together."""
    first = writer.first
    writer.flush(worker.step)
    if skipped is not None:
        skipped.flush(worker.step)
    root = checkpoints_root(writer.root)
    if worker.comm.rank == 0:
        write_metrics_part(writer.fs, metrics_root(writer.root), first, worker.step, worker.history)
        worker.history = []
        save(worker, writer.fs, posixpath.join(root, checkpoint_name(worker.step)))
    worker.comm.barrier()  # every rank's rows are written
    if worker.comm.rank == 0:
        register_checkpoint(writer.fs, root, counters(worker))
