"""The whole-model oracle for a CLIP's mimic scores: ``jacrev`` of the per-sample losses through the model's own
forward (shares no code with ``ClipSites``), against ``ClipSites`` + ``GradMimic`` on the same batch."""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from gradmimic import ClipSites, GradMimic, Weighting, clip_per_sample_loss
from gradmimic.oracle import per_sample_grads, scores_from_grads


class _Loss(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.m = model

    def forward(self, images, texts):
        return clip_per_sample_loss(self.m.encode_image(images), self.m.encode_text(texts), self.m.logit_scale.exp())


def assert_clip_mimic_matches_oracle(model: nn.Module, images: torch.Tensor, texts: torch.Tensor,
                                     names=("visual.proj", "text_projection"), rtol: float = 1e-6) -> None:
    """Scores, gradient norms and the reweighted gradients of ``names`` equal the oracle's (a float64 model)."""
    names = list(names)
    base = dict(model.named_parameters())
    ref = {n: p.detach() + 0.1 * torch.randn_like(p) for n, p in base.items()}
    towers = _Loss(model)

    def loss_of(p):
        return functional_call(towers, {f"m.{k}": v for k, v in {**base, **p}.items()}, (images, texts))

    grads = per_sample_grads(loss_of, {n: base[n] for n in names})
    direction = {n: ref[n] - base[n].detach() for n in names}
    dots, norms = scores_from_grads(grads, direction)
    mimic = GradMimic(model, names, reference=ref, weighting=Weighting("mimic", "normed_cos", 0.5))
    batch = ClipSites(model)(images, texts)
    out = mimic.step(batch.loss(), batch.sites, coupled=True, sqnorms_fn=batch.sqnorms_fn(names))
    tn = torch.sqrt(sum(d.pow(2).sum() for d in direction.values()))
    assert torch.allclose(out.scores, -dots / tn / norms, rtol=rtol)
    assert torch.allclose(out.grad_norms, norms, rtol=rtol)
    for n in names:
        assert torch.allclose(base[n].grad, torch.einsum("b,bij->ij", out.weights, grads[n]), rtol=rtol,
                              atol=1e-12), n
