"""Measurements during training: losses, gradient norm, sharpness, trace, edge of stability."""

from __future__ import annotations

import time

import torch
from torch import Tensor, nn

from lossgeom.curvature import HessianOperator, hessian
from lossgeom.curvature.spectra import eigenvalues, trace
from lossgeom.linalg import EigenResult, SymmetricOperator
from lossgeom.measures._registry import run_measure
from lossgeom.objective import Objective
from lossgeom.train._config import MetricsConfig, OptimConfig

__all__ = ["Prober", "stability_threshold"]


def stability_threshold(optim: OptimConfig, lr: float) -> tuple[float, str]:
    """The sharpness above which the optimizer diverges on a quadratic.

    Gradient descent ``x' = x - eta H x`` is stable iff ``lambda_max < 2 / eta``
    (Cohen et al. 2021, "Gradient descent on neural networks typically occurs at
    the edge of stability"). Heavy-ball momentum ``beta`` (PyTorch's form
    ``v' = beta v + g, x' = x - eta v'``) moves it to ``(2 + 2 beta) / eta``;
    PyTorch's Nesterov form ``x' = x - eta (g + beta v')`` to
    ``(2 + 2 beta) / ((1 + 2 beta) eta)`` (the root of its characteristic
    polynomial at -1). For Adam the quantity is the *preconditioned* sharpness
    ``lambda_max(P^-1 H)``, ``P = diag(sqrt(v_hat) + eps) / eta``'s shape, compared
    with ``(2 + 2 beta_1) / ((1 - beta_1) eta)`` (Cohen et al. 2022, "Adaptive
    gradient methods at the edge of stability").

    Args:
        optim: the optimizer config.
        lr: the step size in use.

    Returns:
        ``(threshold, formula)``.

    Example:
        >>> stability_threshold(OptimConfig(name="gd", lr=0.01), 0.01)
        (200.0, '2 / eta')
    """
    b = optim.momentum
    if optim.name in ("adam", "adamw"):
        b1 = optim.betas[0]
        return (2 + 2 * b1) / ((1 - b1) * lr), "(2 + 2 beta1) / ((1 - beta1) eta)"
    if b == 0:
        return 2 / lr, "2 / eta"
    if optim.nesterov:
        return (2 + 2 * b) / ((1 + 2 * b) * lr), "(2 + 2 beta) / ((1 + 2 beta) eta)"
    return (2 + 2 * b) / lr, "(2 + 2 beta) / eta"


class _Preconditioned(SymmetricOperator):
    """``D H D`` with ``D = diag(d)``: same eigenvalues as ``D^2 H``."""

    def __init__(self, op: SymmetricOperator, scale: Tensor):
        super().__init__(op.shape[0], op.dtype, op.device)
        self.op, self.scale = op, scale.unsqueeze(1)

    def _matmat(self, V: Tensor) -> Tensor:
        return self.scale * (self.op @ (self.scale * V))


def _adam_scale(
    objective: Objective, optimizer: torch.optim.Optimizer
) -> Tensor | None:
    """``P^{-1/2}`` of Adam, flattened in the objective's parameter order."""
    group = optimizer.param_groups[0]
    b2, eps = group["betas"][1], group["eps"]
    parts = []
    params = dict(objective.model.named_parameters())
    for p in (params[name] for name in objective.names):
        state = optimizer.state.get(p)
        if not state or "exp_avg_sq" not in state:
            return None  # before the first step there is no preconditioner
        step = float(state["step"])
        v_hat = state["exp_avg_sq"] / (1 - b2**step)
        parts.append((v_hat.sqrt() + eps).reciprocal().sqrt().reshape(-1))
    return torch.cat(parts).to(objective.dtype)


class Prober:
    """The callbacks' measurements on fixed evaluation and probe sets.

    Args:
        model: the network being trained (read, never modified).
        loss_fn: ``loss_fn(outputs, targets)``, mean over samples.
        train: ``(X, y)`` of the training set.
        test: ``(X, y)`` of the test set or ``None``.
        metrics: what to measure.
        optim: the optimizer config (for the edge-of-stability threshold).
        seed: seed of the subsets and the Lanczos/trace probes.
        classification: whether accuracy is meaningful.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn,
        train: tuple[Tensor, Tensor],
        test: tuple[Tensor, Tensor] | None,
        metrics: MetricsConfig,
        optim: OptimConfig,
        seed: int,
        classification: bool,
    ):
        self.model, self.loss_fn, self.cfg, self.optim = model, loss_fn, metrics, optim
        self.seed, self.classification = seed, classification
        self.sets = {"train": _subset(train, metrics.eval_samples, seed)}
        if test is not None:
            self.sets["test"] = _subset(test, metrics.eval_samples, seed + 1)
        probe = _subset(train, metrics.probe_samples, seed + 2)
        self.objective = Objective(model, loss_fn, probe, mode=metrics.probe_mode)
        self.v0: Tensor | None = None
        self.last_sharpness: float | None = None

    @torch.no_grad()
    def _evaluate(self, X: Tensor, y: Tensor) -> dict[str, float]:
        was = self.model.training
        self.model.eval()
        try:
            total, correct, n = 0.0, 0, X.shape[0]
            for i in range(0, n, 1024):
                out = self.model(X[i : i + 1024])
                total += float(self.loss_fn(out, y[i : i + 1024])) * out.shape[0]
                if self.classification:
                    correct += int((out.argmax(1) == y[i : i + 1024]).sum())
        finally:
            self.model.train(was)
        res = {"loss": total / n}
        if self.classification:
            res["accuracy"] = correct / n
        return res

    def top_eigenpair(
        self, op: SymmetricOperator, seed: int, v0: Tensor | None = None
    ) -> EigenResult:
        """The top eigenpair of ``op`` for tracking during training.

        Cheap by design: warm-started from ``v0``, no verification search, and
        residuals from the Lanczos relation instead of one more product.
        """
        return eigenvalues(
            op,
            1,
            tol=self.cfg.sharpness_tol,
            max_matvecs=self.cfg.sharpness_max_matvecs,
            v0=v0,
            seed=seed,
            verify=False,
            explicit_residuals=False,
        )

    def sharpness(
        self, seed: int, H: HessianOperator | None = None
    ) -> dict[str, float | int | bool]:
        """Top Hessian eigenvalue on the probe set, warm-started from the last one."""
        res = self.top_eigenpair(
            H if H is not None else hessian(self.objective), seed, self.v0
        )
        self.v0 = res.vectors
        self.last_sharpness = float(res.values[0])
        return {
            "sharpness": self.last_sharpness,
            "sharpness_residual": float(res.residuals[0]),
            "sharpness_converged": bool(res.converged[0]),
            "sharpness_matvecs": res.n_matvecs,
        }

    def measure(
        self,
        step: int,
        lr: float,
        optimizer: torch.optim.Optimizer,
        *,
        last: bool = False,
    ) -> dict[str, object]:
        """All configured measurements at ``step``; JSON-ready."""
        start = time.perf_counter()
        out: dict[str, object] = {}
        for name, (X, y) in self.sets.items():
            for key, value in self._evaluate(X, y).items():
                out[f"{name}_{key}"] = value
        H = hessian(self.objective)  # its kept graphs also give the gradient
        out["grad_norm"] = float(H.gradient().norm())
        if self.cfg.sharpness:
            out.update(self.sharpness(seed=self.seed + step, H=H))
            threshold, formula = stability_threshold(self.optim, lr)
            out["eos_threshold"] = threshold
            out["eos_formula"] = formula
            if self.optim.name in ("adam", "adamw"):
                scale = _adam_scale(self.objective, optimizer)
                if scale is not None:
                    # lambda_max(P^-1 H) = lambda_max(P^-1/2 H P^-1/2), symmetric
                    pre = self.top_eigenpair(
                        _Preconditioned(H, scale), self.seed + step
                    )
                    out["preconditioned_sharpness"] = float(pre.values[0])
                    out["eos_ratio"] = float(pre.values[0]) / threshold
            else:
                out["eos_ratio"] = self.last_sharpness / threshold
        if self.cfg.trace_matvecs:
            tr = trace(
                H,
                self.cfg.trace_matvecs,
                seed=self.seed + step,
            )
            out.update(trace=tr.value, trace_stderr=tr.stderr, trace_method=tr.method)
        for spec in self.cfg.measures:
            if spec.every is None or step % spec.every == 0 or last:
                try:
                    out.update(
                        run_measure(
                            spec.name,
                            self.objective,
                            spec.options,
                            self.seed + step,
                            key=spec.column,
                        )
                    )
                except (ValueError, RuntimeError, ArithmeticError) as err:
                    # A measure that cannot be taken at this point (e.g. log det of
                    # an indefinite Hessian) is recorded; training goes on.
                    out[spec.column] = None
                    out[f"{spec.column}_failed"] = f"{type(err).__name__}: {err}"
        out["probe_seconds"] = time.perf_counter() - start
        return out


def _subset(
    data: tuple[Tensor, Tensor], size: int | None, seed: int
) -> tuple[Tensor, Tensor]:
    X, y = data
    if size is None or size >= X.shape[0]:
        return X, y
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(X.shape[0], generator=gen)[:size].to(X.device)
    return X[idx], y[idx]
