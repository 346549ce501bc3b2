"""The gather that carries CLIP's gradients across ranks, under real DDP: raw ``.grad`` against one process.

Two spawned processes (gloo, float64) each hold an unequal share (3 and 5 samples) of one global batch of 8 and run
the train loop's step as :class:`pipelines.training.step.Worker` does: ``ClipSites`` wrapped by ``maybe_ddp``, the
forward's ``ClipBatch`` gathered with :meth:`Comm.gather_rows`, then either the plain loss scaled as ``train_step``
scales it (``world * sum(l) / B``) or ``GradMimic.step`` with the loop's ``gather`` / ``all_sum`` / ``sizes``.  Every
parameter's ``.grad`` after DDP's averaging, before any optimiser (AdamW and clipping would hide a constant factor),
must equal a single process's gradient on the global batch:

- plain: the mean of open_clip's own symmetric InfoNCE (``ClipLoss`` on the model's own forward);
- mimic (``normed_proj``, ``reweight="param"``, both projections): per-sample gradients of the projections by brute
  force (one ``autograd.grad`` per sample), scores ``<-g_i, T>/|T|``, weights their softmax over the global batch,
  the projections' gradient ``sum_i w_i g_i`` and every other parameter's the plain mean.

A gradient lost in the gather's backward (no all-reduce: a rank sees only its own samples' losses), or one off by
the number of ranks, changes every tower parameter's gradient by far more than the tolerance.
"""

from __future__ import annotations

import datetime
import os
import traceback

import pytest
import torch

# two spawned ranks each import torch and open_clip: some 15 s on two idle cores, minutes on a loaded machine
pytestmark = pytest.mark.slow

SIZES = [3, 5]  # unequal shares of the global batch of 8
WORLD = len(SIZES)
MIMIC = ["visual.proj", "text_projection"]  # both projections: both gathered sites carry a reweighted gradient
TEMPERATURE = 1.0  # the loop's default; the weights still span orders of magnitude
CONFIG = dict(  # an open_clip ViT CLIP, smaller than tiny-clip (whose 49408-token vocabulary is dead weight here)
    embed_dim=8,
    vision_cfg=dict(image_size=16, patch_size=8, width=16, layers=1, head_width=8),
    text_cfg=dict(context_length=8, vocab_size=40, width=16, heads=2, layers=1),
)
TIMEOUT_S = 240


def make_problem():
    """The model (float64, random init), the global batch and the mimic reference: the same in every process."""
    import open_clip

    torch.manual_seed(0)
    model = open_clip.CLIP(**CONFIG).double().train()
    n = sum(SIZES)
    images = torch.randn(n, 3, 16, 16, dtype=torch.float64)
    tokens = torch.randint(1, CONFIG["text_cfg"]["vocab_size"], (n, CONFIG["text_cfg"]["context_length"]))
    params = dict(model.named_parameters())
    reference = {k: params[k].detach() + 0.5 * torch.randn_like(params[k]) for k in MIMIC}
    return model, images, tokens, reference


def grads_of(model) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


# ------------------------------------------------------------------------------------------------ the ranks


def rank_step(model, images, tokens, comm, reference, mode):
    """One step of the training loop on this rank's share: ``Worker.forward`` then ``Worker.train_step``'s backward."""
    import functools

    from gradmimic import ClipSites, GradMimic, Weighting
    from pipelines.training.dist import maybe_ddp

    net = maybe_ddp(ClipSites(model), comm, torch.device("cpu"))
    assert isinstance(net, torch.nn.parallel.DistributedDataParallel)
    mimic = None
    if mode == "mimic":
        mimic = GradMimic(model, MIMIC, reference=reference, weighting=Weighting("mimic", "normed_proj", TEMPERATURE),
                          reweight="param")
    sizes = list(SIZES)  # every rank's share (Worker.share exchanges them once per step)
    start = comm.offset(sizes)
    mine = slice(start, start + sizes[comm.rank])
    model.zero_grad(set_to_none=True)
    cb = net(images[mine], tokens[mine])
    cb = cb.gathered(lambda t: comm.gather_rows(t, sizes), comm.offset(sizes))
    loss_B = cb.loss()
    global_b = sum(sizes)
    if mimic is None:
        (comm.world * loss_B.sum() / global_b).backward()
        weights = torch.full_like(loss_B.detach(), 1.0 / global_b)
    else:
        out = mimic.step(loss_B, cb.sites, coupled=True, sqnorms_fn=cb.sqnorms_fn(MIMIC), rank=comm.rank,
                         sizes=sizes, gather=functools.partial(comm.gather_1d, sizes=sizes), all_sum=comm.all_sum)
        weights = out.weights
    return {"grads": grads_of(model), "weights": weights.detach().clone(), "loss": loss_B.detach().clone()}


def worker(rank: int, init_method: str, out_dir: str) -> None:
    """A rank's process: plain then mimic, each from the same initial weights; results (or the error) to files."""
    try:
        import torch.distributed as dist

        torch.set_num_threads(1)
        # a collective whose peer died raises instead of waiting out gloo's 30-minute default
        dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=WORLD,
                                timeout=datetime.timedelta(seconds=TIMEOUT_S))
        try:
            from pipelines.training.dist import Comm

            comm = Comm(WORLD, rank, dist.new_group())
            results = {}
            for mode in ("plain", "mimic"):
                model, images, tokens, reference = make_problem()
                results[mode] = rank_step(model, images, tokens, comm, reference, mode)
            torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        finally:
            dist.destroy_process_group()
    except BaseException:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise


def run_ranks(out_dir, target=worker) -> list:
    """Spawn the ranks, wait (bounded) and load what each saved; a hung or failed rank fails the test."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    init = f"file://{os.path.join(out_dir, 'rendezvous')}"
    procs = [ctx.Process(target=target, args=(r, init, str(out_dir)), daemon=True) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(TIMEOUT_S)
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for r in hung:
        procs[r].kill()
        procs[r].join(10)
    errors = {r: open(os.path.join(out_dir, f"rank{r}.err")).read()
              for r in range(WORLD) if os.path.exists(os.path.join(out_dir, f"rank{r}.err"))}
    assert not hung, f"ranks {hung} did not finish within {TIMEOUT_S} s; errors: {errors}"
    assert not errors and all(p.exitcode == 0 for p in procs), (errors, [p.exitcode for p in procs])
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=True) for r in range(WORLD)]


# ------------------------------------------------------------------------------------------------ one process


def oracle_plain():
    """Mean symmetric InfoNCE of open_clip's own forward and loss over the global batch: grads and per-sample losses."""
    from open_clip.loss import ClipLoss

    from gradmimic import clip_per_sample_loss

    model, images, tokens, _ = make_problem()
    out = model(images, tokens)
    img, txt, scale = (out["image_features"], out["text_features"], out["logit_scale"]) if isinstance(out, dict) \
        else out[:3]
    ClipLoss()(img, txt, scale).backward()
    return grads_of(model), clip_per_sample_loss(img.detach(), txt.detach(), scale.detach())


def oracle_mimic():
    """Brute force on the global batch: per-sample projection gradients, normed_proj weights, the reweighted grads."""
    from gradmimic import clip_per_sample_loss

    model, images, tokens, reference = make_problem()
    params = dict(model.named_parameters())
    img, txt = model.encode_image(images), model.encode_text(tokens)
    loss_B = clip_per_sample_loss(img, txt, model.logit_scale.exp())
    n = loss_B.shape[0]
    task = [reference[k] - params[k].detach() for k in MIMIC]
    t_norm = torch.sqrt(sum((t * t).sum() for t in task))
    scores = torch.stack([
        -sum((g * t).sum() for g, t in zip(torch.autograd.grad(loss_B[i], [params[k] for k in MIMIC],
                                                               retain_graph=True), task)) / t_norm
        for i in range(n)])
    weights = torch.softmax(scores / TEMPERATURE, dim=0)
    names = list(params)
    mean = dict(zip(names, torch.autograd.grad(loss_B.mean(), list(params.values()), retain_graph=True)))
    weighted = torch.autograd.grad((weights * loss_B).sum(), [params[k] for k in MIMIC])
    return {**mean, **dict(zip(MIMIC, weighted))}, weights, mean


# ------------------------------------------------------------------------------------------------ the tests


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_ranks(str(tmp_path_factory.mktemp("ddp")))


def assert_same_grads(rank_grads: dict, expected: dict, rank: int, mode: str) -> None:
    assert set(rank_grads) == set(expected)
    for name, g in expected.items():
        got = rank_grads[name]
        assert got is not None and got.dtype == torch.float64, (mode, rank, name)
        scale = float(g.abs().max())
        assert scale > 0, f"{name}: zero oracle gradient, the comparison would prove nothing"
        torch.testing.assert_close(got, g, rtol=1e-10, atol=1e-12 * scale,
                                   msg=lambda m: f"{mode}, rank {rank}, {name}: {m}")


def test_plain_grads_equal_one_process_on_the_global_batch(ranks):
    grads, loss_B = oracle_plain()
    torch.testing.assert_close(torch.cat([r["plain"]["loss"] for r in ranks]), loss_B, rtol=1e-12, atol=0)
    for rank, r in enumerate(ranks):  # DDP leaves the same averaged gradient on every rank
        assert_same_grads(r["plain"]["grads"], grads, rank, "plain")


def test_mimic_grads_equal_one_process_on_the_global_batch(ranks):
    grads, weights, mean = oracle_mimic()
    got = torch.cat([r["mimic"]["weights"] for r in ranks])
    torch.testing.assert_close(got, weights, rtol=1e-10, atol=0)
    assert float(weights.max() / weights.min()) > 2  # the weighting is far from uniform ...
    for name in MIMIC:  # ... and moves the projections' gradients away from the plain mean
        assert not torch.allclose(grads[name], mean[name], rtol=1e-2)
    for rank, r in enumerate(ranks):
        assert_same_grads(r["mimic"]["grads"], grads, rank, "mimic")
