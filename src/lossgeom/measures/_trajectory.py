"""The effective dimension of a training trajectory (updates or gradients).

:func:`effective_dimension` counts the principal components of a set of vectors
(parameter updates or gradients along training) that explain a fraction
``threshold`` of their variance; :class:`TrajectoryRecorder` collects the vectors
during training. (The effective rank of the Hessian is
:func:`lossgeom.effective_rank`.)
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from lossgeom._results import Result, timed
from lossgeom.measures._checks import _check_int, _check_threshold

__all__ = ["EffectiveDimensionResult", "TrajectoryRecorder", "effective_dimension"]


# ---------------------------------------------------------- effective dimension
@dataclass(frozen=True)
class EffectiveDimensionResult(Result):
    """How many principal components explain a fraction of the variance.

    Attributes:
        dimension: smallest ``k`` whose first ``k`` components explain at least
            ``threshold`` of the variance (0 if the vectors do not vary).
        threshold: the fraction asked for.
        explained_variance_ratio: variance fraction of each component, largest
            first, shape ``(r,)`` with ``r = min(T, D)`` (``T - 1`` if centred).
        cumulative: running sum of ``explained_variance_ratio``.
        n_vectors: ``T``, the number of vectors analysed.
        num_params: ``D``, their length.
        centered: whether the mean vector was subtracted first.
        source: ``"vectors"`` or ``"checkpoint differences"``.
        definition: the definition, in words.
        parameters: the inputs.
        cost: seconds spent.
    """

    dimension: int
    threshold: float
    explained_variance_ratio: Tensor
    cumulative: Tensor
    n_vectors: int
    num_params: int
    centered: bool
    source: str

    def scalars(self) -> dict[str, float]:
        """The effective dimension (``value``)."""
        return {"value": float(self.dimension)}


def _flat_rows(vectors: object, keys: Sequence[str] | None) -> Tensor:
    """Stack a ``(T, D)`` tensor or a list of flat vectors / state dicts."""
    if isinstance(vectors, Tensor):
        rows = vectors
    elif isinstance(vectors, Sequence) and not isinstance(vectors, str) and vectors:
        first = vectors[0]
        if isinstance(first, Mapping):
            names = (
                list(keys)
                if keys is not None
                else [k for k, v in first.items() if torch.is_floating_point(v)]
            )
            flat = []
            for i, state in enumerate(vectors):
                if not isinstance(state, Mapping):
                    raise ValueError(
                        f"vectors mixes state dicts and other items (item {i} is "
                        f"{type(state).__name__}); pass all state dicts or all "
                        "flat vectors."
                    )
                missing = [k for k in names if k not in state]
                if missing:
                    raise ValueError(
                        f"state dict {i} lacks entries {missing[:3]}; every state "
                        f"dict needs the entries {names[:3]}... (pass keys= to "
                        "choose the entries, e.g. the model's parameter names)."
                    )
                flat.append(torch.cat([state[k].detach().reshape(-1) for k in names]))
            rows = torch.stack(flat)
        elif all(isinstance(v, Tensor) for v in vectors):
            lengths = {v.numel() for v in vectors}
            if len(lengths) != 1:
                raise ValueError(
                    f"the flat vectors have different lengths {sorted(lengths)}; "
                    "they must all have the parameter count D."
                )
            rows = torch.stack([v.detach().reshape(-1) for v in vectors])
        else:
            raise ValueError(
                "expected vectors as a (T, D) tensor, or a list of flat tensors or "
                "state dicts; the list holds "
                f"{sorted({type(v).__name__ for v in vectors})}."
            )
    else:
        raise ValueError(
            "expected vectors as a (T, D) tensor, or a non-empty list of flat "
            f"tensors or state dicts; got {type(vectors).__name__}."
        )
    if rows.ndim != 2 or not rows.is_floating_point():
        raise ValueError(
            "expected a floating (T, D) tensor (one vector per row); got shape "
            f"{tuple(rows.shape)} and dtype {rows.dtype}."
        )
    return rows.detach()


def effective_dimension(
    vectors: object,
    threshold: float = 0.9,
    *,
    differences: bool = False,
    center: bool = True,
    keys: Sequence[str] | None = None,
) -> EffectiveDimensionResult:
    """The number of principal components explaining ``threshold`` of the variance.

    For ``T`` vectors of length ``D`` (rows ``v_t``: parameter updates or
    gradients along training) with singular values ``s_1 >= s_2 >= ...`` of the
    matrix of rows (after subtracting their mean when ``center``), the explained
    variance ratios are ``s_i^2 / sum_j s_j^2`` and the effective dimension is
    the smallest ``k`` whose first ``k`` ratios add up to ``threshold``. It is
    computed in float64 on the vectors' device, ``O(T^2 D)`` work.

    With ``differences=True`` the rows are checkpoints ``theta_0, ..., theta_T``
    and the vectors are the updates ``theta_{t+1} - theta_t``.
    ``center=False`` analyses the second moment instead, so a common drift
    counts as a direction. For the Hessian's effective rank see
    :func:`lossgeom.effective_rank`; for the plane of a trajectory see
    :func:`lossgeom.pca_directions`.

    Args:
        vectors: a ``(T, D)`` tensor, or a list of flat vectors or state dicts
            (flattened in ``keys`` order: by default their floating entries in the
            first dict's order; pass the model's parameter names to leave out
            buffers such as BatchNorm statistics).
        threshold: the fraction of variance, in (0, 1].
        differences: take consecutive differences of the rows first.
        center: subtract the mean vector first.
        keys: state-dict entries to use.

    Returns:
        An :class:`EffectiveDimensionResult` with the explained-variance curve.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> basis = torch.randn(3, 100, generator=g, dtype=torch.float64)
        >>> updates = torch.randn(50, 3, generator=g, dtype=torch.float64) @ basis
        >>> effective_dimension(updates, 0.99).dimension
        3
    """
    threshold = _check_threshold(threshold)
    with timed() as meter:
        rows = _flat_rows(vectors, keys)
        if differences:
            if rows.shape[0] < 2:
                raise ValueError(
                    "differences=True needs at least 2 checkpoints; got "
                    f"{rows.shape[0]}."
                )
            rows = rows[1:] - rows[:-1]
        T, D = rows.shape
        if T < 1 + center:
            raise ValueError(
                f"need at least {1 + center} vectors"
                + (" (the variance of one vector is zero)" if center else "")
                + f"; got {T}."
            )
        M = rows.to(torch.float64)
        if center:
            M = M - M.mean(0)
        s2 = torch.linalg.svdvals(M).square()
        if center:
            s2 = s2[: T - 1]
        total = s2.sum()
        if total > 0:
            ratio = s2 / total
            cum = ratio.cumsum(0)
            reached = cum >= threshold * (1 - 1e-12)
            dimension = int(reached.nonzero()[0].item()) + 1
        else:
            ratio = torch.zeros_like(s2)
            cum = torch.zeros_like(s2)
            dimension = 0
    return EffectiveDimensionResult(
        dimension=dimension,
        threshold=threshold,
        explained_variance_ratio=ratio.cpu(),
        cumulative=cum.cpu(),
        n_vectors=T,
        num_params=D,
        centered=center,
        source="checkpoint differences" if differences else "vectors",
        definition=(
            "smallest k such that the k largest principal components of the "
            + ("mean-centred " if center else "uncentred ")
            + "vectors explain at least threshold of their total variance "
            "(squared singular values)"
        ),
        parameters={
            "threshold": threshold,
            "differences": differences,
            "center": center,
            "keys": list(keys) if keys is not None else None,
        },
        cost=meter.cost,
    )


class TrajectoryRecorder:
    """Collect parameter updates or gradients during training.

    Call it (with any arguments, so it can serve as a training callback) after
    each optimizer step; every ``every``-th call stores, on the CPU, the change
    of the trainable parameters since the previous stored call
    (``what="updates"``) or their current ``.grad`` (``what="gradients"``). At
    most ``max_vectors`` are kept (the latest). :meth:`result` gives their
    :func:`effective_dimension`. The model is only read.

    Args:
        model: the network being trained.
        what: ``"updates"`` or ``"gradients"``.
        every: store on every ``every``-th call.
        max_vectors: keep at most this many vectors (``None``: all).

    Example:
        >>> net = nn.Linear(4, 2)
        >>> rec = TrajectoryRecorder(net)
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> for _ in range(5):
        ...     opt.zero_grad()
        ...     net(torch.randn(8, 4)).square().mean().backward()
        ...     opt.step()
        ...     rec()
        >>> rec.vectors().shape
        torch.Size([5, 10])
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        what: Literal["updates", "gradients"] = "updates",
        every: int = 1,
        max_vectors: int | None = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"expected an nn.Module; got {type(model).__name__}.")
        if what not in ("updates", "gradients"):
            raise ValueError(f"what must be 'updates' or 'gradients'; got {what!r}.")
        self.every = _check_int("every", every, 1)
        if max_vectors is not None:
            _check_int("max_vectors", max_vectors, 1)
        self.model, self.what = model, what
        self._params = [p for p in model.parameters() if p.requires_grad]
        self._stored: deque[Tensor] = deque(maxlen=max_vectors)
        self._last = self._flat() if what == "updates" else None
        self.calls = 0

    def _flat(self) -> Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self._params]).cpu().clone()

    def __call__(self, *args: object, **kwargs: object) -> None:
        """Record (every ``every``-th call); arguments are ignored."""
        self.calls += 1
        if self.calls % self.every:
            return
        if self.what == "updates":
            now = self._flat()
            self._stored.append(now - self._last)
            self._last = now
        else:
            grads = [
                torch.zeros_like(p) if p.grad is None else p.grad for p in self._params
            ]
            self._stored.append(
                torch.cat([g.detach().reshape(-1) for g in grads]).cpu().clone()
            )

    def __len__(self) -> int:
        """How many vectors are stored now."""
        return len(self._stored)

    def vectors(self) -> Tensor:
        """The stored vectors, shape ``(T, D)``."""
        if not self._stored:
            raise ValueError(
                "nothing recorded yet: call the recorder after optimizer steps."
            )
        return torch.stack(list(self._stored))

    def result(
        self, threshold: float = 0.9, *, center: bool = True
    ) -> EffectiveDimensionResult:
        """:func:`effective_dimension` of the stored vectors."""
        return effective_dimension(self.vectors(), threshold, center=center)
