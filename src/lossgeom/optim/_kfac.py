"""K-FAC: natural-gradient steps with Kronecker-factored curvature blocks.

Martens & Grosse (2015, "Optimizing neural networks with Kronecker-factored
approximate curvature", ICML) precondition each layer's gradient with the
inverse of a Kronecker-factored block ``A (x) G`` of the Fisher (or the GGN);
Grosse & Martens (2016, "A Kronecker-factored approximate Fisher matrix for
convolution layers", ICML) extend it to convolutions. The factors and their
scaling are defined in :mod:`lossgeom.optim._factors`.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from lossgeom.optim._blocks import apply_power, decompose
from lossgeom.optim._factors import (
    FISHER_KINDS,
    Layer,
    Statistics,
    backprop,
    find_layers,
    loss_spec,
    output_vectors,
)

__all__ = ["KFAC"]

_DAMPING_RULES = ("pi", "exact")
_NOTHING_SEEN = (
    "KFAC.step() found no curvature statistics for this step: no forward and "
    "backward pass of the model K-FAC was built with was seen since the last "
    "step() or zero_grad(). Call model(x) itself (not a copy or functional_call) "
    "in train mode (model.train()) with gradients enabled, then backward(), "
    "then step()."
)


class KFAC(torch.optim.Optimizer):
    """K-FAC (Martens & Grosse 2015; Grosse & Martens 2016) as a PyTorch optimizer.

    For every ``nn.Linear`` and ``nn.Conv2d`` layer of ``model`` (weights and,
    jointly, bias), hooks capture the layer's inputs in the forward pass; when
    the gradient reaches the model's output in the backward pass, output-space
    vectors (``fisher``: ``mc``, labels sampled from the model's predictive
    distribution; ``ggn``, the columns of a square root of the loss Hessian, the
    exact GGN; ``empirical``, the true gradient) are backpropagated to the
    layers' outputs. They give the Kronecker factors ``A`` (inputs) and ``G``
    (output gradients) of the step, whose running averages ``A <- rho A + (1 -
    rho) A_batch`` use ``rho = min(factor_decay, 1 - 1/k)`` at the ``k``-th
    update (so the first is the batch's), every ``cov_every`` steps. Every
    ``inv_every`` steps ``A`` and ``G`` are eigendecomposed. The step is

    * for each layer, ``U = (G + d_G I)^-1 [dW, db] (A + d_A I)^-1`` with the
      pi-correction of Martens & Grosse (2015, Sec. 6.3): ``d_A = pi sqrt(lambda)``,
      ``d_G = sqrt(lambda) / pi``, ``pi = sqrt((tr A / dim A) / (tr G / dim G))``
      (``damping_rule="pi"``), or ``U = (A (x) G + lambda I)^-1 vec([dW, db])``
      (``"exact"``), both through the eigendecompositions;
    * other parameters (norm layers, embeddings, excluded layers, and layers
      whose factors were never captured): their gradient as it is;
    * then PyTorch's SGD step on these directions: weight decay ``wd`` adds
      ``wd * p`` to the gradient before preconditioning, heavy-ball momentum
      ``v <- mu v + U`` (Nesterov: ``U + mu v``), ``p <- p - lr v``.

    The statistics of the passes since the last ``step()`` or ``zero_grad()``
    are summed (gradient accumulation works). The optimizer state (factors,
    eigendecompositions, step counts, momentum) is in ``state_dict()``, keyed by
    parameter like PyTorch's, so a checkpointed run resumes exactly. The MC
    labels come from a generator seeded by ``(seed, step, pass)``, not the global
    random state. Factors are kept in the parameters' dtype, on their device.
    Under ``torch.distributed`` each step's batch factors are averaged over the
    ranks. Not modelled: BatchNorm couplings between samples (the factors treat
    samples as independent), the quadratic-model rescaling and momentum of
    Sec. 7 of the paper.

    Args:
        model: the network; its trainable parameters are optimized.
        lr: step size.
        loss: ``"cross_entropy"``, ``"mse"`` (``0.5 * ||f(x) - y||^2`` summed over
            outputs, averaged over samples: lossgeom's ``mse``), or an
            ``nn.CrossEntropyLoss`` / ``nn.MSELoss`` (mean or sum) module: the
            loss whose curvature ``G`` models.
        fisher: ``"mc"``, ``"ggn"`` or ``"empirical"`` (see above).
        damping: Tikhonov damping ``lambda``.
        damping_rule: ``"pi"`` or ``"exact"`` (see above).
        factor_decay: running-average decay of the factors.
        cov_every: steps between factor updates (passes are captured only
            before those steps).
        inv_every: steps between eigendecompositions.
        momentum: heavy-ball momentum (PyTorch's SGD form).
        nesterov: Nesterov momentum.
        weight_decay: L2 penalty added to the gradient.
        mc_samples: labels drawn per sample for ``fisher="mc"``.
        exclude: names of ``Linear``/``Conv2d`` modules to leave to plain SGD.
        seed: seed of the MC labels.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``; an unsupported loss.
        ValueError: a bad option (naming it), or a model with no trainable
            ``nn.Linear`` or ``nn.Conv2d`` layer.

    A ``backward()`` through outputs that are not finite raises
    ``FloatingPointError`` (the training has diverged).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from lossgeom.optim import KFAC
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3))
        >>> X, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
        >>> opt = KFAC(model, lr=0.2, damping=0.01)
        >>> losses = []
        >>> for _ in range(20):
        ...     opt.zero_grad()
        ...     loss = nn.functional.cross_entropy(model(X), y)
        ...     loss.backward()
        ...     opt.step()
        ...     losses.append(loss.item())
        >>> losses[-1] < 0.8 * losses[0]
        True
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 0.1,
        *,
        loss: str | nn.Module = "cross_entropy",
        fisher: str = "mc",
        damping: float = 0.03,
        damping_rule: str = "pi",
        factor_decay: float = 0.95,
        cov_every: int = 1,
        inv_every: int = 10,
        momentum: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        mc_samples: int = 1,
        exclude: Iterable[str] = (),
        seed: int = 0,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"KFAC takes the model (an nn.Module), whose layers it hooks; got "
                f"{type(model).__name__}. Use KFAC(model, lr=...)."
            )
        defaults = _check_options(
            lr=lr,
            fisher=fisher,
            damping=damping,
            damping_rule=damping_rule,
            factor_decay=factor_decay,
            cov_every=cov_every,
            inv_every=inv_every,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=weight_decay,
            mc_samples=mc_samples,
        )
        self._loss = loss_spec(loss)
        if isinstance(exclude, str):
            exclude = (exclude,)
        layers = find_layers(model, tuple(exclude))
        if not layers:
            raise ValueError(
                f"KFAC found no nn.Linear or nn.Conv2d layer with trainable weights "
                f"in {type(model).__name__} (excluded: {sorted(exclude)}); K-FAC "
                "preconditions those layers only. Use SGD or Adam for this model."
            )
        params = list(dict.fromkeys(p for p in model.parameters() if p.requires_grad))
        super().__init__(params, defaults)
        self.layers: tuple[Layer, ...] = tuple(layers)
        self._model = model
        self._seed = int(seed)
        self._stats: dict[int, Statistics] = {}
        self._calls: dict[int, list[tuple[Tensor, Tensor]]] = {}
        self._boxes: list[list] = []  # outputs awaiting their backward pass
        self._active = False
        self._in_curvature = False
        self._passes = 0
        self._handles = _register_hooks(self, model)

    # ----------------------------------------------------------------- public
    @property
    def layer_names(self) -> list[str]:
        """Names of the modules K-FAC preconditions, in the model's order."""
        return [layer.name for layer in self.layers]

    @property
    def has_curvature(self) -> bool:
        """Whether some layer has an eigendecomposition (after the first step)."""
        return any("A_eigvecs" in self.state.get(la.weight, {}) for la in self.layers)

    def factors(self) -> dict[str, tuple[Tensor, Tensor]]:
        """The running averages ``(A, G)`` of each layer that has them (copies).

        ``A`` is over ``[inputs, 1]`` (the 1 when the layer has a bias), ``G`` over
        outputs; the layer's curvature block, in PyTorch's row-major order of
        ``[W, b]`` (``W.reshape(out, -1)`` with ``b`` as its last column), is
        ``torch.kron(G, A)``.
        """
        out = {}
        for layer in self.layers:
            st = self.state.get(layer.weight, {})
            if "A" in st:
                out[layer.name] = (st["A"].clone(), st["G"].clone())
        return out

    def precondition(
        self, tensors: Sequence[Tensor], power: float = -1.0
    ) -> list[Tensor]:
        """Apply ``P^power`` to vectors given per parameter.

        ``P`` is the damped Kronecker-factored curvature of the last
        eigendecomposition, block by block for the layers K-FAC handles, and
        the identity for the other parameters (and before the first step).
        ``power=-1`` gives the preconditioned gradient of a step (before
        momentum), ``-0.5`` the symmetric square root of ``P^-1``.

        Args:
            tensors: one tensor per parameter of ``self.param_groups[0]["params"]``,
                in that order, shaped like it, optionally with one leading batch
                dimension (the same for all).
            power: the power of ``P``.

        Returns:
            The results, shaped like ``tensors``.
        """
        params = self.param_groups[0]["params"]
        if len(tensors) != len(params):
            raise ValueError(
                f"precondition takes one tensor per parameter ({len(params)}); got "
                f"{len(tensors)}."
            )
        index = {p: i for i, p in enumerate(params)}
        out = list(tensors)
        group = self.param_groups[0]
        for layer in self.layers:
            st = self.state.get(layer.weight, {})
            if "A_eigvecs" not in st:
                continue
            i = index[layer.weight]
            j = index[layer.bias] if layer.bias is not None else None
            mat = layer.matrix(tensors[i], tensors[j] if j is not None else None)
            w, b = layer.split(apply_power(st, mat, power, group))
            out[i] = w
            if j is not None:
                out[j] = b
        return out

    def remove_hooks(self) -> None:
        """Detach K-FAC's hooks from the model (no statistics are captured then)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def add_param_group(self, param_group: dict) -> None:
        """Refused after construction: K-FAC optimizes the whole model it was given."""
        if getattr(self, "param_groups", None):
            raise ValueError(
                "KFAC holds one parameter group, the model's trainable parameters; "
                "build another optimizer for parameters outside the model."
            )
        super().add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients and the curvature statistics gathered since ``step``."""
        super().zero_grad(set_to_none=set_to_none)
        self._release()

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Update the factors (when due), their eigendecompositions, and the weights.

        Args:
            closure: recomputes the loss (forward and backward), as in PyTorch.

        Returns:
            The closure's loss, or ``None``.

        Raises:
            RuntimeError: a factor update is due and no pass was captured.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = self.param_groups[0]
        done = self.steps_done
        if done % group["cov_every"] == 0:
            self._update_factors(group)
        self._release()
        due = done % group["inv_every"] == 0
        for layer in self.layers:
            st = self.state[layer.weight]
            if "A" in st and (due or "A_eigvecs" not in st):
                decompose(st)
        self._descend(group, self._directions(group))
        for layer in self.layers:
            self.state[layer.weight]["step"] = done + 1
        return loss

    @property
    def steps_done(self) -> int:
        """The number of steps taken."""
        return int(self.state.get(self.layers[0].weight, {}).get("step", 0))

    # --------------------------------------------------------------- capture
    def _begin_pass(self, module: nn.Module) -> None:
        group = self.param_groups[0]
        self._calls = {}
        self._active = (
            module is self._model
            and module.training
            and torch.is_grad_enabled()
            and not self._in_curvature
            and self.steps_done % group["cov_every"] == 0
        )

    def _record(self, i: int, module: nn.Module, args: tuple, output) -> None:
        layer = self.layers[i]
        if not self._active or module.weight is not layer.weight or not args:
            return
        if isinstance(output, Tensor) and output.requires_grad:
            self._calls.setdefault(i, []).append((args[0].detach(), output))

    def _end_pass(self, output) -> None:
        if not self._active:
            return
        self._active = False
        calls, self._calls = self._calls, {}
        if not calls:
            return
        if not isinstance(output, Tensor):
            raise TypeError(
                "K-FAC needs the model's forward to return one tensor (the outputs "
                f"the loss takes); it returned {type(output).__name__}."
            )
        if not output.requires_grad:
            return
        box = [output, calls, self._passes]
        self._passes += 1
        self._boxes.append(box)
        ref = weakref.ref(self)

        def on_output_grad(grad: Tensor) -> None:
            opt = ref()
            if opt is not None and box and not opt._in_curvature:
                opt._in_curvature = True
                try:
                    opt._accumulate(*box, grad)
                finally:
                    opt._in_curvature = False
                    box.clear()

        output.register_hook(on_output_grad)

    def _accumulate(self, out: Tensor, calls: dict, index: int, grad: Tensor) -> None:
        if not bool(torch.isfinite(out).all()):
            raise FloatingPointError(
                "K-FAC: the model's outputs are not finite (nan or inf), so no "
                "curvature can be formed from them; the training has diverged. "
                "Lower lr or raise damping."
            )
        group = self.param_groups[0]
        gen = torch.Generator(device=out.device)
        gen.manual_seed(
            (self._seed * 1_000_003 + self.steps_done * 1_009 + index) % 2**63
        )
        vectors = output_vectors(
            out, self._loss, group["fisher"], group["mc_samples"], gen, grad
        )
        flat = [(i, x, s) for i, lst in calls.items() for x, s in lst]
        grads = backprop(out, [s for _, _, s in flat], vectors)
        counted = set()
        for (i, x, _), g in zip(flat, grads, strict=True):
            layer = self.layers[i]
            a = layer.inputs(x)
            stats = self._stats.setdefault(i, Statistics())
            stats.add(a, layer.output_grads(g))
            if i not in counted:
                stats.samples += a.shape[0]
                counted.add(i)

    def _release(self) -> None:
        for box in self._boxes:
            box.clear()
        self._boxes, self._stats, self._passes = [], {}, 0

    # ------------------------------------------------------------------ step
    def _update_factors(self, group: dict) -> None:
        if not self._stats:
            raise RuntimeError(_NOTHING_SEEN)
        world = _world_size()
        for i, stats in sorted(self._stats.items()):
            a, g = stats.factors()
            if world > 1:
                for t in (a, g):
                    torch.distributed.all_reduce(t)
                    t.div_(world)
            st = self.state[self.layers[i].weight]
            k = st.get("factor_updates", 0) + 1
            rho = min(group["factor_decay"], 1.0 - 1.0 / k)
            if k == 1:
                st["A"], st["G"] = a, g
            else:
                st["A"] = rho * st["A"] + (1 - rho) * a
                st["G"] = rho * st["G"] + (1 - rho) * g
            st["factor_updates"] = k

    def _directions(self, group: dict) -> dict[Tensor, Tensor]:
        wd = group["weight_decay"]
        found: dict[Tensor, Tensor] = {}
        for layer in self.layers:
            gw = layer.weight.grad
            if gw is None:
                continue
            gb = layer.bias.grad if layer.bias is not None else None
            mat = layer.matrix(gw, gb)
            if wd:
                mat = mat + wd * layer.matrix(layer.weight, layer.bias)
            st = self.state[layer.weight]
            if "A_eigvecs" in st:
                mat = apply_power(st, mat, -1.0, group)
            dw, db = layer.split(mat)
            found[layer.weight] = dw
            if gb is not None:
                found[layer.bias] = db
        for p in group["params"]:
            if p not in found and p.grad is not None:
                found[p] = p.grad + wd * p if wd else p.grad
        return found

    def _descend(self, group: dict, directions: dict[Tensor, Tensor]) -> None:
        mu, lr = group["momentum"], group["lr"]
        for p, d in directions.items():
            if mu:
                st = self.state[p]
                buf = st.get("momentum_buffer")
                buf = d.contiguous().clone() if buf is None else mu * buf + d
                st["momentum_buffer"] = buf
                d = d + mu * buf if group["nesterov"] else buf
            p.add_(d, alpha=-lr)


def _check_options(**o) -> dict:
    """The options as a parameter group's defaults, or a ``ValueError`` naming one."""

    def bad(name: str, want: str) -> ValueError:
        return ValueError(f"KFAC option {name} must be {want}; got {o[name]!r}.")

    for name in ("lr", "damping"):
        if not _real(o[name]) or not o[name] > 0:
            raise bad(name, "a finite number > 0")
    for name in ("momentum", "factor_decay"):
        if not _real(o[name]) or not 0 <= o[name] < 1:
            raise bad(name, "a number in [0, 1)")
    if not _real(o["weight_decay"]) or o["weight_decay"] < 0:
        raise bad("weight_decay", "a finite number >= 0")
    for name in ("cov_every", "inv_every", "mc_samples"):
        if isinstance(o[name], bool) or not isinstance(o[name], int) or o[name] < 1:
            raise bad(name, "an integer >= 1")
    if o["fisher"] not in FISHER_KINDS:
        raise bad("fisher", f"one of {FISHER_KINDS}")
    if o["damping_rule"] not in _DAMPING_RULES:
        raise bad("damping_rule", f"one of {_DAMPING_RULES}")
    if not isinstance(o["nesterov"], bool):
        raise bad("nesterov", "a bool")
    if o["nesterov"] and o["momentum"] == 0:
        raise ValueError("KFAC: nesterov needs momentum > 0 (e.g. momentum=0.9).")
    return {k: float(v) if k in _FLOATS else v for k, v in o.items()}


_FLOATS = ("lr", "damping", "factor_decay", "momentum", "weight_decay")


def _real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _register_hooks(opt: KFAC, model: nn.Module) -> list:
    """Forward hooks on the layers and the model, holding the optimizer weakly.

    Closures, not bound methods: a deep copy of the model (as probes make) then
    keeps the same functions, whose identity checks ignore the copy's passes.
    """
    ref = weakref.ref(opt)
    handles = []

    def begin(module, args):
        o = ref()
        if o is not None:
            o._begin_pass(module)

    def layer_hook(i: int):
        def hook(module, args, output):
            o = ref()
            if o is not None:
                o._record(i, module, args, output)

        return hook

    def end(module, args, output):
        o = ref()
        if o is not None and module is o._model:
            o._end_pass(output)

    handles.append(model.register_forward_pre_hook(begin))
    for i, layer in enumerate(opt.layers):  # before `end`: the model may be a layer
        handles.append(layer.module.register_forward_hook(layer_hook(i)))
    handles.append(model.register_forward_hook(end))
    return handles


def _world_size() -> int:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1
