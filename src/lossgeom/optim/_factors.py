"""What K-FAC's Kronecker factors are made of: layers, losses and their statistics.

For a layer with pre-activations ``s = W a_bar`` (``a_bar``: the input with a 1
appended when the layer has a bias) the gradient of a per-sample loss is
``dW = g a_bar^T`` with ``g = dl/ds``, so the layer's block of a curvature matrix
``E[vec(dW) vec(dW)^T] = E[a_bar a_bar^T (x) g g^T]`` is approximated by the
Kronecker product of two small expectations, ``A (x) G`` (Martens & Grosse 2015,
"Optimizing neural networks with Kronecker-factored approximate curvature", ICML,
Sec. 3; ``vec`` stacks columns). For a convolution, ``a_bar`` are the unfolded
input patches and ``g`` the output gradients at each of the ``T`` spatial
positions; with independent activations and derivatives, derivatives
uncorrelated between positions and spatial homogeneity the block is
``Omega (x) Gamma`` with ``Omega = E[sum_t a_bar_t a_bar_t^T]`` and
``Gamma = (1/T) E[sum_t g_t g_t^T]`` (Grosse & Martens 2016, "A
Kronecker-factored approximate Fisher matrix for convolution layers", ICML,
Sec. 3). Here, with ``N`` samples per batch:

* ``A = (1/N) sum_n sum_t a_bar_nt a_bar_nt^T``;
* ``G = (1/(N T)) sum_n sum_t sum_k g_knt g_knt^T`` with ``g_knt = J_nt^T r_kn``,
  the backpropagation to ``s`` of output-space vectors ``r_kn`` whose outer
  products have the loss Hessian ``H_n`` (w.r.t. the outputs) as expectation
  (MC Fisher), as exact sum (type-2, the GGN), or that are the true gradient
  (empirical Fisher) -- see :func:`output_vectors`.

A ``Linear`` layer applied to inputs ``(N, ..., in)`` treats the middle
dimensions as positions. With one sample and one position ``A (x) G`` equals the
exact GGN block ``a_bar a_bar^T (x) J^T H J``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "FISHER_KINDS",
    "Layer",
    "LossSpec",
    "Statistics",
    "backprop",
    "find_layers",
    "loss_spec",
    "output_vectors",
]

FISHER_KINDS = ("mc", "ggn", "empirical")


@dataclass(frozen=True)
class LossSpec:
    """The loss in the form K-FAC needs: its per-sample Hessian and reduction.

    The loss of a batch is ``L = w sum_n l_n`` with ``w = 1/N`` (``mean``) or 1
    (``sum``). ``cross_entropy``: ``l_n = -log softmax(f_n)[y_n]``, whose Hessian
    w.r.t. ``f_n`` is ``diag(p_n) - p_n p_n^T``. ``squared``: ``l_n = (c/2)
    ||f_n - y_n||^2`` with Hessian ``c I``; ``c = 1`` for lossgeom's ``mse``
    (``0.5 ||f - y||^2`` summed over outputs, averaged over samples), ``2 / C``
    for ``nn.MSELoss()`` (mean over all ``N C`` entries), 2 for
    ``nn.MSELoss(reduction="sum")``.
    """

    kind: str
    reduction: str = "mean"
    per_output_mean: bool = False  # nn.MSELoss(): c = 2 / C
    scale: float = 1.0

    def hessian_scale(self, outputs: int) -> float:
        """``c`` of a squared loss with ``outputs`` entries per sample."""
        return 2.0 / outputs if self.per_output_mean else self.scale


def loss_spec(loss: str | nn.Module) -> LossSpec:
    """Read a loss given by name or as a module.

    Raises:
        ValueError: an unknown name or an option K-FAC does not model.
        TypeError: neither a name nor a supported module.
    """
    if isinstance(loss, str):
        if loss == "cross_entropy":
            return LossSpec("cross_entropy")
        if loss == "mse":
            return LossSpec("squared")
        raise ValueError(
            f"unknown loss {loss!r}; K-FAC knows 'cross_entropy' and 'mse' "
            "(0.5 * ||f(x) - y||^2 summed over outputs, averaged over samples), or "
            "an nn.CrossEntropyLoss / nn.MSELoss instance."
        )
    reduction = getattr(loss, "reduction", None)
    if isinstance(loss, (nn.CrossEntropyLoss, nn.MSELoss)) and reduction not in (
        "mean",
        "sum",
    ):
        raise ValueError(
            f"K-FAC needs a loss reduced over the batch by 'mean' or 'sum'; got "
            f"{type(loss).__name__}(reduction={reduction!r})."
        )
    if isinstance(loss, nn.CrossEntropyLoss):
        if loss.weight is not None or loss.label_smoothing != 0:
            raise ValueError(
                "K-FAC models nn.CrossEntropyLoss without class weights or label "
                "smoothing (the likelihood of a categorical distribution); got "
                f"weight={loss.weight is not None}, "
                f"label_smoothing={loss.label_smoothing}."
            )
        return LossSpec("cross_entropy", reduction)
    if isinstance(loss, nn.MSELoss):
        return LossSpec(
            "squared", reduction, per_output_mean=reduction == "mean", scale=2.0
        )
    raise TypeError(
        f"K-FAC needs the loss to sample from or differentiate twice: 'cross_entropy', "
        f"'mse', nn.CrossEntropyLoss() or nn.MSELoss(); got {type(loss).__name__}."
    )


def output_vectors(
    out: Tensor,
    spec: LossSpec,
    fisher: str,
    mc_samples: int,
    generator: torch.Generator,
    grad: Tensor,
) -> Tensor:
    """The vectors ``r_kn`` in output space that K-FAC backpropagates for ``G``.

    Returns ``(K, *out.shape)``, with ``sum_k r_kn r_kn^T`` for sample ``n``:

    * ``mc``: ``K = mc_samples`` draws ``yhat ~ p(y | f_n)``,
      ``r = grad_f(-log p(yhat | f_n)) / sqrt(K)`` -- for cross-entropy
      ``p_n - onehot(yhat)``, for a squared loss ``sqrt(c) eps`` with
      ``eps ~ N(0, I)``; expectation ``H_n``;
    * ``ggn``: ``K = C`` columns of a square root ``S_n S_n^T = H_n``:
      ``S_n = diag(sqrt(p_n)) - p_n sqrt(p_n)^T`` for cross-entropy (since
      ``sum p = 1``), ``sqrt(c) I`` for a squared loss;
    * ``empirical``: ``K = 1``, ``grad_f l_n``, read from the gradient ``grad``
      of the loss arriving at the output (``w grad_f l_n``).

    For a summed loss the vectors carry a further ``sqrt(N)``, so that ``G``
    approximates the curvature of the sum.
    """
    n = out.shape[0]
    f = out.detach().reshape(n, -1)
    if fisher == "empirical":
        w = 1.0 / n if spec.reduction == "mean" else 1.0
        vectors = (grad.detach().reshape(n, -1) / w)[None]
    elif spec.kind == "cross_entropy":
        if out.ndim != 2:
            raise ValueError(
                "K-FAC with cross-entropy needs model outputs of shape (N, classes); "
                f"got {tuple(out.shape)}."
            )
        p = torch.softmax(f.to(torch.promote_types(f.dtype, torch.float32)), dim=1)
        classes = p.shape[1]
        if fisher == "mc":
            drawn = torch.multinomial(
                p, mc_samples, replacement=True, generator=generator
            )
            onehot = F.one_hot(drawn.T, classes).to(p.dtype)  # (K, N, C)
            vectors = (p[None] - onehot) / math.sqrt(mc_samples)
        else:
            eye = torch.eye(classes, dtype=p.dtype, device=p.device)
            vectors = p.sqrt().T[:, :, None] * (eye[:, None, :] - p[None])
    else:
        c = spec.hessian_scale(f.shape[1])
        if fisher == "mc":
            shape = (mc_samples, *f.shape)
            eps = torch.randn(
                shape, generator=generator, dtype=f.dtype, device=f.device
            )
            vectors = eps * math.sqrt(c / mc_samples)
        else:
            eye = torch.eye(f.shape[1], dtype=f.dtype, device=f.device)
            vectors = math.sqrt(c) * eye[:, None, :].expand(-1, n, -1)
    if spec.reduction == "sum":
        vectors = vectors * math.sqrt(n)
    return vectors.to(out.dtype).reshape(vectors.shape[0], *out.shape)


@dataclass(eq=False)
class Layer:
    """A layer K-FAC preconditions: its module, parameters and factor shapes."""

    name: str
    module: nn.Linear | nn.Conv2d
    weight: nn.Parameter
    bias: nn.Parameter | None

    @property
    def in_dim(self) -> int:
        """Size of ``A``: inputs (times kernel size), plus 1 with a bias."""
        return self.weight[0].numel() + (self.bias is not None)

    @property
    def out_dim(self) -> int:
        """Size of ``G``: outputs (channels)."""
        return self.weight.shape[0]

    def inputs(self, x: Tensor) -> Tensor:
        """``a_bar`` as ``(N, T, in_dim)`` from the layer's input."""
        m = self.module
        if isinstance(m, nn.Conv2d):
            x = x if x.ndim == 4 else x[None]
            patches = F.unfold(
                x,
                m.kernel_size,
                dilation=m.dilation,
                padding=m.padding,
                stride=m.stride,
            )
            a = patches.transpose(1, 2)
        else:
            x = x if x.ndim > 1 else x[None]
            a = x.reshape(x.shape[0], -1, x.shape[-1])
        a = a.to(self.weight.dtype)
        if self.bias is not None:
            a = torch.cat([a, a.new_ones(*a.shape[:2], 1)], dim=2)
        return a

    def output_grads(self, g: Tensor) -> Tensor:
        """``g`` as ``(K, N, T, out_dim)`` from gradients ``(K, *s.shape)``."""
        k = g.shape[0]
        if isinstance(self.module, nn.Conv2d):
            g = g if g.ndim == 5 else g[:, None]
            g = g.reshape(k, g.shape[1], g.shape[2], -1).transpose(2, 3)
        else:
            g = g if g.ndim > 2 else g[:, None]
            g = g.reshape(k, g.shape[1], -1, g.shape[-1])
        return g.to(self.weight.dtype)

    def matrix(self, weight: Tensor, bias: Tensor | None) -> Tensor:
        """``[W, b]`` as ``(..., out_dim, in_dim)`` (a leading batch dim kept)."""
        lead = weight.shape[: weight.ndim - self.weight.ndim]
        mat = weight.reshape(*lead, self.out_dim, -1)
        if self.bias is None:
            return mat
        if bias is None:
            bias = mat.new_zeros(*lead, self.out_dim)
        return torch.cat([mat, bias[..., None]], dim=-1)

    def split(self, mat: Tensor) -> tuple[Tensor, Tensor | None]:
        """The inverse of :meth:`matrix`: weight- and bias-shaped pieces."""
        lead = mat.shape[:-2]
        if self.bias is None:
            return mat.reshape(*lead, *self.weight.shape), None
        return mat[..., :-1].reshape(*lead, *self.weight.shape), mat[..., -1]


def find_layers(model: nn.Module, exclude: tuple[str, ...] = ()) -> list[Layer]:
    """The ``nn.Linear`` and ``nn.Conv2d`` layers of ``model`` with trainable weights.

    Raises:
        ValueError: ``exclude`` names no module of the model; a convolution K-FAC
            does not handle (groups, non-zero padding mode, string padding).
    """
    names = {name for name, _ in model.named_modules()}
    unknown = sorted(set(exclude) - names)
    if unknown:
        raise ValueError(
            f"exclude names {unknown}, which are not modules of the model; module "
            f"names look like {sorted(n for n in names if n)[:6]}."
        )
    found = []
    for name, m in model.named_modules():
        if name in exclude or not isinstance(m, (nn.Linear, nn.Conv2d)):
            continue
        if not m.weight.requires_grad:
            continue
        if isinstance(m, nn.Conv2d) and (
            m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str)
        ):
            raise ValueError(
                f"K-FAC handles Conv2d layers with groups=1, padding_mode='zeros' "
                f"and numeric padding; layer {name!r} is {m}. Leave it to plain "
                f"SGD with exclude=({name!r},)."
            )
        bias = m.bias if m.bias is not None and m.bias.requires_grad else None
        found.append(Layer(name, m, m.weight, bias))
    return found


@dataclass
class Statistics:
    """Sums behind one step's ``A`` and ``G`` of a layer, over its captured passes."""

    a_sum: Tensor | None = None
    samples: int = 0
    g_sum: Tensor | None = None
    positions: int = 0

    def add(self, a: Tensor, g: Tensor) -> None:
        """Add one call: ``a`` ``(N, T, in)``, ``g`` ``(K, N, T, out)``."""
        a2 = a.reshape(-1, a.shape[-1])
        g2 = g.reshape(-1, g.shape[-1])
        aa, gg = a2.T @ a2, g2.T @ g2
        self.a_sum = aa if self.a_sum is None else self.a_sum + aa
        self.g_sum = gg if self.g_sum is None else self.g_sum + gg
        self.positions += a.shape[0] * a.shape[1]

    def factors(self) -> tuple[Tensor, Tensor]:
        """``(A, G)`` of the batch (see the module docstring)."""
        return self.a_sum / self.samples, self.g_sum / self.positions


def backprop(out: Tensor, targets: list[Tensor], vectors: Tensor) -> list[Tensor]:
    """``J^T r`` at each target for every vector ``r``: ``(K, *target.shape)`` each."""
    k = vectors.shape[0]
    grads = None
    if k > 1:
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="There is a performance drop")
                grads = torch.autograd.grad(
                    out,
                    targets,
                    vectors,
                    retain_graph=True,
                    allow_unused=True,
                    is_grads_batched=True,
                )
        except RuntimeError:  # an operation vmap cannot batch: one at a time
            grads = None
    if grads is None:
        per = [
            torch.autograd.grad(
                out, targets, vectors[j], retain_graph=True, allow_unused=True
            )
            for j in range(k)
        ]
        grads = [
            None if col[0] is None else torch.stack(col)
            for col in zip(*per, strict=True)
        ]
    return [
        torch.zeros(k, *t.shape, dtype=t.dtype, device=t.device) if g is None else g
        for g, t in zip(grads, targets, strict=True)
    ]
