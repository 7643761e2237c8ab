"""Argument checks the measures share.

The integer, projection-kind and subspace-size checks are the ones the random
projections (:mod:`lossgeom.linalg.projections`) apply to their own arguments, so a
measure that forwards an argument to a projection refuses it with the same message.
"""

from __future__ import annotations

from lossgeom.linalg.projections import _check_int, _check_kind, _check_subspace

__all__ = ["_check_int", "_check_kind", "_check_subspace", "_check_threshold"]


def _check_threshold(threshold: object) -> float:
    """A fraction in ``(0, 1]`` (e.g. a share of variance), as a float."""
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
