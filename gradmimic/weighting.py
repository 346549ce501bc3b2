"""Weighting rules: Grad-Mimic and the baselines of the paper, on the same per-sample machinery.

Each rule maps per-sample statistics to ``(scores_B, weights_B)``; the weights sum to 1 over the global batch
and replace the mean's ``1/B`` in the mimic parameters' gradient (or in every parameter's).

- ``uniform``:   plain training; score 0.
- ``mimic``:     Grad-Mimic (arXiv 2501.06708): ``proj`` / ``cos`` of ``-g_i`` on ``T = W_ref - W_t``;
                 ``normed_*`` weight by ``softmax(score / temperature)``, raw methods only observe (uniform weights).
- ``influence``: the same scores against a small clean set's descent direction (``-mean grad``) instead of ``T``.
- ``grand``:     GraNd / gradient norm (Paul et al. 2021): ``softmax(|g_i| / temperature)``.
- ``rho``:       RHO-loss (Mindermann et al. 2022): ``softmax((l_i - l_ref_i) / temperature)``, reducible loss.
- ``agra``:      AGRA (Sedova et al. 2023): keep samples whose gradient aligns positively with a comparison
                 batch's (``cos(-g_i, D) > 0`` for ``D`` = minus its mean gradient), equal weights on the kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from .scores import Gather, batch_weights, check_method, global_softmax, mimic_scores, needs_grad_norms

RULES = ("uniform", "mimic", "influence", "grand", "rho", "agra")


@dataclass(frozen=True)
class Weighting:
    rule: str = "mimic"
    method: str = "normed_proj"  # for mimic / influence
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"unknown weighting rule {self.rule!r}; expected one of {', '.join(RULES)}")
        check_method(self.method)
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")

    @property
    def needs_direction(self) -> bool:
        return self.rule in ("mimic", "influence", "agra")

    @property
    def needs_grad_norms(self) -> bool:
        return self.rule == "grand" or (self.rule in ("mimic", "influence") and needs_grad_norms(self.method))

    def weigh(
        self,
        loss_B: torch.Tensor,
        *,
        dots: Optional[torch.Tensor] = None,
        dnorm: Optional[torch.Tensor] = None,
        gnorms: Optional[torch.Tensor] = None,
        ref_loss_B: Optional[torch.Tensor] = None,
        gather: Optional[Gather] = None,
        rank: int = 0,
        sizes: Optional[list] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        rule, t = self.rule, self.temperature
        if rule == "uniform":
            scores = torch.zeros_like(loss_B)
            return scores, batch_weights(scores, "proj", t, gather, rank, sizes)
        if rule in ("mimic", "influence"):
            scores = mimic_scores(dots, dnorm, self.method, gnorms)
            return scores, batch_weights(scores, self.method, t, gather, rank, sizes)
        if rule == "grand":
            return gnorms, global_softmax(gnorms, t, gather, rank, sizes)
        if rule == "rho":
            if ref_loss_B is None:
                raise ValueError("the rho rule needs ref_loss_B: the reference model's per-sample losses")
            if ref_loss_B.shape != loss_B.shape:
                raise ValueError(f"ref_loss_B has shape {tuple(ref_loss_B.shape)}, loss_B {tuple(loss_B.shape)}")
            scores = loss_B - ref_loss_B.detach().to(device=loss_B.device, dtype=loss_B.dtype)
            return scores, global_softmax(scores, t, gather, rank, sizes)
        # agra
        scores = mimic_scores(dots, dnorm, "proj")
        keep = (scores > 0).to(loss_B.dtype)
        kept = int((gather(keep) if gather is not None else keep).sum())  # a per-sample gather, like every other
        if kept == 0:  # nothing aligns: fall back to the plain step rather than a zero update
            return scores, batch_weights(scores, "proj", t, gather, rank, sizes)
        return scores, keep / kept
