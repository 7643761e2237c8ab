"""The training advisor: rules that turn early probes into advice.

:func:`recommend` evaluates the rules of :mod:`lossgeom.train._advice_rules` on
metrics rows; :func:`advise` does it on the first ``early_fraction`` of a run
directory's steps (and, given other runs of the same model and data, on the
barrier between their early weights) and saves the :class:`AdviceResult` in
``<run_dir>/advice/``; the :class:`Advice` callback (``metrics.advice: true``)
writes the rule ids that fire into every metrics row and saves the advice at
the end of training. The rules, their thresholds and their validation are in
docs/advice.md.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lossgeom._results import Cost, Result, save_result
from lossgeom.train._advice_base import AdviceInputs, AdviceThresholds, NotEvaluated
from lossgeom.train._advice_rules import RULES
from lossgeom.train._callbacks import Callback, TrainState
from lossgeom.train._config import TrainConfig, load_config
from lossgeom.train._distributed import Ranks
from lossgeom.train._state import MetricsLog

__all__ = ["ADVICE", "Advice", "AdviceResult", "check_thresholds", "recommend"]

ADVICE = "advice"  # the folder of a run directory that holds the advice

DEFINITION = (
    "training advice: rules evaluated on a window of a run's metrics rows (the "
    "sharpness against the stability threshold 2/lr, Cohen et al. 2021; the "
    "train loss; the gradient noise scale against the batch size, McCandlish et "
    "al. 2018; slice ruggedness against the trace; the barrier between two "
    "seeds), each recommendation with its evidence, expected effect and a "
    "config change (docs/advice.md)"
)


@dataclass(frozen=True, eq=False)
class AdviceResult(Result):
    """What the advisor recommends for a run.

    Attributes:
        recommendations: one dict per rule that fired, in priority order, with
            ``rule``, ``message``, ``evidence`` (numbers and thresholds),
            ``expected_effect``, ``change`` (config overrides such as
            ``{"optim.lr": 0.05}``; empty for advice that is not a config
            change) and ``source``.
        run_dir: the run directory (``None`` for rows given directly).
        status: the run's status when advised (``running``, ``finished``,
            ``diverged``), where known.
        window: the rows the rules read: ``early_fraction``, ``end_step``,
            ``first_step``, ``last_step``, ``rows``, ``complete`` (the run got
            past the window's end).
        definition, parameters, details, cost: as for every
            :class:`~lossgeom.Result`; ``details`` has ``evaluated`` (rule ids),
            ``not_evaluated`` (rule id -> ``reason`` and ``enable``: the
            settings that provide what it reads), ``enable`` (all of those) and
            ``primary`` (the first rule whose advice changes the config).
    """

    recommendations: list[dict]
    run_dir: str | None = None
    status: str | None = None
    window: dict = field(default_factory=dict)
    definition: str = field(default=DEFINITION, kw_only=True)

    @property
    def rules(self) -> list[str]:
        """The ids of the rules that fired, in priority order."""
        return [r["rule"] for r in self.recommendations]

    @property
    def primary(self) -> dict | None:
        """The first recommendation that changes the config (``None``: none)."""
        return next((r for r in self.recommendations if r["change"]), None)

    def scalars(self) -> dict[str, float]:
        """``advice_count``: how many rules fired."""
        return {"advice_count": float(len(self.recommendations))}

    def summary(self) -> str:
        """The recommendations and the rules that could not be evaluated, as text."""
        w = self.window
        where = self.run_dir or "the rows given"
        span = ""
        if w.get("rows"):
            span = f" (steps {w['first_step']}-{w['last_step']}, {w['rows']} rows)"
        lines = [f"advice for {where}{span}:"]
        if not self.recommendations:
            lines.append("  no rule fires: no change recommended.")
        for i, rec in enumerate(self.recommendations, 1):
            lines.append(f"{i}. [{rec['rule']}] {rec['message']}")
            lines.append(f"   expected: {rec['expected_effect']}")
            if rec["change"]:
                shown = ", ".join(f"{k}: {v}" for k, v in rec["change"].items())
                lines.append(f"   change:   {shown}")
        missing = self.details.get("not_evaluated", {})
        if missing:
            lines.append("not evaluated:")
            for rule, why in missing.items():
                lines.append(
                    f"  {rule}: {why['reason']}; turn on: {'; '.join(why['enable'])}"
                )
        if w and not w.get("complete", True):
            lines.append(
                f"note: the run has not yet reached step {w['end_step']:g}, the end "
                "of the window; the advice reads the rows so far."
            )
        return "\n".join(lines)


def check_thresholds(value: AdviceThresholds | dict | None) -> AdviceThresholds:
    if value is None:
        return AdviceThresholds()
    if isinstance(value, AdviceThresholds):
        return value
    if isinstance(value, dict):
        known = set(AdviceThresholds.__dataclass_fields__)
        bad = sorted(set(value) - known)
        if bad:
            raise ValueError(
                f"unknown advice thresholds {bad}; the thresholds are {sorted(known)}."
            )
        return AdviceThresholds(**value)
    raise TypeError(
        "thresholds must be an AdviceThresholds, a dict of its fields or None; got "
        f"{type(value).__name__}."
    )


def _check_rows(rows: Sequence[dict]) -> list[dict]:
    if isinstance(rows, (str, bytes, dict)) or not isinstance(rows, Sequence):
        raise TypeError(
            "rows must be a list of metrics rows (dicts with an integer step), "
            f"as in metrics.jsonl; got {type(rows).__name__}."
        )
    for i, row in enumerate(rows):
        step = row.get("step") if isinstance(row, dict) else None
        if not isinstance(step, int) or isinstance(step, bool):
            raise ValueError(
                f"rows[{i}] is not a metrics row (a dict with an integer step); got "
                f"{row!r:.80}."
            )
    return sorted(rows, key=lambda r: r["step"])


def recommend(
    rows: Sequence[dict],
    config: TrainConfig | dict,
    *,
    thresholds: AdviceThresholds | dict | None = None,
    diverged_at: int | None = None,
    probe_rows: Sequence[dict] = (),
    pairs: list[dict] | None = None,
    pair_missing: str | None = None,
    run_dir: str | None = None,
    status: str | None = None,
    window: dict | None = None,
) -> AdviceResult:
    """Evaluate the advice rules on metrics rows.

    Args:
        rows: metrics rows (as in ``metrics.jsonl``); a divergence row
            (``"diverged": true``) sets ``diverged_at``.
        config: the run's training config.
        thresholds: the rules' thresholds (default :class:`AdviceThresholds`).
        diverged_at: the step whose loss was not finite, if the run diverged
            within the rows' span.
        probe_rows: rows of study probes (``probes.jsonl``) in the same span.
        pairs: two-run measurements for ``seed_sensitive`` (see :func:`advise`);
            ``None``: no other run.
        pair_missing: why the two-run measurement could not be taken.
        run_dir: recorded in the result.
        status: the run's status, recorded in the result.
        window: more entries of the result's ``window``.

    Returns:
        An :class:`AdviceResult`.

    Raises:
        ValueError: no metrics rows, or a row without an integer step.

    Example:
        >>> cfg = {"model": {"name": "mlp"}, "data": {"name": "digits"},
        ...        "optim": {"name": "gd", "lr": 1.0}, "steps": 100}
        >>> rows = [{"step": 0, "lr": 1.0, "train_loss": 2.3, "sharpness": 1.0},
        ...         {"step": 10, "lr": 1.0, "train_loss": 2.1, "sharpness": 5.0}]
        >>> res = recommend(rows, cfg)
        >>> res.rules, res.recommendations[0]["change"]
        (['lr_too_high'], {'optim.lr': 0.5})
    """
    start = time.perf_counter()
    cfg = load_config(config)
    th = check_thresholds(thresholds)
    rows = _check_rows(rows)
    for row in rows:
        if row.get("diverged") is True and diverged_at is None:
            diverged_at = row["step"]
    measured = [r for r in rows if r.get("diverged") is not True]
    if not measured:
        raise ValueError(
            "no metrics rows to advise on: the rules read the rows a run writes "
            "every metrics.every steps (metrics.jsonl); train for at least one "
            "metrics step first."
        )
    inputs = AdviceInputs(
        rows=measured,
        config=cfg,
        probe_rows=_check_rows(probe_rows),
        diverged_at=diverged_at,
        pairs=pairs,
        pair_missing=pair_missing,
    )
    recommendations, evaluated, missing = [], [], {}
    for rule in RULES.values():
        try:
            found = rule.check(inputs, th)
        except NotEvaluated as why:
            missing[rule.id] = {"reason": why.reason, "enable": why.enable}
            continue
        evaluated.append(rule.id)
        if found is not None:
            recommendations.append(found)
    enable = list(dict.fromkeys(e for m in missing.values() for e in m["enable"]))
    primary = next((r["rule"] for r in recommendations if r["change"]), None)
    shown_window = {
        "first_step": measured[0]["step"],
        "last_step": measured[-1]["step"],
        "rows": len(measured),
        **(window or {}),
    }
    return AdviceResult(
        recommendations=recommendations,
        run_dir=run_dir,
        status=status,
        window=shown_window,
        parameters={"thresholds": asdict(th)},
        details={
            "evaluated": evaluated,
            "not_evaluated": missing,
            "enable": enable,
            "primary": primary,
        },
        cost=Cost(seconds=time.perf_counter() - start),
    )


# ---------------------------------------------------------------------- callback
class Advice(Callback):
    """The training advisor as a callback (``metrics.advice: true``).

    At every metrics row it evaluates the rules on the rows so far (this one
    with the built-in columns measured before it) and adds ``advice`` (the ids
    of the rules that fire) and ``advice_count``; at the end of training it
    saves the advice on all the rows, with the run's status, in
    ``<run_dir>/advice/`` (rank 0). Rules that need a second run or study
    probes are listed as not evaluated; :func:`advise` evaluates them
    afterwards.

    Args:
        thresholds: the rules' thresholds (default :class:`AdviceThresholds`).
    """

    def __init__(self, thresholds: AdviceThresholds | dict | None = None):
        self.thresholds = check_thresholds(thresholds)
        self.rows: list[dict] = []
        self.writer = True

    def on_train_start(self, state: TrainState) -> None:
        self.writer = Ranks.current(state.device).writer
        log = MetricsLog(state.run_dir / "metrics.jsonl")
        self.rows = [r for r in log.read() if r["step"] < state.step]

    def on_eval(self, state: TrainState) -> None:
        self.rows.append(dict(state.row))
        res = recommend(self.rows, state.config, thresholds=self.thresholds)
        state.row["advice"] = res.rules
        state.row["advice_count"] = len(res.rules)

    def on_train_end(self, state: TrainState) -> None:
        if not self.writer or not [r for r in self.rows if "diverged" not in r]:
            return
        diverged_at = state.step if state.status == "diverged" else None
        res = recommend(
            self.rows,
            state.config,
            thresholds=self.thresholds,
            diverged_at=diverged_at,
            run_dir=str(state.run_dir),
            status=state.status,
            window={
                "early_fraction": None,
                "end_step": state.step,
                "steps": state.config.steps,
                "complete": True,
            },
        )
        save_result(res, Path(state.run_dir) / ADVICE)
