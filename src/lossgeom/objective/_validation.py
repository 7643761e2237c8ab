"""Checks at the boundary of an Objective: its arguments, its model, its first batch.

Mistakes in the model, the loss or the data surface here as ``TypeError`` or
``ValueError`` that say what was expected, what came and what to do, rather than
as a stack trace from deep inside a later Hessian-vector product.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.func import functional_call

if TYPE_CHECKING:
    from lossgeom.objective._core import ObjectiveCore

__all__ = [
    "BACKENDS",
    "check_arguments",
    "check_first_batch",
    "label_error",
    "model_placement",
    "shape_or_type",
]

BACKENDS = ("auto", "forward-over-reverse", "double-backward")
_VALIDATION_SAMPLES = 32
_IGNORE_INDEX = -100  # torch's cross-entropy and NLL skip targets of this value


def check_arguments(
    model: object,
    loss_fn: object,
    mode: object,
    hvp_backend: object,
    dtype: object,
) -> None:
    """Refuse constructor arguments of the wrong kind, naming the fix."""
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"expected model to be a torch.nn.Module; got {type(model).__name__}."
        )
    if not callable(loss_fn):
        raise TypeError(
            "expected loss_fn to be callable as loss_fn(outputs, targets) -> "
            f"scalar tensor; got {type(loss_fn).__name__}."
        )
    if mode not in ("eval", "train"):
        raise ValueError(f"mode must be 'eval' or 'train'; got {mode!r}.")
    if hvp_backend not in BACKENDS:
        raise ValueError(f"hvp_backend must be one of {BACKENDS}; got {hvp_backend!r}.")
    if dtype is not None and not (
        isinstance(dtype, torch.dtype) and dtype.is_floating_point
    ):
        raise ValueError(
            f"dtype must be a floating torch.dtype such as torch.float64; got {dtype!r}."
        )


def model_placement(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """The one device and floating dtype of the model's parameters."""
    floating = [p for p in model.parameters() if p.is_floating_point()]
    if not floating:
        raise ValueError(
            f"the model ({type(model).__name__}) has no floating-point parameters; "
            "there is nothing to differentiate."
        )
    devices = {p.device for p in floating}
    dtypes = {p.dtype for p in floating}
    if len(devices) > 1:
        raise ValueError(
            f"the model's parameters are spread over devices {sorted(map(str, devices))}; "
            "an Objective needs them on one device. Move the model with model.to(device)."
        )
    if len(dtypes) > 1:
        raise ValueError(
            f"the model's parameters have mixed dtypes {sorted(map(str, dtypes))}; "
            "pass dtype=... to evaluate a copy in one dtype."
        )
    return devices.pop(), dtypes.pop()


def shape_or_type(x: object) -> object:
    """The shape of a tensor, or the type name of anything else (for messages)."""
    return tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__


def check_loss_value(loss: object) -> None:
    """Refuse a loss that is not a scalar tensor."""
    if not isinstance(loss, Tensor) or loss.ndim != 0:
        raise ValueError(
            "loss_fn must return a scalar tensor (the mean over the batch); got "
            + (
                f"shape {tuple(loss.shape)}"
                if isinstance(loss, Tensor)
                else type(loss).__name__
            )
            + ". Use reduction='mean' (the default of torch.nn losses) or 'sum'; "
            "reduction='none' is not accepted (the objective is the loss's own "
            "reduction applied to the whole data set)."
        )


def label_error(
    index: int, y: Tensor, out: Tensor, description: str
) -> ValueError | None:
    """A clear error for class labels outside the model's outputs, if there are any.

    Integer targets shaped like the outputs without their class dimension (dim 1)
    are class indices; a value outside ``[0, C)`` (other than -100, which
    cross-entropy ignores) makes the loss fail with a bare ``IndexError``. Called
    only after the loss failed on a batch, so it costs nothing otherwise.

    Args:
        index: the batch's position in one pass (from 0).
        y: the batch's targets.
        out: the model's outputs on that batch (only the shape is read).
        description: the data's description.

    Returns:
        The error to raise, or ``None`` when the labels are not the problem.

    Example:
        >>> err = label_error(2, torch.tensor([0, 5]), torch.zeros(2, 3), "tensors")
        >>> "batch 2" in str(err), "label 5" in str(err), "3 outputs" in str(err)
        (True, True, True)
        >>> label_error(2, torch.tensor([0, 2]), torch.zeros(2, 3), "tensors") is None
        True
    """
    if (
        y.is_floating_point()
        or y.is_complex()
        or y.dtype == torch.bool
        or out.ndim < 2
        or y.shape != out.shape[:1] + out.shape[2:]
    ):
        return None
    classes = out.shape[1]
    bad = ((y < 0) & (y != _IGNORE_INDEX)) | (y >= classes)
    if not bool(bad.any()):
        return None
    flat = int(bad.reshape(-1).nonzero()[0])
    value = int(y.reshape(-1)[flat])
    sample = flat // max(1, y[0].numel()) if y.ndim > 1 else flat
    return ValueError(
        f"batch {index} (counted from 0; sample {sample} of it) of the data "
        f"({description}) holds the class label {value}, but the model has "
        f"{classes} outputs: class labels must lie in [0, {classes}). Remap the "
        f"labels to 0..{classes - 1}, or give the model one output per class."
    )


def check_first_batch(obj: ObjectiveCore) -> list[str]:
    """Run the first batch once to turn shape and type mistakes into clear errors.

    Warns about trainable parameters that do not reach the loss (the warning
    points at the code that built the objective).

    Returns:
        The names of the trainable parameters without a gradient on that batch.
    """
    first = next(iter(obj.batches()), None)
    if first is None:
        raise ValueError(
            f"the data is empty: the {obj.data_description} yielded no "
            "batches. Pass at least one batch."
        )
    x, y = first
    x, y = x[:_VALIDATION_SAMPLES], y[:_VALIDATION_SAMPLES]
    leaves = {
        n: p.detach().clone().requires_grad_(True)
        for n, p in zip(obj.names, obj._params, strict=True)
    }
    frozen = {n: p.detach() for n, p in obj._frozen}
    buffers = obj.probe_buffers()
    with obj.probe_mode(), torch.enable_grad():
        out = _apply_model(obj, ({**leaves, **frozen}, buffers), x)
        loss = _apply_loss(obj, out, y)
        check_loss_value(loss)
        if not loss.requires_grad:
            raise ValueError(
                "the loss does not depend on any trainable parameter (no gradient "
                "flows from loss_fn(model(x), y) to the parameters). Check that "
                "loss_fn does not detach its input."
            )
        grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    unused = [n for n, g in zip(leaves, grads, strict=True) if g is None]
    if unused:
        warnings.warn(
            "these trainable parameters do not reach the loss on the first batch; "
            "their gradient and curvature are zero: " + ", ".join(unused),
            UserWarning,
            stacklevel=3,
        )
    return unused


def _apply_model(obj: ObjectiveCore, state: tuple[dict, dict], x: Tensor) -> Tensor:
    try:
        return functional_call(obj.model, state, (x,))
    except Exception as err:  # noqa: BLE001 - re-raised with context
        raise ValueError(
            f"the model ({type(obj.model).__name__}) could not be applied to "
            f"the inputs: got inputs of shape {tuple(x.shape)} and dtype "
            f"{x.dtype} (first batch of the {obj.data_description}); the "
            f"model raised {type(err).__name__}: {err}. Check the input shape "
            "the model expects (e.g. flatten images for an MLP)."
        ) from err


def _apply_loss(obj: ObjectiveCore, out: Tensor, y: Tensor) -> object:
    try:
        return obj.loss_fn(out, y)
    except Exception as err:  # noqa: BLE001 - re-raised with context
        labels = label_error(0, y, out, obj.data_description)
        if labels is not None:
            raise labels from err
        raise ValueError(
            f"loss_fn could not compare outputs of shape {tuple(out.shape)} "
            f"({out.dtype}) with targets of shape {tuple(y.shape)} "
            f"({y.dtype}): {type(err).__name__}: {err}. Cross-entropy expects "
            "class indices (int64, shape (n,)) or probabilities shaped like "
            "the outputs; MSE expects targets shaped like the outputs."
        ) from err
