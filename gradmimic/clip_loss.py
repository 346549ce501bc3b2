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

    Computed in at least float32 with autocast off (bf16 logits at a logit scale of 100 would move every exponent
    by ~0.4), and without the cancellations of a plain cross-entropy: see :func:`_contrastive_ce`.  The result is in
    at least float32.
    """
    if image_BE.shape != text_BE.shape or image_BE.dim() != 2:
        raise ValueError(f"image {tuple(image_BE.shape)} and text {tuple(text_BE.shape)} embeddings must both be (B, E)")
    acc = torch.promote_types(torch.promote_types(image_BE.dtype, text_BE.dtype), torch.float32)
    with torch.autocast(device_type=image_BE.device.type, enabled=False):
        u = F.normalize(image_BE.to(acc), dim=-1)
        v = F.normalize(text_BE.to(acc), dim=-1)
        rows = slice(None) if rows is None else rows
        labels = torch.arange(u.shape[0], device=u.device)[rows]
        row = _contrastive_ce(logit_scale * u[rows] @ v.T, labels)  # image i against every text
        col = _contrastive_ce(logit_scale * v[rows] @ u.T, labels)  # text i against every image
        return (row + col) / 2


def _contrastive_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``F.cross_entropy(logits, labels, reduction="none")``, exact also where the batch is fit (losses ~1e-6).

    With ``d_j = z_j - z_y`` over the other entries ``j != y``: ``l = log(1 + sum_j exp(d_j))``.  The label's own
    entry never enters, so the gradient w.r.t. ``z_y`` is minus a sum of positive terms instead of
    ``softmax_y - 1`` (whose float32 rounding, ~6e-8, is a whole percent of ``1 - softmax_y`` at such losses), and
    ``log1p`` keeps a small loss to float32's relative precision (a plain log-sum-exp returns ``z_y + l`` rounded
    to ``z_y``'s ulp, ~1e-5 at a logit of 100).  Where some ``d_j > 0`` the largest, ``m``, is taken out first:
    ``l = m + log1p(exp(-m) - 1 + sum_j exp(d_j - m))``, in which no term overflows.
    """
    own = logits.gather(1, labels[:, None])
    is_own = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, labels[:, None], True)
    diff = (logits - own).masked_fill(is_own, float("-inf"))  # no gradient reaches z_y through its own entry
    m = diff.amax(dim=1, keepdim=True).clamp_min(0).detach()
    rest = torch.exp(diff - m).sum(1, keepdim=True)
    return (m + torch.log1p(torch.exp(-m) - 1 + rest)).squeeze(1)


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
    # float64 throughout: these B x B sums expand |a_ij|^2-like products into differences of O(1) terms (e.g.
    # |v_i - u_i g_ii|^2 = 1 - g_ii^2), so float32 rounding of the pieces is amplified by 1 / (1 - g_ii^2) when a
    # batch is fit; in float64 the result is as accurate as the (float32, bf16) embeddings it is given.
    f64 = torch.float64
    h = h_BE.to(f64)
    x = x_BW.to(f64)
    s = torch.as_tensor(logit_scale, dtype=f64, device=h.device).reshape(())
    alpha = 1.0 / h.norm(dim=-1)
    u = h * alpha[:, None]
    v = F.normalize(other_BE.to(f64), dim=-1)
    g = u @ v.T  # g[j, i] = u_j . v_i
    off = ~torch.eye(g.shape[0], dtype=torch.bool, device=g.device)
    p = torch.softmax(s * g, dim=1) * off  # off-diagonal parts of the row and column softmax: 1 - p_jj and
    q = torch.softmax(s * g, dim=0) * off  # 1 - q_ii are formed as sums of these, never by subtracting from 1
    r = p @ v - p.sum(1, keepdim=True) * v  # r_j = sum_{i != j} p_ji (v_i - v_j) = (p v)_j - v_j
    m = (r - u * (u * r).sum(-1, keepdim=True)) * alpha[:, None]
    k = x @ x.T
    beta = (q - torch.diag(q.sum(0))) * alpha[:, None]  # beta[j, i] = c_ji / |h_j|, c = q - I
    mu = m @ u.T  # mu[i, j] = m_i . u_j
    bg = beta * g
    y = beta.T @ x  # y_i = sum_j beta_ji x_j: diag(beta^T K beta) = |y_i|^2 in B^2 W instead of B^3
    term1 = k.diagonal() * m.pow(2).sum(-1)
    term2 = 2 * ((m * v).sum(-1) * (x * y).sum(-1) - (k * beta.T * g.T * mu).sum(1))
    term3 = (
        v.pow(2).sum(-1) * y.pow(2).sum(-1)
        - 2 * (y * ((bg * g).T @ x)).sum(-1)
        + _diag_of_product(bg, k * (u @ u.T), bg)
    )
    out = ((s / 2) ** 2 * (term1 + term2 + term3)).clamp_min(0)
    out = out.to(torch.promote_types(h_BE.dtype, torch.float32))
    return out if rows is None else out[rows]
