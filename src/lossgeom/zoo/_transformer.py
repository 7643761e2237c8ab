"""A pre-norm transformer encoder, and its 1-D sequence classifier.

The encoder (:class:`PatchTransformer`) is shared with the vision transformer
(:mod:`lossgeom.zoo._vit`): inputs are cut into patches, each patch is embedded
linearly into a token, a learned positional embedding is added, and ``depth``
pre-norm blocks

    x = x + Attention(LayerNorm(x))
    x = x + MLP(LayerNorm(x))

are followed by a final LayerNorm, pooling and a linear head. Attention is written
out (``softmax(q k^T / sqrt(d_head)) v`` with matrix products), so it has
forward-mode derivatives and a double backward on every device: Hessian-vector
products through it work with either of :class:`~lossgeom.Objective`'s backends.
There is no dropout.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lossgeom.zoo._init import build, check_bool, check_choice, check_int

__all__ = [
    "Attention",
    "Block",
    "PatchTransformer",
    "SequencePatches",
    "check_encoder",
    "divisors",
    "transformer",
]

POOLS = ("cls", "mean")


def divisors(n: int) -> list[int]:
    """The positive divisors of ``n``, for error messages that suggest a fix."""
    return [k for k in range(1, n + 1) if n % k == 0]


class Attention(nn.Module):
    """Multi-head self-attention with a fused q/k/v projection and an output one.

    Attributes:
        qkv: ``Linear(dim, 3 * dim)``, the query, key and value projections of
            all heads side by side.
        proj: ``Linear(dim, dim)``, the output projection.
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        n, t, dim = x.shape
        head_dim = dim // self.heads
        q, k, v = (
            self.qkv(x).reshape(n, t, 3, self.heads, head_dim).permute(2, 0, 3, 1, 4)
        )
        weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(head_dim), dim=-1)
        out = (weights @ v).transpose(1, 2).reshape(n, t, dim)
        return self.proj(out)


class Block(nn.Module):
    """A pre-norm encoder block; ``skip=False`` drops both residual additions."""

    def __init__(
        self, dim: int, heads: int, mlp_dim: int, layer_norm: bool, skip: bool
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim) if layer_norm else nn.Identity()
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim) if layer_norm else nn.Identity()
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim)
        )
        self.skip = skip

    def forward(self, x: Tensor) -> Tensor:
        a = self.attn(self.norm1(x))
        x = x + a if self.skip else a
        m = self.mlp(self.norm2(x))
        return x + m if self.skip else m


class PatchTransformer(nn.Module):
    """Patch embedding, positional embedding, encoder blocks, pooling, head.

    Attributes:
        embed: the patch embedding, a module mapping an input batch to tokens
            ``(n, num_tokens, dim)`` (:class:`SequencePatches`, or
            :class:`~lossgeom.zoo._vit.ImagePatches` in a ViT).
        cls_token: the learned class token ``(1, 1, dim)`` when ``pool="cls"``,
            else ``None``.
        pos_embedding: learned, ``(1, num_tokens [+ 1 for the class token], dim)``.
        blocks: the encoder blocks, an ``nn.Sequential``.
        norm: the final LayerNorm (``Identity`` when ``layer_norm=False``).
        head: the classifier, applied to the class token's output (``pool="cls"``)
            or to the mean over the patch tokens (``pool="mean"``).
    """

    def __init__(
        self,
        embed: nn.Module,
        *,
        num_tokens: int,
        num_classes: int,
        dim: int,
        depth: int,
        heads: int,
        mlp_dim: int,
        layer_norm: bool,
        skip: bool,
        pool: str,
    ):
        super().__init__()
        self.embed = embed
        self.cls_token: nn.Parameter | None = None
        if pool == "cls":
            self.cls_token = nn.Parameter(torch.empty(1, 1, dim))
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.pos_embedding = nn.Parameter(
            torch.empty(1, num_tokens + (pool == "cls"), dim)
        )
        nn.init.trunc_normal_(self.pos_embedding, std=0.02)
        self.blocks = nn.Sequential(
            *(Block(dim, heads, mlp_dim, layer_norm, skip) for _ in range(depth))
        )
        self.norm = nn.LayerNorm(dim) if layer_norm else nn.Identity()
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x)
        if self.cls_token is not None:
            h = torch.cat([self.cls_token.expand(h.shape[0], -1, -1), h], dim=1)
        h = self.norm(self.blocks(h + self.pos_embedding))
        return self.head(h[:, 0] if self.cls_token is not None else h.mean(dim=1))


class SequencePatches(nn.Module):
    """Tokens from patches of length ``p`` of sequences ``(n, L)`` or ``(n, C, L)``.

    Token ``j`` embeds ``x[:, :, j*p : (j+1)*p]`` linearly (a ``Conv1d`` with kernel
    and stride ``p``). An input ``(n, L)`` is read as one channel.

    Attributes:
        proj: the ``Conv1d``.
    """

    def __init__(self, seq_len: int, in_channels: int, patch_size: int, dim: int):
        super().__init__()
        self.seq_len = seq_len
        self.in_channels = in_channels
        self.proj = nn.Conv1d(in_channels, dim, patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim == 2 and self.in_channels == 1:
            x = x.unsqueeze(1)
        if x.ndim != 3 or x.shape[1:] != (self.in_channels, self.seq_len):
            raise ValueError(
                f"transformer: expected inputs of shape (n, {self.in_channels}, "
                f"{self.seq_len})"
                + (f" or (n, {self.seq_len})" if self.in_channels == 1 else "")
                + f"; got {tuple(x.shape)}. Build the model with seq_len and "
                "in_channels matching the data."
            )
        return self.proj(x).transpose(1, 2)


def check_encoder(
    name: str,
    *,
    num_classes: int,
    dim: int,
    depth: int,
    heads: int,
    mlp_dim: int,
    layer_norm: bool,
    skip: bool,
    pool: str,
) -> None:
    """Check the options shared by every :class:`PatchTransformer`."""
    check_int(name, "num_classes", num_classes, 1)
    check_int(name, "dim", dim, 1)
    check_int(name, "depth", depth, 0)
    check_int(name, "heads", heads, 1)
    check_int(name, "mlp_dim", mlp_dim, 1)
    check_bool(name, "layer_norm", layer_norm)
    check_bool(name, "skip", skip)
    check_choice(name, "pool", pool, POOLS)
    if dim % heads:
        raise ValueError(
            f"{name}: dim must be divisible by heads (each head gets dim // heads "
            f"features); got dim={dim}, heads={heads}. Use heads in "
            f"{[h for h in divisors(dim) if h <= 64]} or a dim that is a multiple "
            f"of {heads} (e.g. {heads * max(1, round(dim / heads))})."
        )


def transformer(
    *,
    seq_len: int = 40,
    in_channels: int = 1,
    patch_size: int = 4,
    num_classes: int = 10,
    dim: int = 64,
    depth: int = 4,
    heads: int = 4,
    mlp_dim: int = 128,
    layer_norm: bool = True,
    skip: bool = True,
    pool: str = "cls",
    init_scale: float = 1.0,
    seed: int | None = None,
) -> PatchTransformer:
    """A small pre-norm transformer encoder for 1-D sequences (e.g. MNIST-1D).

    The sequence is cut into ``seq_len // patch_size`` patches, each embedded into
    a ``dim``-dimensional token; see the module docstring for the blocks.

    Args:
        seq_len: length ``L`` of the input sequences (40 for MNIST-1D); a multiple
            of ``patch_size``.
        in_channels: channels ``C`` of inputs ``(n, C, L)``; with 1, inputs
            ``(n, L)`` work too.
        patch_size: samples per token.
        num_classes: outputs.
        dim: token width.
        depth: number of encoder blocks.
        heads: attention heads; must divide ``dim``.
        mlp_dim: hidden units of each block's MLP (GELU).
        layer_norm: the pre-norm LayerNorms and the final one (``False`` replaces
            them by the identity).
        skip: residual connections around attention and MLP.
        pool: ``"cls"`` (a learned class token, as in ViT) or ``"mean"`` (the mean
            of the patch tokens) feeds the head.
        init_scale: factor on the initialisation of every parameter outside the
            LayerNorms: the patch embedding, q/k/v and output projections, MLP and
            head weights and biases (PyTorch defaults), the class token and the
            positional embedding (truncated normal, std 0.02). See
            :func:`~lossgeom.zoo._init.scale_init`.
        seed: seed construction locally (``None``: use torch's global RNG).

    Returns:
        The network, mapping ``(n, C, L)`` or ``(n, L)`` to ``(n, num_classes)``.
    """
    name = "transformer"
    check_int(name, "seq_len", seq_len, 1)
    check_int(name, "in_channels", in_channels, 1)
    check_int(name, "patch_size", patch_size, 1)
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
    if seq_len % patch_size:
        raise ValueError(
            f"{name}: seq_len must be a multiple of patch_size; got seq_len={seq_len}, "
            f"patch_size={patch_size}. Use patch_size in {divisors(seq_len)}."
        )
    return build(
        name,
        lambda: PatchTransformer(
            SequencePatches(seq_len, in_channels, patch_size, dim),
            num_tokens=seq_len // patch_size,
            **kw,
        ),
        init_scale=init_scale,
        seed=seed,
    )
