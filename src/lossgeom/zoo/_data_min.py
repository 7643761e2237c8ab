"""Interim data-set registry (digits only) until the full registry lands."""

from __future__ import annotations

import torch

from lossgeom.zoo._digits import digits


def datasets() -> dict[str, dict]:
    return {"digits": {"flatten": True, "test_fraction": 0.2}}


def dataset(name, root=None, split="train", subset=None, seed=0, **options):
    if name not in datasets():
        raise ValueError(
            f"unknown data set {name!r}; valid names: {sorted(datasets())}"
        )
    X, y = digits(split, seed=seed, **options)
    if subset is not None:
        idx = torch.randperm(X.shape[0], generator=torch.Generator().manual_seed(seed))
        X, y = X[idx[:subset]], y[idx[:subset]]
    return X, y
