"""Layer 2: scalar diagnostics: sharpness, gradient noise, dimensionality, difficulty."""

from lossgeom.measures._registry import CALLBACKS, register

__all__ = [
    # callbacks by name
    "CALLBACKS",
    "register",
]
