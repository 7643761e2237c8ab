"""Turn what a user calls "data" into a fixed, re-iterable sequence of batches.

Three forms are accepted:

* ``(inputs, targets)``: a pair of tensors with the same first dimension;
* a map-style :class:`torch.utils.data.Dataset` of ``(input, target)`` pairs, read
  once and held as tensors;
* any re-iterable of ``(inputs, targets)`` batches, such as a
  :class:`~torch.utils.data.DataLoader`, streamed on every pass.

Every pass yields the same samples, so that a loss, a gradient and a
Hessian-vector product all refer to one function. A DataLoader with
``drop_last=True`` yields only its full batches: the objective is then over the
samples it yields, not its whole data set (a warning says so). Inputs must be
tensors: a dict of inputs is refused (wrap the model so that it takes one
tensor).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate

__all__ = ["Batch", "DataSource", "make_source"]

Batch = tuple[Tensor, Tensor]


@dataclass
class _Placement:
    device: torch.device
    dtype: torch.dtype

    def inputs(self, x: Tensor) -> Tensor:
        return x.to(self.device, self.dtype if x.is_floating_point() else None)

    def targets(self, y: Tensor) -> Tensor:
        return y.to(self.device, self.dtype if y.is_floating_point() else None)


class DataSource:
    """A fixed sequence of ``(inputs, targets)`` batches on the model's device.

    Attributes:
        kind: ``"tensors"``, ``"dataset"`` or ``"iterable"``.
        description: a short human-readable description for error messages.
    """

    def __init__(
        self,
        kind: str,
        description: str,
        *,
        tensors: Batch | None = None,
        iterable: Iterable | None = None,
        batch_size: int | None,
        placement: _Placement,
        max_samples: int | None = None,
    ):
        self.kind = kind
        self.description = description
        self._tensors = tensors
        self._iterable = iterable
        self._batch_size = batch_size
        self._placement = placement
        self._max_samples = max_samples
        self._cache: list[Batch] | None = None
        self._n_samples: int | None = (
            int(tensors[0].shape[0]) if tensors is not None else None
        )

    @property
    def n_samples(self) -> int:
        """Samples in one pass (on this rank); counts a pass if not yet known."""
        if self._n_samples is None:
            self._n_samples = sum(int(x.shape[0]) for x, _ in self.batches())
        return self._n_samples

    def batches(self) -> Iterator[Batch]:
        """Yield the batches of one pass, placed on the model's device and dtype."""
        if self._tensors is not None:
            X, Y = self._tensors
            n = X.shape[0]
            step = n if self._batch_size is None else self._batch_size
            for start in range(0, n, step):
                yield X[start : start + step], Y[start : start + step]
            return
        if self._cache is not None:
            yield from self._cache
            return
        if self._max_samples is not None:
            self._cache = list(self._stream(limit=self._max_samples))
            self._n_samples = sum(int(x.shape[0]) for x, _ in self._cache)
            yield from self._cache
            return
        count = 0
        for batch in self._stream():
            count += int(batch[0].shape[0])
            yield batch
        self._n_samples = count

    def _stream(self, limit: int | None = None) -> Iterator[Batch]:
        seen = 0
        for index, item in enumerate(self._iterable):
            x, y = _unpack_batch(item, index)
            if limit is not None:
                if seen >= limit:
                    return
                x, y = x[: limit - seen], y[: limit - seen]
            seen += int(x.shape[0])
            x, y = self._placement.inputs(x), self._placement.targets(y)
            step = x.shape[0] if self._batch_size is None else self._batch_size
            for start in range(0, x.shape[0], max(step, 1)):
                yield x[start : start + step], y[start : start + step]

    def shard(self, rank: int, world: int) -> None:
        """Keep this rank's contiguous share of the samples (tensor data only)."""
        if self._tensors is None:
            return  # iterables are sharded by the user's sampler
        X, Y = self._tensors
        n = X.shape[0]
        lo, hi = rank * n // world, (rank + 1) * n // world
        self._tensors = (X[lo:hi], Y[lo:hi])
        self._n_samples = hi - lo


def _unpack_batch(item: object, index: int) -> Batch:
    if (
        isinstance(item, (tuple, list))
        and len(item) == 2
        and isinstance(item[0], Tensor)
        and isinstance(item[1], Tensor)
    ):
        x, y = item
        if x.shape[:1] != y.shape[:1]:
            raise ValueError(
                f"batch {index}: inputs and targets must have the same number of "
                f"samples (first dimension); got inputs {tuple(x.shape)} and "
                f"targets {tuple(y.shape)}."
            )
        return x, y
    raise TypeError(
        f"batch {index}: expected an (inputs, targets) pair of tensors; got "
        f"{_describe(item)}. Make the loader yield (inputs, targets) tuples"
        + _DICT_HINT
    )


_DICT_HINT = (
    " (inputs given as a dict are not accepted: wrap the model in a module "
    "that takes one tensor and builds the dict)."
)


def _describe(obj: object) -> str:
    if isinstance(obj, Tensor):
        return f"a tensor of shape {tuple(obj.shape)}"
    if isinstance(obj, (tuple, list)):
        inner = ", ".join(_describe(o) for o in obj[:3])
        more = ", ..." if len(obj) > 3 else ""
        return f"a {type(obj).__name__} of {len(obj)} ({inner}{more})"
    return type(obj).__name__


def _subset_indices(n: int, max_samples: int | None, seed: int) -> Tensor | None:
    if max_samples is None or max_samples >= n:
        return None
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=gen)[:max_samples].sort().values


def make_source(
    data: object,
    *,
    max_samples: int | None,
    batch_size: int | None,
    seed: int,
    device: torch.device,
    dtype: torch.dtype,
) -> DataSource:
    """Build a :class:`DataSource` from any accepted data form, validating it.

    Args:
        data: ``(inputs, targets)``, a map-style Dataset, or a re-iterable of batches.
        max_samples: keep a fixed subset of this many samples (seeded for tensors
            and Datasets; the first ones of a pass for iterables).
        batch_size: evaluate at most this many samples at once.
        seed: seed of the subset.
        device: where batches go (the model's device).
        dtype: floating-point inputs and targets are cast to this dtype.

    Returns:
        The data source.
    """
    if max_samples is not None and (
        not isinstance(max_samples, int) or max_samples < 1
    ):
        raise ValueError(
            f"max_samples must be a positive integer or None; got {max_samples!r}."
        )
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(
            f"batch_size must be a positive integer or None; got {batch_size!r}."
        )
    place = _Placement(torch.device(device), dtype)
    if (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and all(isinstance(t, Tensor) for t in data)
    ):
        return _from_tensors(data[0], data[1], max_samples, batch_size, seed, place)
    if (
        isinstance(data, Dataset)
        and not isinstance(data, IterableDataset)
        and hasattr(data, "__len__")
    ):
        return _from_dataset(data, max_samples, batch_size, seed, place)
    if isinstance(data, Iterable) and not isinstance(data, (str, bytes, Tensor)):
        if iter(data) is data:
            raise TypeError(
                f"the data is a one-shot iterator ({type(data).__name__}): probes pass "
                "over the data many times. Pass a re-iterable such as a list of "
                "batches or a DataLoader."
            )
        if isinstance(data, DataLoader) and data.drop_last:
            warnings.warn(
                "the DataLoader has drop_last=True: the objective is over the "
                "samples of the batches it yields, without the samples it drops. "
                "Pass drop_last=False for the loss over the whole data set.",
                UserWarning,
                stacklevel=3,
            )
        # emptiness shows on the first read, in Objective's validation pass
        return DataSource(
            "iterable",
            f"{type(data).__name__}",
            iterable=data,
            batch_size=batch_size,
            placement=place,
            max_samples=max_samples,
        )
    raise TypeError(
        "expected data as an (inputs, targets) pair of tensors, a map-style Dataset "
        f"of (input, target) pairs, or a re-iterable of batches; got {_describe(data)}."
    )


def _from_tensors(
    X: Tensor,
    Y: Tensor,
    max_samples: int | None,
    batch_size: int | None,
    seed: int,
    place: _Placement,
) -> DataSource:
    """A source over ``(inputs, targets)`` tensors, checked and subset."""
    if X.ndim == 0 or Y.ndim == 0:
        raise ValueError(
            "expected inputs and targets with a leading sample dimension; got "
            f"inputs {tuple(X.shape)} and targets {tuple(Y.shape)}."
        )
    if X.shape[0] != Y.shape[0]:
        raise ValueError(
            "inputs and targets must have the same number of samples (first "
            f"dimension); got inputs {tuple(X.shape)} and targets "
            f"{tuple(Y.shape)}."
        )
    if X.shape[0] == 0:
        raise ValueError(
            "the data is empty: inputs and targets have 0 samples. Pass at least "
            "one sample."
        )
    idx = _subset_indices(X.shape[0], max_samples, seed)
    if idx is not None:
        X, Y = X[idx], Y[idx]
    tensors = (place.inputs(X), place.targets(Y))
    return DataSource(
        "tensors",
        f"tensors: inputs {tuple(X.shape)}, targets {tuple(Y.shape)}",
        tensors=tensors,
        batch_size=batch_size,
        placement=place,
    )


def _from_dataset(
    data: Dataset,
    max_samples: int | None,
    batch_size: int | None,
    seed: int,
    place: _Placement,
) -> DataSource:
    """A source over a map-style Dataset, read once (or its subset) and collated."""
    n = len(data)
    if n == 0:
        raise ValueError(
            f"the data is empty: the {type(data).__name__} has 0 samples. Pass at "
            "least one sample."
        )
    idx = _subset_indices(n, max_samples, seed)
    order = range(n) if idx is None else idx.tolist()
    items = []
    for i in order:
        item = data[i]
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise TypeError(
                f"sample {i} of the {type(data).__name__}: expected an (input, "
                f"target) pair; got {_describe(item)}."
            )
        items.append(tuple(item))
    X, Y = default_collate(items)
    if not isinstance(X, Tensor) or not isinstance(Y, Tensor):
        raise TypeError(
            f"the {type(data).__name__}'s samples must collate to tensors; got "
            f"inputs {_describe(X)} and targets {_describe(Y)}" + _DICT_HINT
        )
    return DataSource(
        "dataset",
        f"{type(data).__name__} of {len(order)} samples",
        tensors=(place.inputs(X), place.targets(Y)),
        batch_size=batch_size,
        placement=place,
    )
