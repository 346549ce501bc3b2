"""The three steps ``gradmimic bench overhead`` times on one tiny open_clip CLIP and batch (plain, exact
Grad-Mimic, the reference code's vmap), and the float64 oracle check: kept apart from the command so that
building the CLI never imports torch.
"""

from __future__ import annotations

import time
from typing import Dict

import torch
from torch.func import grad, vmap

from gradmimic import ClipSites, GradMimic, Weighting, clip_per_sample_loss
from gradmimic.oracle import per_sample_grads, scores_from_grads
from pipelines.bench.overhead import VARIANTS
from pipelines.models.build import tiny_clip

PARAM = "visual.proj"


def make_batch(model, batch_size: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    size = model.visual.image_size
    images = torch.randn(batch_size, 3, *size, generator=g)
    ctx, vocab = model.context_length, model.vocab_size
    texts = torch.randint(1, vocab - 2, (batch_size, ctx), generator=g)
    ends = torch.randint(2, ctx, (batch_size,), generator=g)
    texts[torch.arange(batch_size), ends] = vocab - 1  # end-of-text: the pooled (argmax) token
    return images, texts


class Bench:
    def __init__(self, batch_size: int, method: str, temperature: float, seed: int) -> None:
        torch.manual_seed(seed)
        self.model = tiny_clip(seed)
        self.sites = ClipSites(self.model)
        proj = self.model.visual.proj.detach()
        self.ref = {PARAM: proj + 0.05 * proj.std() * torch.randn_like(proj)}
        self.weighting = Weighting("mimic", method, temperature)
        self.mimic = GradMimic(self.model, [PARAM], reference=self.ref, weighting=self.weighting)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-4)
        self.images, self.texts = make_batch(self.model, batch_size, seed)

    def plain(self) -> None:
        m = self.model
        self.opt.zero_grad(set_to_none=True)
        loss = clip_per_sample_loss(m.encode_image(self.images), m.encode_text(self.texts), m.logit_scale.exp())
        loss.mean().backward()
        self.opt.step()

    def mimic_step(self, backward: bool = True):
        self.opt.zero_grad(set_to_none=True)
        batch = self.sites(self.images, self.texts)
        out = self.mimic.step(batch.loss(), batch.sites, coupled=True, sqnorms_fn=batch.sqnorms_fn([PARAM]),
                              backward=backward)
        if backward:
            self.opt.step()
        return out

    def vmap_step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        batch = self.sites(self.images, self.texts)
        loss_B = batch.loss()
        x = batch.image_site.inputs
        txt = batch.text_site.outputs.detach()
        scale = batch.logit_scale.detach()
        p = self.model.visual.proj

        def loss_i(param, onehot):  # l_i of the whole coupled batch, picked by a one-hot row
            return clip_per_sample_loss(x @ param, txt, scale) @ onehot

        grads_B = vmap(grad(loss_i), in_dims=(None, 0))(p.detach(), torch.eye(x.shape[0]))
        t = self.ref[PARAM] - p.detach()
        dots, norms = scores_from_grads({PARAM: grads_B}, {PARAM: t})
        scores = -dots / t.norm()
        if self.weighting.method.endswith("cos"):
            scores = scores / norms.clamp_min(1e-12)
        w = torch.softmax(scores / self.weighting.temperature, 0)
        loss_B.mean().backward()
        p.grad = torch.einsum("b,bij->ij", w, grads_B)
        self.opt.step()

    def run(self, variant: str) -> None:
        {"plain": self.plain, "mimic": self.mimic_step, "vmap": self.vmap_step}[variant]()

    def oracle_error(self) -> float:
        """Max abs difference of fast scores and weights from a float64 jacrev oracle, every method."""
        batch = self.sites(self.images, self.texts)
        x = batch.image_site.inputs.double()
        txt = batch.text_site.outputs.detach().double()
        scale = batch.logit_scale.detach().double()
        p = self.model.visual.proj.detach().double()
        grads_B = per_sample_grads(lambda q: clip_per_sample_loss(x @ q[PARAM], txt, scale), {PARAM: p})
        t = self.ref[PARAM].double() - p
        dots, norms = scores_from_grads(grads_B, {PARAM: t})
        err = 0.0
        for method in ("proj", "cos", "normed_proj", "normed_cos"):
            w = Weighting("mimic", method, self.weighting.temperature)
            mimic = GradMimic(self.model, [PARAM], reference=self.ref, weighting=w)
            batch = self.sites(self.images, self.texts)
            out = mimic.step(batch.loss(), batch.sites, coupled=True, sqnorms_fn=batch.sqnorms_fn([PARAM]),
                             backward=False)
            scores = -dots / t.norm() / (norms if method.endswith("cos") else 1)
            weights = torch.softmax(scores / w.temperature, 0) if method.startswith("normed") else None
            err = max(err, (out.scores.double() - scores).abs().max().item())
            if weights is not None:
                err = max(err, (out.weights.double() - weights).abs().max().item())
        return err


def time_variants(bench: Bench, repeats: int, warmup: int) -> Dict[str, list]:
    for _ in range(warmup):
        for v in VARIANTS:
            bench.run(v)
    times: Dict[str, list] = {v: [] for v in VARIANTS}
    for _ in range(repeats):
        for v in VARIANTS:  # interleaved, so a noisy neighbour hits every variant alike
            t0 = time.perf_counter()
            bench.run(v)
            times[v].append((time.perf_counter() - t0) * 1e3)
    return times
