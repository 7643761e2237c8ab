"""Checks on full-size models, too slow for `make test`: run with `make test-slow`."""

from pathlib import Path

import pytest
import torch

import lossgeom as lg
from lossgeom.zoo import cifar_resnet

from cases import rel_err


@pytest.mark.slow
def test_resnet20_hvp_backends_agree_and_match_finite_differences():
    torch.manual_seed(0)
    model = cifar_resnet(20, width=8)
    X, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    objs = {
        b: lg.Objective(
            model,
            torch.nn.CrossEntropyLoss(),
            (X, y),
            dtype=torch.float64,
            hvp_backend=b,
        )
        for b in ("forward-over-reverse", "double-backward")
    }
    obj = objs["double-backward"]
    V = torch.randn(obj.dim, 2, dtype=torch.float64)
    a, b = (o.hvp(V) for o in objs.values())
    assert rel_err(a, b) <= 1e-10
    assert rel_err(lg.hessian(obj) @ V, b) <= 1e-10
    # symmetric on a random pair (finite differences are no reference here: a ReLU
    # network's gradient jumps where a perturbation flips an activation)
    assert abs(V[:, 0] @ b[:, 1] - V[:, 1] @ b[:, 0]) <= 1e-10 * b.norm() * V.norm()
    top = lg.eigenvalues(obj, 2, tol=1e-8)
    assert top.all_converged


@pytest.mark.slow
@pytest.mark.parametrize("lr", [0.2, 0.12])
def test_edge_of_stability(tmp_path, lr):
    """examples/edge_of_stability.yaml: sharpness rises from well below 2/lr, then
    stays within 15% of 2/lr over the last half of training (Cohen et al. 2021)."""
    import yaml

    cfg = yaml.safe_load(
        (
            Path(__file__).parent.parent / "examples" / "edge_of_stability.yaml"
        ).read_text()
    )
    cfg["optim"]["lr"] = lr
    res = lg.train(cfg, tmp_path / "run")
    assert res.status == "finished"
    threshold = 2 / lr
    rows = res.metrics
    assert rows[0]["sharpness"] < 0.6 * threshold
    late = [r["sharpness"] / threshold for r in rows if r["step"] >= cfg["steps"] // 2]
    assert 0.85 <= min(late) and max(late) <= 1.15, late
