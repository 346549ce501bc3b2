"""One training step of a worker: its rank's share of a global batch, forward, weighting, backward and update.

The :class:`Worker` holds one rank's model (DDP-wrapped), optimiser and :class:`gradmimic.GradMimic` weightings as
its job's mode (:data:`~pipelines.training.config.MODES`) asks: the rule's, and the warm-up rule's for the first
``mimic.warmup_steps``; the reference model for reference losses (rho), the comparison direction (agra,
influence).  For CLIP the embeddings of every rank are gathered with gradient so each rank's per-sample InfoNCE is
over the global batch; the one backward leaves the reweighted gradient, which DDP averages into the single-process
update.  A step with a non-finite loss, score, weight or gradient on any rank is skipped on every rank.
"""

from __future__ import annotations

import functools
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from gradmimic import ClipSites, GradMimic, Weighting, capture_linear_sites, clip_per_sample_loss
from pipelines.formats import skipped
from pipelines.models.build import apply_trainable, load_weights, train_mode
from pipelines.run import failpoints
from pipelines.training.batches import autocast, to_images
from pipelines.training.config import Job
from pipelines.training.data import grouped
from pipelines.training.dist import Comm, maybe_ddp
from pipelines.training.evaluation import decodable, heldout
from pipelines.training.optim import make_optimizer


def prepare_model(job: Job, device: torch.device) -> torch.nn.Module:
    """Build, load the initial weights, re-initialise the chosen parameters, freeze, move to the device."""
    import ray

    model = job.model.build(seed=job.cfg.seed)
    if job.init is not None:
        load_weights(model, ray.get(job.init))
    if job.reinit:
        fresh = dict(job.model.build(seed=job.cfg.seed + 7919).named_parameters())
        load_weights(model, {n: fresh[n].detach() for n in job.reinit})
    apply_trainable(model, job.cfg.trainable, job.cfg.freeze)
    return train_mode(model.to(device))


class Worker:
    """One rank's model, optimiser, weightings and training state (what a checkpoint saves)."""

    def __init__(self, job: Job, comm: Comm, device: torch.device) -> None:
        self.job, self.comm, self.device = job, comm, device
        self.model = prepare_model(job, device)
        self.clip = job.cfg.task == "clip"
        module = ClipSites(self.model) if self.clip else self.model
        self.net = maybe_ddp(module, comm, device)
        self.opt, self.sched = make_optimizer(self.model, job.cfg.optimizer, job.plan.total_steps)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]  # fixed once the model is prepared
        self.mimic = self.warm = None
        self.ref_model = None
        if job.mode.scored:
            self.mimic, self.warm = self._weightings()
        self.step = 0
        self.inject_nan = failpoints.flag_hook("nonfinite:step")  # None unless a test armed a non-finite step
        self.samples = 0
        self.nonfinite = 0  # steps skipped for a non-finite value (checkpointed)
        self.train_seconds = 0.0
        self.history: List[Dict[str, Any]] = []
        self.comparison: List[Dict[str, np.ndarray]] = []
        self.direction: Optional[Dict[str, torch.Tensor]] = None  # agra / influence: the comparison direction
        self.direction_step: Optional[int] = None  # and the step it was computed at (both are checkpointed)

    def _weightings(self) -> Tuple[GradMimic, GradMimic]:
        """The mode's weighting and its warm-up weighting (the same scores, raw methods only observe: the plain
        mean's weights), with the reference the mode loads."""
        import ray

        job, mode, mimic = self.job, self.job.mode, self.job.cfg.mimic
        reference = None
        if job.reference is not None:
            tensors = ray.get(job.reference)
            if mode.full_reference:
                self.ref_model = job.model.build(seed=job.cfg.seed)
                load_weights(self.ref_model, tensors)
                self.ref_model.to(self.device).eval().requires_grad_(False)
            if mode.reference == "params":
                reference = {n: tensors[n] for n in job.params}
        weighting = Weighting(mode.rule, mimic.method, mimic.temperature)
        warm = Weighting(mode.warmup_rule, mimic.method.replace("normed_", ""), mimic.temperature)
        make = lambda w: GradMimic(self.model, list(job.params), reference=reference, weighting=w,  # noqa: E731
                                   reweight=mimic.reweight)
        return make(weighting), make(warm)

    def autocast(self):
        return autocast(self.job.precision, self.device)

    # -------------------------------------------------------------------------------------------- one step

    def forward(self, batch: Dict[str, np.ndarray], sizes: Optional[List[int]] = None, net=None):
        """``(loss_B, sites, sqnorms_fn, sizes)``: this rank's per-sample losses over the global batch whose ranks'
        shares are ``sizes`` (:meth:`share`), or over ``batch`` alone without ``sizes``."""
        net = net or self.net
        images = to_images(batch, self.job.model, self.device)
        gather = sizes is not None
        sizes = sizes if gather else [len(images)]
        if len(images) != sizes[self.comm.rank if gather else 0]:
            raise RuntimeError(f"rank {self.comm.rank} got {len(images)} samples, its share is {sizes[self.comm.rank]}")
        with self.autocast():
            if self.clip:
                tokens = torch.from_numpy(batch["tokens"]).to(self.device)
                cb = net(images, tokens)
                if gather and self.comm.distributed:
                    cb = cb.gathered(lambda t: self.comm.gather_rows(t, sizes), self.comm.offset(sizes))
                return cb.loss(), cb.sites, cb.sqnorms_fn(self.job.params), sizes
            labels = torch.from_numpy(batch["label"]).to(self.device)
            with capture_linear_sites(self.model, self.job.params) as sites:
                logits = net(images)
            return F.cross_entropy(logits.float(), labels, reduction="none"), dict(sites), None, sizes

    def share(self, batch: Dict[str, np.ndarray]) -> Tuple[Dict[str, np.ndarray], Dict[str, np.ndarray], List[int]]:
        """``(rows, skipped, sizes)``: this rank's decodable rows of a step, the rows it skips (uid halves and
        ``reason``) and every rank's count of decodable rows, exchanged (one tiny all-gather).  With nothing to skip
        ``rows`` is ``batch`` and ``sizes`` the plan's.  A step where some rank has no decodable row is skipped on
        every rank (its forward would have nothing to run on): all of its rows are skipped, ``empty_share`` for the
        decodable ones."""
        n = len(batch["uid_lo"])
        if n != self.job.plan.local_sizes[self.comm.rank]:
            raise RuntimeError(f"rank {self.comm.rank} got {n} samples, its share is "
                               f"{self.job.plan.local_sizes[self.comm.rank]}")
        reason = batch["reason"]
        ok = reason == skipped.OK
        sizes = self.comm.sizes(int(ok.sum()), self.device)
        if min(sizes) == 0:
            reason = np.where(ok, np.uint8(skipped.EMPTY_SHARE), reason)
            ok[:] = False
        bad = {"uid_hi": batch["uid_hi"][~ok], "uid_lo": batch["uid_lo"][~ok], "reason": reason[~ok]}
        return (batch if ok.all() else {k: v[ok] for k, v in batch.items()}), bad, sizes

    def reference_losses(self, batch: Dict[str, np.ndarray], sizes: List[int]) -> torch.Tensor:
        """The rho rule's reference losses for this rank's samples (over the global batch for CLIP)."""
        images = to_images(batch, self.job.model, self.device)
        with torch.no_grad(), self.autocast():
            if not self.clip:
                labels = torch.from_numpy(batch["label"]).to(self.device)
                return F.cross_entropy(self.ref_model(images).float(), labels, reduction="none")
            tokens = torch.from_numpy(batch["tokens"]).to(self.device)
            img = self.comm.gather_rows(self.ref_model.encode_image(images), sizes)
            txt = self.comm.gather_rows(self.ref_model.encode_text(tokens), sizes)
            rows = slice(self.comm.offset(sizes), self.comm.offset(sizes) + len(images))
            return clip_per_sample_loss(img.float(), txt.float(), self.ref_model.logit_scale.exp(), rows)

    def comparison_direction(self) -> Dict[str, torch.Tensor]:
        """Minus the mean gradient of the mimic parameters over the comparison set (the same on every rank)."""
        module = ClipSites(self.model) if self.clip else self.model
        total: Dict[str, torch.Tensor] = {}
        count = 0
        for batch in self.comparison:
            batch = decodable(batch)
            if not len(batch["uid_lo"]):
                continue
            loss, sites, _, _ = self.forward(batch, net=module)
            grads = torch.autograd.grad(loss.sum(), [sites[n].outputs for n in self.job.params])
            for name, g in zip(self.job.params, grads):
                pg = sites[name].param_grad(g).float()
                total[name] = total.get(name, 0) + pg
            count += len(loss)
        return {n: (-g / count).to(self.model.get_parameter(n).dtype) for n, g in total.items()}

    def set_direction(self, direction: Dict[str, torch.Tensor], step: int) -> None:
        self.direction, self.direction_step = direction, step
        self.mimic.set_direction(direction)
        self.warm.set_direction(direction)

    def train_step(self, batch: Dict[str, np.ndarray], step: int, sizes: List[int]) -> Dict[str, Any]:
        """One step on this rank's decodable rows, every rank's share ``sizes`` (:meth:`share`); ``finite`` is False
        (on every rank alike) when it was skipped for a non-finite loss, score, weight or gradient on any rank: no
        update, and the caller logs no score rows for it.  A step some rank has no rows of does nothing."""
        self.opt.zero_grad(set_to_none=True)
        if min(sizes) == 0:
            empty = np.zeros(0, np.float32)
            stats = dict(loss=float("nan"), weight_entropy=float("nan"), lr=self.opt.param_groups[0]["lr"],
                         batch_size=0)
            return {"stats": stats, "scores": empty, "weights": empty, "losses": empty, "finite": True}
        loss_B, sites, sqnorms, sizes = self.forward(batch, sizes)
        if self.inject_nan is not None and self.inject_nan(step):
            loss_B = loss_B * float("nan")
        global_b = sum(sizes)
        if self.mimic is None:
            (self.comm.world * loss_B.sum() / global_b).backward()
            scores = torch.zeros_like(loss_B.detach())
            weights = torch.full_like(scores, 1.0 / global_b)
            stats: Dict[str, Any] = {}
        else:
            scores, weights, stats = self.weighted_backward(batch, loss_B, sites, sqnorms, sizes)
        finite = self.clip_and_agree(loss_B, scores, weights)
        lr = self.opt.param_groups[0]["lr"]
        if not finite:
            self.opt.zero_grad(set_to_none=True)
            nan = float("nan")
            stats.update(loss=nan, weight_entropy=nan, lr=lr, batch_size=global_b)
            return {"stats": stats, "finite": False}
        self.opt.step()
        self.sched.step()
        w = weights.double()
        sums = self.comm.all_sum(torch.stack([loss_B.detach().double().sum(), -(w * w.clamp_min(1e-300).log()).sum()]))
        stats.update(loss=float(sums[0]) / global_b, weight_entropy=float(sums[1]), lr=lr, batch_size=global_b)
        return {"stats": stats, "scores": scores.float().cpu().numpy(), "weights": weights.float().cpu().numpy(),
                "losses": loss_B.detach().float().cpu().numpy(), "finite": True}

    def weighted_backward(self, batch: Dict[str, np.ndarray], loss_B: torch.Tensor, sites, sqnorms,
                          sizes: List[int]) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, Any]]:
        """``(scores, weights, stats)`` from the mode's weighting (the warm-up one for the first steps), after the
        one backward of the reweighted loss."""
        job, mode = self.job, self.job.mode
        mimic = self.warm if self.step < job.cfg.mimic.warmup_steps else self.mimic
        if mode.comparison and (self.direction_step is None
                                or self.step - self.direction_step >= job.cfg.comparison.every):
            self.set_direction(self.comparison_direction(), self.step)
        ref_loss = self.reference_losses(batch, sizes) if mode.full_reference else None
        dist = {}
        if self.comm.distributed:
            dist = dict(gather=functools.partial(self.comm.gather_1d, sizes=sizes), all_sum=self.comm.all_sum)
        out = mimic.step(loss_B, sites, coupled=self.clip, sqnorms_fn=sqnorms, ref_loss_B=ref_loss,
                         rank=self.comm.rank, sizes=sizes, **dist)
        return out.scores, out.weights, {"direction_norm": out.direction_norm, "alignment": out.alignment}

    def clip_and_agree(self, loss_B: torch.Tensor, scores: torch.Tensor, weights: torch.Tensor) -> bool:
        """Clip the gradient norm (if asked) and agree over the ranks whether the step is finite: the norm is one
        reduction that is non-finite if any gradient entry is, and one exchange makes any rank's verdict all's."""
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, self.job.cfg.optimizer.grad_clip or float("inf"))
        ok = torch.isfinite(grad_norm.to(self.device))
        for t in (loss_B.detach(), scores, weights):
            ok = ok & torch.isfinite(t).all()
        bad = self.comm.all_sum((~ok).to(torch.float64).reshape(1))
        return not float(bad[0]) > 0

    # -------------------------------------------------------------------------------------------- evaluation

    def evaluate(self, chunks) -> Dict[str, float]:
        """Held-out loss (and accuracy where the pool has labels) over this rank's chunks, summed over ranks."""
        self.model.eval()
        zero_shot = self.job.zero_shot if self.clip else None
        held = heldout(self.model, self.job.model, grouped(chunks, "chunk"), self.device, zero_shot=zero_shot,
                       precision=self.job.precision)
        train_mode(self.model)
        sums = self.comm.all_sum(held.sums)
        out = {"test_loss": float(sums[0] / sums[2]) if sums[2] else float("nan"), "test_skipped": int(sums[3])}
        if held.labelled:
            out["test_accuracy"] = float(sums[1] / sums[2]) if sums[2] else float("nan")
        return out
