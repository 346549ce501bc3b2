"""``gradmimic bench clipscore``: the clipscore stage next to a bare PyTorch loop computing the same scores on the
same cores.

One run on a generated DataComp-layout pool (:mod:`pipelines.bench.poolgen`: real JPEGs, 10,000 per tar, cached)
indexed in place, and a CLIP (the shipped tiny CLIP; ``--towers``: the CLIP of pretrained towers) with seeded
weights committed as a model stage:

- ``stage``: the clipscore stage through the runner, on ``--actors`` Ray Data actors, each with ``cores / actors``
  torch threads, from stage start to commit (reading the shards, ranged reads of the images, decoding,
  tokenising, the forward passes, writing the scored shards);
- ``bare``: one process with as many torch threads, the same rows decoded by the same decoder from the same
  tars, the same forward passes, nothing written (its decoding runs on one core; the stage's actors, one per
  core by default, decode in parallel, so it can beat the bare loop).

They run ``--rounds`` times, one after the other within a round; ``stage_over_bare`` is the median of the rounds'
ratios of rows per second (1.0: the stage costs nothing over the bare loop).
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Dict, List

import numpy as np

from pipelines.bench import print_result
from pipelines.formats import model as fm
from pipelines.run.errors import InputError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rows", type=int, default=40_000, help="pool samples")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--actors", type=int, default=0, help="Ray Data actors (0: one per core, as the stage's own default)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--towers", action="store_true", help="the CLIP of pretrained towers (the towers extra)")
    p.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "gradmimic-bench-scale"),
                   help="where the generated pool is kept (shared with bench scale)")
    p.add_argument("--json", action="store_true", help="print one JSON line")


def _model_spec(towers: bool):
    from pipelines.models.build import ModelSpec

    if towers:
        return ModelSpec("clip", backbone="efficientnet_lite0", text_tower="all-minilm-l6-v2", embed_dim=256,
                         image_size_override=64)
    return ModelSpec("clip", "tiny-clip")


def _commit_model(storage: str, spec_yaml: Dict[str, Any], model_spec) -> None:
    """The model stage, committed as the runner would skip it (seeded weights, no training)."""
    from safetensors.torch import save

    from pipelines.models.build import model_json
    from pipelines.run.runner import committed_stage, config_hash
    from pipelines.run.spec import parse_spec
    from pipelines.run.storage import StageDir

    spec = parse_spec(spec_yaml, label="bench clipscore")
    pool = committed_stage(spec, "pool")
    model = model_spec.build(seed=0)
    d = StageDir(pool.fs, pool.path.rsplit("/", 1)[0] + "/model")
    d.begin()
    d.write_bytes(fm.WEIGHTS, save({k: v.contiguous() for k, v in model.state_dict().items()}))
    d.write_bytes(fm.MODEL_JSON, model_json(model_spec))
    d.commit({"files": [fm.WEIGHTS, fm.MODEL_JSON], "rows_in": 0, "rows_out": 0,
              "config_hash": config_hash(spec.stages[1], {"pool": pool.manifest()["config_hash"]})})


def bare_rows_per_s(storage: str, model_spec, batch_size: int, threads: int) -> float:
    """Every pool row decoded and scored in one process: rows per second."""
    import torch
    import torch.nn.functional as F

    from gradmimic import load_state_dict
    from pipelines.formats import pool as fp
    from pipelines.models.build import load_weights
    from pipelines.run.storage import StageDir, open_storage, read_parquet
    from pipelines.training.batches import to_images
    from pipelines.training.data import Decoder

    torch.set_num_threads(threads)
    fs, root = open_storage(storage)
    pool, model_dir = StageDir(fs, f"{root}/bench/pool"), StageDir(fs, f"{root}/bench/model")
    t0 = time.perf_counter()
    model = model_spec.build(0)
    load_weights(model, load_state_dict(fm.read_weights(model_dir)))
    model.eval()
    decoder = Decoder(model_spec.image_size, tokens=model_spec.context_length, arch=model_spec.tokenizer)
    base, rows = fs.unstrip_protocol(pool.join("")), 0
    with torch.no_grad():
        for name in fp.shard_parquets(pool.manifest()["files"]):
            table = read_parquet(fs, pool.join(name))
            table = table.set_column(table.schema.get_field_index("tar"), "tar", fp.tar_urls(base, table["tar"]))
            for start in range(0, table.num_rows, batch_size):
                batch = decoder(table, np.arange(start, min(table.num_rows, start + batch_size)))
                image = F.normalize(model.encode_image(to_images(batch, model_spec, torch.device("cpu"))), dim=-1)
                text = F.normalize(model.encode_text(torch.from_numpy(batch["tokens"])), dim=-1)
                (image * text).sum(1).numpy()
            rows += table.num_rows
    return rows / (time.perf_counter() - t0)


def run(args: argparse.Namespace) -> Dict[str, Any]:
    import ray

    from pipelines.bench.poolgen import PoolShape, ensure_pool
    from pipelines.run.runner import run_spec
    from pipelines.run.spec import parse_spec

    if args.rows < 1 or args.rounds < 1 or args.batch_size < 1 or args.actors < 0:
        raise InputError("--rows, --rounds and --batch-size must be >= 1, --actors >= 0")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    actors = args.actors or cores
    threads = max(1, cores // actors)
    root, _ = ensure_pool(args.cache, PoolShape(args.rows), cores)
    model_spec = _model_spec(args.towers)
    model = {"backbone": "efficientnet_lite0", "text_tower": "all-minilm-l6-v2", "embed_dim": 256,
             "image_size": 64} if args.towers else {"arch": "tiny-clip"}
    stage_rates: List[float] = []
    bare_rates: List[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        storage = os.path.join(tmp, "runs")
        stages: List[Dict[str, Any]] = [
            {"stage": "ingest", "name": "pool", "source": {"kind": "datacomp", "path": root}, "shard_size": 10_000},
            {"stage": "train", "name": "model", "data": "pool", "model": model}]
        spec_yaml = {"name": "bench", "storage": storage, "stages": stages}
        ray.init(address="local", num_cpus=actors * threads, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
        try:
            run_spec(parse_spec({**spec_yaml, "stages": stages[:1]}), stream=io.StringIO())
            _commit_model(storage, spec_yaml, model_spec)
            for r in range(1, args.rounds + 1):
                stages.append({"stage": "clipscore", "name": f"scored{r}", "data": "pool", "model": "model",
                               "batch_size": args.batch_size, "actors": actors, "cpus_per_actor": threads})
                done = run_spec(parse_spec(spec_yaml, label="bench clipscore"), max_parallel=1,
                                stream=io.StringIO() if args.json else sys.stderr)[f"scored{r}"]
                stage_rates.append(done["rows_out"] / done["timings"]["seconds"])
                bare_rates.append(bare_rows_per_s(storage, model_spec, args.batch_size, actors * threads))
        finally:
            ray.shutdown()
    result = {"rows": args.rows, "model": "towers" if args.towers else "tiny-clip", "cores": cores, "actors": actors,
              "threads_per_actor": threads, "batch_size": args.batch_size, "rounds": args.rounds,
              "stage_rows_per_s": round(statistics.median(stage_rates), 1),
              "bare_rows_per_s": round(statistics.median(bare_rates), 1),
              "stage_over_bare": round(statistics.median(s / b for s, b in zip(stage_rates, bare_rates)), 3)}
    print_result(result, args.json)
    return result
