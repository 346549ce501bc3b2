"""Where a mimic parameter enters the network: a linear map whose inputs and outputs we hold.

The whole speed of Grad-Mimic rests on one fact: for ``Z = X W^T`` (``nn.Linear``) or ``Z = X P`` (open_clip's
``visual.proj`` / ``text_projection``), the per-sample gradient of ``l_i`` is ``sum_j X_j^T dl_i/dZ_j``.  So every
inner product with the task vector, every gradient norm and every weighted gradient can be formed from ``X`` and
gradients with respect to ``Z`` (size ``B x out``), never from ``B`` copies of the parameter.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Dict, Iterator, Sequence

import torch
from torch import nn

LAYOUTS = ("linear", "matmul")  # Z = X @ W.T (nn.Linear.weight)  |  Z = X @ P (a bare parameter)


@dataclass
class LinearSite:
    """One use of a mimic parameter: ``outputs = inputs @ P`` (``matmul``) or ``inputs @ W.T (+ b)`` (``linear``).

    ``inputs``: ``(B, in)`` or ``(B, S, in)`` for token sequences; ``outputs``: the same leading shape, in the graph.
    """

    name: str
    inputs: torch.Tensor
    outputs: torch.Tensor
    layout: str

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"site {self.name!r}: unknown layout {self.layout!r}; expected one of {LAYOUTS}")
        if self.inputs.dim() not in (2, 3) or self.inputs.shape[:-1] != self.outputs.shape[:-1]:
            raise ValueError(
                f"site {self.name!r}: inputs {tuple(self.inputs.shape)} and outputs {tuple(self.outputs.shape)} "
                "must be (B, features) or (B, tokens, features) with the same leading dims"
            )
        self.inputs = self.inputs.detach()

    @property
    def batch_size(self) -> int:
        return self.inputs.shape[0]

    @property
    def acc_dtype(self) -> torch.dtype:
        """The precision of per-sample statistics: the inputs' dtype, at least float32 (bf16 / fp16 under autocast)."""
        return torch.promote_types(self.inputs.dtype, torch.float32)

    def tangent(self, t: torch.Tensor) -> torch.Tensor:
        """``dZ``: how the outputs move when the parameter moves along ``t`` (same shape as the parameter).

        In at least float32: ``t`` is a small difference of weights, and ``dZ`` only feeds the per-sample dots.
        """
        x, t = self.inputs.to(self.acc_dtype), t.to(self.acc_dtype)
        return x @ (t.T if self.layout == "linear" else t)

    def param_grad(self, grad_outputs: torch.Tensor) -> torch.Tensor:
        """The parameter's gradient given ``dLoss/dZ``: ``sum_i X_i^T G_i``, in the parameter's layout."""
        x = self.inputs.reshape(-1, self.inputs.shape[-1])
        g = grad_outputs.reshape(-1, grad_outputs.shape[-1]).to(x.dtype)
        return g.T @ x if self.layout == "linear" else x.T @ g

    def ghost_sqnorms(self, grad_outputs_B: torch.Tensor, gram: bool | None = None) -> torch.Tensor:
        """``|grad l_i|^2`` for a *decoupled* loss, where ``grad_outputs_B[i] = dl_i/dZ_i``.

        2-D: ``|x_i|^2 |d_i|^2``.  Sequences: ``sum_{s,t} (x_is . x_it)(d_is . d_it)`` (the Gram form, cost
        ``S^2 (in + out)``) or the materialised ``|X_i^T D_i|^2`` (cost ``S in out``), whichever is cheaper
        unless ``gram`` forces one.  In at least float32 (the Gram form's sum cancels).
        """
        x, d = self.inputs.to(self.acc_dtype), grad_outputs_B.to(self.acc_dtype)
        if x.dim() == 2:
            return x.pow(2).sum(-1) * d.pow(2).sum(-1)
        s, n_in, n_out = x.shape[1], x.shape[2], d.shape[2]
        if gram is None:
            gram = s * (n_in + n_out) <= n_in * n_out
        if gram:
            return ((x @ x.transpose(1, 2)) * (d @ d.transpose(1, 2))).sum((1, 2))
        return torch.einsum("bsi,bso->bio", x, d).pow(2).sum((1, 2))


def find_parameters(model: nn.Module, names: Sequence[str]) -> Dict[str, nn.Parameter]:
    """The named parameters, or an error that lists the closest names the model does have."""
    import difflib

    params = dict(model.named_parameters())
    out = {}
    for name in names:
        if name not in params:
            near = difflib.get_close_matches(name, list(params), n=4, cutoff=0.5) or list(params)[-4:]
            raise KeyError(f"model has no parameter {name!r} (similar: {', '.join(near)})")
        out[name] = params[name]
    return out


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    *path, attr = name.split(".")
    module = model.get_submodule(".".join(path)) if path else model
    return module, attr


@contextlib.contextmanager
def capture_linear_sites(model: nn.Module, names: Sequence[str]) -> Iterator[Dict[str, LinearSite]]:
    """Record the inputs and outputs of ``nn.Linear`` layers whose ``weight`` is a mimic parameter.

    Usage::

        with capture_linear_sites(model, ["head.weight"]) as sites:
            logits = model(x)
        # sites["head.weight"] now holds the head's inputs and logits

    Each layer must run exactly once per forward (a layer applied twice would have two sites).
    """
    sites: Dict[str, LinearSite] = {}
    handles = []
    for name in names:
        module, attr = _owner(model, name)
        if not isinstance(module, nn.Linear) or attr != "weight":
            raise TypeError(
                f"{name!r} is not the weight of an nn.Linear; for a parameter used as x @ P "
                "(open_clip's visual.proj, text_projection) use gradmimic.open_clip_sites"
            )

        def hook(mod, args, output, _name=name):
            if _name in sites:
                raise RuntimeError(f"layer of {_name!r} ran twice in one forward; one site per parameter")
            sites[_name] = LinearSite(_name, args[0], output, "linear")

        handles.append(module.register_forward_hook(hook))
    try:
        yield sites
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def bypass(model: nn.Module, name: str) -> Iterator[nn.Parameter | nn.Module]:
    """Temporarily set a parameter or submodule attribute to ``None`` (open_clip then skips its projection)."""
    module, attr = _owner(model, name)
    table = module._parameters if attr in module._parameters else module._modules
    if attr not in table or table[attr] is None:
        raise KeyError(f"{name!r} is not a parameter or submodule of {type(module).__name__}")
    saved = table[attr]
    table[attr] = None
    try:
        yield saved
    finally:
        table[attr] = saved
