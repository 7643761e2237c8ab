"""Random linear maps from a small space to parameter space, for subspace training.

:class:`DenseProjection` (Gaussian, unit-norm columns), :class:`SparseProjection`
(very sparse random projection, Li, Hastie & Church 2006) and
:class:`FastfoodProjection` (Le, Sarlos & Smola 2013, memory ``O(D)``): seeded linear
maps ``z -> P z`` with a transpose product, whose backward is the transpose product
(no intermediates kept). :func:`fwht` is the fast Walsh-Hadamard transform Fastfood
is built from. Tensors only: used by :func:`lossgeom.intrinsic_dimension`.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from lossgeom.linalg._operator import check_block

__all__ = [
    "DenseProjection",
    "FastfoodProjection",
    "Projection",
    "ProjectionKind",
    "SparseProjection",
    "fwht",
    "random_projection",
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
