"""CLIP under data parallelism: each rank scores its own rows of the *global* batch and the update adds up.

Ranks are threads of one process here, with a barrier-based ``gather``: each holds its own copy of the model and
the whole batch's embeddings (what :meth:`ClipBatch.gathered` gives a DDP rank), and scores only its rows.  The
test checks the contract the DDP stage relies on: every rank's scores and weights equal the single-process ones on
the global batch, and the ranks' gradients, averaged as DDP does, equal the single-process gradient.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch

from gradmimic import GradMimic, Weighting, clip_per_sample_loss
from gradmimic.clip_loss import projection_sqnorms

from .test_exact import TinyClip, close, perturbed

SIZES = (4, 3)  # unequal local batches
NAMES = ("proj", "text_projection.weight")


pytestmark = pytest.mark.usefixtures("float64")


class ThreadGather:
    """``gather(t)``: every rank's 1-D tensor, concatenated in rank order (threads meet at a barrier)."""

    def __init__(self, world: int) -> None:
        self.slots = [None] * world
        self.barrier = threading.Barrier(world, timeout=30)

    def for_rank(self, rank: int):
        def gather(t: torch.Tensor) -> torch.Tensor:
            self.slots[rank] = t.detach().clone()
            self.barrier.wait()
            out = torch.cat(self.slots)
            self.barrier.wait()  # nobody overwrites a slot before everyone has read
            return out

        return gather


def clip_step(model, img, txt, ref, method, reweight, rows=None, norms="gram", **dist):
    sites = model.sites(img, txt)
    scale = model.logit_scale.exp()
    loss = clip_per_sample_loss(sites["proj"].outputs, sites["text_projection.weight"].outputs, scale, rows)
    i, t = sites["proj"], sites["text_projection.weight"]

    def gram():
        return (projection_sqnorms(i.inputs, i.outputs.detach(), t.outputs.detach(), scale.detach(), rows)
                + projection_sqnorms(t.inputs, t.outputs.detach(), i.outputs.detach(), scale.detach(), rows))

    mimic = GradMimic(model, list(NAMES), reference=ref, weighting=Weighting("mimic", method, 0.6), reweight=reweight)
    model.zero_grad()
    out = mimic.step(loss, sites, coupled=True, sqnorms_fn=gram if norms == "gram" else None, **dist)
    return out, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("method", ["normed_proj", "normed_cos"])
@pytest.mark.parametrize("reweight", ["param", "all"])
@pytest.mark.parametrize("norms", ["gram", "jacobian"])
@pytest.mark.parametrize("given", [False, True])  # the caller passes sizes and an all_sum (fewer collectives)
def test_ranks_score_their_rows_of_the_global_batch(method, reweight, norms, given):
    torch.manual_seed(0)
    model = TinyClip()
    ref = perturbed(model)
    n = sum(SIZES)
    img, txt = torch.randn(n, 6), torch.randn(n, 5)
    single, grads = clip_step(model, img, txt, ref, method, reweight, norms=norms)

    group = ThreadGather(len(SIZES))
    results, errors = [None] * len(SIZES), []

    def rank_main(rank: int) -> None:
        try:
            start = sum(SIZES[:rank])
            rows = slice(start, start + SIZES[rank])
            gather = group.for_rank(rank)
            extra = {}
            if given:
                def all_sum(t):
                    return gather(t.reshape(-1)).reshape(len(SIZES), -1).sum(0).reshape(t.shape)

                extra = dict(sizes=list(SIZES), all_sum=all_sum)
            results[rank] = clip_step(copy.deepcopy(model), img, txt, ref, method, reweight, rows, norms,
                                      gather=gather, rank=rank, **extra)
        except Exception as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)
            group.barrier.abort()

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(len(SIZES))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    assert not errors, errors
    close(torch.cat([r[0].scores for r in results]), single.scores)
    close(torch.cat([r[0].weights for r in results]), single.weights)
    assert abs(sum(float(r[0].weights.sum()) for r in results) - 1) < 1e-12
    for out, _ in results:
        close(out.alignment, single.alignment)
    for name, g in grads.items():  # DDP averages the ranks' gradients
        close(sum(r[1][name] for r in results) / len(SIZES), g)
    # and the weighting did something: the projection's gradient is not the plain mean
    model.zero_grad()
    clip_per_sample_loss(*[s.outputs for s in model.sites(img, txt).values()], model.logit_scale.exp()).mean().backward()
    assert not torch.allclose(model.proj.grad, grads["proj"], rtol=1e-3)


def test_rows_are_slices_of_the_whole_batch():
    torch.manual_seed(1)
    x, h, o = torch.randn(7, 5), torch.randn(7, 3), torch.randn(7, 3)
    full = clip_per_sample_loss(h, o, 2.0)
    close(clip_per_sample_loss(h, o, 2.0, slice(2, 6)), full[2:6])
    close(projection_sqnorms(x, h, o, 2.0, slice(2, 6)), projection_sqnorms(x, h, o, 2.0)[2:6])


def test_sizes_of_many_ranks_need_a_gather():
    torch.manual_seed(0)
    model = TinyClip()
    with pytest.raises(ValueError, match="sizes for 2 ranks need a gather"):
        clip_step(model, torch.randn(4, 6), torch.randn(4, 5), perturbed(model), "normed_proj", "param",
                  slice(0, 2), sizes=[2, 2])
