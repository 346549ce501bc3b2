"""``gradmimic bench overhead``: what an exact Grad-Mimic step costs next to a plain CLIP step.

Three steps on the same tiny open_clip CLIP and batch, timed interleaved (round-robin; medians of ``--repeats`` rounds, ratios as the median of per-round ratios):

- ``plain``: open_clip forward, symmetric InfoNCE, backward, SGD step;
- ``mimic``: the same with Grad-Mimic scores and reweighting on ``visual.proj`` (:class:`gradmimic.GradMimic`);
- ``vmap``:  the reference code's way: materialise every per-sample gradient of ``visual.proj`` with
  ``torch.func.vmap(grad(l_i))``, score them against the task vector, set the weighted gradient.

It also checks the fast scores and weights against a float64 ``jacrev`` oracle, and measures how much resident
memory each step adds, in a fresh process per variant.  Machines are shared and noisy: read the ratios, not the milliseconds.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict

from pipelines.bench import print_result

VARIANTS = ("plain", "mimic", "vmap")  # the steps :mod:`pipelines.bench.exact_steps` times


def median_ratio(num: list, den: list) -> float:
    """Median over rounds of the per-round ratio: robust to the machine speeding up or slowing down mid-run."""
    return statistics.median(a / b for a, b in zip(num, den))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def step_memory_mb(fn: Callable[[], None], steps: int = 2) -> float:
    """Growth of resident memory while ``fn`` runs, above the level before it: sampled every millisecond.

    (Torch's CPU allocator keeps no peak statistics; the process-wide peak is dominated by loading torch.)
    """
    import threading

    import psutil

    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        for _ in range(steps):
            fn()
    finally:
        done.set()
        thread.join(timeout=5)
    return (peak[0] - base) / 2**20


def variant_memory(args, variant: str) -> float:
    """Step memory of one variant, in a fresh process so no variant inherits another's freed pages."""
    cmd = [sys.executable, "-m", "pipelines.bench.overhead", "--only", variant, "--batch-size", str(args.batch_size),
           "--method", args.method, "--temperature", str(args.temperature), "--seed", str(args.seed)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["step_mb"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--method", default="normed_proj", choices=["proj", "cos", "normed_proj", "normed_cos"])
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-variant step-memory processes")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    p.add_argument("--only", choices=VARIANTS, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> Dict[str, float]:
    import torch

    from pipelines.bench.exact_steps import Bench, time_variants

    if args.threads:
        torch.set_num_threads(args.threads)
    bench = Bench(args.batch_size, args.method, args.temperature, args.seed)
    if args.only:
        result = {"variant": args.only, "step_mb": round(step_memory_mb(lambda: bench.run(args.only)), 1)}
        print(json.dumps(result))
        return result
    err = bench.oracle_error()
    times = time_variants(bench, args.repeats, args.warmup)
    ms = {v: statistics.median(ts) for v, ts in times.items()}
    result = {
        "batch_size": args.batch_size,
        "method": args.method,
        "threads": torch.get_num_threads(),
        "plain_ms": round(ms["plain"], 2),
        "mimic_ms": round(ms["mimic"], 2),
        "vmap_ms": round(ms["vmap"], 2),
        "mimic_over_plain": round(median_ratio(times["mimic"], times["plain"]), 3),
        "vmap_over_plain": round(median_ratio(times["vmap"], times["plain"]), 3),
        "max_abs_err_vs_oracle": float(f"{err:.3g}"),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }
    if not args.no_memory:
        for v in VARIANTS:
            result[f"{v}_step_mb"] = variant_memory(args, v)
    print_result(result, args.json)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="gradmimic bench overhead", description=__doc__.splitlines()[0])
    add_arguments(p)
    run(p.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
