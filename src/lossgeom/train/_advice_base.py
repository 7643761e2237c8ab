"""Shared machinery of the advice rules: thresholds, inputs, row readers.

The rules (:mod:`lossgeom.train._advice_rules`) read metrics rows through these
helpers: values as numbers (the strings ``"Infinity"``, ``"NaN"`` of
non-finite ones included), the sharpness as a ratio to the stability threshold
of the row's step size, and step-size changes as config overrides.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from lossgeom.train._config import TrainConfig
from lossgeom.train._probes import stability_threshold

__all__ = [
    "COHEN",
    "HEURISTIC",
    "LEWKOWYCZ",
    "MCCANDLISH",
    "AdviceInputs",
    "AdviceThresholds",
    "NotEvaluated",
    "down_factor",
    "formula",
    "lr_change",
    "need_sharpness",
    "number",
    "ratios",
    "recommendation",
    "series",
    "shown",
    "slope",
]

COHEN = (
    "Cohen et al. 2021, 'Gradient descent on neural networks typically occurs at "
    "the edge of stability' (ICLR): GD on a quadratic is stable iff lambda_max < "
    "2 / lr; full-batch training hovers at that threshold"
)
MCCANDLISH = (
    "McCandlish et al. 2018, 'An empirical model of large-batch training': "
    "steps S = S_min (1 + B_noise / B), samples E = E_min (1 + B / B_noise), "
    "best step size lr(B) = lr_max / (1 + B_noise / B)"
)
LEWKOWYCZ = (
    "Lewkowycz et al. 2020, 'The large learning rate phase of deep learning: the "
    "catapult mechanism': from 2 / lambda_0 < lr < 4 / lambda_0 the loss spikes "
    "and the curvature falls until training is stable; beyond, it diverges"
)
HEURISTIC = "a heuristic of this advisor (docs/advice.md), tested in its validation"


@dataclass(frozen=True)
class AdviceThresholds:
    """The thresholds of the advice rules, each relative to a scale of the run.

    Attributes:
        eos_high: ``eos_ratio`` (sharpness / stability threshold) at or above
            which a *rising* sharpness is unstable: 1 is the threshold itself
            (Cohen et al. 2021).
        eos_overshoot: ``eos_ratio`` at or above which the step is unstable
            whatever the trend: 2 is ``lr = 4 / lambda_max``, the largest step
            from which the catapult of Lewkowycz et al. (2020) returns for a
            wide two-layer network with squared loss (between 1 and 2 the
            sharpness can fall back below the threshold).
        eos_low: ``eos_ratio`` at or below which the step is far below the
            threshold (it could grow ``1 / eos_low`` times before reaching it).
        target_ratio: the ``eos_ratio`` a changed step size aims at, leaving
            room for the sharpness to rise (progressive sharpening).
        max_factor_down: a step size reduced by the advisor is at most this
            fraction of the old one.
        stall_drop: the train loss stalls when it falls by less than this
            fraction of its first value over the window.
        noise_factor: the batch is far from the noise scale ``B_noise`` when
            ``B < B_noise / noise_factor`` or ``B > noise_factor * B_noise``.
        rugged_fraction: slices are rugged when this fraction of their total
            variation is excess variation (bumps beyond a single valley).
        damp_factor: the step-size factor of the rugged-slice advice.
        barrier_high: the barrier between two seeds is high when it is at least
            this multiple of the mean loss of its two ends.
        flat_ratio: minima are flat when both ends' ``eos_ratio`` are below this.
    """

    eos_high: float = 1.0
    eos_overshoot: float = 2.0
    eos_low: float = 0.1
    target_ratio: float = 0.25
    max_factor_down: float = 0.5
    stall_drop: float = 0.5
    noise_factor: float = 4.0
    rugged_fraction: float = 0.25
    damp_factor: float = 0.5
    barrier_high: float = 1.0
    flat_ratio: float = 0.5

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value <= 0
            ):
                raise ValueError(
                    f"advice threshold {name} must be a finite positive number; "
                    f"got {value!r}."
                )
        for name in ("max_factor_down", "stall_drop", "rugged_fraction", "damp_factor"):
            if getattr(self, name) >= 1:
                raise ValueError(
                    f"advice threshold {name} is a fraction and must be below 1; "
                    f"got {getattr(self, name)!r}."
                )
        if self.noise_factor <= 1:
            raise ValueError(
                f"noise_factor must exceed 1 (a factor away from B_noise); got "
                f"{self.noise_factor!r}."
            )
        if not self.eos_low < self.target_ratio < self.eos_high <= self.eos_overshoot:
            raise ValueError(
                "the eos_ratio thresholds must be ordered eos_low < target_ratio < "
                f"eos_high <= eos_overshoot; got {self.eos_low}, {self.target_ratio}, "
                f"{self.eos_high}, {self.eos_overshoot}."
            )


class NotEvaluated(Exception):  # noqa: N818 (a rule's answer, not an error)
    """A rule could not be evaluated on a run.

    Attributes:
        reason: what is missing.
        enable: the config settings (or calls) that provide it.
    """

    def __init__(self, reason: str, enable: list[str]):
        super().__init__(reason)
        self.reason, self.enable = reason, enable


@dataclass
class AdviceInputs:
    """What the rules read.

    Attributes:
        rows: the window's metrics rows, in step order.
        config: the run's config.
        probe_rows: the window's rows of study probes (``probes.jsonl``), each
            with ``step`` and its columns.
        diverged_at: the step whose loss was not finite, when it lies in the
            window (``None``: no divergence seen).
        pairs: two-run measurements (one dict per other run), ``None`` when no
            other run was given.
        pair_missing: why the two-run measurement could not be taken.
    """

    rows: list[dict]
    config: TrainConfig
    probe_rows: list[dict]
    diverged_at: int | None = None
    pairs: list[dict] | None = None
    pair_missing: str | None = None


def number(value: Any) -> float | None:
    """A row value as a float (``"Infinity"`` included), ``None`` if not a number."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        value = float(value)
    elif isinstance(value, str) and value in ("Infinity", "-Infinity", "NaN"):
        value = float(value.lower().replace("infinity", "inf"))
    else:
        return None
    return None if math.isnan(value) else value


def _sig(x: float, digits: int = 3) -> float:
    """``x`` to ``digits`` significant digits (a readable config value)."""
    return float(f"{x:.{digits}g}")


def series(rows: list[dict], key: str) -> list[tuple[int, float]]:
    out = []
    for row in rows:
        x = number(row.get(key))
        if x is not None:
            out.append((int(row["step"]), x))
    return out


def ratios(inp: AdviceInputs) -> list[tuple[int, float]]:
    """``(step, sharpness / stability threshold)`` of every row that has it.

    ``eos_ratio`` where the row has it; else ``sharpness`` over the threshold of
    the row's ``lr`` (:func:`~lossgeom.train.stability_threshold`).
    """
    out = []
    for row in inp.rows:
        r = number(row.get("eos_ratio"))
        if r is None:
            lam, lr = number(row.get("sharpness")), number(row.get("lr"))
            if lam is None or lr is None or lr <= 0:
                continue
            r = lam / stability_threshold(inp.config.optim, lr)[0]
        out.append((int(row["step"]), r))
    return out


def slope(points: list[tuple[int, float]]) -> float | None:
    """Least-squares slope of the values against the steps (``None``: < 2 steps)."""
    finite = [(s, v) for s, v in points if math.isfinite(v)]
    if len({s for s, _ in finite}) < 2:
        return None
    ms = sum(s for s, _ in finite) / len(finite)
    mv = sum(v for _, v in finite) / len(finite)
    num = sum((s - ms) * (v - mv) for s, v in finite)
    den = sum((s - ms) ** 2 for s, _ in finite)
    return num / den


def need_sharpness(inp: AdviceInputs, rule: str) -> list[tuple[int, float]]:
    """:func:`ratios`, or :class:`NotEvaluated` naming ``metrics.sharpness``."""
    found = ratios(inp)
    if not found:
        raise NotEvaluated(
            f"{rule} reads the sharpness against the stability threshold "
            "(eos_ratio), which no row of the window has",
            ["metrics.sharpness: true"],
        )
    return found


def lr_change(cfg: TrainConfig, factor: float) -> dict[str, float]:
    """The override that multiplies the step size by ``factor``."""
    if cfg.optim.adaptive is not None:  # eta = c / lambda_max: scale c
        return {"optim.adaptive.c": _sig(cfg.optim.adaptive.c * factor)}
    return {"optim.lr": _sig(cfg.optim.lr * factor)}


def down_factor(r_first: float | None, th: AdviceThresholds) -> float:
    """The step-size factor of a reduction: ``target / r_first``, at most the cap.

    The first row's ratio is the curvature before the instability (at step 0
    it does not depend on the step size's history); the new step puts it at
    ``target_ratio`` of the threshold.
    """
    if r_first is None or not math.isfinite(r_first) or r_first <= 0:
        return th.max_factor_down
    return min(th.target_ratio / r_first, th.max_factor_down)


def recommendation(
    rule: str, message: str, evidence: dict, effect: str, change: dict, source: str
) -> dict:
    """A recommendation dict (see the module documentation of the rules)."""
    return {
        "rule": rule,
        "message": message,
        "evidence": evidence,
        "expected_effect": effect,
        "change": change,
        "source": source,
    }


def formula(inp: AdviceInputs) -> str:
    """The stability threshold's formula, for messages."""
    for row in reversed(inp.rows):
        if isinstance(row.get("eos_formula"), str):
            return f"threshold {row['eos_formula']}"
    return "threshold " + stability_threshold(inp.config.optim, 1.0)[1]


def shown(change: dict) -> str:
    """Config overrides as ``path: value, ...``."""
    return ", ".join(f"{k}: {v:g}" for k, v in change.items())
