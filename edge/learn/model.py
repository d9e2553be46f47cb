"""The U-Net (PyTorch) that turns a normalised HAADF frame into a column heat map and class channels.

A small U-Net (O. Ronneberger, P. Fischer, T. Brox, "U-Net: convolutional networks for biomedical image
segmentation", MICCAI 2015): four resolution levels, two 3x3 convolution + batch-norm + ReLU blocks per level,
max-pooling down, nearest-neighbour upsampling + skip concatenation up, and a 1x1 head. Output channel 0 is
the heat-map logit, channels 1..4 the class logits of :data:`beamloop.edge.stages.unet.SEG_CLASSES`. Several members
trained from different initialisations form an ensemble (as in ELIT: Ghosh et al., "Ensemble learning-iterative
training machine learning for uncertainty quantification and automated experiment in atom-resolved
microscopy", npj Comput. Mater. 7, 100 (2021)); :class:`Ensemble` is what gets exported to ONNX.

Imports torch: only for training and export (the ``train`` extra).
"""

from __future__ import annotations

import torch
from torch import nn

from beamloop.edge.stages.unet import SEG_CLASSES

WIDTHS = (8, 16, 32, 64)
"""Channels per resolution level (full, 1/2, 1/4, 1/8)."""


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """U-Net member.

    Parameters
    ----------
    widths : tuple of int
        Channels per level; the input side length must be divisible by ``2 ** (len(widths) - 1)``.

    Input ``(b, 1, h, w)`` float32 (:func:`beamloop.edge.stages.unet.normalise_frame`); output ``(b, 1 + 4, h, w)``
    logits.
    """

    def __init__(self, widths: tuple[int, ...] = WIDTHS) -> None:
        super().__init__()
        self.widths = tuple(widths)
        self.down = nn.ModuleList()
        cin = 1
        for w in widths:
            self.down.append(_block(cin, w))
            cin = w
        self.pool = nn.MaxPool2d(2)
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        self.up = nn.ModuleList(_block(widths[k + 1] + widths[k], widths[k]) for k in reversed(range(len(widths) - 1)))
        self.head = nn.Conv2d(widths[0], 1 + len(SEG_CLASSES), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for k, block in enumerate(self.down):
            x = block(x if k == 0 else self.pool(x))
            skips.append(x)
        for block, skip in zip(self.up, reversed(skips[:-1])):
            x = block(torch.cat([self.upsample(x), skip], dim=1))
        return self.head(x)


def fuse_batchnorm(model: UNet) -> UNet:
    """A copy of ``model`` (eval mode) with every BatchNorm folded into the convolution before it.

    The exported graph is then convolutions and ReLUs only, which ONNX Runtime quantizes per channel.
    """
    import copy

    from torch.nn.utils.fusion import fuse_conv_bn_eval

    model = copy.deepcopy(model).eval()
    for seq in list(model.down) + list(model.up):
        for i in (0, 3):
            seq[i] = fuse_conv_bn_eval(seq[i], seq[i + 1])
            seq[i + 1] = nn.Identity()
    return model


class Ensemble(nn.Module):
    """Members run side by side on one input: the exported model.

    Outputs
    -------
    heat : (b, m, h, w) float32
        Each member's heat map (sigmoid), in [0, 1].
    classes : (b, 4, h, w) float32
        Class probabilities (softmax), averaged over the members.
    """

    def __init__(self, members: list[UNet]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outs = [m(x) for m in self.members]
        heat = torch.sigmoid(torch.cat([o[:, :1] for o in outs], dim=1))
        cls = torch.stack([torch.softmax(o[:, 1:], dim=1) for o in outs], dim=0).mean(dim=0)
        return heat, cls
