"""Bad input gets a clear error naming what was expected and what came."""

import pytest
import torch
from torch import nn

import lossgeom as lg

from cases import CASES, DTYPE

MLP = CASES[0]


def mlp_objective(**kw):
    model, loss_fn, X, y = MLP.make()
    return lg.Objective(model, loss_fn, (X, y), **kw), model, X, y


def test_inputs_that_do_not_fit_the_model():
    model, loss_fn, X, y = MLP.make()  # Linear(5, ...)
    bad = torch.randn(X.shape[0], 7, dtype=DTYPE)
    with pytest.raises(
        ValueError, match=r"could not be applied to the inputs.*\(23, 7\)"
    ):
        lg.Objective(model, loss_fn, (bad, y))


def test_targets_that_do_not_fit_the_loss():
    model, loss_fn, X, y = MLP.make()
    bad = torch.randn(X.shape[0], 5, dtype=DTYPE)  # 3 classes, not 5
    with pytest.raises(
        ValueError, match=r"outputs of shape \(23, 3\).*targets of shape \(23, 5\)"
    ):
        lg.Objective(model, loss_fn, (X, bad))


def test_loss_that_is_not_a_scalar():
    model, _, X, y = MLP.make()
    with pytest.raises(
        ValueError, match=r"scalar.*got shape \(23,\).*reduction='mean'"
    ):
        lg.Objective(model, nn.CrossEntropyLoss(reduction="none"), (X, y))


def test_non_finite_loss_names_the_batch():
    model, loss_fn, X, y = MLP.make()
    X = X.clone()
    X[12, 0] = float("nan")  # batch 2 of size 5 holds samples 10..14
    obj = lg.Objective(model, loss_fn, (X, y), batch_size=5)
    with pytest.raises(lg.NonFiniteError, match=r"non-finite loss in batch 2 \(of 5\)"):
        obj.loss()
    with pytest.raises(lg.NonFiniteError, match=r"batch 2"):
        obj.grad()
    with pytest.raises(lg.NonFiniteError, match=r"Hessian-vector product in batch 2"):
        obj.hvp(torch.randn(obj.dim, dtype=DTYPE))


class _SqrtNet(nn.Module):
    """Output sqrt(|w.x|): finite loss, infinite gradient where w.x = 0."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(3, dtype=DTYPE))

    def forward(self, x):
        return (x @ self.w).abs().sqrt().unsqueeze(1)


def test_non_finite_gradient_with_finite_loss_names_the_batch():
    X = torch.randn(9, 3, dtype=DTYPE)
    X[7] = 0.0  # batch 1 (of size 4) holds samples 4..7
    obj = lg.Objective(
        _SqrtNet(), nn.MSELoss(), (X, torch.zeros(9, 1, dtype=DTYPE)), batch_size=4
    )
    assert torch.isfinite(torch.tensor(obj.loss()))
    with pytest.raises(
        lg.NonFiniteError, match=r"non-finite loss and gradient in batch 1 \(of 3\)"
    ):
        obj.grad()


def test_empty_data():
    model, loss_fn, X, y = MLP.make()
    with pytest.raises(ValueError, match="empty.*0 samples"):
        lg.Objective(model, loss_fn, (X[:0], y[:0]))
    with pytest.raises(ValueError, match="empty.*no batches"):
        lg.Objective(model, loss_fn, [])


def test_mismatched_sample_counts():
    model, loss_fn, X, y = MLP.make()
    with pytest.raises(ValueError, match=r"same number of samples.*\(23, 5\).*\(20,\)"):
        lg.Objective(model, loss_fn, (X, y[:20]))


def test_one_shot_iterator_is_refused():
    model, loss_fn, X, y = MLP.make()
    with pytest.raises(TypeError, match="one-shot iterator.*re-iterable"):
        lg.Objective(model, loss_fn, iter([(X, y)]))


def test_unrecognised_data():
    model, loss_fn, *_ = MLP.make()
    with pytest.raises(
        TypeError, match=r"expected data as an \(inputs, targets\) pair"
    ):
        lg.Objective(model, loss_fn, 42)


def test_vector_of_the_wrong_shape():
    obj, *_ = mlp_objective()
    with pytest.raises(
        ValueError,
        match=rf"shape \({obj.dim},\) or a block of shape \({obj.dim}, m\).*got shape \(7,\)",
    ):
        obj.hvp(torch.randn(7, dtype=DTYPE))
    with pytest.raises(ValueError, match="looks transposed: pass V.T"):
        obj.hvp(torch.randn(3, obj.dim, dtype=DTYPE))
    with pytest.raises(ValueError, match="got shape"):
        lg.hessian(obj) @ torch.randn(obj.dim, 2, 2, dtype=DTYPE)


def test_vector_on_the_wrong_device():
    obj, *_ = mlp_objective()
    with pytest.raises(
        ValueError, match=r"device 'cpu'.*got V on 'meta'.*V.to\('cpu'\)"
    ):
        obj.hvp(torch.empty(obj.dim, dtype=DTYPE, device="meta"))


def test_vector_of_the_wrong_dtype():
    obj, *_ = mlp_objective()
    with pytest.raises(ValueError, match=r"dtype torch.float64.*got torch.float32"):
        obj.hvp(torch.randn(obj.dim))


def test_theta_of_the_wrong_shape():
    obj, *_ = mlp_objective()
    with pytest.raises(ValueError, match=rf"theta of shape \({obj.dim},\).*got \(3,\)"):
        obj.loss(torch.zeros(3, dtype=DTYPE))
    with pytest.raises(ValueError, match=rf"points of shape \(m, {obj.dim}\)"):
        obj.evaluate(torch.zeros(obj.dim, dtype=DTYPE))


class _WithUnused(nn.Module):
    def __init__(self):
        super().__init__()
        self.used = nn.Linear(3, 2)
        self.unused = nn.Linear(3, 2)

    def forward(self, x):
        return self.used(x)


def test_parameters_that_do_not_reach_the_loss_are_reported_and_have_zero_curvature():
    torch.manual_seed(0)
    model = _WithUnused().double()
    X, y = torch.randn(10, 3, dtype=DTYPE), torch.randint(0, 2, (10,))
    with pytest.warns(
        UserWarning, match=r"do not reach the loss.*unused.weight, unused.bias"
    ):
        obj = lg.Objective(model, nn.CrossEntropyLoss(), (X, y))
    assert obj.unused_parameters == ["unused.weight", "unused.bias"]
    H = lg.hessian(obj).to_dense()
    unused = slice(8, 16)  # used.weight (6) + used.bias (2), then the unused ones
    assert (
        torch.count_nonzero(H[unused]) == 0 and torch.count_nonzero(H[:, unused]) == 0
    )
    assert torch.count_nonzero(obj.grad()[unused]) == 0
    assert torch.count_nonzero(H[:8, :8]) > 0
    for backend in ("double-backward", "forward-over-reverse"):
        with pytest.warns(UserWarning, match="do not reach the loss"):
            o = lg.Objective(model, nn.CrossEntropyLoss(), (X, y), hvp_backend=backend)
        assert torch.equal(
            lg.hessian(o).to_dense()[unused], torch.zeros(8, 16, dtype=DTYPE)
        )


def test_model_without_trainable_parameters():
    model = nn.Linear(3, 2)
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        lg.Objective(model, nn.MSELoss(), (torch.randn(4, 3), torch.randn(4, 2)))


def test_not_a_module_and_not_callable():
    with pytest.raises(TypeError, match="nn.Module"):
        lg.Objective(lambda x: x, nn.MSELoss(), (torch.randn(4, 3), torch.randn(4, 3)))
    with pytest.raises(TypeError, match="loss_fn to be callable"):
        lg.Objective(nn.Linear(3, 3), "mse", (torch.randn(4, 3), torch.randn(4, 3)))


def test_bad_options():
    model, loss_fn, X, y = MLP.make()
    with pytest.raises(ValueError, match="mode must be"):
        lg.Objective(model, loss_fn, (X, y), mode="training")
    with pytest.raises(ValueError, match="max_samples must be a positive integer"):
        lg.Objective(model, loss_fn, (X, y), max_samples=0)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        lg.Objective(model, loss_fn, (X, y), batch_size=-1)
    with pytest.raises(ValueError, match="hvp_backend must be one of"):
        lg.Objective(model, loss_fn, (X, y), hvp_backend="magic")
    with pytest.raises(ValueError, match="floating torch.dtype"):
        lg.Objective(model, loss_fn, (X, y), dtype=torch.int32)
    with pytest.raises(ValueError, match="data_parallel=True needs an initialised"):
        lg.Objective(model, loss_fn, (X, y), data_parallel=True)
