"""``gradmimic bench train``: what the train stage delivers next to a bare PyTorch loop.

One run, on the embedded digits and the tiny CLIP, all with the same batch, optimiser and torch threads:

- ``plain``: the train stage, ``mode: plain`` (Ray Train, Ray Data decoding, score log, metrics);
- ``mimic``: the train stage, ``mode: mimic`` on ``visual.proj`` (reference: the plain stage's final weights);
- ``bare``: an in-memory PyTorch loop over the same batches, decoded up front: no Ray, no data pipeline (one
  process, with as many torch threads as all the workers together).

Throughput is the median step time over the steps after ``--warmup`` (a stage's step time is from one step's end to
the next: data wait included, evaluation and checkpoints excluded).  The three run in ``--rounds`` rounds, one
after another within a round, and every ratio is the median of the per-round ratios, so a machine that speeds up or
slows down between rounds (these are shared) moves all three alike.  ``mimic_over_plain`` is the ratio of median
step times; ``pipeline_efficiency`` is plain stage throughput over bare-loop throughput (1.0: data loading and the
stage's bookkeeping cost nothing).  ``startup_s`` and ``teardown_s`` are a stage's fixed cost (median over the
stages), from the manifest's ``phases``: from its start to its first step (the model, the first decoded batch) for a
stage that ran on an idle worker group (each round's ``mimic``, after its ``plain``), and from its last step to its
end (the final evaluation and checkpoint); ``group_startup_s`` the same start for a stage that started its group
(each round's ``plain``: Ray Train's processes and the workers' imports too).
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from pipelines.bench import print_result
from pipelines.run.errors import InputError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int, default=1, help="training workers (DDP ranks)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--warmup", type=int, default=15, help="first steps left out of the medians")
    p.add_argument("--rounds", type=int, default=5, help="plain / mimic / bare rounds (ratios: median over rounds)")
    p.add_argument("--cpus-per-worker", type=int, default=0, help="torch threads per worker (0: cores / workers)")
    p.add_argument("--json", action="store_true", help="print one JSON line")


def _spec(storage: str, args, cpus: int, rounds: int) -> Dict[str, Any]:
    common = {"data": "pool", "batch_size": args.batch_size, "steps": args.steps, "checkpoint_every": args.steps,
              "optimizer": {"lr": 5e-4}, "resources": {"num_workers": args.workers, "cpus_per_worker": cpus}}
    stages: List[Dict[str, Any]] = [{"stage": "ingest", "name": "pool", "source": {"kind": "embedded"}, "shard_size": 200}]
    for r in range(1, rounds + 1):  # the same configs, as separate stages: a committed stage would be skipped
        stages.append({"stage": "train", "name": f"plain{r}", "mode": "plain", **common, "seed": r})
        stages.append({"stage": "train", "name": f"mimic{r}", "mode": "mimic", "reference": "plain1",
                       "mimic": {"params": ["visual.proj"], "method": "normed_proj"}, **common, "seed": r})
    return {"name": "bench", "storage": storage, "stages": stages}


def stage_step_seconds(storage: str, stage: str, warmup: int, column: str = "step_seconds") -> List[float]:
    from pipelines.formats.model import read_metrics
    from pipelines.run.storage import StageDir, open_storage

    fs, root = open_storage(storage)
    table = read_metrics(StageDir(fs, f"{root}/bench/{stage}")).to_pandas()
    return table[table.step > warmup][column].tolist()


def _median(values: List[float]) -> Optional[float]:
    return round(statistics.median(values), 2) if values else None


def stage_fixed_seconds(storage: str, stage: str) -> Tuple[float, float, bool]:
    """A train stage's ``(startup, teardown, started its group)`` from its manifest's phases: its start to its first
    step, its last step to the end of the stage (seconds), and whether its worker group started for it."""
    from pipelines.formats.manifest import ModelManifest
    from pipelines.run.storage import StageDir, open_storage

    fs, root = open_storage(storage)
    phases = ModelManifest.read(StageDir(fs, f"{root}/bench/{stage}")).phases
    return phases["first_step"], phases["finished"] - phases["last_step"], "process" in phases


def bare_step_seconds(storage: str, args, threads: int):
    """The same model, batches and optimiser in a plain loop over tensors already in memory: wall and CPU seconds
    per step."""
    import torch

    from gradmimic import clip_per_sample_loss
    from pipelines.models.build import ModelSpec
    from pipelines.run.storage import StageDir, open_storage
    from pipelines.training.batches import to_images
    from pipelines.training.config import OptimizerConfig
    from pipelines.training.data import Decoder, StepPlan
    from pipelines.training.index import build_index
    from pipelines.training.optim import make_optimizer

    torch.set_num_threads(threads)
    fs, root = open_storage(storage)
    train = build_index(None, StageDir(fs, f"{root}/bench/pool"), labels=False, text=True).split("train")
    spec = ModelSpec("clip", "tiny-clip")
    decoded = Decoder(spec.image_size, tokens=spec.context_length, arch="tiny-clip")(train, np.arange(train.num_rows))
    device = torch.device("cpu")
    images = to_images(decoded, spec, device)
    tokens = torch.from_numpy(decoded["tokens"])
    plan = StepPlan(train.num_rows, args.batch_size, 1, 0, args.steps)
    model = spec.build(seed=0)
    opt, sched = make_optimizer(model, OptimizerConfig(lr=5e-4), args.steps)
    times, cpu = [], []
    for step in range(1, args.steps + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        idx = torch.from_numpy(plan.global_rows(step))
        opt.zero_grad(set_to_none=True)
        loss = clip_per_sample_loss(model.encode_image(images[idx]), model.encode_text(tokens[idx]),
                                    model.logit_scale.exp())
        loss.mean().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return times[args.warmup:], cpu[args.warmup:]


def run(args: argparse.Namespace) -> Dict[str, Any]:
    import ray

    from pipelines.bench.overhead import median_ratio
    from pipelines.run.runner import run_spec
    from pipelines.run.spec import parse_spec

    cores = os.cpu_count() or 1
    cpus = args.cpus_per_worker or max(1, cores // args.workers)
    if args.steps <= args.warmup or args.rounds < 1:
        raise InputError(f"--steps ({args.steps}) must exceed --warmup ({args.warmup}), and --rounds be >= 1")
    rounds: Dict[str, List[float]] = {"plain": [], "mimic": [], "bare": []}
    cpu: Dict[str, List[float]] = {"plain": [], "mimic": [], "bare": []}
    fixed: List[Tuple[float, float, bool]] = []  # (startup, teardown, started its group) of every stage
    with tempfile.TemporaryDirectory() as tmp:
        storage = os.path.join(tmp, "runs")
        # logical CPUs: the workers', their decoding actors' (half a CPU each) and one for the rest
        ray.init(address="local", num_cpus=args.workers * cpus + (args.workers + 1) // 2 + 1, include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
        try:
            for r in range(1, args.rounds + 1):
                spec = parse_spec(_spec(storage, args, cpus, r), label="bench train")
                run_spec(spec, max_parallel=1, stream=io.StringIO() if args.json else sys.stderr)
                for mode in ("plain", "mimic"):
                    rounds[mode].append(statistics.median(stage_step_seconds(storage, f"{mode}{r}", args.warmup)))
                    cpu[mode].append(statistics.median(stage_step_seconds(storage, f"{mode}{r}", args.warmup,
                                                                          "step_cpu_seconds")))
                    fixed.append(stage_fixed_seconds(storage, f"{mode}{r}"))
                wall, used = bare_step_seconds(storage, args, cpus * args.workers)  # the workers' cores, one process
                rounds["bare"].append(statistics.median(wall))
                cpu["bare"].append(statistics.median(used))
        finally:
            ray.shutdown()
    plain, mimic, bare = (statistics.median(rounds[k]) for k in ("plain", "mimic", "bare"))
    b = args.batch_size
    result = {
        "workers": args.workers, "batch_size": b, "steps": args.steps, "warmup": args.warmup, "threads": cpus,
        "plain_samples_per_s": round(b / plain, 1), "mimic_samples_per_s": round(b / mimic, 1),
        "bare_samples_per_s": round(b / bare, 1),
        "plain_step_ms": round(plain * 1e3, 2), "mimic_step_ms": round(mimic * 1e3, 2), "bare_step_ms": round(bare * 1e3, 2),
        "mimic_over_plain": round(median_ratio(rounds["mimic"], rounds["plain"]), 3),
        "pipeline_efficiency": round(median_ratio(rounds["bare"], rounds["plain"]), 3),
        # the same ratios from the processes' CPU time, which a busy machine disturbs less than wall time
        "mimic_over_plain_cpu": round(median_ratio(cpu["mimic"], cpu["plain"]), 3),
        "bare_over_plain_cpu": round(median_ratio(cpu["bare"], cpu["plain"]), 3),
        # a stage's fixed cost: from its start to its first step (on an idle worker group; starting one), and from
        # its last step to its commit
        "startup_s": _median([a for a, _, new in fixed if not new]),
        "group_startup_s": _median([a for a, _, new in fixed if new]),
        "teardown_s": _median([b for _, b, _ in fixed]),
        "rounds": args.rounds,
        **{f"{k}_step_ms_rounds": [round(v * 1e3, 2) for v in vs] for k, vs in rounds.items()},
    }
    print_result(result, args.json)
    return result
