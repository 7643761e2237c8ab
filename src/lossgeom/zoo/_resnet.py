"""CIFAR-style ResNets (He et al. 2016, Sec. 4.2): 6n+2 layers, widths w, 2w, 4w."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["cifar_resnet"]


class _Block(nn.Module):
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


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs: a 3x3 stem, three stages of ``n`` blocks, global pooling."""

    def __init__(
        self, depth: int, width: int, num_classes: int, skip: bool, norm: bool
    ):
        super().__init__()
        n = (depth - 2) // 6
        self.stem = nn.Conv2d(3, width, 3, 1, 1, bias=not norm)
        self.bn = nn.BatchNorm2d(width) if norm else nn.Identity()
        blocks: list[nn.Module] = []
        cin = width
        for stage, cout in enumerate((width, 2 * width, 4 * width)):
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


def cifar_resnet(
    depth: int = 20,
    *,
    width: int = 16,
    num_classes: int = 10,
    skip: bool = True,
    norm: bool = True,
) -> CifarResNet:
    """A CIFAR-style ResNet of ``depth = 6n + 2`` layers (20, 32, 44, 56, 110).

    Args:
        depth: 6n + 2.
        width: channels of the first stage (16 in the original).
        num_classes: outputs.
        skip: residual connections (``False`` gives the "noshort" plain network).
        norm: BatchNorm after every convolution.

    Returns:
        The network; ResNet-20 with width 16 has about 0.27M parameters.
    """
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(
            f"depth must be 6n + 2 with n >= 1 (20, 32, 56, ...); got {depth}."
        )
    return CifarResNet(depth, width, num_classes, skip, norm)
