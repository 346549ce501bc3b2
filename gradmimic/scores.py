"""Mimic scores and batch weights (Huang et al., arXiv 2501.06708, Sec. 3).

For sample i with per-sample gradient ``g_i`` of the mimic parameter(s) and task vector ``T = W_ref - W_t``:

- ``proj``:  ``<-g_i, T> / |T|``, the length of the negative gradient's projection on the task vector;
- ``cos``:   ``<-g_i, T> / (|g_i| |T|)``;
- ``normed_proj`` / ``normed_cos``: the same score, turned into batch weights by a softmax over the (global)
  batch of ``score / temperature``.

Everything here works from the per-sample inner products ``dots_B = <g_i, T>`` (note: of the gradient, not the
negative gradient), the norms ``|g_i|`` and ``|T|``; how those are obtained exactly and cheaply lives elsewhere.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

METHODS = ("proj", "cos", "normed_proj", "normed_cos")

# A gather takes this rank's 1-D tensor and returns the concatenation over ranks, in rank order.
Gather = Callable[[torch.Tensor], torch.Tensor]

_EPS = 1e-12


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"unknown mimic method {method!r}; expected one of {', '.join(METHODS)}")
    return method


def needs_grad_norms(method: str) -> bool:
    """Whether ``method`` needs the per-sample gradient norms (the cosine variants do)."""
    return check_method(method).endswith("cos")


def is_normed(method: str) -> bool:
    return check_method(method).startswith("normed_")


def mimic_scores(
    dots_B: torch.Tensor,
    tnorm: torch.Tensor | float,
    method: str,
    gnorms_B: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Raw score of each sample: ``proj`` or ``cos`` of ``-g_i`` against ``T`` (``normed_*`` use the same raw score).

    A zero task vector (the model sits on the reference) or a zero gradient gives a score of 0, not NaN.
    Scores are computed in at least float32, whatever the training precision; cosines lie in ``[-1, 1]``.
    """
    check_method(method)
    dots_B = dots_B.to(torch.promote_types(dots_B.dtype, torch.float32))
    tnorm = torch.as_tensor(tnorm, dtype=dots_B.dtype, device=dots_B.device)
    proj_B = -dots_B / tnorm.clamp_min(_EPS)
    if not needs_grad_norms(method):
        return proj_B
    if gnorms_B is None:
        raise ValueError(f"method {method!r} needs per-sample gradient norms (gnorms_B)")
    if gnorms_B.shape != dots_B.shape:
        raise ValueError(f"gnorms_B has shape {tuple(gnorms_B.shape)} but dots_B has {tuple(dots_B.shape)}")
    # |<g, T>| <= |g| |T| holds exactly; dots and norms come from different computations, so clamp their rounding
    return (proj_B / gnorms_B.to(dots_B.dtype).clamp_min(_EPS)).clamp(-1.0, 1.0)


def global_softmax(
    scores_B: torch.Tensor,
    temperature: float,
    gather: Optional[Gather] = None,
    rank: int = 0,
    sizes: Optional[list[int]] = None,
) -> torch.Tensor:
    """Softmax of ``scores / temperature`` over the global batch, returned for this rank's samples.

    ``gather`` concatenates every rank's scores in rank order (ranks may hold different batch sizes);
    without it the local batch is the global batch.  The weights of all ranks sum to 1.  ``sizes`` (from
    :func:`rank_sizes`) saves a collective when the caller already has them.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if scores_B.dim() != 1:
        raise ValueError(f"scores must be 1-D (one per sample), got shape {tuple(scores_B.shape)}")
    local = scores_B.detach()
    if gather is None:
        return torch.softmax(local / temperature, dim=0)
    sizes = sizes if sizes is not None else rank_sizes(local, gather)
    full = gather(local)
    if full.numel() != sum(sizes) or not 0 <= rank < len(sizes):
        raise ValueError(f"gather returned {full.numel()} scores for per-rank sizes {sizes} (rank {rank})")
    start = sum(sizes[:rank])
    mine = full[start : start + local.numel()]
    if mine.shape != local.shape or not torch.allclose(mine, local, rtol=0, atol=0, equal_nan=True):  # NaN == NaN here
        raise ValueError(f"rank={rank} does not match this process's place in the gather order")
    return torch.softmax(full / temperature, dim=0)[start : start + local.numel()]


def batch_weights(
    scores_B: torch.Tensor,
    method: str,
    temperature: float,
    gather: Optional[Gather] = None,
    rank: int = 0,
    sizes: Optional[list[int]] = None,
) -> torch.Tensor:
    """Weights ``w_i`` (summing to 1 over the global batch) that replace the mean ``1/B``.

    ``normed_*`` methods reweight with the softmax; the raw ``proj`` / ``cos`` methods only observe, so their
    weights stay uniform and training is unchanged (useful to log scores for offline filtering).
    """
    if is_normed(method):
        return global_softmax(scores_B, temperature, gather, rank, sizes)
    total = sum(sizes) if sizes is not None else global_count(scores_B, gather)
    return torch.full_like(scores_B.detach(), 1.0 / total)


def rank_sizes(local_B: torch.Tensor, gather: Optional[Gather] = None) -> list[int]:
    """Every rank's batch size, in rank order (``[B]`` without a gather); its length is the world size."""
    n = local_B.shape[0]
    if gather is None:
        return [n]
    return gather(torch.tensor([float(n)], dtype=torch.float64, device=local_B.device)).long().tolist()


def global_count(local_B: torch.Tensor, gather: Optional[Gather] = None) -> int:
    """Number of samples in the global batch (this rank's ``B`` without a gather)."""
    return sum(rank_sizes(local_B, gather))
