"""Run an open_clip CLIP so that its two projections are applied here, in view.

open_clip applies ``visual.proj`` and ``text_projection`` inline (``pooled @ proj``), where no hook can see the
pooled features.  :class:`ClipSites` runs each tower with its projection switched off (open_clip skips a
projection that is ``None``), then applies the projection itself, so the pooled features (the sites' inputs) and
the embeddings (their outputs) are both at hand and gradients flow exactly as in the model's own forward.

Wrap the CLIP in ``ClipSites`` before DDP so the projections run inside the DDP forward.  Under DDP the contrastive
loss couples the **global** batch: :meth:`ClipBatch.gathered` makes each rank's sites hold every rank's pooled
features and embeddings, and its loss the global-batch losses of this rank's samples.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .clip_loss import clip_per_sample_loss, projection_sqnorms
from .linear_site import LinearSite, bypass

IMAGE_PROJ = "visual.proj"
TEXT_PROJ = "text_projection"


@dataclass
class ClipBatch:
    """The forward of one batch: per-sample loss, projection sites, and the exact norms of their gradients."""

    image_site: LinearSite
    text_site: LinearSite
    logit_scale: torch.Tensor
    rows: slice = field(default_factory=lambda: slice(None))  # this process's samples within the sites' batch

    @property
    def sites(self) -> Dict[str, LinearSite]:
        return {self.image_site.name: self.image_site, self.text_site.name: self.text_site}

    def loss(self) -> torch.Tensor:
        """``l_i`` of this process's samples, over the whole batch the sites hold."""
        return clip_per_sample_loss(self.image_site.outputs, self.text_site.outputs, self.logit_scale, self.rows)

    def sqnorms_fn(self, names: Sequence[str]):
        """``|grad l_i|^2`` summed over the named projections (a callable for ``GradMimic.step``)."""
        img, txt = self.image_site, self.text_site

        def sqnorms() -> torch.Tensor:
            total = 0
            if img.name in names:
                total = total + projection_sqnorms(img.inputs, img.outputs.detach(), txt.outputs.detach(),
                                                   self.logit_scale, self.rows)
            if txt.name in names:
                total = total + projection_sqnorms(txt.inputs, txt.outputs.detach(), img.outputs.detach(),
                                                   self.logit_scale, self.rows)
            return total

        return sqnorms

    def gathered(self, gather: Callable[[torch.Tensor], torch.Tensor], offset: int) -> "ClipBatch":
        """This rank's batch seen inside the global batch (DDP).

        ``gather`` concatenates a ``(b, ...)`` tensor over ranks along dim 0, in rank order, and passes gradients
        back to each rank's own rows (open_clip's ``gather_with_grad``); ``offset`` is where this rank's rows start.
        The result's sites hold every rank's pooled features and embeddings, and its :meth:`loss` is the global
        batch's ``l_i`` for this rank's samples, so ``GradMimic.step`` scores them exactly as one process holding
        the global batch would (given the usual score ``gather``).
        """
        n = self.image_site.batch_size
        sites = []
        for s in (self.image_site, self.text_site):
            inputs = gather(s.inputs)
            if not 0 <= offset <= inputs.shape[0] - n:
                raise ValueError(f"offset {offset} is not this rank's place in the gathered batch of {inputs.shape[0]}")
            sites.append(LinearSite(s.name, inputs, gather(s.outputs), s.layout))
        return ClipBatch(sites[0], sites[1], self.logit_scale, slice(offset, offset + n))


def _project(name: str, proj, x: torch.Tensor) -> LinearSite:
    # the embeddings in at least float32: under autocast the projection runs in bf16, but the loss head (float32,
    # see clip_per_sample_loss) then hands the sites float32 gradients, which the per-sample dots use unrounded
    if isinstance(proj, nn.Linear):
        name, z, layout = f"{name}.weight", F.linear(x, proj.weight, proj.bias), "linear"
    else:
        z, layout = x @ proj, "matmul"
    return LinearSite(name, x, z.to(torch.promote_types(z.dtype, torch.float32)), layout)


def projection_params(model: nn.Module) -> Dict[str, str]:
    """``{"image": ..., "text": ...}``: the names of an open_clip CLIP's projection weights."""
    t = model.text_projection
    return {"image": IMAGE_PROJ, "text": f"{TEXT_PROJ}.weight" if isinstance(t, nn.Linear) else TEXT_PROJ}


class ClipSites(nn.Module):
    """``forward(images, texts) -> ClipBatch`` for an open_clip ``CLIP`` whose towers end in a projection."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        for name in (IMAGE_PROJ, TEXT_PROJ):
            owner, attr = (model.visual, "proj") if name == IMAGE_PROJ else (model, "text_projection")
            if getattr(owner, attr, None) is None:
                raise ValueError(f"model has no {name!r} projection (towers without one are not supported)")

    @property
    def param_names(self) -> Dict[str, str]:
        """Parameter names of the image / text projection weights, as ``GradMimic`` wants them."""
        return projection_params(self.model)

    def forward(self, images: torch.Tensor, texts: torch.Tensor) -> ClipBatch:
        with bypass(self.model, IMAGE_PROJ) as proj:
            image = _project(IMAGE_PROJ, proj, self.model.encode_image(images))
        with bypass(self.model, TEXT_PROJ) as proj:
            text = _project(TEXT_PROJ, proj, self.model.encode_text(texts))
        return ClipBatch(image, text, self.model.logit_scale.exp())
