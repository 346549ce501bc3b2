"""Brute-force per-sample gradients with ``torch.func``: the reference semantics every fast path is tested against.

These materialise ``B`` copies of each mimic parameter's gradient (memory ``O(B x params)``), exactly what the fast
paths avoid.  Use them in tests, in the benchmark, and to audit a new model on a small batch.
"""

from __future__ import annotations

from typing import Callable, Dict, Mapping

import torch
from torch.func import jacrev


def per_sample_grads(
    loss_fn: Callable[[Dict[str, torch.Tensor]], torch.Tensor], params: Mapping[str, torch.Tensor]
) -> Dict[str, torch.Tensor]:
    """``{name: (B, *shape)}``: the Jacobian of the per-sample loss vector ``loss_fn(params)`` w.r.t. ``params``.

    Exact for coupled losses: row ``i`` is the full gradient of ``l_i``, through every sample it depends on.
    """
    detached = {k: v.detach() for k, v in params.items()}
    return jacrev(loss_fn)(detached)


def scores_from_grads(
    grads: Mapping[str, torch.Tensor], direction: Mapping[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dots_B, norms_B)``: ``<g_i, D>`` and ``|g_i|`` from materialised per-sample gradients."""
    names = list(grads)
    b = grads[names[0]].shape[0]
    flat = torch.cat([grads[n].reshape(b, -1) for n in names], 1)
    d = torch.cat([direction[n].reshape(-1).to(flat.dtype) for n in names])
    return flat @ d, flat.norm(dim=1)
