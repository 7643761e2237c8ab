"""Residual networks of BasicBlocks: CIFAR-style ResNet-(6n+2) and ResNet-18/34.

Both follow He et al., "Deep Residual Learning for Image Recognition" (CVPR 2016):

- :func:`cifar_resnet` is the CIFAR-10 family of Sec. 4.2: a 3x3 stem of ``w``
  channels and three stages of ``n`` blocks with ``w, 2w, 4w`` channels (16, 32,
  64 in the paper), ``6n + 2`` weighted layers.
- :func:`resnet` is the ImageNet family of Table 1 (ResNet-18: 2-2-2-2 blocks,
  ResNet-34: 3-4-6-3, with 64, 128, 256, 512 channels) in the usual adaptation to
  small inputs: a 3x3 stride-1 stem and no max-pool, so 32x32 images reach the
  last stage at 4x4.

Where a block changes the shape, its shortcut is a 1x1 convolution with BatchNorm
(the paper's option B). With ``skip=False`` there is no shortcut at all: the
"noshort" plain network of Li et al., "Visualizing the Loss Landscape of Neural
Nets" (NeurIPS 2018). With ``norm=False`` there is no BatchNorm and every
convolution has a bias instead.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lossgeom.zoo._init import build, check_bool, check_int

__all__ = ["ResNet", "cifar_resnet", "resnet"]

_IMAGENET_BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}


class _Block(nn.Module):
    """Two 3x3 convolutions; adds the (projected) input unless ``skip=False``."""

    def __init__(self, cin: int, cout: int, stride: int, skip: bool, norm: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=not norm)
        self.bn1 = nn.BatchNorm2d(cout) if norm else nn.Identity()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=not norm)
        self.bn2 = nn.BatchNorm2d(cout) if norm else nn.Identity()
        self.skip = skip
        self.shortcut: nn.Module = nn.Identity()
        if skip and (stride != 1 or cin != cout):
            # projection shortcut (option B): 1x1 convolution
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=not norm),
                nn.BatchNorm2d(cout) if norm else nn.Identity(),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.skip:
            out = out + self.shortcut(x)
        return torch.relu(out)


class ResNet(nn.Module):
    """A 3x3 stem, stages of BasicBlocks, global average pooling, a linear head.

    Stage ``i`` has ``blocks_per_stage[i]`` blocks of ``widths[i]`` channels; every
    stage after the first halves the resolution in its first block.

    Attributes:
        stem: the first convolution; ``bn`` its BatchNorm (or ``Identity``).
        blocks: all residual blocks in order, an ``nn.Sequential``.
        fc: the classifier.
    """

    def __init__(
        self,
        blocks_per_stage: tuple[int, ...],
        widths: tuple[int, ...],
        *,
        in_channels: int,
        num_classes: int,
        skip: bool,
        norm: bool,
    ):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=not norm)
        self.bn = nn.BatchNorm2d(widths[0]) if norm else nn.Identity()
        blocks: list[nn.Module] = []
        cin = widths[0]
        for stage, (n, cout) in enumerate(zip(blocks_per_stage, widths, strict=True)):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(_Block(cin, cout, stride, skip, norm))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        x = self.blocks(x)
        return self.fc(x.mean(dim=(2, 3)))


def _common_checks(
    name: str, width: int, num_classes: int, in_channels: int, skip: bool, norm: bool
) -> None:
    check_int(name, "width", width, 1)
    check_int(name, "num_classes", num_classes, 1)
    check_int(name, "in_channels", in_channels, 1)
    check_bool(name, "skip", skip)
    check_bool(name, "norm", norm)


def cifar_resnet(
    depth: int = 20,
    *,
    width: int = 16,
    num_classes: int = 10,
    in_channels: int = 3,
    skip: bool = True,
    norm: bool = True,
    init_scale: float = 1.0,
    seed: int | None = None,
) -> ResNet:
    """A CIFAR-style ResNet of ``depth = 6n + 2`` layers (20, 32, 44, 56, 110).

    Args:
        depth: 6n + 2 with n >= 1.
        width: channels of the first stage (16 in the original); the stages have
            ``width, 2 * width, 4 * width``.
        num_classes: outputs.
        in_channels: channels of the input images (3 for CIFAR, 1 for MNIST).
        skip: residual connections (``False`` gives the "noshort" plain network).
        norm: BatchNorm after every convolution.
        init_scale: factor on PyTorch's default initialisation of every conv and
            linear weight and bias (see :func:`~lossgeom.zoo._init.scale_init`).
        seed: seed construction locally (``None``: use torch's global RNG).

    Returns:
        The network; any input of at least 1x1 pixels works (global pooling).
        ResNet-20/32/56 with width 16 have about 0.27M/0.47M/0.86M parameters.
    """
    name = f"resnet{depth}" if isinstance(depth, int) else "cifar_resnet"
    if (
        isinstance(depth, bool)
        or not isinstance(depth, int)
        or depth < 8
        or (depth - 2) % 6
    ):
        raise ValueError(
            f"cifar_resnet: depth must be 6n + 2 with n >= 1 (8, 14, 20, 32, 44, 56, "
            f"110, ...); got {depth!r}. Pick the nearest such depth."
        )
    _common_checks(name, width, num_classes, in_channels, skip, norm)
    n = (depth - 2) // 6
    return build(
        name,
        lambda: ResNet(
            (n, n, n),
            (width, 2 * width, 4 * width),
            in_channels=in_channels,
            num_classes=num_classes,
            skip=skip,
            norm=norm,
        ),
        init_scale=init_scale,
        seed=seed,
    )


def resnet(
    depth: int = 18,
    *,
    width: int = 64,
    num_classes: int = 10,
    in_channels: int = 3,
    skip: bool = True,
    norm: bool = True,
    init_scale: float = 1.0,
    seed: int | None = None,
) -> ResNet:
    """ResNet-18 or ResNet-34 (BasicBlocks) adapted to small images.

    The ImageNet stem (7x7 stride-2 convolution and max-pool) is replaced by a
    3x3 stride-1 convolution, the standard adaptation to 32x32 inputs.

    Args:
        depth: 18 or 34.
        width: channels of the first stage (64 in the original); the stages have
            ``width, 2 * width, 4 * width, 8 * width``.
        num_classes: outputs.
        in_channels: channels of the input images.
        skip: residual connections (``False`` gives the "noshort" plain network).
        norm: BatchNorm after every convolution.
        init_scale: factor on PyTorch's default initialisation of every conv and
            linear weight and bias (see :func:`~lossgeom.zoo._init.scale_init`).
        seed: seed construction locally (``None``: use torch's global RNG).

    Returns:
        The network; with 10 classes ResNet-18 has 11,173,962 parameters and
        ResNet-34 21,282,122.
    """
    if (
        isinstance(depth, bool)
        or not isinstance(depth, int)
        or depth not in _IMAGENET_BLOCKS
    ):
        raise ValueError(
            f"resnet: depth must be 18 or 34 (BasicBlock ResNets); got {depth!r}. "
            "For CIFAR-style depths 6n + 2 use cifar_resnet."
        )
    name = f"resnet{depth}"
    _common_checks(name, width, num_classes, in_channels, skip, norm)
    return build(
        name,
        lambda: ResNet(
            _IMAGENET_BLOCKS[depth],
            (width, 2 * width, 4 * width, 8 * width),
            in_channels=in_channels,
            num_classes=num_classes,
            skip=skip,
            norm=norm,
        ),
        init_scale=init_scale,
        seed=seed,
    )
