"""A worker's checkpoints: everything a restarted worker group needs to continue from the last one.

Rank 0 writes the checkpoint (the ranks hold the same model, optimiser and direction); every rank flushes its score
rows and skipped samples first (rank 0 also the segment's metrics rows: :func:`pipelines.formats.model.write_metrics_part`), and Ray
Train registers the checkpoint only once every rank has reported it, so the score log, the metrics and the
checkpoint become durable together.  ``state.json`` holds counters only: a checkpoint's cost does not grow with
the run.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import TYPE_CHECKING, Any, Dict, Optional

import torch

from pipelines.formats.model import CHECKPOINT_STATE, CHECKPOINT_TRAINER, WEIGHTS, metrics_root, write_metrics_part
from pipelines.formats.score_log import ScoreLogWriter
from pipelines.formats.skipped import SkippedWriter
from pipelines.models.build import load_weights

if TYPE_CHECKING:
    from pipelines.training.step import Worker


def state_dict_cpu(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def save(worker: Worker, directory: str) -> None:
    """The model's weights, the optimiser, scheduler, RNG and comparison direction, and the step and counters
    (``state.json``, which the driver reads back) into ``directory``."""
    from safetensors.torch import save_file

    save_file(state_dict_cpu(worker.model), os.path.join(directory, WEIGHTS))
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    direction = None if worker.direction is None else {n: t.cpu() for n, t in worker.direction.items()}
    torch.save({"optimizer": worker.opt.state_dict(), "scheduler": worker.sched.state_dict(), "rng": rng,
                "direction": direction, "direction_step": worker.direction_step},
               os.path.join(directory, CHECKPOINT_TRAINER))
    with open(os.path.join(directory, CHECKPOINT_STATE), "w") as f:
        json.dump({"step": worker.step, "samples_seen": worker.samples, "nonfinite_steps": worker.nonfinite,
                   "train_seconds": worker.train_seconds,
                   "world_size": worker.comm.world}, f)


def restore(worker: Worker, directory: str) -> None:
    """The worker as :func:`save` left it."""
    from gradmimic import load_state_dict

    load_weights(worker.model, load_state_dict(os.path.join(directory, WEIGHTS)))
    saved = load_state_dict(os.path.join(directory, CHECKPOINT_TRAINER), flat=False)
    worker.opt.load_state_dict(saved["optimizer"])
    worker.sched.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["rng"]["cpu"])
    if "cuda" in saved["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(saved["rng"]["cuda"])
    if saved.get("direction") is not None:
        worker.set_direction({n: t.to(worker.device) for n, t in saved["direction"].items()}, saved["direction_step"])
    with open(os.path.join(directory, CHECKPOINT_STATE)) as f:
        state = json.load(f)
    worker.step, worker.samples = state["step"], state["samples_seen"]
    worker.nonfinite = state.get("nonfinite_steps", 0)
    worker.train_seconds, worker.history = state["train_seconds"], []  # the metrics rows are in their segments


def checkpoint_and_report(worker: Worker, writer: ScoreLogWriter, metrics: Dict[str, Any],
                          skipped: Optional[SkippedWriter] = None) -> None:
    """Flush this rank's score rows and skipped samples (rank 0: and the segment's metrics rows), then report the
    checkpoint (rank 0 writes it): durable together."""
    import ray.train
    from ray.train import Checkpoint

    first = writer.first
    writer.flush(worker.step)
    if skipped is not None:
        skipped.flush(worker.step)
    name = f"checkpoint_{worker.step:09d}"
    if worker.comm.rank != 0:
        ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=name)
        return
    write_metrics_part(writer.fs, metrics_root(writer.root), first, worker.step, worker.history)
    worker.history = []
    with tempfile.TemporaryDirectory() as d:
        save(worker, d)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d), checkpoint_dir_name=name)
