"""Layer 2: scalar diagnostics: sharpness, gradient noise, dimensionality, difficulty."""

__all__: list[str] = []
