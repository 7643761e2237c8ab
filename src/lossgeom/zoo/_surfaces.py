"""Two-parameter loss surfaces with closed forms, as "models" for illustrating theory.

Each is ``(model, loss_fn, data)`` ready for ``lossgeom.Objective(*surface(name))``:
the model holds one parameter ``w`` of shape ``(2,)`` and returns ``L(w)`` for every
sample of a one-sample dummy data set; ``loss_fn`` averages it. Curvature tools
then measure a function whose Hessian is known exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from lossgeom.zoo._init import keyword_options

__all__ = ["SURFACES", "Surface", "surface"]


def double_well(w: Tensor, *, stiffness: float = 1.0) -> Tensor:
    """``(w1^2 - 1)^2 + stiffness * w2^2 / 2``.

    Minima at ``(+-1, 0)`` with value 0 and Hessian ``diag(8, stiffness)``; a saddle
    at the origin with value 1 and Hessian ``diag(-4, stiffness)``.
    """
    return (w[0] ** 2 - 1) ** 2 + stiffness * w[1] ** 2 / 2


def rosenbrock(w: Tensor, *, a: float = 1.0, b: float = 100.0) -> Tensor:
    """``(a - w1)^2 + b (w2 - w1^2)^2``: a curved narrow valley.

    Minimum at ``(a, a^2)`` with value 0 and Hessian
    ``[[2 + 8 b a^2, -4 b a], [-4 b a, 2 b]]`` (``[[802, -400], [-400, 200]]`` at
    the defaults, condition number about 2,508).
    """
    return (a - w[0]) ** 2 + b * (w[1] - w[0] ** 2) ** 2


def sharp_flat(
    w: Tensor, *, sharp: float = 10.0, flat: float = 0.5, distance: float = 6.0
) -> Tensor:
    """Two Gaussian basins of equal depth 1, one sharp and one flat.

    ``1 - exp(-sharp |w - c_s|^2 / 2) - exp(-flat |w - c_f|^2 / 2)`` with centres
    ``c_s = (-distance/2, 0)`` and ``c_f = (distance/2, 0)``. Each basin's Hessian
    at its centre is ``sharp * I`` and ``flat * I`` up to the other basin's tail
    (at the defaults, a relative change below 1e-3), so the top eigenvalues differ by
    the ratio ``sharp / flat`` (20 at the defaults) while the losses are equal.
    """
    cs = w.new_tensor([-distance / 2, 0.0])
    cf = w.new_tensor([distance / 2, 0.0])
    return (
        1
        - torch.exp(-sharp * ((w - cs) ** 2).sum() / 2)
        - torch.exp(-flat * ((w - cf) ** 2).sum() / 2)
    )


# Mueller & Brown (1979), Theor. Chim. Acta 53, 75, footnote 7: four Gaussians
# A_k exp(a_k dx^2 + b_k dx dy + c_k dy^2), dx = x - x0_k, dy = y - y0_k.
_MB_A = (-200.0, -100.0, -170.0, 15.0)
_MB_a = (-1.0, -1.0, -6.5, 0.7)
_MB_b = (0.0, 0.0, 11.0, 0.6)
_MB_c = (-10.0, -10.0, -6.5, 0.7)
_MB_x0 = (1.0, 0.0, -0.5, -1.0)
_MB_y0 = (0.0, 0.5, 1.5, 1.0)


def mueller_brown(w: Tensor, *, scale: float = 1.0) -> Tensor:
    """The Mueller-Brown potential (Mueller & Brown 1979), times ``scale``.

    ``sum_k A_k exp(a_k dx^2 + b_k dx dy + c_k dy^2)`` with ``dx = w1 - x0_k``,
    ``dy = w2 - y0_k`` and ``A = (-200, -100, -170, 15)``,
    ``a = (-1, -1, -6.5, 0.7)``, ``b = (0, 0, 11, 0.6)``,
    ``c = (-10, -10, -6.5, 0.7)``, ``x0 = (1, 0, -0.5, -1)``,
    ``y0 = (0, 0.5, 1.5, 1)``. Three minima joined by a curved path through two
    saddles. Stationary points at ``scale=1`` (Newton's method on the gradient
    in float64, gradient norm below 1e-12; the published values, to three
    decimals, agree):

    ========  ========================  ========================  ===============
    point     w1                        w2                        loss
    ========  ========================  ========================  ===============
    min A     -0.558223634633           1.441725841805            -146.699517210
    min B     0.623499404931            0.028037758529            -108.166724117
    min C     -0.050010822998           0.466694104872            -80.767818130
    saddle 1  -0.822001558733           0.624312802815            -40.664843509
    saddle 2  0.212486582001            0.292988325107            -72.248940112
    ========  ========================  ========================  ===============

    The minimum-energy path runs A - saddle 1 - C - saddle 2 - B; the Hessian's
    eigenvalues are about -751 and 490 at saddle 1, -735 and 511 at saddle 2.
    """
    dtype, device = w.dtype, w.device
    A, a, b, c, x0, y0 = (
        torch.tensor(v, dtype=dtype, device=device)
        for v in (_MB_A, _MB_a, _MB_b, _MB_c, _MB_x0, _MB_y0)
    )
    dx, dy = w[0] - x0, w[1] - y0
    return scale * (A * torch.exp(a * dx**2 + b * dx * dy + c * dy**2)).sum()


SURFACES: dict[str, Callable[..., Tensor]] = {
    "double_well": double_well,
    "mueller_brown": mueller_brown,
    "rosenbrock": rosenbrock,
    "sharp_flat": sharp_flat,
}


class Surface(nn.Module):
    """A two-parameter "model": ``forward(x)`` returns ``L(w)`` once per sample."""

    def __init__(
        self, fn: Callable[..., Tensor], start, options: dict, dtype: torch.dtype
    ):
        super().__init__()
        self.fn, self.options = fn, options
        self.w = nn.Parameter(torch.as_tensor(start, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        value = self.fn(self.w, **self.options)
        return value.expand(x.shape[0], 1)


def _mean(out: Tensor, y: Tensor) -> Tensor:
    return out.mean()


def surface(
    name: str,
    start=(0.5, 0.5),
    *,
    dtype: torch.dtype = torch.float64,
    **options: float,
):
    """A closed-form two-parameter loss as ``(model, loss_fn, data)``.

    Args:
        name: ``double_well``, ``mueller_brown``, ``rosenbrock`` or
            ``sharp_flat``.
        start: the initial ``w``.
        dtype: of ``w`` (float64 by default: the closed forms are exact).
        **options: the surface's constants (see each function).

    Returns:
        ``(model, loss_fn, data)`` for :class:`lossgeom.Objective`.

    Example:
        >>> import lossgeom as lg
        >>> obj = lg.Objective(*surface("rosenbrock", start=(1.0, 1.0)))
        >>> lg.hessian(obj).to_dense().tolist()
        [[802.0, -400.0], [-400.0, 200.0]]
    """
    if name not in SURFACES:
        raise ValueError(f"unknown surface {name!r}; valid names: {sorted(SURFACES)}.")
    fn = SURFACES[name]
    valid = keyword_options(fn)
    bad = sorted(set(options) - set(valid))
    if bad:
        raise ValueError(
            f"unknown option(s) {bad} for surface {name!r}; valid options (with "
            f"defaults): {valid}."
        )
    if len(tuple(start)) != 2 or not all(math.isfinite(float(s)) for s in start):
        raise ValueError(f"start must be two finite numbers; got {start!r}.")
    data = (torch.zeros(1, 1, dtype=dtype), torch.zeros(1, dtype=dtype))
    return Surface(fn, tuple(float(s) for s in start), options, dtype), _mean, data
