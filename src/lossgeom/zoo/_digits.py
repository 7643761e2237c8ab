"""The sklearn digits data set (8x8 images, 10 classes), shipped with scikit-learn."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["digits"]


def digits(
    split: str = "train",
    *,
    test_fraction: float = 0.2,
    seed: int = 0,
    flatten: bool = True,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """Load sklearn's digits (1,797 samples, 64 pixels in 0..16, 10 classes).

    Pixels are scaled to [0, 1] and standardised with the training split's
    per-pixel mean and standard deviation. The train/test split is a seeded
    permutation, so the same ``seed`` always gives the same split.

    Args:
        split: ``"train"``, ``"test"`` or ``"all"``.
        test_fraction: fraction of samples in the test split.
        seed: seed of the split.
        flatten: inputs of shape ``(n, 64)``; otherwise ``(n, 1, 8, 8)``.
        dtype: dtype of the inputs.

    Returns:
        ``(inputs, labels)`` with int64 labels.
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all'; got {split!r}.")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1); got {test_fraction!r}.")
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the digits data set ships with scikit-learn; install it with "
            "`pip install scikit-learn` (or `pip install lossgeom[data]`)."
        ) from err
    bunch = load_digits()
    X = torch.as_tensor(bunch.data, dtype=torch.float64) / 16.0
    y = torch.as_tensor(bunch.target, dtype=torch.int64)
    perm = torch.randperm(X.shape[0], generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * X.shape[0]))
    train_idx, test_idx = perm[n_test:], perm[:n_test]
    mean = X[train_idx].mean(0)
    std = X[train_idx].std(0).clamp_min(1e-2)
    X = (X - mean) / std
    idx = {"train": train_idx, "test": test_idx, "all": perm}[split]
    X, y = X[idx].to(dtype), y[idx]
    if not flatten:
        X = X.view(-1, 1, 8, 8)
    return X, y
