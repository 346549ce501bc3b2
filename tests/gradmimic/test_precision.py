"""Precision of the fast CLIP scores against a float64 brute-force oracle, in float32 and under bf16 autocast.

A tiny open_clip CLIP is trained on one batch at logit scale 100 until it fits it (per-sample losses ~1e-5, where
``1 - softmax`` and the Gram form's expansion cancel in float32), with a snapshot on the way at realistic losses
(~0.1 to 2).  The references are per-sample gradients materialised by ``jacrev`` through the whole model and a
textbook loss (``F.cross_entropy`` both ways, as open_clip's ``ClipLoss``), sharing no code with
:class:`ClipSites`, :func:`clip_per_sample_loss` or the Gram form: in float64 (the truth, at the same weights and
inputs) and in float32 (the error a float32 brute force makes, the yardstick the fast path must meet).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from gradmimic import ClipSites, GradMimic, LinearSite, Weighting
from gradmimic.oracle import per_sample_grads, scores_from_grads
from gradmimic.scores import mimic_scores

open_clip = pytest.importorskip("open_clip")

NAMES = ("visual.proj", "text_projection")
BATCH = 16
# The fast path may be at most FACTOR x further from the float64 oracle than a brute force at the same precision
# is, plus a floor of FLOOR x the score's scale (max |score|) for when both are at rounding level.
FACTOR = 1.5
FLOOR = 1e-5
# ... and in float32 within ABS x scale: float32 embeddings are good to ~1e-6, and the scores are well conditioned
# in them (the fast path lands within ~2e-5 x scale here).  A float32 brute force through F.cross_entropy misses
# this by 10-100x on the fit batch, where its softmax - 1 rounds to a percent of itself, as did the fast path
# before its loss and Gram pieces avoided that cancellation.
ABS = 1e-3


def tiny_clip(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    vision = open_clip.CLIPVisionCfg(image_size=16, patch_size=8, width=32, layers=1, head_width=16)
    text = open_clip.CLIPTextCfg(context_length=8, vocab_size=64, width=32, heads=2, layers=1)
    return open_clip.CLIP(embed_dim=16, vision_cfg=vision, text_cfg=text)


def make_batch(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 16, 16, generator=g)
    texts = torch.randint(1, 62, (n, 8), generator=g)
    texts[torch.arange(n), torch.randint(2, 8, (n,), generator=g)] = 63  # end-of-text: the pooled (argmax) token
    return images, texts


def textbook_loss(image, text, scale):
    """``l_i`` of the symmetric InfoNCE as open_clip's ClipLoss computes it, per sample."""
    logits = scale * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T
    labels = torch.arange(len(logits))
    return (F.cross_entropy(logits, labels, reduction="none") + F.cross_entropy(logits.T, labels, reduction="none")) / 2


class Towers(nn.Module):
    """The plain open_clip forward and the textbook per-sample loss: what the oracle differentiates."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.m = model

    def forward(self, images, texts):
        return textbook_loss(self.m.encode_image(images), self.m.encode_text(texts), self.m.logit_scale.exp())


@pytest.fixture(scope="module")
def regimes():
    """``{"realistic": ..., "fit": ...}``: (model, images, texts, reference) at logit scale 100."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: threads only contend (CI machines are shared)
    try:
        return _train()
    finally:
        torch.set_num_threads(threads)


def _train():
    model = tiny_clip()
    images, texts = make_batch(BATCH, seed=1)
    with torch.no_grad():
        model.logit_scale.fill_(torch.log(torch.tensor(100.0)))
    model.logit_scale.requires_grad_(False)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    snaps = {}
    for _ in range(400):
        loss = Towers(model)(images, texts)
        if "realistic" not in snaps and loss.mean() < 1.0:
            snaps["realistic"] = copy.deepcopy(model)
        if loss.max() < 3e-4:
            snaps["fit"] = copy.deepcopy(model)
            break
        opt.zero_grad()
        loss.mean().backward()
        opt.step()
    assert set(snaps) == {"realistic", "fit"}, "the tiny CLIP did not fit its batch"
    out = {}
    g = torch.Generator().manual_seed(5)
    for key, m in snaps.items():
        m.logit_scale.requires_grad_(True)
        ref = {n: p.detach() + 0.05 * p.detach().std() * torch.randn(p.shape, generator=g) for n, p in
               m.named_parameters() if n in NAMES}
        out[key] = (m, images, texts, ref)
    return out


def oracle(model, images, texts, ref, dtype):
    """``{name: (dots, norms, |T|)}`` per projection from materialised per-sample gradients, computed in ``dtype``."""
    model = copy.deepcopy(model).to(dtype)
    base = dict(model.named_parameters())
    towers = Towers(model)

    def loss_of(p):
        return functional_call(towers, {f"m.{k}": v for k, v in {**base, **p}.items()}, (images.to(dtype), texts))

    grads = per_sample_grads(loss_of, {n: base[n] for n in NAMES})
    out = {}
    for n in NAMES:
        d = {n: ref[n].to(dtype) - base[n].detach()}
        dots, norms = scores_from_grads({n: grads[n].detach()}, d)
        out[n] = (dots.double(), norms.double(), d[n].double().norm())
    return out


def brute_autocast(model, images, texts, ref):
    """Per-sample gradients of the float32 model with its towers under bf16 autocast (the loss head in float64, so
    the yardstick's error is what the bf16 towers cost): a loop of backward passes."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        image, text = model.encode_image(images), model.encode_text(texts)
    loss = textbook_loss(image.double(), text.double(), model.logit_scale.exp().double())
    params = dict(model.named_parameters())
    grads = {n: [] for n in NAMES}
    for i in range(loss.shape[0]):
        for n, g in zip(NAMES, torch.autograd.grad(loss[i], [params[n] for n in NAMES], retain_graph=True)):
            grads[n].append(g)
    out = {}
    for n in NAMES:
        d = {n: ref[n] - params[n].detach()}
        dots, norms = scores_from_grads({n: torch.stack(grads[n])}, d)
        out[n] = (dots.double(), norms.double(), d[n].double().norm())
    return out


def fast(model, images, texts, ref, name, autocast=False):
    """``(dots, norms, cos scores)`` of one projection from ClipSites + GradMimic (forward as the train loop runs it)."""
    mimic = GradMimic(model, [name], reference=ref, weighting=Weighting("mimic", "cos", 1.0))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        batch = ClipSites(model)(images, texts)
        loss = batch.loss()
    out = mimic.step(loss, batch.sites, coupled=True, sqnorms_fn=batch.sqnorms_fn([name]), backward=False)
    return out.dots.double(), out.grad_norms.double(), out.scores.double()


def scores(dots, norms, tnorm):
    return {"proj": -dots / tnorm, "cos": (-dots / tnorm / norms)}


def max_err(a, b):
    return float((a - b).abs().max())


def spearman(a, b):
    ranks = torch.stack([a.argsort().argsort(), b.argsort().argsort()]).double()
    return float(torch.corrcoef(ranks)[0, 1])


@pytest.mark.parametrize("regime", ["fit", "realistic"])
def test_float32_fast_scores_are_as_close_to_float64_as_float32_brute_force(regimes, regime):
    model, images, texts, ref = regimes[regime]
    truth = oracle(model, images, texts, ref, torch.float64)
    brute = oracle(model, images, texts, ref, torch.float32)
    report, failures = [], []
    for name in NAMES:
        dots, norms, cos = fast(model, images, texts, ref, name)
        want = scores(*truth[name])
        got = {"proj": -dots / truth[name][2], "cos": cos}
        base = scores(*brute[name])
        assert cos.abs().max() <= 1
        for method in ("proj", "cos"):
            e_fast, e_brute = max_err(got[method], want[method]), max_err(base[method], want[method])
            scale = float(want[method].abs().max())
            bound = min(FACTOR * e_brute + FLOOR * scale, ABS * scale)
            report.append(f"{name} {method}: fast {e_fast:.2e} brute {e_brute:.2e} (scale {scale:.2e})")
            if e_fast > bound:
                failures.append(report[-1])
    print("\n".join(report))
    assert not failures, "fast float32 scores further from the float64 oracle than float32 brute force:\n" + "\n".join(
        failures)


@pytest.mark.parametrize("regime", ["fit", "realistic"])
def test_bf16_autocast_scores_against_float64(regimes, regime):
    """The train loop's ``precision: bf16`` path: forward under autocast, scores after it.

    The bf16 towers themselves move every embedding by ~1e-2 relative, which no scoring can undo (cos scores
    land ~10% of their scale off here, the brute force's too); the yardstick is a brute force that differentiates
    the same autocast towers.  The fast path must be no further from the float64 oracle than FACTOR x that (plus
    1e-3 x scale), and at realistic losses rank the samples as the oracle does: Spearman >= 0.9 and within 0.03 of
    the brute force's (which reaches 0.96-0.99 here).  Gram norms formed in bf16, or the loss head's logits in bf16 (exponents off by ~0.4 at a logit
    scale of 100), fail this.
    """
    model, images, texts, ref = regimes[regime]
    truth = oracle(model, images, texts, ref, torch.float64)
    brute = brute_autocast(model, images, texts, ref)
    report, failures = [], []
    for name in NAMES:
        dots, norms, cos = fast(model, images, texts, ref, name, autocast=True)
        assert torch.isfinite(cos).all() and cos.abs().max() <= 1
        want = scores(*truth[name])
        got = {"proj": -dots / truth[name][2], "cos": cos}
        base = scores(*brute[name])
        for method in ("proj", "cos"):
            e_fast, e_brute = max_err(got[method], want[method]), max_err(base[method], want[method])
            scale = float(want[method].abs().max())
            bound = FACTOR * e_brute + 1e-3 * scale
            report.append(f"{name} {method}: fast {e_fast:.2e} brute {e_brute:.2e} (scale {scale:.2e})")
            if e_fast > bound:
                failures.append(report[-1])
            if regime == "realistic":
                rank, rank_brute = spearman(got[method], want[method]), spearman(base[method], want[method])
                report[-1] += f", Spearman fast {rank:.3f} brute {rank_brute:.3f}"
                if rank < 0.9 or rank < rank_brute - 0.03:  # 0.03: ~10 swaps of neighbours among 16
                    failures.append(report[-1])
    print("\n".join(report))
    assert not failures, "bf16 autocast scores too far from the float64 oracle:\n" + "\n".join(failures)


def test_cosines_are_clamped_to_the_unit_interval():
    dots = torch.tensor([-3.0, 3.0, 1.0, 0.0])
    gnorms = torch.tensor([1.0, 1.0, 2.0, 0.0])  # |<g, T>| > |g| |T| in the first two: rounding, never geometry
    cos = mimic_scores(dots, 2.0, "cos", gnorms)
    assert torch.equal(cos, torch.tensor([1.0, -1.0, -0.25, 0.0]))
    assert torch.equal(mimic_scores(dots, 2.0, "proj"), torch.tensor([1.5, -1.5, -0.5, 0.0]))


@pytest.mark.parametrize("seq", [False, True])
def test_bf16_sites_give_float32_statistics(seq):
    """Under autocast a classifier head's inputs and gradients are bf16: its norms and tangents are formed in float32."""
    g = torch.Generator().manual_seed(0)
    lead = (6, 5) if seq else (6,)
    x = torch.randn(*lead, 8, generator=g).bfloat16()
    d = torch.randn(*lead, 3, generator=g).bfloat16()
    t = 1e-3 * torch.randn(3, 8, generator=g)
    site = LinearSite("w", x, torch.zeros(*lead, 3, dtype=torch.bfloat16), "linear")
    x64, d64 = x.double(), d.double()
    if seq:  # |sum_s d_s x_s^T|^2, the per-sample gradient materialised
        want = torch.einsum("bso,bsi->boi", d64, x64).pow(2).sum((1, 2))
    else:
        want = x64.pow(2).sum(-1) * d64.pow(2).sum(-1)
    for gram in ([True, False] if seq else [None]):
        sq = site.ghost_sqnorms(d, gram=gram)
        assert sq.dtype == torch.float32 and torch.allclose(sq.double(), want, rtol=1e-5)
    dz = site.tangent(t)
    assert dz.dtype == torch.float32 and torch.allclose(dz.double(), x64 @ t.double().T, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("spread", [0.01, 1.0, 3.0])
def test_contrastive_cross_entropy_matches_float64_cross_entropy(spread):
    from gradmimic.clip_loss import _contrastive_ce

    g = torch.Generator().manual_seed(3)
    logits = 100 * spread * torch.randn(16, 48, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 48, (16,), generator=g)
    logits[:8, :].clamp_(max=0)
    logits[torch.arange(4), labels[:4]] = 100.0  # fit rows: losses ~1e-40 .. 1e-3
    want = F.cross_entropy(logits, labels, reduction="none")
    got = _contrastive_ce(logits.float().requires_grad_(), labels)
    assert torch.isfinite(got).all()
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-30), (got, want)  # small losses: relative
    x = logits.clone().requires_grad_()
    (gx,) = torch.autograd.grad(_contrastive_ce(x, labels).sum(), x)
    (gw,) = torch.autograd.grad(F.cross_entropy(x, labels, reduction="sum"), x)
    assert torch.allclose(gx, gw, rtol=1e-9, atol=1e-12)
