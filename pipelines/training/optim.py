"""The optimiser every training run uses: AdamW with linear warm-up, then cosine decay (or a constant rate)."""

from __future__ import annotations

import math

import torch

from pipelines.training.config import OptimizerConfig

NO_DECAY = ("bias", "logit_scale", "ln", "bn", "norm")  # gains, biases and the temperature: no weight decay


def make_optimizer(model: torch.nn.Module, optim: OptimizerConfig, total_steps: int):
    """AdamW without weight decay on gains, biases and ``logit_scale``; linear warm-up then cosine (or constant)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or any(k in name for k in NO_DECAY) else decay).append(p)
    groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    try:  # the fused kernel: on CPU too, several times faster than the per-tensor loop for many small tensors
        opt = torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps, fused=True)
    except (RuntimeError, TypeError, ValueError):
        opt = torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps, foreach=True)

    def factor(step: int) -> float:  # LambdaLR calls it with the number of steps taken
        if step < optim.warmup_steps:
            return (step + 1) / optim.warmup_steps
        if optim.schedule == "constant":
            return 1.0
        progress = (step - optim.warmup_steps) / max(1, total_steps - optim.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)
