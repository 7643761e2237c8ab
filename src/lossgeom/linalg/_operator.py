"""Symmetric linear operators: the interface every matrix-free algorithm takes.

An operator is anything that multiplies a block of vectors. Algorithms in
:mod:`lossgeom.linalg` only ever call ``op @ V`` with ``V`` of shape ``(d, m)`` and
read ``shape``, ``dtype`` and ``device``; they never see a neural network.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

__all__ = [
    "DenseOperator",
    "NonFiniteError",
    "SymmetricOperator",
    "apply_checked",
    "check_block",
]

# Above this dimension ``to_dense`` refuses unless told ``max_dim``: a dense d x d
# matrix of 20k parameters is 3.2 GB in float64 and 20k matrix-vector products.
_DEFAULT_MAX_DENSE_DIM = 20_000


def check_block(
    V: Tensor, dim: int, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """Validate a vector or block of vectors for an operator of size ``dim``.

    Args:
        V: a tensor of shape ``(dim,)`` or ``(dim, m)``.
        dim: the operator's dimension.
        dtype: the operator's dtype; ``V`` must match it.
        device: the operator's device; ``V`` must be on it.

    Returns:
        ``V`` itself.

    Raises:
        TypeError: ``V`` is not a tensor.
        ValueError: the shape, dtype or device does not match, with the fix.
    """
    if not isinstance(V, Tensor):
        raise TypeError(
            f"expected a torch.Tensor of shape ({dim},) or ({dim}, m); "
            f"got {type(V).__name__}. Convert with torch.as_tensor(..., "
            f"dtype={dtype}, device='{device}')."
        )
    if V.ndim not in (1, 2) or V.shape[0] != dim:
        raise ValueError(
            f"expected a vector of shape ({dim},) or a block of shape ({dim}, m) "
            f"(one column per vector); got shape {tuple(V.shape)}. "
            + (
                f"A block of shape {tuple(V.shape)} looks transposed: pass V.T."
                if V.ndim == 2 and V.shape[1] == dim
                else f"The operator acts on {dim} parameters."
            )
        )
    if V.device != torch.device(device) and not _same_device(V.device, device):
        raise ValueError(
            f"expected V on device '{device}' (where the model lives); got V on "
            f"'{V.device}'. Move it with V.to('{device}')."
        )
    if V.dtype != dtype:
        raise ValueError(
            f"expected V of dtype {dtype} (the operator's dtype); got {V.dtype}. "
            f"Convert with V.to({dtype})."
        )
    return V


class NonFiniteError(ValueError):
    """A loss, gradient or curvature product was NaN or infinite."""


def apply_checked(op: SymmetricOperator, V: Tensor) -> Tensor:
    """``op @ V``, refusing non-finite results (they would poison every estimate)."""
    W = op @ V
    if not bool(torch.isfinite(W).all()):
        raise NonFiniteError(
            "the operator returned non-finite values (NaN or inf) for a finite "
            "input; check the model and data at these parameters."
        )
    return W


def _same_device(a: torch.device, b: torch.device | str) -> bool:
    b = torch.device(b)
    if a.type != b.type:
        return False
    # 'cuda' and 'cuda:0' name the same device when the current device is 0.
    ia = a.index if a.index is not None else _current_index(a.type)
    ib = b.index if b.index is not None else _current_index(b.type)
    return ia == ib


def _current_index(kind: str) -> int | None:
    if kind == "cuda" and torch.cuda.is_available():
        return torch.cuda.current_device()
    return None


class SymmetricOperator(ABC):
    """A symmetric ``d x d`` matrix known only through its products.

    Subclasses implement :meth:`_matmat` for a block ``(d, m)``; this class adds
    validation, single-vector products, a product counter and :meth:`to_dense`.

    Attributes:
        n_matvecs: matrix-vector products done so far (a block of ``m`` counts ``m``).
    """

    def __init__(self, dim: int, dtype: torch.dtype, device: torch.device | str):
        self._dim = int(dim)
        self._dtype = dtype
        self._device = torch.device(device)
        self.n_matvecs = 0

    @property
    def shape(self) -> tuple[int, int]:
        """``(d, d)``."""
        return (self._dim, self._dim)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of vectors this operator accepts and returns."""
        return self._dtype

    @property
    def device(self) -> torch.device:
        """The device of vectors this operator accepts and returns."""
        return self._device

    @abstractmethod
    def _matmat(self, V: Tensor) -> Tensor:
        """Multiply a validated block ``V`` of shape ``(d, m)``."""

    def matmat(self, V: Tensor) -> Tensor:
        """Return ``A @ V`` for ``V`` of shape ``(d,)`` or ``(d, m)``."""
        check_block(V, self._dim, self._dtype, self._device)
        single = V.ndim == 1
        block = V.unsqueeze(1) if single else V
        if block.shape[1] == 0:
            return torch.empty_like(V)
        out = self._matmat(block)
        self.n_matvecs += block.shape[1]
        return out.squeeze(1) if single else out

    def __matmul__(self, V: Tensor) -> Tensor:
        return self.matmat(V)

    def to_dense(self, *, chunk_size: int = 64, max_dim: int | None = None) -> Tensor:
        """Materialise the matrix by multiplying the identity, ``chunk_size`` columns at a time.

        The result is returned exactly as computed, not symmetrised, so that any
        asymmetry (a bug, or round-off) stays visible.

        Args:
            chunk_size: columns per product.
            max_dim: refuse above this dimension (default 20,000).

        Returns:
            The ``(d, d)`` matrix.
        """
        limit = _DEFAULT_MAX_DENSE_DIM if max_dim is None else max_dim
        if self._dim > limit:
            raise ValueError(
                f"to_dense() would build a {self._dim} x {self._dim} matrix, above "
                f"max_dim={limit}. Use matrix-free algorithms, or pass a larger "
                "max_dim if you have the memory."
            )
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1; got {chunk_size}.")
        cols = []
        for start in range(0, self._dim, chunk_size):
            stop = min(start + chunk_size, self._dim)
            E = torch.zeros(
                self._dim, stop - start, dtype=self._dtype, device=self._device
            )
            E[torch.arange(start, stop), torch.arange(stop - start)] = 1
            cols.append(self.matmat(E))
        return torch.cat(cols, dim=1)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype}, "
            f"device='{self.device}')"
        )


class DenseOperator(SymmetricOperator):
    """A symmetric operator backed by an explicit matrix (for tests and small problems).

    Example:
        >>> A = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> op = DenseOperator(A)
        >>> (op @ torch.tensor([1.0, 0.0], dtype=torch.float64)).tolist()
        [2.0, 1.0]
    """

    def __init__(self, matrix: Tensor, *, check_symmetric: bool = True):
        if not isinstance(matrix, Tensor) or matrix.ndim != 2:
            raise ValueError(
                "expected a square 2-D tensor; got "
                + (
                    f"shape {tuple(matrix.shape)}"
                    if isinstance(matrix, Tensor)
                    else type(matrix).__name__
                )
                + "."
            )
        if matrix.shape[0] != matrix.shape[1]:
            raise ValueError(
                f"expected a square matrix; got shape {tuple(matrix.shape)}."
            )
        if check_symmetric:
            scale = matrix.abs().max().clamp_min(torch.finfo(matrix.dtype).tiny)
            asym = (matrix - matrix.T).abs().max() / scale
            if asym > 100 * torch.finfo(matrix.dtype).eps:
                raise ValueError(
                    f"expected a symmetric matrix; max |A - A^T| / max |A| = "
                    f"{asym.item():.2e}. Symmetrise with (A + A.T) / 2, or pass "
                    "check_symmetric=False."
                )
        super().__init__(matrix.shape[0], matrix.dtype, matrix.device)
        self.matrix = matrix

    def _matmat(self, V: Tensor) -> Tensor:
        return self.matrix @ V


class _Promoted(SymmetricOperator):
    """An operator seen in a working dtype of at least float32.

    The algorithms orthogonalise, factorise and accumulate in the working dtype
    (``torch.linalg`` has no QR or eigensolver in half precision, and a Krylov
    basis kept in bfloat16 loses orthogonality at once); each product is computed
    by the operator in its own dtype and cast back.

    Attributes:
        op: the operator.
        product_dtype: the dtype its products are computed in (their rounding
            decides what is noise, e.g. in symmetry tests).
    """

    def __init__(self, op: SymmetricOperator, dtype: torch.dtype):
        super().__init__(op.shape[0], dtype, op.device)
        self.op = op
        self.product_dtype = op.dtype

    def _matmat(self, V: Tensor) -> Tensor:
        return (self.op @ V.to(self.op.dtype)).to(self._dtype)


def working(op: SymmetricOperator) -> SymmetricOperator:
    """``op`` itself in float32 or float64, else ``op`` seen in float32."""
    if op.dtype in (torch.float32, torch.float64):
        return op
    return _Promoted(op, torch.promote_types(op.dtype, torch.float32))


def product_eps(op: SymmetricOperator) -> float:
    """The rounding unit of ``op``'s products (of its own dtype unless promoted)."""
    return torch.finfo(getattr(op, "product_dtype", op.dtype)).eps
