"""The rules of the training advisor: early metrics rows in, recommendations out.

Each rule reads the metrics rows of a window of a run (and, for two rules, the
study probes and a second run) and either stays silent, fires with a
recommendation, or says why it cannot be evaluated and what to turn on. Every
threshold is relative: the sharpness is read against the stability threshold of
the step size (``eos_ratio``), the loss against its own first value, the batch
size against the gradient noise scale, the barrier against the loss of its ends.
Multiplying the step size by ``c`` and the curvature by ``1 / c`` (or the loss by
any factor) leaves every decision unchanged.

A recommendation is a dict with ``rule``, ``message``, ``evidence`` (flat: the
numbers and the thresholds they were compared with), ``expected_effect``,
``change`` (config overrides, ``{"optim.lr": 0.05}``; empty when the advice is
not a config change) and ``source`` (where the threshold comes from).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from lossgeom.train._advice_base import (
    COHEN,
    HEURISTIC,
    LEWKOWYCZ,
    MCCANDLISH,
    AdviceInputs,
    AdviceThresholds,
    NotEvaluated,
    down_factor,
    formula,
    lr_change,
    need_sharpness,
    number,
    ratios,
    recommendation,
    series,
    shown,
    slope,
)
from lossgeom.train._probes import stability_threshold

__all__ = ["RULES", "Rule"]


# ----------------------------------------------------------------------- rules
def lr_too_high(inp: AdviceInputs, th: AdviceThresholds) -> dict | None:
    """Sharpness at or above the stability threshold: reduce the step size.

    Fires when the last ratio is at least ``eos_high`` and the ratio rises
    (least-squares slope over the window's rows > 0), or when any ratio reaches
    ``eos_overshoot``.
    """
    rs = need_sharpness(inp, "lr_too_high")
    (s_first, r_first), (s_last, r_last) = rs[0], rs[-1]
    s_peak, r_peak = max(rs, key=lambda p: p[1])
    trend = slope(rs)
    rising = trend is not None and trend > 0
    if not ((r_last >= th.eos_high and rising) or r_peak >= th.eos_overshoot):
        return None
    factor = down_factor(r_first, th)
    change = lr_change(inp.config, factor)
    why = (
        f"reached {r_peak:.3g}x the threshold at step {s_peak}"
        if r_peak >= th.eos_overshoot
        else f"is {r_last:.3g}x the threshold at step {s_last} and rising"
    )
    evidence = {
        "eos_ratio_first": r_first,
        "eos_ratio_last": r_last,
        "eos_ratio_peak": r_peak,
        "peak_step": s_peak,
        "eos_ratio_slope_per_100_steps": None if trend is None else 100 * trend,
        "eos_high": th.eos_high,
        "eos_overshoot": th.eos_overshoot,
        "target_ratio": th.target_ratio,
        "lr_factor": factor,
    }
    where = formula(inp)
    return recommendation(
        "lr_too_high",
        f"The sharpness {why} ({where}): the step is unstable along the top "
        f"Hessian direction. Multiply the step size by {factor:.3g} "
        f"({shown(change)}), or raise the batch size.",
        evidence,
        f"The top direction becomes stable: the sharpness at step {s_first} would "
        f"be {r_first * factor:.3g}x the threshold instead of {r_first:.3g}x, "
        "leaving room for it to rise; fewer loss spikes and no divergence.",
        change,
        f"{COHEN}; the overshoot: {LEWKOWYCZ}",
    )


def diverged(inp: AdviceInputs, th: AdviceThresholds) -> dict | None:
    """The loss became non-finite within the window: reduce the step size."""
    if inp.diverged_at is None:
        return None
    rs = ratios(inp)
    r_first = rs[0][1] if rs else None
    factor = down_factor(r_first, th)
    change = lr_change(inp.config, factor)
    evidence = {
        "diverged_at": inp.diverged_at,
        "eos_ratio_first": r_first,
        "target_ratio": th.target_ratio,
        "lr_factor": factor,
    }
    return recommendation(
        "diverged",
        f"The loss became non-finite at step {inp.diverged_at}. Multiply the step "
        f"size by {factor:.3g} ({shown(change)}).",
        evidence,
        "The run trains past the step where it diverged.",
        change,
        COHEN,
    )


def lr_too_low(inp: AdviceInputs, th: AdviceThresholds) -> dict | None:
    """The loss stalls while the sharpness is far below the threshold: raise it.

    Fires when the train loss fell by less than ``stall_drop`` of its first
    value over the window and every ratio is at most ``eos_low``.
    """
    rs = need_sharpness(inp, "lr_too_low")
    losses = series(inp.rows, "train_loss")
    if len(losses) < 2:
        raise NotEvaluated(
            "lr_too_low compares the train loss at two metrics rows; the window "
            f"has {len(losses)}",
            ["metrics.every smaller (at most half the window's steps)"],
        )
    (s0, l0), (s1, l1) = losses[0], losses[-1]
    if l0 <= 0:
        return None
    drop = (l0 - l1) / l0
    r_peak = max(r for _, r in rs)
    if not (drop < th.stall_drop and 0 < r_peak <= th.eos_low):
        return None
    factor = th.target_ratio / r_peak
    change = lr_change(inp.config, factor)
    evidence = {
        "loss_first": l0,
        "loss_last": l1,
        "loss_drop": drop,
        "stall_drop": th.stall_drop,
        "eos_ratio_peak": r_peak,
        "eos_low": th.eos_low,
        "target_ratio": th.target_ratio,
        "lr_factor": factor,
    }
    return recommendation(
        "lr_too_low",
        f"The train loss fell by {drop:.1%} from step {s0} to {s1} (a stall: less "
        f"than {th.stall_drop:.0%}) while the sharpness stayed at most "
        f"{r_peak:.3g}x the stability threshold: the step could grow "
        f"{1 / r_peak:.3g}x before reaching it. Multiply the step size by "
        f"{factor:.3g} ({shown(change)}).",
        evidence,
        f"A faster fall of the loss, with the sharpness near {th.target_ratio:.3g}x "
        "the threshold.",
        change,
        f"{COHEN}; the stall criterion is {HEURISTIC}",
    )


def _slice_stats(inp: AdviceInputs) -> tuple[int, str, float, float] | None:
    """The latest ``(step, key, excess, total)`` slice statistics of the window."""
    found = None
    for row in [*inp.rows, *inp.probe_rows]:
        for col in row:
            if not col.endswith("_excess_variation"):
                continue
            key = col.removesuffix("_excess_variation")
            excess = number(row.get(col))
            total = number(row.get(f"{key}_total_variation"))
            if excess is None or total is None:
                continue
            if found is None or int(row["step"]) >= found[0]:
                found = (int(row["step"]), key, excess, total)
    return found


def rugged_slices(inp: AdviceInputs, th: AdviceThresholds) -> dict | None:
    """Rugged random slices where the trace promises a smooth valley: damp steps.

    Ruggedness is the slices' excess variation over their total variation (0
    for a slice that falls then rises once, as the quadratic model does when
    the curvature is positive); the trace is small when it is below the
    stability threshold (with a positive semi-definite Hessian even all the
    curvature in one direction would leave the step stable). Fires when
    ruggedness >= ``rugged_fraction`` and ``trace < threshold``.
    """
    stats = _slice_stats(inp)
    traces = series(inp.rows, "trace")
    enable = []
    if stats is None:
        enable.append(
            "a slice_1d probe in the early window (study file: probes: [{name: "
            "slice_1d, options: {n_directions: 4}, at: {steps: [N]}}])"
        )
    if not traces:
        enable.append("metrics.trace_max_matvecs: 20")
    if enable:
        lacks = [
            w for w, m in (("slice statistics", stats), ("the trace", traces)) if not m
        ]
        raise NotEvaluated(
            "rugged_slices compares the ruggedness of random slices with the "
            "Hessian trace; the window lacks " + " and ".join(lacks),
            enable,
        )
    step, key, excess, total = stats
    before = [t for t in traces if t[0] <= step] or traces[:1]
    trace_step, trace = before[-1]
    lr = next(
        (number(r.get("lr")) for r in inp.rows if int(r["step"]) == trace_step), None
    )
    lr = lr if lr is not None and lr > 0 else inp.config.optim.lr
    threshold = stability_threshold(inp.config.optim, lr)[0]
    rugged = excess / total if total > 0 else 0.0
    trace_ratio = trace / threshold
    if not (rugged >= th.rugged_fraction and trace_ratio < 1):
        return None
    change = lr_change(inp.config, th.damp_factor)
    evidence = {
        "slice_step": step,
        "slice_key": key,
        "excess_variation": excess,
        "total_variation": total,
        "ruggedness": rugged,
        "rugged_fraction": th.rugged_fraction,
        "trace": trace,
        "stability_threshold": threshold,
        "trace_ratio": trace_ratio,
        "damp_factor": th.damp_factor,
    }
    return recommendation(
        "rugged_slices",
        f"{rugged:.0%} of the variation of the loss along random directions at "
        f"step {step} is in bumps beyond a single valley, while the Hessian trace "
        f"(the sum of all curvatures) is only {trace_ratio:.3g}x the stability "
        "threshold: the local quadratic model does not describe the loss at the "
        "scale of the steps. Clip the gradients, or damp the steps "
        f"({shown(change)}).",
        evidence,
        "Smaller steps across the bumps: fewer loss spikes.",
        change,
        HEURISTIC,
    )


def _noise_column(inp: AdviceInputs) -> str:
    m = inp.config.metrics
    for spec in m.measures if m is not None else []:
        if spec.name == "noise_scale":
            return spec.column
    return "noise_scale"


def _batch(inp: AdviceInputs, small: bool, th: AdviceThresholds) -> dict | None:
    cfg = inp.config
    rule = "batch_too_small" if small else "batch_too_large"
    if cfg.full_batch:
        raise NotEvaluated(
            f"{rule} tunes the minibatch size; this run is full-batch",
            ["optim.name: sgd with a batch_size smaller than the training set"],
        )
    column = _noise_column(inp)
    noise = series([*inp.rows, *inp.probe_rows], column)
    if not noise:
        raise NotEvaluated(
            f"{rule} compares the batch size with the gradient noise scale "
            f"({column}), which no row of the window has",
            ["metrics.measures: [{name: noise_scale}]"],
        )
    step, b_noise = max(noise, key=lambda p: p[0])
    b = cfg.batch_size
    if not (math.isfinite(b_noise) and b_noise > 0):
        return None
    ratio = b / b_noise
    if small and not ratio < 1 / th.noise_factor:
        return None
    if not small and not ratio > th.noise_factor:
        return None
    new_b = max(1, round(b_noise))
    if cfg.data.subset is not None:
        new_b = min(new_b, cfg.data.subset)
    lr_factor = (1 + b_noise / b) / (1 + b_noise / new_b)  # lr(B) of McCandlish
    rs = ratios(inp)
    if rs and small:  # not past the stability target for the larger step
        r_last = rs[-1][1]
        if r_last > 0 and math.isfinite(r_last):
            lr_factor = min(lr_factor, max(1.0, th.target_ratio / r_last))
    step_factor = (1 + b_noise / new_b) / (1 + b_noise / b)  # S(B') / S(B)
    new_steps = max(1, math.ceil(cfg.steps * step_factor))
    change = {"batch_size": new_b, **lr_change(cfg, lr_factor), "steps": new_steps}
    data_factor = (new_b * new_steps) / (b * cfg.steps)
    evidence = {
        "noise_scale": b_noise,
        "noise_step": step,
        "batch_size": b,
        "batch_over_noise": ratio,
        "noise_factor": th.noise_factor,
        "steps_factor": new_steps / cfg.steps,
        "samples_factor": data_factor,
        "lr_factor": lr_factor,
    }
    if small:
        message = (
            f"The batch size {b} is {1 / ratio:.3g}x below the gradient noise scale "
            f"B_noise = {b_noise:.3g} (step {step}; far below: more than "
            f"{th.noise_factor:g}x): each step averages too little gradient to use "
            f"its size. Raise the batch to {new_b} and train {new_steps} steps "
            f"({shown(change)})."
        )
        effect = (
            f"About the same loss in {new_steps / cfg.steps:.2g}x the steps, with "
            f"{data_factor:.2g}x the samples."
        )
    else:
        message = (
            f"The batch size {b} is {ratio:.3g}x above the gradient noise scale "
            f"B_noise = {b_noise:.3g} (step {step}; far above: more than "
            f"{th.noise_factor:g}x): most of each batch's samples are wasted. Lower "
            f"the batch to {new_b} and train {new_steps} steps ({shown(change)})."
        )
        effect = (
            f"About the same loss with {data_factor:.2g}x the samples, in "
            f"{new_steps / cfg.steps:.2g}x the steps."
        )
    return recommendation(rule, message, evidence, effect, change, MCCANDLISH)


def batch_too_small(inp: AdviceInputs, th: AdviceThresholds) -> dict | None:
    """Batch far below the noise scale: raise it (fewer steps, same loss)."""
    return _batch(inp, True, th)


def batch_too_large(inp: AdviceInputs, th: AdviceThresholds) -> dict | None:
    """Batch far above the noise scale: lower it (fewer samples, same loss)."""
    return _batch(inp, False, th)


def seed_sensitive(inp: AdviceInputs, th: AdviceThresholds) -> dict | None:
    """A high barrier between two seeds' early weights, both flat: seed-sensitive.

    Fires when, for some other run, the loss barrier on the straight path
    between the two runs' weights at a common early step is at least
    ``barrier_high`` times the mean loss of the two ends, and both ends'
    ``eos_ratio`` are below ``flat_ratio``.
    """
    if inp.pairs is None:
        raise NotEvaluated(
            "seed_sensitive needs a second run of the same model and data "
            "(another seed)",
            [
                "advise(run_dir, others=[other_run_dir]) or lossgeom advise RUN "
                "--other OTHER_RUN, both runs with a checkpoint in the early "
                "window (checkpoint: {steps: [N]})"
            ],
        )
    if not inp.pairs:
        raise NotEvaluated(
            inp.pair_missing or "no two-run measurement could be taken",
            ["checkpoint: {steps: [N]} with N in the early window, in both runs"],
        )
    fired = []
    for pair in inp.pairs:
        ends = (pair["loss_a"] + pair["loss_b"]) / 2
        rel = pair["barrier"] / ends if ends > 0 else math.inf
        flat = max(pair["eos_ratio_a"], pair["eos_ratio_b"])
        if rel >= th.barrier_high and flat < th.flat_ratio:
            fired.append((rel, flat, pair))
    if not fired:
        return None
    rel, flat, pair = max(fired, key=lambda f: f[0])
    evidence = {
        "other_run": pair["other"],
        "step": pair["step"],
        "barrier": pair["barrier"],
        "ends_loss": (pair["loss_a"] + pair["loss_b"]) / 2,
        "relative_barrier": rel,
        "barrier_high": th.barrier_high,
        "eos_ratio_max": flat,
        "flat_ratio": th.flat_ratio,
        "distance": pair["distance"],
        "pairs_flagged": len(fired),
        "pairs": len(inp.pairs),
    }
    return recommendation(
        "seed_sensitive",
        f"At step {pair['step']} the loss on the straight path to the other seed's "
        f"weights rises {rel:.3g}x the ends' loss above them, while both ends are "
        f"flat (sharpness at most {flat:.3g}x the stability threshold): flat but "
        "isolated minima. Results of one seed may not transfer; report them over "
        "several seeds.",
        evidence,
        "No change to the run; conclusions that hold across seeds.",
        {},
        f"{HEURISTIC}; the barrier as in Frankle et al. 2020 (linear mode connectivity)",
    )


@dataclass(frozen=True)
class Rule:
    """An advice rule.

    Attributes:
        id: its name (the ``rule`` of its recommendations).
        check: ``check(inputs, thresholds)`` -> a recommendation or ``None``;
            raises :class:`NotEvaluated` when the inputs lack what it reads.
        summary: one line: the condition and the advice.
    """

    id: str
    check: Callable[[AdviceInputs, AdviceThresholds], dict | None]
    summary: str


RULES: dict[str, Rule] = {
    r.id: r
    for r in (
        Rule(
            "lr_too_high",
            lr_too_high,
            "eos_ratio >= eos_high and rising, or >= eos_overshoot: lower the step",
        ),
        Rule("diverged", diverged, "a non-finite loss in the window: lower the step"),
        Rule(
            "lr_too_low",
            lr_too_low,
            "loss drop < stall_drop with eos_ratio <= eos_low: raise the step",
        ),
        Rule(
            "rugged_slices",
            rugged_slices,
            "slice ruggedness >= rugged_fraction with trace < threshold: damp",
        ),
        Rule(
            "batch_too_small",
            batch_too_small,
            "B < B_noise / noise_factor: raise the batch, fewer steps",
        ),
        Rule(
            "batch_too_large",
            batch_too_large,
            "B > noise_factor B_noise: lower the batch, fewer samples",
        ),
        Rule(
            "seed_sensitive",
            seed_sensitive,
            "barrier >= barrier_high x ends' loss, ends flat: seed-sensitive",
        ),
    )
}
"""The rules in order of priority: the first recommendation is the primary one."""
