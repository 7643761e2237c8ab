"""The batch of each step: seeded order and augmentation, a function of (seed, step)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lossgeom.train._config import TrainConfig

__all__ = ["augment", "step_generator", "training_batch"]


def training_batch(
    cfg: TrainConfig,
    data: tuple[Tensor, Tensor],
    step: int,
    shard: tuple[int, int] = (0, 1),
) -> tuple[Tensor, Tensor]:
    """The (augmented) batch of update ``step``: the same for the same config.

    Batches come from a permutation per epoch and augmentation from a generator
    per step, both seeded by ``(cfg.seed, step)``, so resuming needs no saved
    data-order state.

    Args:
        cfg: the run's config.
        data: the training set.
        step: the update (0-based).
        shard: ``(rank, world_size)``: this rank's contiguous share of the
            global batch (whose size the world size divides); the default is
            the whole batch. Augmentation draws for the whole global batch, so
            the shards together are exactly the one-process batch.
    """
    X, y = data
    rank, world = shard
    idx = _batch_indices(cfg, X.shape[0], step)
    size = X.shape[0] if idx is None else idx.shape[0]
    part = slice(rank * size // world, (rank + 1) * size // world)
    if cfg.augment is None:  # gather this rank's rows only
        if idx is None:
            return X[part], y[part]
        idx = idx[part]
    if idx is not None:
        idx = idx.to(X.device)
        X, y = X[idx], y[idx]
    if cfg.augment is not None:
        a = cfg.augment
        X = augment(X, a.crop_padding, a.flip, step_generator(cfg.seed, step, 2))
        X, y = X[part], y[part]
    return X, y


def step_generator(seed: int, step: int, salt: int) -> torch.Generator:
    """A generator that depends on (seed, step) only: resuming needs no saved state."""
    return torch.Generator().manual_seed(
        (seed * 1_000_003 + step * 7_919 + salt) % 2**63
    )


def _batch_indices(cfg: TrainConfig, n: int, step: int) -> Tensor | None:
    if cfg.full_batch or cfg.batch_size >= n:
        return None
    per_epoch = n // cfg.batch_size
    epoch, pos = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=step_generator(cfg.seed, epoch, 1))
    return perm[pos * cfg.batch_size : (pos + 1) * cfg.batch_size]


def augment(X: Tensor, crop_padding: int, flip: bool, gen: torch.Generator) -> Tensor:
    """Random crop after zero padding, and random horizontal flip, per image.

    Args:
        X: images ``(n, C, H, W)``.
        crop_padding: pixels of zero padding before cropping back to ``H x W``.
        flip: flip each image left-right with probability 1/2.
        gen: the generator of the random choices (on the CPU).

    Returns:
        The augmented batch (a new tensor).

    Example:
        >>> X = torch.arange(16.0).view(1, 1, 4, 4)
        >>> out = augment(X, 0, True, torch.Generator().manual_seed(0))
        >>> bool((out == X).all() or (out == X.flip(-1)).all())
        True
    """
    if X.ndim != 4:
        raise ValueError(
            f"augmentation works on images of shape (n, C, H, W); got inputs of shape "
            f"{tuple(X.shape)}. Set augment: null for this data set."
        )
    n, _, h, w = X.shape
    out = X
    if crop_padding:
        p = crop_padding
        padded = nn.functional.pad(X, (p, p, p, p))
        dy = torch.randint(0, 2 * p + 1, (n,), generator=gen)
        dx = torch.randint(0, 2 * p + 1, (n,), generator=gen)
        rows = (dy.view(n, 1) + torch.arange(h)).to(X.device)  # (n, h)
        cols = (dx.view(n, 1) + torch.arange(w)).to(X.device)  # (n, w)
        idx_r = rows.view(n, 1, h, 1).expand(n, X.shape[1], h, w + 2 * p)
        out = padded.gather(2, idx_r)
        idx_c = cols.view(n, 1, 1, w).expand(n, X.shape[1], h, w)
        out = out.gather(3, idx_c)
    if flip:
        mask = (torch.rand(n, generator=gen) < 0.5).to(X.device).view(n, 1, 1, 1)
        out = torch.where(mask, out.flip(-1), out)
    return out
