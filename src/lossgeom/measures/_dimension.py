"""Dimensionality: effective dimension of trajectories, intrinsic dimension of tasks.

Two measures of how many directions of parameter space matter:

- :func:`effective_dimension`: the number of principal components of a set of
  vectors (parameter updates or gradients along training) that explain a fraction
  ``threshold`` of their variance. :class:`TrajectoryRecorder` collects the vectors
  during training. (The effective rank of the Hessian is
  :func:`lossgeom.effective_rank`.)
- :func:`intrinsic_dimension`: the smallest number ``d`` of trainable coordinates
  ``z`` in ``theta = theta0 + P z`` (a random ``D x d`` projection ``P``, ``theta0``
  the frozen initialisation) with which training reaches ``threshold`` times the
  accuracy of the full model (Li et al. 2018, "Measuring the intrinsic dimension
  of objective landscapes"). The projections are :class:`DenseProjection`
  (Gaussian, unit-norm columns), :class:`SparseProjection` (very sparse random
  projection, Li, Hastie & Church 2006) and :class:`FastfoodProjection` (Le,
  Sarlos & Smola 2013, memory ``O(D)``), all seeded linear maps with a transpose
  product.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from lossgeom.linalg import check_block
from lossgeom.measures._common import dataclass_to_dict, measure_cost
from lossgeom.objective import Objective

__all__ = [
    "DenseProjection",
    "EffectiveDimensionResult",
    "FastfoodProjection",
    "IntrinsicDimensionResult",
    "Projection",
    "SparseProjection",
    "SubspaceRun",
    "TrajectoryRecorder",
    "effective_dimension",
    "fwht",
    "intrinsic_dimension",
    "random_projection",
    "subspace_train",
]

ProjectionKind = Literal["dense", "sparse", "fastfood"]
_KINDS = ("dense", "sparse", "fastfood")


# ------------------------------------------------------------------ input checks
def _check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if not ok or value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be an integer {bound}; got {value!r}.")
    return int(value)


def _check_threshold(threshold: object) -> float:
    if (
        isinstance(threshold, bool)
        or not isinstance(threshold, (int, float))
        or not 0 < threshold <= 1
    ):
        raise ValueError(
            f"threshold must be a fraction in (0, 1] (e.g. 0.9 for 90%); got "
            f"{threshold!r}."
        )
    return float(threshold)


def _check_subspace(dim: object, num_params: int) -> int:
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)):
        raise ValueError(
            f"the subspace size d must be an integer; got {dim!r} "
            f"({type(dim).__name__})."
        )
    if dim < 1:
        raise ValueError(
            f"the subspace size d must be at least 1; got d={dim}. Use d >= 1."
        )
    if dim > num_params:
        raise ValueError(
            f"the subspace size d={dim} exceeds the parameter count D={num_params}: "
            f"a random subspace has at most D dimensions. Use d <= {num_params} "
            "(d = D already reaches every parameter)."
        )
    return int(dim)


# ------------------------------------------------------------- Walsh-Hadamard
def fwht(x: Tensor) -> Tensor:
    """The fast Walsh-Hadamard transform ``H x`` along the last dimension.

    ``H`` is the unnormalised Sylvester-ordered Hadamard matrix of size ``n``
    (entries ``+-1``, ``H @ H = n I``; ``scipy.linalg.hadamard(n)``), applied in
    ``log2 n`` butterfly passes: ``O(n log n)`` work and ``O(n)`` memory per
    vector. Differentiable; any leading dimensions are batch dimensions.

    Args:
        x: a tensor whose last dimension ``n`` is a power of two.

    Returns:
        ``H x`` with the shape of ``x``.

    Raises:
        ValueError: the last dimension is not a power of two.

    Example:
        >>> fwht(torch.tensor([1.0, 0.0, 0.0, 0.0]))
        tensor([1., 1., 1., 1.])
        >>> fwht(torch.tensor([1.0, 2.0]))
        tensor([ 3., -1.])
    """
    n = x.shape[-1] if x.ndim else 0
    if n < 1 or n & (n - 1):
        raise ValueError(
            "fwht needs a last dimension that is a power of two; got shape "
            f"{tuple(x.shape)}. Pad with zeros to the next power of two."
        )
    batch = x.shape[:-1]
    y = x
    h = 1
    while h < n:
        a, b = y.reshape(*batch, n // (2 * h), 2, h).unbind(-2)
        y = torch.stack((a + b, a - b), dim=-2)
        h *= 2
    return y.reshape(*batch, n) if n > 1 else x.clone()


# ------------------------------------------------------------------ projections
class _Apply(torch.autograd.Function):
    """``P z`` (or ``P^T v``) whose backward is the transpose product.

    Differentiating through the product with the transpose map keeps no
    intermediates, so training ``z`` costs the memory of two products.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, proj: Projection, transpose: bool) -> Tensor:
        ctx.proj, ctx.transpose = proj, transpose
        return proj._rmatmat(x) if transpose else proj._matmat(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        proj = ctx.proj
        out = proj._matmat(grad) if ctx.transpose else proj._rmatmat(grad)
        return out, None, None


class Projection:
    """A seeded random linear map ``P: R^d -> R^D`` (``D`` parameters, ``d`` coordinates).

    ``P(z)`` (or ``P @ z``) maps a vector ``(d,)`` or a block ``(d, k)`` to
    ``(D,)`` or ``(D, k)``; :meth:`transpose` maps ``(D,)``/``(D, k)`` back. Both
    are differentiable, the gradient of one being the other. Subclasses are
    scaled so that ``E ||P z||^2 = ||z||^2`` (columns of unit norm, exactly or
    in expectation), so one step in ``z`` moves ``theta`` comparably for every
    kind and size.

    Attributes:
        kind: ``"dense"``, ``"sparse"`` or ``"fastfood"``.
        num_params: ``D``, the output size.
        dim: ``d``, the input size (the subspace dimension).
        seed: the seed that fixes the map.
        device: device of the map and of its inputs and outputs.
        dtype: floating dtype of the map and of its inputs and outputs.
    """

    kind: str = ""

    def __init__(
        self,
        num_params: int,
        dim: int,
        *,
        seed: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        self.num_params = _check_int("num_params (D)", num_params, 1)
        self.dim = _check_subspace(dim, self.num_params)
        self.seed = _check_int("seed", seed, 0)
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(
                f"dtype must be a floating torch.dtype such as torch.float32; got "
                f"{dtype!r}."
            )
        self.device = torch.device("cpu" if device is None else device)
        self.dtype = dtype

    @property
    def shape(self) -> tuple[int, int]:
        """``(D, d)``."""
        return (self.num_params, self.dim)

    def buffers(self) -> dict[str, Tensor]:
        """Every tensor the map holds, by name (its whole memory)."""
        raise NotImplementedError  # pragma: no cover - abstract

    @property
    def nbytes(self) -> int:
        """Bytes held by :meth:`buffers`."""
        return sum(t.numel() * t.element_size() for t in self.buffers().values())

    def __call__(self, z: Tensor) -> Tensor:
        """``P z`` for ``z`` of shape ``(d,)`` or ``(d, k)``."""
        check_block(z, self.dim, self.dtype, self.device)
        out = _Apply.apply(z.reshape(self.dim, -1), self, False)
        return out.reshape(self.num_params) if z.ndim == 1 else out

    def __matmul__(self, z: Tensor) -> Tensor:
        """``P @ z``, the same as ``P(z)``."""
        return self(z)

    def transpose(self, v: Tensor) -> Tensor:
        """``P^T v`` for ``v`` of shape ``(D,)`` or ``(D, k)``."""
        check_block(v, self.num_params, self.dtype, self.device)
        out = _Apply.apply(v.reshape(self.num_params, -1), self, True)
        return out.reshape(self.dim) if v.ndim == 1 else out

    def to_dense(self, *, max_entries: int = 10**7) -> Tensor:
        """The ``(D, d)`` matrix, materialised column block by column block.

        Meant for checks on small maps; refuses more than ``max_entries`` entries.
        """
        if self.num_params * self.dim > max_entries:
            raise ValueError(
                f"materialising a {self.num_params} x {self.dim} projection needs "
                f"{self.num_params * self.dim} entries, more than max_entries="
                f"{max_entries}. Apply the map to vectors instead, or raise "
                "max_entries if the memory is there."
            )
        eye = torch.eye(self.dim, dtype=self.dtype, device=self.device)
        with torch.no_grad():
            return self._matmat(eye)

    def _matmat(self, Z: Tensor) -> Tensor:  # (d, k) -> (D, k)
        raise NotImplementedError  # pragma: no cover - abstract

    def _rmatmat(self, V: Tensor) -> Tensor:  # (D, k) -> (d, k)
        raise NotImplementedError  # pragma: no cover - abstract

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(D={self.num_params}, d={self.dim}, seed="
            f"{self.seed}, dtype={self.dtype}, device={self.device}, "
            f"nbytes={self.nbytes})"
        )


class DenseProjection(Projection):
    """A Gaussian ``D x d`` matrix with columns normalised to unit norm (Li et al. 2018).

    Holds ``D d`` numbers, so it is refused for ``D > 100_000`` parameters or
    more than ``10**8`` entries unless ``allow_large=True``: use
    :class:`FastfoodProjection` (memory ``O(D)``) or :class:`SparseProjection`
    there.

    Args:
        num_params: ``D``.
        dim: ``d``, between 1 and ``D``.
        seed: fixes the matrix (drawn in float64 on the CPU, then cast and
            moved, so the same seed gives the same map on every device).
        device: device of the map.
        dtype: dtype of the map.
        allow_large: build it even above the size limits.

    Example:
        >>> P = DenseProjection(50, 3, seed=0, dtype=torch.float64)
        >>> P.to_dense().norm(dim=0)
        tensor([1.0000, 1.0000, 1.0000], dtype=torch.float64)
    """

    kind = "dense"
    max_params = 100_000
    max_entries = 10**8

    def __init__(
        self,
        num_params: int,
        dim: int,
        *,
        seed: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        allow_large: bool = False,
    ):
        super().__init__(num_params, dim, seed=seed, device=device, dtype=dtype)
        D, d = self.num_params, self.dim
        if not allow_large and (D > self.max_params or D * d > self.max_entries):
            raise ValueError(
                f"a dense projection for D={D} parameters and d={d} holds a "
                f"{D} x {d} matrix ({D * d} entries); dense projections are limited "
                f"to D <= {self.max_params} and D*d <= {self.max_entries}. Use "
                "projection='fastfood' (memory O(D)) or 'sparse', or pass "
                "allow_large=True if the memory is there."
            )
        gen = torch.Generator().manual_seed(self.seed)
        M = torch.randn(D, d, generator=gen, dtype=torch.float64)
        M /= M.norm(dim=0, keepdim=True)
        self.matrix = M.to(device=self.device, dtype=self.dtype)

    def buffers(self) -> dict[str, Tensor]:
        """``{"matrix": (D, d)}``."""
        return {"matrix": self.matrix}

    def _matmat(self, Z: Tensor) -> Tensor:
        return self.matrix @ Z

    def _rmatmat(self, V: Tensor) -> Tensor:
        return self.matrix.T @ V


class SparseProjection(Projection):
    """A very sparse random projection (Li, Hastie & Church 2006).

    Each entry is nonzero with probability ``density`` (default ``1/sqrt(D)``),
    with a random sign; every column is scaled to unit norm (its nonzeros share
    one magnitude ``1/sqrt(nnz_j)``), and a column that drew no nonzero gets
    one at a random row. The map is stored as coordinate lists ``rows``,
    ``cols``, ``values`` (``nnz ~ d sqrt(D)`` each); :meth:`to_sparse_coo` gives
    the ``torch.sparse_coo_tensor``. Positions are drawn with replacement from
    the ``D d`` grid and repeats dropped, so building never touches all ``D d``
    entries.

    Args:
        num_params: ``D``.
        dim: ``d``, between 1 and ``D``.
        seed: fixes the map (drawn on the CPU, then moved).
        device: device of the map.
        dtype: dtype of the values.
        density: the fraction of nonzero entries, in (0, 1].

    Example:
        >>> P = SparseProjection(10_000, 20, seed=0, dtype=torch.float64)
        >>> round(P.nnz / (10_000 * 20), 3)  # about 1/sqrt(D) = 0.01
        0.01
        >>> bool(torch.allclose(P.to_dense().norm(dim=0), torch.ones(20, dtype=torch.float64)))
        True
    """

    kind = "sparse"

    def __init__(
        self,
        num_params: int,
        dim: int,
        *,
        seed: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        density: float | None = None,
    ):
        super().__init__(num_params, dim, seed=seed, device=device, dtype=dtype)
        D, d = self.num_params, self.dim
        if density is None:
            density = 1.0 / math.sqrt(D)
        if isinstance(density, bool) or not (
            isinstance(density, (int, float)) and 0 < density <= 1
        ):
            raise ValueError(
                f"density must be a fraction in (0, 1] (default 1/sqrt(D)); got "
                f"{density!r}."
            )
        self.density = float(density)
        gen = torch.Generator().manual_seed(self.seed)
        total = D * d
        count = max(1, round(total * self.density))
        if self.density == 1.0:
            flat = torch.arange(total)
        else:
            flat = torch.randint(0, total, (count,), generator=gen).unique()
        cols, rows = flat // D, flat % D
        empty = torch.ones(d, dtype=torch.bool)
        empty[cols] = False
        if empty.any():
            extra_cols = empty.nonzero().flatten()
            extra_rows = torch.randint(0, D, (extra_cols.numel(),), generator=gen)
            cols = torch.cat([cols, extra_cols])
            rows = torch.cat([rows, extra_rows])
        signs = torch.randint(0, 2, (cols.numel(),), generator=gen) * 2.0 - 1.0
        per_col = torch.bincount(cols, minlength=d).to(torch.float64)
        values = signs.double() / per_col.sqrt()[cols]
        self.rows = rows.to(self.device)
        self.cols = cols.to(self.device)
        self.values = values.to(device=self.device, dtype=self.dtype)

    @property
    def nnz(self) -> int:
        """Number of nonzero entries."""
        return self.values.numel()

    def buffers(self) -> dict[str, Tensor]:
        """``{"rows", "cols", "values"}``, each of length ``nnz``."""
        return {"rows": self.rows, "cols": self.cols, "values": self.values}

    def to_sparse_coo(self) -> Tensor:
        """The map as a coalesced ``(D, d)`` ``torch.sparse_coo_tensor``."""
        index = torch.stack([self.rows, self.cols])
        return torch.sparse_coo_tensor(
            index, self.values, self.shape, check_invariants=True
        ).coalesce()

    def _matmat(self, Z: Tensor) -> Tensor:
        out = Z.new_zeros(self.num_params, Z.shape[1])
        return out.index_add_(0, self.rows, self.values[:, None] * Z[self.cols])

    def _rmatmat(self, V: Tensor) -> Tensor:
        out = V.new_zeros(self.dim, V.shape[1])
        return out.index_add_(0, self.cols, self.values[:, None] * V[self.rows])


class FastfoodProjection(Projection):
    r"""The Fastfood transform (Le, Sarlos & Smola 2013): memory and work ``O(D)``.

    With ``n`` the smallest power of two ``>= d`` and ``m = ceil(D / n)``
    independent blocks, block ``b`` maps ``z`` (zero-padded to ``n``) to
    ``V_b z = c S_b H G_b Pi_b H B_b z``: ``B_b`` random signs, ``H`` the
    Walsh-Hadamard matrix (:func:`fwht`, never stored), ``Pi_b`` a random
    permutation, ``G_b`` Gaussian diagonal, ``S_b`` the diagonal
    ``s_i / ||G_b||`` with ``s_i ~ chi(n)`` (so rows have Gaussian-like norms).
    The blocks are stacked and cut to ``D`` rows. The scale
    ``c = 1 / sqrt(D n)`` makes ``E_S ||P z||^2 = ||z||^2`` exactly when ``n``
    divides ``D`` (each block column has ``||H G Pi H B e_j||^2 = n ||G_b||^2``),
    and up to the cut last block otherwise: the columns have unit norm in
    expectation.

    The map holds four ``(m, n)`` tensors (``signs``, ``perm``, ``gauss``,
    ``scale``; ``m n < D + n``), never a ``D x d`` matrix; a product costs
    ``O(D log d)``.

    Args:
        num_params: ``D``.
        dim: ``d``, between 1 and ``D``.
        seed: fixes the map (drawn on the CPU, then moved).
        device: device of the map.
        dtype: dtype of the map.

    Example:
        >>> P = FastfoodProjection(200_000, 1000, seed=0)
        >>> P.block_size, P.num_blocks
        (1024, 196)
        >>> sum(t.numel() for t in P.buffers().values()) < 5 * 200_000
        True
        >>> P(torch.zeros(1000)).shape
        torch.Size([200000])
    """

    kind = "fastfood"

    def __init__(
        self,
        num_params: int,
        dim: int,
        *,
        seed: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__(num_params, dim, seed=seed, device=device, dtype=dtype)
        D, d = self.num_params, self.dim
        n = 1 << (d - 1).bit_length()
        m = -(-D // n)
        self.block_size, self.num_blocks = n, m
        gen = torch.Generator().manual_seed(self.seed)
        signs = torch.randint(0, 2, (m, n), generator=gen) * 2.0 - 1.0
        perm = torch.argsort(torch.rand(m, n, generator=gen, dtype=torch.float64), 1)
        gauss = torch.randn(m, n, generator=gen, dtype=torch.float64)
        chi = np.sqrt(np.random.default_rng(self.seed).chisquare(n, size=(m, n)))
        scale = torch.from_numpy(chi) / gauss.norm(dim=1, keepdim=True)
        scale /= math.sqrt(D * n)
        kw = {"device": self.device, "dtype": self.dtype}
        self.signs = signs.to(**kw)
        self.perm = perm.to(self.device)
        self.gauss = gauss.to(**kw)
        self.scale = scale.to(**kw)

    def buffers(self) -> dict[str, Tensor]:
        """``{"signs", "perm", "gauss", "scale"}``, each of shape ``(m, n)``."""
        return {
            "signs": self.signs,
            "perm": self.perm,
            "gauss": self.gauss,
            "scale": self.scale,
        }

    def _matmat(self, Z: Tensor) -> Tensor:
        k, m, n = Z.shape[1], self.num_blocks, self.block_size
        X = Z.T.new_zeros(k, 1, n)
        X[:, 0, : self.dim] = Z.T
        X = fwht(X * self.signs)  # (k, m, n)
        X = torch.gather(X, -1, self.perm.expand(k, m, n))
        X = fwht(X * self.gauss) * self.scale
        return X.reshape(k, m * n)[:, : self.num_params].T

    def _rmatmat(self, V: Tensor) -> Tensor:
        k, m, n = V.shape[1], self.num_blocks, self.block_size
        Y = V.T.new_zeros(k, m * n)
        Y[:, : self.num_params] = V.T
        Y = fwht(Y.view(k, m, n) * self.scale) * self.gauss
        Y = torch.zeros_like(Y).scatter_(-1, self.perm.expand(k, m, n), Y)
        Y = (fwht(Y) * self.signs).sum(1)
        return Y[:, : self.dim].T


_CLASSES: dict[str, type[Projection]] = {
    "dense": DenseProjection,
    "sparse": SparseProjection,
    "fastfood": FastfoodProjection,
}


def _check_kind(kind: object) -> str:
    if kind not in _CLASSES:
        raise ValueError(
            f"unknown projection {kind!r}; expected one of {list(_KINDS)} "
            "('fastfood' needs memory O(D) and suits any size; 'dense' only small "
            "models)."
        )
    return str(kind)


def random_projection(
    kind: ProjectionKind,
    num_params: int,
    dim: int,
    *,
    seed: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    **options: Any,
) -> Projection:
    """Build a seeded random projection ``P: R^d -> R^D`` by name.

    Args:
        kind: ``"dense"``, ``"sparse"`` or ``"fastfood"``.
        num_params: ``D``.
        dim: ``d``, between 1 and ``D``.
        seed: fixes the map.
        device: device of the map.
        dtype: dtype of the map.
        **options: options of the class (``allow_large`` for dense, ``density``
            for sparse).

    Returns:
        A :class:`Projection`.

    Example:
        >>> P = random_projection("fastfood", 100, 10, dtype=torch.float64)
        >>> z, v = torch.randn(10, dtype=torch.float64), torch.randn(100, dtype=torch.float64)
        >>> bool(torch.isclose(P(z) @ v, z @ P.transpose(v)))
        True
    """
    cls = _CLASSES[_check_kind(kind)]
    return cls(num_params, dim, seed=seed, device=device, dtype=dtype, **options)


# ---------------------------------------------------------- effective dimension
@dataclass(frozen=True)
class EffectiveDimensionResult:
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
    definition: str
    parameters: dict = field(default_factory=dict)
    cost: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """Plain JSON values."""
        return dataclass_to_dict(self)


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
    with measure_cost(None) as cost:
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
        cost=dict(cost),
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


# ------------------------------------------------------- subspace training
@dataclass(frozen=True)
class SubspaceRun:
    """One training run in a random subspace ``theta = theta0 + P z``.

    Attributes:
        dim: ``d``, the number of trained coordinates (``D`` for the full model).
        accuracy: accuracy on the evaluation data at the end of training.
        loss: loss on the evaluation data at the end of training.
        train_loss: loss of the last training batch.
        finite: whether the final parameters and losses are finite.
        projection: kind of ``P`` (``"full"`` for the full model).
        seed: seed of the projection and the batch order.
        steps: Adam steps taken.
        lr: Adam's step size.
        seconds: wall time of the run.
    """

    dim: int
    accuracy: float
    loss: float
    train_loss: float
    finite: bool
    projection: str
    seed: int
    steps: int
    lr: float
    seconds: float

    def to_dict(self) -> dict:
        """Plain JSON values."""
        return dataclass_to_dict(self)


def _adam(
    z: Tensor,
    loss_of: Callable[[Tensor], Tensor],
    *,
    steps: int,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> Tensor:
    """Minimise ``loss_of(z)`` in place with Adam (Kingma & Ba 2015).

    The update of ``torch.optim.Adam`` with its defaults (bias-corrected moments,
    ``eps`` added to ``sqrt(v_hat)``), written out for one tensor: it spares the
    optimizer's per-step overhead, which dominates on small models.

    Returns:
        The loss of the last step (detached).
    """
    b1, b2 = betas
    m, v = torch.zeros_like(z), torch.zeros_like(z)
    loss = z.new_zeros(())
    for t in range(1, steps + 1):
        z.requires_grad_(True)
        loss = loss_of(z)
        (g,) = torch.autograd.grad(loss, z)
        z.requires_grad_(False)
        m.mul_(b1).add_(g, alpha=1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        denom = (v.sqrt() / math.sqrt(1 - b2**t)).add_(eps)
        z.addcdiv_(m, denom, value=-lr / (1 - b1**t))
    return loss.detach()


class _Problem:
    """The model as a function of theta, the training tensors and the evaluation."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Any,
        train_data: object,
        eval_data: object,
        *,
        mode: str,
        dtype: torch.dtype | None,
        eval_batch_size: int | None,
    ):
        if not (
            isinstance(train_data, (tuple, list))
            and len(train_data) == 2
            and all(isinstance(t, Tensor) for t in train_data)
        ):
            raise ValueError(
                "expected train_data as an (inputs, targets) pair of tensors (the "
                "batches are drawn from it with a seeded generator); got "
                f"{type(train_data).__name__}. Load a data set with "
                "lossgeom.zoo.dataset(...) or stack a DataLoader's batches."
            )
        self.train = Objective(model, loss_fn, train_data, mode=mode, dtype=dtype)
        self.eval = Objective(
            model,
            loss_fn,
            eval_data,
            mode=mode,
            dtype=dtype,
            batch_size=eval_batch_size,
        )
        if not self.eval.knows_accuracy:
            raise ValueError(
                "intrinsic dimension compares accuracies, so it needs a classifier: "
                "outputs (n, C) with C > 1 and integer class targets (n,); the "
                "model and eval_data give something else."
            )
        X, y = train_data
        if X.shape[0] != y.shape[0] or X.shape[0] < 1:
            raise ValueError(
                f"train_data inputs and targets need the same positive number of "
                f"samples; got {X.shape[0]} and {y.shape[0]}."
            )
        dev, dt = self.train.device, self.train.dtype
        self.X = X.to(dev, dt if X.is_floating_point() else None)
        self.y = y.to(dev, dt if y.is_floating_point() else None)
        self.loss_fn = self.train.loss_fn
        self.theta0 = self.train.theta
        self.num_params = self.train.dim

    def run(
        self,
        proj: Projection | None,
        *,
        steps: int,
        lr: float,
        batch_size: int | None,
        seed: int,
    ) -> SubspaceRun:
        """Train ``z`` (``theta0 + P z``, or ``theta0 + z`` without ``P``) with Adam."""
        with measure_cost(None) as cost:
            dim = self.num_params if proj is None else proj.dim
            z = self.theta0.new_zeros(dim)
            gen = torch.Generator().manual_seed(seed)
            n = self.X.shape[0]

            def batch_loss(z: Tensor) -> Tensor:
                if batch_size is None or batch_size >= n:
                    x, y = self.X, self.y
                else:
                    idx = torch.randint(0, n, (batch_size,), generator=gen)
                    idx = idx.to(self.X.device)
                    x, y = self.X[idx], self.y[idx]
                theta = self.theta0 + (z if proj is None else proj(z))
                return self.loss_fn(self.train.model_fn(theta, x), y)

            with self.train.probe_mode(higher_order=False):
                loss = _adam(z, batch_loss, steps=steps, lr=lr)
            with torch.no_grad():
                theta = self.theta0 + (z if proj is None else proj(z))
                metrics = self.eval.evaluate_metrics(theta.unsqueeze(0), chunk_size=1)
            acc, eval_loss = float(metrics["accuracy"][0]), float(metrics["loss"][0])
            finite = bool(
                torch.isfinite(theta).all() and math.isfinite(eval_loss)
            ) and math.isfinite(float(loss))
        return SubspaceRun(
            dim=dim,
            accuracy=acc,
            loss=eval_loss,
            train_loss=float(loss),
            finite=finite,
            projection="full" if proj is None else proj.kind,
            seed=seed,
            steps=steps,
            lr=lr,
            seconds=cost["seconds"],
        )


def _check_training(steps: object, lr: object, batch_size: object) -> None:
    _check_int("steps", steps, 1)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"lr must be a positive number; got {lr!r}.")
    if batch_size is not None:
        _check_int("batch_size", batch_size, 1)


def subspace_train(
    model: nn.Module,
    loss_fn: Any,
    train_data: tuple[Tensor, Tensor],
    eval_data: object,
    dim: int,
    *,
    projection: ProjectionKind = "fastfood",
    steps: int = 500,
    lr: float = 0.01,
    batch_size: int | None = None,
    seed: int = 0,
    mode: Literal["eval", "train"] = "eval",
    dtype: torch.dtype | None = None,
) -> SubspaceRun:
    """Train only ``z`` in ``theta = theta0 + P z`` and report the accuracy reached.

    ``theta0`` is the model's current parameters (frozen), ``P`` a seeded
    random projection (:func:`random_projection`) of size ``D x dim``, ``z``
    starts at 0 and takes ``steps`` Adam steps on the training loss (full batch,
    or seeded batches of ``batch_size`` drawn with replacement). The model is
    evaluated through :func:`torch.func.functional_call` and never modified.

    Args:
        model: a classifier ``nn.Module``.
        loss_fn: ``loss_fn(outputs, targets)``, the batch mean.
        train_data: ``(inputs, targets)`` tensors.
        eval_data: the data the accuracy is measured on (anything
            :class:`~lossgeom.objective.Objective` accepts).
        dim: ``d``, between 1 and the parameter count ``D``.
        projection: ``"fastfood"`` (default), ``"dense"`` or ``"sparse"``.
        steps: Adam steps.
        lr: Adam's step size on ``z``.
        batch_size: samples per step (``None``: all).
        seed: seed of the projection and the batch order.
        mode: ``"eval"`` or ``"train"`` (BatchNorm batch statistics), for
            training and evaluation alike.
        dtype: train in this dtype (``None``: the model's).

    Returns:
        A :class:`SubspaceRun`.
    """
    _check_training(steps, lr, batch_size)
    kind = _check_kind(projection)
    problem = _Problem(
        model, loss_fn, train_data, eval_data, mode=mode, dtype=dtype,
        eval_batch_size=None,
    )  # fmt: skip
    dim = _check_subspace(dim, problem.num_params)
    proj = random_projection(
        kind, problem.num_params, dim, seed=seed, device=problem.train.device,
        dtype=problem.train.dtype,
    )  # fmt: skip
    return problem.run(proj, steps=steps, lr=lr, batch_size=batch_size, seed=seed)


# ------------------------------------------------------- intrinsic dimension
@dataclass(frozen=True)
class IntrinsicDimensionResult:
    """The intrinsic dimension of a task found by random-subspace training.

    Attributes:
        d_int: smallest subspace size tried whose accuracy reached
            ``target_accuracy`` (``d_int90`` at the default threshold 0.9);
            ``None`` if no size tried reached it.
        lower: largest size tried below ``d_int`` that missed the target (the
            bracket is ``(lower, d_int]``); ``None`` if ``d_int`` is the first
            grid size or was not found.
        threshold: the fraction of the reference accuracy to reach.
        target_accuracy: ``threshold * reference_accuracy``.
        reference_accuracy: accuracy of the full model.
        reference_trained: whether the reference was trained here (or given).
        dims: subspace sizes tried, in the order tried.
        accuracies: their accuracies, in the same order.
        runs: one dict per run (:class:`SubspaceRun` fields and ``stage``:
            ``"reference"``, ``"grid"`` or ``"bisection"``).
        consistent: whether accuracy crossed the target once over the sizes tried
            (no smaller size reached it while a larger one missed); bisection
            assumes this.
        num_params: ``D``.
        projection: kind of projection.
        definition: the definition and the search, in words.
        parameters: the inputs.
        cost: seconds, training steps, runs, and the evaluation's counters.
    """

    d_int: int | None
    lower: int | None
    threshold: float
    target_accuracy: float
    reference_accuracy: float
    reference_trained: bool
    dims: list[int]
    accuracies: list[float]
    runs: list[dict]
    consistent: bool
    num_params: int
    projection: str
    definition: str
    parameters: dict = field(default_factory=dict)
    cost: dict = field(default_factory=dict)

    @property
    def d_int90(self) -> int | None:
        """``d_int`` when ``threshold`` is 0.9; raises otherwise."""
        if self.threshold != 0.9:
            raise ValueError(
                f"this result is for threshold={self.threshold}, not 0.9; read d_int."
            )
        return self.d_int

    @property
    def found(self) -> bool:
        """Whether some size tried reached the target."""
        return self.d_int is not None

    def to_dict(self) -> dict:
        """Plain JSON values."""
        return dataclass_to_dict(self)


def _log_grid(num_params: int) -> list[int]:
    grid, d = [], 1
    while d < num_params:
        grid.append(d)
        d *= 2
    return [*grid, num_params]


def intrinsic_dimension(
    model: nn.Module,
    loss_fn: Any,
    train_data: tuple[Tensor, Tensor],
    eval_data: object,
    *,
    dims: Sequence[int] | None = None,
    projection: ProjectionKind = "fastfood",
    steps: int = 500,
    lr: float = 0.01,
    batch_size: int | None = None,
    seed: int = 0,
    threshold: float = 0.9,
    resolution: float = 1.1,
    reference_accuracy: float | None = None,
    reference_lr: float = 0.001,
    mode: Literal["eval", "train"] = "eval",
    dtype: torch.dtype | None = None,
    eval_batch_size: int | None = None,
) -> IntrinsicDimensionResult:
    """``d_int``: the smallest random subspace in which training reaches the target.

    Following Li et al. (2018), the model is trained in ``theta = theta0 + P z``
    (:func:`subspace_train`: ``theta0`` the model's parameters, frozen; ``P``
    a seeded ``D x d`` random projection; only ``z`` trained with Adam), and
    ``d_int`` is the smallest ``d`` whose accuracy on ``eval_data`` reaches
    ``threshold * reference_accuracy``, the reference being the full model
    trained the same way (all ``D`` parameters, step size ``reference_lr``)
    unless given.

    The search: the sizes of ``dims`` (default ``1, 2, 4, ...`` below ``D``,
    then ``D``) are trained in increasing order until one reaches the target;
    then the bracket between the last size that missed and the first that
    reached is bisected on a log scale (geometric midpoints) until
    ``hi / lo <= resolution`` or ``hi - lo <= 1``. ``d_int`` is the smallest
    size tried that reached the target: within a factor ``resolution`` of the
    crossing, if accuracy grows with ``d`` (``consistent`` reports whether the
    sizes tried agree with that). Each size costs one training run of
    ``steps`` steps.

    Args:
        model: a classifier ``nn.Module`` (never modified).
        loss_fn: ``loss_fn(outputs, targets)``, the batch mean.
        train_data: ``(inputs, targets)`` tensors to train on.
        eval_data: data the accuracies are measured on (e.g. a test split).
        dims: the coarse grid of sizes, each between 1 and ``D``.
        projection: ``"fastfood"`` (default, memory ``O(D)``), ``"sparse"`` or
            ``"dense"`` (small models only).
        steps: Adam steps per run.
        lr: Adam's step size on ``z``.
        batch_size: samples per step (``None``: all).
        seed: seed of the projections and the batch order.
        threshold: the fraction of the reference accuracy, in (0, 1].
        resolution: the bisection stops at this ratio of the bracket, > 1.
        reference_accuracy: the full model's accuracy, if already known.
        reference_lr: Adam's step size for the full model.
        mode: ``"eval"`` or ``"train"`` (BatchNorm batch statistics).
        dtype: train in this dtype (``None``: the model's).
        eval_batch_size: evaluate at most this many samples at once.

    Returns:
        An :class:`IntrinsicDimensionResult`.

    Raises:
        ValueError: a size outside ``[1, D]``, an unknown projection, a
            threshold outside (0, 1], or a model that is not a classifier.
    """
    threshold = _check_threshold(threshold)
    kind = _check_kind(projection)
    _check_training(steps, lr, batch_size)
    _check_training(1, reference_lr, None)
    if (
        isinstance(resolution, bool)
        or not isinstance(resolution, (int, float))
        or not resolution > 1
    ):
        raise ValueError(
            f"resolution must be a ratio > 1 (e.g. 1.1 stops the bisection when "
            f"the bracket is within 10%); got {resolution!r}."
        )
    if reference_accuracy is not None and not (
        isinstance(reference_accuracy, (int, float))
        and not isinstance(reference_accuracy, bool)
        and 0 < reference_accuracy <= 1
    ):
        raise ValueError(
            "reference_accuracy must be an accuracy in (0, 1], or None to train "
            f"the full model; got {reference_accuracy!r}."
        )
    problem = _Problem(
        model, loss_fn, train_data, eval_data, mode=mode, dtype=dtype,
        eval_batch_size=eval_batch_size,
    )  # fmt: skip
    D = problem.num_params
    if dims is None:
        grid = _log_grid(D)
    else:
        if isinstance(dims, (str, bytes)) or not isinstance(dims, Sequence) or not dims:
            raise ValueError(
                f"dims must be a non-empty list of subspace sizes; got {dims!r}."
            )
        grid = sorted({_check_subspace(d, D) for d in dims})

    runs: list[dict] = []
    accuracy_of: dict[int, float] = {}
    passed_at: dict[int, bool] = {}

    def train(d: int, stage: str) -> bool:
        proj = random_projection(
            kind, D, d, seed=seed, device=problem.train.device,
            dtype=problem.train.dtype,
        )  # fmt: skip
        run = problem.run(proj, steps=steps, lr=lr, batch_size=batch_size, seed=seed)
        runs.append({**run.to_dict(), "stage": stage})
        accuracy_of[d] = run.accuracy
        passed_at[d] = bool(run.finite and run.accuracy >= target)
        return passed_at[d]

    with measure_cost(problem.eval) as cost:
        if reference_accuracy is None:
            ref = problem.run(
                None, steps=steps, lr=reference_lr, batch_size=batch_size, seed=seed
            )
            runs.append({**ref.to_dict(), "stage": "reference"})
            if not ref.finite:
                raise ValueError(
                    "training the full model for the reference accuracy diverged "
                    f"(reference_lr={reference_lr}); lower reference_lr, or pass "
                    "reference_accuracy."
                )
            reference = ref.accuracy
        else:
            reference = float(reference_accuracy)
        target = threshold * reference
        lo: int | None = None
        hi: int | None = None
        for d in grid:
            if train(d, "grid"):
                hi = d
                break
            lo = d
        if hi is not None and lo is not None:
            while hi - lo > 1 and hi > resolution * lo:
                mid = min(max(round(math.sqrt(lo * hi)), lo + 1), hi - 1)
                if train(mid, "bisection"):
                    hi = mid
                else:
                    lo = mid
    ordered = sorted(accuracy_of)
    passed = [passed_at[d] for d in ordered]  # the same test the search used
    consistent = all(not p or q for p, q in zip(passed, passed[1:], strict=False))
    n_runs = len(runs)
    return IntrinsicDimensionResult(
        d_int=hi,
        lower=lo if hi is not None else None,
        threshold=threshold,
        target_accuracy=target,
        reference_accuracy=reference,
        reference_trained=reference_accuracy is None,
        dims=[r["dim"] for r in runs if r["stage"] != "reference"],
        accuracies=[r["accuracy"] for r in runs if r["stage"] != "reference"],
        runs=runs,
        consistent=consistent,
        num_params=D,
        projection=kind,
        definition=(
            "d_int = smallest subspace size d such that training only z in "
            "theta = theta0 + P z (P a seeded random D x d "
            f"{kind} projection with unit-norm columns, theta0 the frozen "
            "initialisation, Adam) reaches threshold * the full model's accuracy on "
            "the evaluation data; searched on a doubling grid, then by bisection "
            "on a log scale down to the resolution"
        ),
        parameters={
            "dims": grid,
            "projection": kind,
            "steps": steps,
            "lr": lr,
            "batch_size": batch_size,
            "seed": seed,
            "threshold": threshold,
            "resolution": resolution,
            "reference_accuracy": reference_accuracy,
            "reference_lr": reference_lr,
            "mode": mode,
            "dtype": str(problem.train.dtype).removeprefix("torch."),
            "device": str(problem.train.device),
        },
        cost={**cost, "runs": n_runs, "train_steps": n_runs * steps},
    )
