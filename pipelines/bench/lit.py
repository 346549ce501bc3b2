"""``gradmimic bench lit``: what cached tower features save when the towers are locked (LiT).

One process, the CLIP of pretrained towers (EfficientNet-Lite0 + all-MiniLM-L6-v2, ``--image-size`` pixels), one
batch of random images and captions, three things timed side by side, ``--repeats`` times each, interleaved:

- ``full``: a Grad-Mimic step (forward, scores, reweighted backward, AdamW) of the full model with its towers
  frozen: what every step of every train stage costs without the features stage;
- ``features``: the towers' forward pass alone over the batch: what the features stage pays once per row;
- ``cached``: the same step of the model without its towers, on those features.

Medians per batch in milliseconds; ``full_over_cached`` is the step's speed-up, and ``saved@k`` the fraction of
the towers' cost saved when the rows are visited ``k`` times in all (epochs x train stages): ``1 - (features + k x
cached) / (k x full)``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace
from typing import Any, Callable, Dict

from pipelines.bench import print_result

WORDS = ("a dog on a red sofa in the sun", "two people riding bicycles past a market", "an old map of the coast",
         "a bowl of soup with bread", "the night sky over a lake", "a child holding a kite on a beach")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=224, help="input pixels (EfficientNet-Lite0's own: 224)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", action="store_true", help="print one JSON line")


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000


def run(args: argparse.Namespace) -> None:
    import torch

    from gradmimic import ClipSites, GradMimic, Weighting
    from pipelines.models.build import ModelSpec, apply_trainable, train_mode
    from pipelines.models.towers import text_tokenizer
    from pipelines.stages.train import CACHED_PARAMS
    from pipelines.training.config import OptimizerConfig
    from pipelines.training.optim import make_optimizer

    spec = ModelSpec("clip", backbone="efficientnet_lite0", text_tower="all-minilm-l6-v2", embed_dim=256,
                     image_size_override=args.image_size)
    full, cached = spec.build(seed=0), replace(spec, cached=True).build(seed=0)
    apply_trainable(full, CACHED_PARAMS, ())
    torch.manual_seed(0)
    b = args.batch_size
    images = torch.randn(b, 3, args.image_size, args.image_size)
    tokens = text_tokenizer(spec.text_tower, spec.context_length)([WORDS[i % len(WORDS)] + f" {i}" for i in range(b)])

    def features():
        with torch.no_grad():
            return full.visual.trunk(images), full.text(tokens)

    feats = features()

    def stepper(model, inputs):
        train_mode(model)
        opt, _ = make_optimizer(model, OptimizerConfig(), 1000)
        proj = model.visual.proj.detach()
        mimic = GradMimic(model, ["visual.proj"], reference={"visual.proj": proj + 0.01 * torch.randn_like(proj)},
                          weighting=Weighting("mimic", "normed_proj", 1.0))

        def step():
            opt.zero_grad(set_to_none=True)
            batch = ClipSites(model)(*inputs)
            mimic.step(batch.loss(), batch.sites, coupled=True, sqnorms_fn=batch.sqnorms_fn(["visual.proj"]))
            opt.step()
        return step

    runs = {"full": stepper(full, (images, tokens)), "features": features, "cached": stepper(cached, feats)}
    for fn in runs.values():  # warm-up
        fn()
    times: Dict[str, list] = {k: [] for k in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            times[name].append(_timed(fn))
    ms = {k: statistics.median(v) for k, v in times.items()}
    out: Dict[str, Any] = {f"{k}_ms": round(v, 2) for k, v in ms.items()}
    out.update(batch_size=b, image_size=args.image_size, threads=torch.get_num_threads(),
               full_over_cached=round(ms["full"] / ms["cached"], 1))
    for k in (1, 3, 10):
        out[f"saved@{k}"] = round(1 - (ms["features"] + k * ms["cached"]) / (k * ms["full"]), 3)
    print_result(out, args.json)
