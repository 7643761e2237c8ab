"""Layer 0: matrix-free linear algebra on symmetric operators (tensors only)."""

from lossgeom.linalg._operator import DenseOperator, SymmetricOperator, check_block

__all__ = ["DenseOperator", "SymmetricOperator", "check_block"]
