"""A VGG-like convolutional network with global average pooling."""

from __future__ import annotations

from torch import Tensor, nn

from lossgeom.zoo._init import build, check_bool, check_int

__all__ = ["CNN", "cnn", "stage_sizes"]

_MAX_STAGES = 4


def stage_sizes(depth: int) -> list[int]:
    """Split ``depth`` conv layers over at most four stages, later stages larger.

    Example:
        >>> stage_sizes(4), stage_sizes(6), stage_sizes(8), stage_sizes(2)
        ([1, 1, 1, 1], [1, 1, 2, 2], [2, 2, 2, 2], [1, 1])
    """
    stages = min(depth, _MAX_STAGES)
    base, extra = divmod(depth, stages)
    return [base + (1 if i >= stages - extra else 0) for i in range(stages)]


class CNN(nn.Module):
    """Stages of ``3x3 conv -> [BatchNorm] -> ReLU`` layers, max-pool between them.

    Stage ``i`` has ``width * 2**i`` channels; a 2x2 max-pool (rounding up, so odd
    and 1x1 maps are fine) follows every stage but the last. Global average pooling
    and one linear layer give the logits, so any input size works.

    Attributes:
        features: the convolutional layers and pools, an ``nn.Sequential``.
        fc: the classifier.
    """

    def __init__(
        self, *, in_channels: int, num_classes: int, width: int, depth: int, norm: bool
    ):
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        sizes = stage_sizes(depth)
        for stage, n in enumerate(sizes):
            cout = width * 2**stage
            for _ in range(n):
                layers.append(nn.Conv2d(cin, cout, 3, padding=1, bias=not norm))
                if norm:
                    layers.append(nn.BatchNorm2d(cout))
                layers.append(nn.ReLU())
                cin = cout
            if stage < len(sizes) - 1:
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


def cnn(
    *,
    in_channels: int = 3,
    num_classes: int = 10,
    width: int = 32,
    depth: int = 4,
    norm: bool = True,
    init_scale: float = 1.0,
    seed: int | None = None,
) -> CNN:
    """A VGG-like CNN: ``depth`` 3x3 conv layers in up to four stages, then GAP.

    The conv layers are split over ``min(depth, 4)`` stages as evenly as possible,
    later stages taking the extra layers (see :func:`stage_sizes`); channels double
    from stage to stage (``width, 2 * width, ...``). Unlike VGG there are no
    fully connected hidden layers: global average pooling feeds the classifier.

    Args:
        in_channels: channels of the input images.
        num_classes: outputs.
        width: channels of the first stage.
        depth: number of conv layers (>= 1).
        norm: BatchNorm after every convolution (the convolutions then have no
            bias).
        init_scale: factor on PyTorch's default initialisation of every conv and
            linear weight and bias (see :func:`~lossgeom.zoo._init.scale_init`).
        seed: seed construction locally (``None``: use torch's global RNG).

    Returns:
        The network; inputs ``(n, in_channels, H, W)`` of any ``H, W >= 1``.
    """
    name = "cnn"
    check_int(name, "in_channels", in_channels, 1)
    check_int(name, "num_classes", num_classes, 1)
    check_int(name, "width", width, 1)
    check_int(name, "depth", depth, 1)
    check_bool(name, "norm", norm)
    return build(
        name,
        lambda: CNN(
            in_channels=in_channels,
            num_classes=num_classes,
            width=width,
            depth=depth,
            norm=norm,
        ),
        init_scale=init_scale,
        seed=seed,
    )
