"""A vision transformer (Dosovitskiy et al., ICLR 2021) for small images.

Non-overlapping ``p x p`` patches are embedded by a convolution with kernel and
stride ``p`` (the same as a linear map of each flattened patch), then go through
the pre-norm encoder of :mod:`lossgeom.zoo._transformer`.
"""

from __future__ import annotations

from torch import Tensor, nn

from lossgeom.zoo._init import build, check_int
from lossgeom.zoo._transformer import PatchTransformer, check_encoder, divisors

__all__ = ["ImagePatches", "vit"]


class ImagePatches(nn.Module):
    """Tokens from the ``p x p`` patches of images ``(n, C, S, S)``, row by row.

    Attributes:
        proj: a ``Conv2d`` with kernel and stride ``p`` (a linear map of each
            flattened patch).
    """

    def __init__(self, image_size: int, in_channels: int, patch_size: int, dim: int):
        super().__init__()
        self.image_size = image_size
        self.in_channels = in_channels
        self.proj = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        expected = (self.in_channels, self.image_size, self.image_size)
        if x.ndim != 4 or x.shape[1:] != expected:
            raise ValueError(
                f"vit: expected images of shape (n, {', '.join(map(str, expected))}); "
                f"got {tuple(x.shape)}. Build the model with image_size and "
                "in_channels matching the data."
            )
        return self.proj(x).flatten(2).transpose(1, 2)


def vit(
    *,
    image_size: int = 32,
    patch_size: int = 4,
    in_channels: int = 3,
    num_classes: int = 10,
    dim: int = 128,
    depth: int = 6,
    heads: int = 4,
    mlp_dim: int = 256,
    layer_norm: bool = True,
    skip: bool = True,
    pool: str = "cls",
    init_scale: float = 1.0,
    seed: int | None = None,
) -> PatchTransformer:
    """A vision transformer with pre-norm blocks and a class token (by default).

    Args:
        image_size: side ``S`` of the square input images; a multiple of
            ``patch_size``.
        patch_size: side ``p`` of the square patches.
        in_channels: channels of the input images.
        num_classes: outputs.
        dim: token width.
        depth: number of encoder blocks.
        heads: attention heads; must divide ``dim``.
        mlp_dim: hidden units of each block's MLP (GELU).
        layer_norm: the pre-norm LayerNorms and the final one (``False`` replaces
            them by the identity).
        skip: residual connections around attention and MLP.
        pool: ``"cls"`` (a learned class token feeds the head, as in the original
            ViT) or ``"mean"`` (the mean of the patch tokens does).
        init_scale: factor on the initialisation of every parameter outside the
            LayerNorms: the patch embedding, q/k/v and output projections, MLP and
            head weights and biases (PyTorch defaults), the class token and the
            positional embedding (truncated normal, std 0.02). See
            :func:`~lossgeom.zoo._init.scale_init`.
        seed: seed construction locally (``None``: use torch's global RNG).

    Returns:
        The network, mapping ``(n, in_channels, S, S)`` to ``(n, num_classes)``.
    """
    name = "vit"
    check_int(name, "image_size", image_size, 1)
    check_int(name, "patch_size", patch_size, 1)
    check_int(name, "in_channels", in_channels, 1)
    kw = dict(
        num_classes=num_classes,
        dim=dim,
        depth=depth,
        heads=heads,
        mlp_dim=mlp_dim,
        layer_norm=layer_norm,
        skip=skip,
        pool=pool,
    )
    check_encoder(name, **kw)
    if image_size % patch_size:
        raise ValueError(
            f"{name}: image_size must be a multiple of patch_size; got "
            f"image_size={image_size}, patch_size={patch_size}. Use patch_size in "
            f"{divisors(image_size)}."
        )
    return build(
        name,
        lambda: PatchTransformer(
            ImagePatches(image_size, in_channels, patch_size, dim),
            num_tokens=(image_size // patch_size) ** 2,
            **kw,
        ),
        init_scale=init_scale,
        seed=seed,
    )
