"""Every fast path against brute force: torch.func jacrev of the per-sample loss vector through the whole model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from gradmimic import (
    GradMimic,
    LinearSite,
    Weighting,
    capture_linear_sites,
    clip_per_sample_loss,
)
from gradmimic.mimic import jacobian_sqnorms
from gradmimic.oracle import per_sample_grads, scores_from_grads

RTOL = 1e-5


pytestmark = pytest.mark.usefixtures("float64")


def close(a, b, rtol=RTOL):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    scale = b.abs().max().clamp_min(1e-12)
    assert (a - b).abs().max() <= rtol * scale, f"max err {(a - b).abs().max():.3e} vs scale {scale:.3e}"


# ---------------------------------------------------------------- models and their per-sample losses


class Classifier(nn.Module):
    def __init__(self, d_in=7, width=5, classes=4):
        super().__init__()
        self.trunk = nn.Linear(d_in, width)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.head(torch.tanh(self.trunk(x)))


def ce_loss(call, x, y):
    logits = call(x)
    if logits.dim() == 3:  # sequences: sum of token losses
        return F.cross_entropy(logits.transpose(1, 2), y, reduction="none").sum(1)
    return F.cross_entropy(logits, y, reduction="none")


class TinyClip(nn.Module):
    """Two towers ending in projections: the image one a bare parameter (x @ P), the text one an nn.Linear."""

    def __init__(self, d_img=6, d_txt=5, width=4, embed=3):
        super().__init__()
        self.trunk_i = nn.Linear(d_img, width)
        self.trunk_t = nn.Linear(d_txt, width)
        self.proj = nn.Parameter(torch.randn(width, embed))
        self.text_projection = nn.Linear(width, embed)
        self.logit_scale = nn.Parameter(torch.tensor(1.3))

    def sites(self, img, txt):
        xi, xt = torch.tanh(self.trunk_i(img)), torch.tanh(self.trunk_t(txt))
        return {
            "proj": LinearSite("proj", xi, xi @ self.proj, "matmul"),
            "text_projection.weight": LinearSite("text_projection.weight", xt, self.text_projection(xt), "linear"),
        }

    def forward(self, img, txt):
        s = self.sites(img, txt)
        return clip_per_sample_loss(s["proj"].outputs, s["text_projection.weight"].outputs, self.logit_scale.exp())


def oracle(model, loss_of, names):
    """Per-sample gradients of the named parameters, through the whole model."""
    base = dict(model.named_parameters())
    return per_sample_grads(lambda p: loss_of(lambda *a: functional_call(model, {**base, **p}, a)), {n: base[n] for n in names})


def perturbed(model, scale=0.3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {n: p.detach() + scale * torch.randn(p.shape, generator=g) for n, p in model.named_parameters()}


# ---------------------------------------------------------------- problems: (model, loss_of(model) -> l_B, sites_fn, coupled)


def ce_problem(seq: bool):
    torch.manual_seed(0)
    model = Classifier()
    b, s = 9, 4
    x = torch.randn(b, s, 7) if seq else torch.randn(b, 7)
    y = torch.randint(0, 4, (b, s) if seq else (b,))

    def run():
        with capture_linear_sites(model, ["head.weight"]) as sites:
            loss = ce_loss(model, x, y)
        return loss, dict(sites)

    return model, (lambda call: ce_loss(call, x, y)), run, False, ["head.weight"]


def clip_problem(names=("proj",)):
    torch.manual_seed(0)
    model = TinyClip()
    b = 8
    img, txt = torch.randn(b, 6), torch.randn(b, 5)

    def run():
        sites = model.sites(img, txt)
        loss = clip_per_sample_loss(sites["proj"].outputs, sites["text_projection.weight"].outputs, model.logit_scale.exp())
        return loss, sites

    return model, (lambda call: call(img, txt)), run, True, list(names)


PROBLEMS = {
    "ce2d": lambda: ce_problem(False),
    "ceseq": lambda: ce_problem(True),
    "clip_image": lambda: clip_problem(("proj",)),
    "clip_text": lambda: clip_problem(("text_projection.weight",)),
    "clip_both": lambda: clip_problem(("proj", "text_projection.weight")),
}


def clip_sqnorms_fn(model, sites, names):
    from gradmimic.clip_loss import projection_sqnorms

    i, t = sites["proj"], sites["text_projection.weight"]
    scale = model.logit_scale.exp().detach()

    def fn():
        total = 0
        if "proj" in names:
            total = total + projection_sqnorms(i.inputs, i.outputs.detach(), t.outputs.detach(), scale)
        if "text_projection.weight" in names:
            total = total + projection_sqnorms(t.inputs, t.outputs.detach(), i.outputs.detach(), scale)
        return total

    return fn


# ---------------------------------------------------------------- the tests


@pytest.mark.parametrize("problem", list(PROBLEMS))
@pytest.mark.parametrize("method", ["proj", "cos", "normed_proj", "normed_cos"])
@pytest.mark.parametrize("reweight", ["param", "all"])
def test_scores_weights_and_grads_match_oracle(problem, method, reweight):
    model, loss_of, run, coupled, names = PROBLEMS[problem]()
    ref = perturbed(model)
    temperature = 0.7
    mimic = GradMimic(model, names, reference=ref, weighting=Weighting("mimic", method, temperature), reweight=reweight)

    grads = oracle(model, loss_of, names)
    direction = {n: ref[n] - dict(model.named_parameters())[n].detach() for n in names}
    dots, norms = scores_from_grads(grads, direction)
    tnorm = torch.sqrt(sum(d.pow(2).sum() for d in direction.values()))
    expect = -dots / tnorm / (norms if method.endswith("cos") else 1)
    expect_w = torch.softmax(expect / temperature, 0) if method.startswith("normed") else torch.full_like(expect, 1 / len(expect))

    # every parameter's oracle gradient under the expected weights
    all_names = [n for n, _ in model.named_parameters()]
    all_grads = oracle(model, loss_of, all_names)
    model.zero_grad()
    loss, sites = run()
    sq = clip_sqnorms_fn(model, sites, names) if coupled else None
    out = mimic.step(loss, sites, coupled=coupled, sqnorms_fn=sq)

    close(out.scores, expect)
    close(out.weights, expect_w)
    close(out.dots, dots)
    if method.endswith("cos"):
        close(out.grad_norms, norms)
    mean_g = torch.cat([grads[n].mean(0).reshape(-1) for n in names])
    flat_d = torch.cat([direction[n].reshape(-1) for n in names])
    close(out.alignment, -(mean_g @ flat_d) / (mean_g.norm() * flat_d.norm()))
    for name, p in model.named_parameters():
        w = expect_w if (reweight == "all" or name in names) else torch.full_like(expect_w, 1 / len(expect_w))
        want = torch.einsum("b,b...->...", w, all_grads[name])
        close(p.grad, want)


@pytest.mark.parametrize("gram", [True, False])
def test_sequence_ghost_norm_both_forms(gram):
    torch.manual_seed(3)
    x, d = torch.randn(5, 6, 4), torch.randn(5, 6, 3)
    site = LinearSite("w", x, torch.zeros(5, 6, 3), "linear")
    brute = torch.einsum("bso,bsi->boi", d, x).pow(2).sum((1, 2))
    close(site.ghost_sqnorms(d, gram=gram), brute)


def test_jacobian_sqnorms_for_any_coupled_loss_matches_oracle():
    model, loss_of, run, _, names = clip_problem(("proj", "text_projection.weight"))
    grads = oracle(model, loss_of, names)
    _, norms = scores_from_grads(grads, {n: torch.zeros_like(g[0]) for n, g in grads.items()})
    loss, sites = run()
    close(jacobian_sqnorms(loss, [sites[n] for n in names]).sqrt(), norms)


@pytest.mark.parametrize("problem", ["ce2d", "clip_image"])
@pytest.mark.parametrize("rule", ["uniform", "grand", "rho", "agra", "influence"])
def test_baselines_match_oracle(problem, rule):
    model, loss_of, run, coupled, names = PROBLEMS[problem]()
    grads = oracle(model, loss_of, names)
    b = next(iter(grads.values())).shape[0]
    g = torch.Generator().manual_seed(5)
    direction = {n: torch.randn(v.shape[1:], generator=g) for n, v in grads.items()}
    dots, norms = scores_from_grads(grads, direction)
    ref_loss = torch.rand(b, generator=g)
    t = 0.9
    mimic = GradMimic(model, names, weighting=Weighting(rule, "normed_proj", t))
    if rule in ("agra", "influence"):
        mimic.set_direction(direction)
    loss, sites = run()
    if rule == "uniform":
        want = torch.full((b,), 1 / b)
    elif rule == "grand":
        want = torch.softmax(norms / t, 0)
    elif rule == "rho":
        want = torch.softmax((loss.detach() - ref_loss) / t, 0)
    elif rule == "agra":
        keep = (-dots > 0).double()
        assert 0 < keep.sum() < b, "fixture should keep some and drop some"
        want = keep / keep.sum()
    else:
        dn = torch.sqrt(sum(d.pow(2).sum() for d in direction.values()))
        want = torch.softmax(-dots / dn / t, 0)
    sq = clip_sqnorms_fn(model, sites, names) if coupled else None
    out = mimic.step(loss, sites, coupled=coupled, sqnorms_fn=sq, ref_loss_B=ref_loss)
    close(out.weights, want)
    name = names[0]
    close(dict(model.named_parameters())[name].grad, torch.einsum("b,b...->...", want, grads[name]))
