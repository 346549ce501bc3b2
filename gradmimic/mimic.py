"""One Grad-Mimic training step: exact per-sample scores, batch weights, and a single reweighted backward.

``GradMimic.step`` takes the per-sample loss vector ``l_B`` (un-normalised; the plain batch loss is its mean) and
the :class:`~gradmimic.linear_site.LinearSite` of each mimic parameter, and

1. computes ``dots_i = <grad l_i, D>`` for the direction ``D`` (the task vector ``T = W_ref - W_t`` for
   Grad-Mimic, a clean set's descent direction for influence, a comparison batch's for AGRA) and, where the rule
   needs them, ``|grad l_i|``, from gradients with respect to the sites' outputs only;
2. turns them into scores and weights ``w_B`` (summing to 1 over the global batch; see :mod:`gradmimic.weighting`);
3. runs one backward that leaves ``.grad`` = ``sum_i w_i grad l_i`` on the mimic parameters and the plain mean on
   every other parameter (``reweight="param"``), or the weighted sum on all of them (``reweight="all"``).

Decoupled losses (``l_i`` depends on sample ``i``'s outputs only: cross-entropy heads) need one gradient of
``sum(l)`` w.r.t. the outputs.  Coupled losses (CLIP's InfoNCE) get ``dots`` from a forward-mode product along
the direction (computed as a double vector-Jacobian product on the loss part of the graph), and norms from a
loss-specific Gram form (``sqnorms_fn``) or, for any coupled loss, from the ``B x B`` output Jacobian.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Mapping, Optional, Sequence

import torch
from torch import nn

from .linear_site import LinearSite, find_parameters
from .scores import Gather, rank_sizes
from .task_vector import Reference, global_norm, reference_tensors, task_vectors
from .weighting import Weighting

REWEIGHT = ("param", "all")


@dataclass
class StepResult:
    """Per-sample and per-step outputs of one step (all detached; per-sample tensors are this rank's)."""

    loss: torch.Tensor  # l_B
    scores: torch.Tensor  # the rule's raw score per sample
    weights: torch.Tensor  # w_B, summing to 1 over the global batch
    dots: Optional[torch.Tensor]  # <grad l_i, D>
    grad_norms: Optional[torch.Tensor]  # |grad l_i| over the mimic parameters
    direction_norm: Optional[float]  # |D| (|T| for Grad-Mimic)
    alignment: Optional[float]  # cos(D, mean negative gradient) over the global batch


def _flat_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).reshape(a.shape[0], -1).sum(1)


def jvp_dots(
    loss_B: torch.Tensor,
    sites: Sequence[LinearSite],
    tangents: Sequence[torch.Tensor],
    base: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``<grad_Z l_i, dZ>`` for every ``i``: the forward-mode product of the loss vector along ``dZ``.

    Computed as ``d/dv <grad_Z <base + v, l>, dZ>`` at ``v = 0`` on the loss part of the graph (two loss-sized
    passes, exact).  The first pass also yields ``grad_Z <base, l>``, returned for free (zeros without ``base``).
    """
    v = torch.zeros_like(loss_B, requires_grad=True)
    weights = v if base is None else base.detach() + v
    outs = [s.outputs for s in sites]
    grads = torch.autograd.grad(loss_B, outs, grad_outputs=weights, create_graph=True)
    total = sum((g * dz).sum() for g, dz in zip(grads, tangents))
    (dots,) = torch.autograd.grad(total, v, retain_graph=True)
    return dots, [g.detach() for g in grads]


def jacobian_sqnorms(loss_B: torch.Tensor, sites: Sequence[LinearSite]) -> torch.Tensor:
    """``|grad l_i|^2`` for any coupled loss from the output Jacobian (``b x B x out`` memory: small batches).

    The sites may hold a larger batch than ``loss_B`` (under DDP: the global batch, ``loss_B`` this rank's rows).
    """
    n = loss_B.shape[0]
    eye = torch.eye(n, dtype=loss_B.dtype, device=loss_B.device)
    jacs = torch.autograd.grad(loss_B, [s.outputs for s in sites], grad_outputs=eye, is_grads_batched=True,
                               retain_graph=True)
    total = torch.zeros(n, dtype=torch.float64, device=loss_B.device)
    for site, jac in zip(sites, jacs):
        m = site.batch_size
        x = site.inputs.double().reshape(m, -1, site.inputs.shape[-1])  # (B, S, in)
        j = jac.double().reshape(n, m, x.shape[1], -1)  # (i, B, S, out)
        k = torch.einsum("jsa,kta->jskt", x, x)
        total += torch.einsum("ijse,ikte,jskt->i", j, j, k)
    return total.to(loss_B.dtype)


class GradMimic:
    """Scores and reweights samples inside an ordinary PyTorch training loop.

    ``params``: names of the mimic parameters (default: the last projection / head).  ``reference``: a path
    (safetensors or weights-only checkpoint), a module or a state dict holding the same names; needed by the
    ``mimic`` rule, whose direction is ``T = W_ref - W_t`` recomputed from the live weights at every step.
    """

    def __init__(
        self,
        model: nn.Module,
        params: Sequence[str],
        reference: Optional[Reference] = None,
        weighting: Weighting = Weighting(),
        reweight: str = "param",
    ) -> None:
        if isinstance(params, str):
            params = [params]
        if not params:
            raise ValueError("at least one mimic parameter name is required")
        if reweight not in REWEIGHT:
            raise ValueError(f"reweight must be one of {REWEIGHT}, got {reweight!r}")
        self.model = model
        self.params: Dict[str, nn.Parameter] = find_parameters(model, params)
        for name, p in self.params.items():
            if p.dim() != 2:
                raise ValueError(f"mimic parameter {name!r} must be a 2-D weight used linearly, has shape {tuple(p.shape)}")
        self.weighting = weighting
        self.reweight = reweight
        self.reference = reference_tensors(reference, self.params) if reference is not None else None
        if weighting.rule == "mimic" and self.reference is None:
            raise ValueError("the mimic rule needs reference weights (reference=...)")
        self._direction: Optional[Dict[str, torch.Tensor]] = None

    def set_direction(self, direction: Mapping[str, torch.Tensor]) -> None:
        """Direction for the ``influence`` / ``agra`` rules: e.g. minus a clean set's mean gradient."""
        missing = set(self.params) - set(direction)
        if missing:
            raise KeyError(f"direction lacks {sorted(missing)}")
        for name, p in self.params.items():
            if tuple(direction[name].shape) != tuple(p.shape):
                raise ValueError(f"direction {name!r} has shape {tuple(direction[name].shape)}, parameter has {tuple(p.shape)}")
        self._direction = {n: direction[n].detach() for n in self.params}

    def direction(self) -> Optional[Dict[str, torch.Tensor]]:
        """This step's direction, on the parameters' current device (the model may have moved since)."""
        if self.weighting.rule == "mimic":
            self.reference = _follow(self.reference, self.params)
            return task_vectors(self.reference, self.params)
        if self.weighting.needs_direction:
            if self._direction is None:
                raise ValueError(f"rule {self.weighting.rule!r} needs set_direction(...) before step()")
            self._direction = _follow(self._direction, self.params)
            return self._direction
        return None

    def _sites(self, sites: Mapping[str, LinearSite]) -> list[LinearSite]:
        missing = [n for n in self.params if n not in sites]
        if missing:
            raise KeyError(f"no site recorded for mimic parameter(s) {missing}; got {sorted(sites)}")
        return [sites[n] for n in self.params]

    def step(
        self,
        loss_B: torch.Tensor,
        sites: Mapping[str, LinearSite],
        *,
        coupled: bool = False,
        sqnorms_fn: Optional[Callable[[], torch.Tensor]] = None,
        ref_loss_B: Optional[torch.Tensor] = None,
        gather: Optional[Gather] = None,
        rank: int = 0,
        backward: bool = True,
        sizes: Optional[list] = None,
        all_sum: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    ) -> StepResult:
        """Score this batch, weight it and (unless ``backward=False``) run the one backward.

        ``gather`` concatenates a 1-D tensor over ranks in rank order and ``rank`` is this process's place in
        it; with them, weights are normalised over the global batch and, for DDP (which averages gradients), the
        loss is scaled by the number of ranks so the update equals the single-process update on the global batch.
        Optional, to save collectives: ``sizes``, every rank's batch size when the caller has them already, and
        ``all_sum``, a sum over ranks (an all-reduce) for the ``alignment`` diagnostic instead of a gather.  With
        both, ``gather`` only ever receives per-sample vectors of this rank's batch, so it may rely on ``sizes``.
        """
        site_list = self._checked_sites(loss_B, sites, coupled)
        outs = [s.outputs for s in site_list]
        rule = self.weighting
        direction = self.direction()
        tangents = [s.tangent(direction[s.name]) for s in site_list] if direction is not None else None
        sizes = list(sizes) if sizes is not None else rank_sizes(loss_B, gather)
        if len(sizes) > 1 and gather is None:
            raise ValueError(f"sizes for {len(sizes)} ranks need a gather")
        uniform = torch.full_like(loss_B.detach(), 1.0 / sum(sizes))
        if backward and self.reweight == "param" and not any(p.requires_grad for p in self.params.values()):
            raise ValueError("the mimic parameters do not require grad, so reweight='param' would change nothing; "
                             "use reweight='all' or backward=False")
        grads_B, grads_u, dots, sq = self._per_sample(loss_B, site_list, tangents, uniform, coupled, sqnorms_fn)
        acc = torch.promote_types(loss_B.dtype, torch.float32)  # scores in at least float32, also under fp16
        gnorms = sq.to(acc).clamp_min(0).sqrt() if sq is not None else None
        dots = dots.to(acc) if dots is not None else None
        dnorm = global_norm(list(direction.values())).to(acc) if direction is not None else None
        scores, weights = rule.weigh(loss_B.detach().to(acc), dots=dots, dnorm=dnorm, gnorms=gnorms,
                                     ref_loss_B=ref_loss_B, gather=gather, rank=rank, sizes=sizes)

        def out_grads(w: torch.Tensor) -> Sequence[torch.Tensor]:
            # dL/dZ for L = sum_i w_i l_i; free for decoupled losses, one loss-sized pass otherwise
            if grads_B is not None:
                return [g * w.reshape(-1, *([1] * (g.dim() - 1))) for g in grads_B]
            return torch.autograd.grad((w * loss_B).sum(), outs, retain_graph=True)

        alignment = None
        if direction is not None:
            mean_g = [s.param_grad(g) for s, g in zip(site_list, grads_u or out_grads(uniform))]
            alignment = _alignment(mean_g, site_list, direction, gather, all_sum)
        if backward:
            self._backward(loss_B, site_list, weights, uniform, len(sizes), out_grads)
        return StepResult(
            loss=loss_B.detach(), scores=scores.detach(), weights=weights.detach(),
            dots=None if dots is None else dots.detach(), grad_norms=None if gnorms is None else gnorms.detach(),
            direction_norm=None if dnorm is None else float(dnorm), alignment=alignment,
        )

    def _checked_sites(self, loss_B: torch.Tensor, sites: Mapping[str, LinearSite], coupled: bool) -> list:
        if loss_B.dim() != 1:
            raise ValueError(f"loss_B must be the per-sample loss vector (B,), got shape {tuple(loss_B.shape)}")
        site_list = self._sites(sites)
        for s in site_list:
            # a coupled loss's sites may hold more samples than it scores (the global batch under DDP)
            if s.batch_size != loss_B.shape[0] and not (coupled and s.batch_size > loss_B.shape[0]):
                raise ValueError(f"site {s.name!r} has batch {s.batch_size} but loss_B has {loss_B.shape[0]}")
        return site_list

    def _per_sample(self, loss_B, site_list, tangents, uniform, coupled: bool, sqnorms_fn):
        """``(grads_B, grads_u, dots, sqnorms)``: the outputs' gradients of ``sum(l)`` (decoupled losses) or of
        the uniform mean (a by-product of the JVP for coupled ones), ``<grad l_i, D>`` and ``|grad l_i|^2`` as the
        rule needs them."""
        outs = [s.outputs for s in site_list]
        dots = sq = grads_B = grads_u = None
        if not coupled:
            grads_B = torch.autograd.grad(loss_B.sum(), outs, retain_graph=True)
            if tangents is not None:
                dots = sum(_flat_dot(g, t) for g, t in zip(grads_B, tangents))
            if self.weighting.needs_grad_norms:
                sq = sum(s.ghost_sqnorms(g) for s, g in zip(site_list, grads_B))
        else:
            if tangents is not None:
                dots, grads_u = jvp_dots(loss_B, site_list, tangents, base=uniform)
            if self.weighting.needs_grad_norms:
                sq = sqnorms_fn() if sqnorms_fn is not None else jacobian_sqnorms(loss_B, site_list)
        return grads_B, grads_u, dots, sq

    def _backward(self, loss_B, site_list, weights, uniform, world_size: int, out_grads) -> None:
        """The one backward: ``sum_i w_i grad l_i`` on the mimic parameters (on all of them with ``reweight="all"``),
        scaled by the ranks so that DDP's average is the single-process update on the global batch."""
        if self.reweight == "all":
            total = world_size * (weights * loss_B).sum()
        else:
            total = world_size * (uniform * loss_B).sum()
            delta = out_grads(weights - uniform)
            for s, g in zip(site_list, delta):
                # a linear term whose gradient moves P's grad from the mean to the weighted sum
                total = total + (self.params[s.name] * (world_size * s.param_grad(g)).detach()).sum()
        total.backward()


def _alignment(mean_g, site_list, direction, gather, all_sum) -> float:
    """cos(D, mean negative gradient) over the global batch."""
    if gather is not None:
        mean_g = [all_sum(m) if all_sum is not None else _all_sum(m, gather) for m in mean_g]
    num = -sum((m * direction[s.name]).sum() for s, m in zip(site_list, mean_g))
    den = global_norm(mean_g) * global_norm(list(direction.values()))
    return float(num / den) if den > 0 else 0.0


def _follow(tensors: Dict[str, torch.Tensor], params: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``tensors`` on each parameter's device and dtype (a no-op once they are there)."""
    return {n: t.to(device=params[n].device, dtype=params[n].dtype) for n, t in tensors.items()}


def _all_sum(t: torch.Tensor, gather: Gather) -> torch.Tensor:
    flat = gather(t.reshape(-1))
    return flat.reshape(-1, t.numel()).sum(0).reshape(t.shape)
