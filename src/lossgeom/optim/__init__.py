"""Layer 3: optimizers that use curvature, usable with or without lossgeom's trainer.

``KFAC(model, lr=...)`` is K-FAC (Martens & Grosse 2015; Grosse & Martens 2016):
each ``nn.Linear`` and ``nn.Conv2d`` layer's gradient is preconditioned with the
inverse of a damped Kronecker-factored block of the Fisher or the GGN, captured
by hooks in the ordinary forward and backward passes. It imports PyTorch only.
"""

from lossgeom.optim._kfac import KFAC

__all__ = [
    # optimizers
    "KFAC",
]
