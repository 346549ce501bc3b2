"""CLIP's symmetric InfoNCE as a per-sample loss vector, and exact per-sample gradient norms of its projections.

``l_i = (row_i + col_i) / 2`` where ``row_i`` is the cross-entropy of image ``i`` against every text in the batch and
``col_i`` of text ``i`` against every image (Radford et al. 2021; open_clip's ``ClipLoss`` is the mean of ``l``).
Every ``l_i`` depends on every embedding of the batch, so the per-sample gradient of a projection sums over all
samples; :func:`projection_sqnorms` gives ``|grad_P l_i|`` for all ``i`` in ``O(B^2)`` memory without forming
``B`` gradients (derivation in the docstring).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def clip_per_sample_loss(
    image_BE: torch.Tensor, text_BE: torch.Tensor, logit_scale: torch.Tensor | float, rows: Optional[slice] = None
) -> torch.Tensor:
    """``l_B`` of the symmetric InfoNCE on un-normalised embeddings; ``logit_scale`` is the multiplier (already
    ``exp``-ed, as open_clip's forward returns it) and stays in the graph: it is a parameter of the loss.

    ``rows`` returns only those samples' losses, each still over the whole batch given: under DDP every rank holds
    the global batch's embeddings and computes the losses of its own samples (``b x B`` logits, not ``B x B``).
    """
    if image_BE.shape != text_BE.shape or image_BE.dim() != 2:
        raise ValueError(f"image {tuple(image_BE.shape)} and text {tuple(text_BE.shape)} embeddings must both be (B, E)")
    u = F.normalize(image_BE, dim=-1)
    v = F.normalize(text_BE, dim=-1)
    rows = slice(None) if rows is None else rows
    labels = torch.arange(u.shape[0], device=u.device)[rows]
    row = F.cross_entropy(logit_scale * u[rows] @ v.T, labels, reduction="none")  # image i against every text
    col = F.cross_entropy(logit_scale * v[rows] @ u.T, labels, reduction="none")  # text i against every image
    return (row + col) / 2


def _diag_of_product(a: torch.Tensor, m: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``diag(a^T m b)`` without forming the product."""
    return (a * (m @ b)).sum(0)


@torch.no_grad()
def projection_sqnorms(
    x_BW: torch.Tensor,
    h_BE: torch.Tensor,
    other_BE: torch.Tensor,
    logit_scale: torch.Tensor | float,
    rows: Optional[slice] = None,
) -> torch.Tensor:
    """``|grad_P l_i|^2`` for the projection ``P`` with ``h = x P`` (one tower), ``other`` the other tower's embeddings.

    ``rows`` returns only those samples' norms (each still sums over the whole batch, as in
    :func:`clip_per_sample_loss`).

    With ``u_j = h_j/|h_j|``, ``v`` the other side normalised, ``s`` the scale, ``p`` the row softmax and ``q`` the
    column softmax of ``s u v^T``: ``dl_i/du_j = s/2 (delta_ij r_i + c_ji v_i)`` with ``r_i = (p v)_i - v_i`` and
    ``c = q - I``.  Through the normalisation ``a_ij = dl_i/dh_j = s/2 (delta_ij m_i + c_ji n_ji)`` where
    ``m_i = (r_i - u_i (u_i . r_i)) / |h_i|`` and ``n_ji = (v_i - u_j g_ji) / |h_j|``, ``g = u v^T``.  Then
    ``|grad_P l_i|^2 = sum_jk K_jk a_ij . a_ik`` with ``K = x x^T``, which expands into ``B x B`` products only.
    The loss is symmetric in the two towers, so the same function serves ``text_projection`` with roles swapped.
    """
    # at least float32 (the terms cancel: bf16 would lose whole percents); float32 agrees with a float64 oracle to
    # ~1e-6 relative (see the benchmark)
    h = h_BE.to(torch.promote_types(h_BE.dtype, torch.float32))
    x = x_BW.to(h.dtype)
    s = torch.as_tensor(logit_scale, dtype=h.dtype, device=h.device).reshape(())
    alpha = 1.0 / h.norm(dim=-1)
    u = h * alpha[:, None]
    v = F.normalize(other_BE.to(h.dtype), dim=-1)
    g = u @ v.T  # g[j, i] = u_j . v_i
    p = torch.softmax(s * g, dim=1)
    q = torch.softmax(s * g, dim=0)
    eye = torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    r = p @ v - v
    m = (r - u * (u * r).sum(-1, keepdim=True)) * alpha[:, None]
    k = x @ x.T
    beta = (q - eye) * alpha[:, None]  # beta[j, i] = c_ji / |h_j|
    mu = m @ u.T  # mu[i, j] = m_i . u_j
    term1 = k.diagonal() * m.pow(2).sum(-1)
    term2 = 2 * ((m * v).sum(-1) * (k * beta.T).sum(1) - (k * beta.T * g.T * mu).sum(1))
    bg = beta * g
    term3 = (
        v.pow(2).sum(-1) * _diag_of_product(beta, k, beta)
        - 2 * _diag_of_product(beta, k, beta * g * g)
        + _diag_of_product(bg, k * (u @ u.T), bg)
    )
    out = ((s / 2) ** 2 * (term1 + term2 + term3)).clamp_min(0)
    return out if rows is None else out[rows]
