"""The curvature bound (Singla & Feizi): certified against the true input Hessian of small smooth networks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.sparse.linalg import LinearOperator, eigsh
from torch import nn

from sepconv.errors import ConfigError, UnsupportedLayerError
from sepconv.spectral import curvature_bound, curvature_penalty, lipschitz_bound
from sepconv.spectral.curvature import ACTIVATION_CURVATURE

ACTIVATIONS = {  # name -> (module, its sup |s''|)
    "softplus": (nn.Softplus(), 0.25), "softplus_beta2": (nn.Softplus(beta=2.0), 0.5), "tanh": (nn.Tanh(), None),
    "sigmoid": (nn.Sigmoid(), None), "elu": (nn.ELU(), 1.0), "celu_half": (nn.CELU(alpha=0.5), 2.0),
    "silu": (nn.SiLU(), 0.5), "gelu": (nn.GELU(), None), "gelu_tanh": (nn.GELU(approximate="tanh"), None),
    "mish": (nn.Mish(), None), "softsign": (nn.Softsign(), 2.0),
}
KEY = {"softplus_beta2": "softplus", "celu_half": "celu", "gelu_tanh": "gelu"}


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_each_activation_constant_bounds_its_second_derivative_and_is_attained(name):
    """``ACTIVATION_CURVATURE`` (scaled by the module's parameters) is >= sup |s''| on a fine grid and
    within 1e-4 of it: rounded up, never down."""
    act, scale = ACTIVATIONS[name]
    h = scale if scale is not None else ACTIVATION_CURVATURE[KEY.get(name, name)]
    x = torch.linspace(-8, 8, 400_001, dtype=torch.float64).requires_grad_(True)
    (d1,) = torch.autograd.grad(act(x).sum(), x, create_graph=True)
    (d2,) = torch.autograd.grad(d1.sum(), x)
    assert float(d2.abs().max()) <= h <= float(d2.abs().max()) * (1 + 1e-4)


class _Residual(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.a, self.b = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return F.softplus(x + self.bn(self.b(F.gelu(self.a(x)))), beta=2.0)


class _Branches(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(1, 3, 3, padding=1), nn.Conv2d(1, 2, 1)
        self.head = nn.Linear(5 * 4 * 4, 3)

    def forward(self, x):
        y = torch.cat([torch.tanh(self.a(x)), F.silu(self.b(x))], dim=1)
        return self.head(F.avg_pool2d(y, 2).flatten(1))


def _bn(c: int, seed: int) -> nn.BatchNorm2d:
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(c)
    bn.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
    bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    bn.weight.data.copy_(torch.randn(c, generator=g))
    return bn


NETWORKS = {  # name -> (builder, input shape)
    "softplus_tanh": (lambda: nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Softplus(),
                                            nn.Conv2d(4, 4, 3, padding=1, stride=2), nn.Tanh(),
                                            nn.Flatten(), nn.Linear(4 * 4 * 4, 3)), (1, 8, 8)),
    "bn_elu_avgpool": (lambda: nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), _bn(4, 1), nn.ELU(), nn.AvgPool2d(2),
                                             nn.Conv2d(4, 3, 3, padding=1, bias=False), _bn(3, 2), nn.SiLU(),
                                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 4)), (2, 6, 6)),
    "residual_gelu": (lambda: nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.Mish(), _Residual(3).eval(),
                                            nn.Flatten(), nn.Linear(3 * 5 * 5, 2), nn.Sigmoid()), (1, 5, 5)),
    "branches": (_Branches, (1, 8, 8)),
    "dilated_celu": (lambda: nn.Sequential(nn.Conv2d(1, 3, 3, padding=2, dilation=2), nn.CELU(0.5),
                                           nn.Conv2d(3, 2, 3, padding=1, padding_mode="circular"), nn.Softsign(),
                                           nn.Flatten(), nn.Linear(2 * 7 * 7, 3)), (1, 7, 7)),
}


def _build(name: str, seed: int) -> tuple[nn.Module, tuple]:
    torch.manual_seed(seed)
    make, shape = NETWORKS[name]
    net = make().double().eval()
    for m in net.modules():  # larger weights: the activations work in their curved range
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.weight.data.mul_(2.0)
    return net, shape


def _max_hessian_eig(net: nn.Module, shape, x: torch.Tensor) -> float:
    """Largest |eigenvalue| of the input Hessian over every logit, from the dense Hessian (float64)."""
    out = 0.0
    for i in range(net(x[None]).shape[1]):
        H = torch.autograd.functional.hessian(lambda z: net(z.reshape(1, *shape))[0, i], x.reshape(-1))
        out = max(out, float(torch.linalg.eigvalsh(H).abs().max()))
    return out


@pytest.mark.parametrize("name", sorted(NETWORKS))
@pytest.mark.parametrize("method", ["upper", "fantastic4"])
def test_the_bound_is_at_least_every_sampled_hessian_eigenvalue(name, method):
    net, shape = _build(name, seed=len(name))
    C = curvature_bound(net, shape, method=method)
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for k in range(12):
        x = torch.randn(shape, generator=g, dtype=torch.float64) * [0.1, 0.5, 1.0, 3.0][k % 4]
        worst = max(worst, _max_hessian_eig(net, shape, x))
    assert 0 < worst <= C * (1 + 1e-9), (name, worst, C)


def test_the_bound_holds_against_lanczos_hessian_vector_products_on_a_larger_network():
    """3x16x16 inputs (768 dimensions): the top |eigenvalue| by Lanczos on Hessian-vector products."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _bn(8, 3), nn.Softplus(),
                        nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.Tanh(), nn.Conv2d(8, 8, 3, padding=1, groups=4),
                        nn.SiLU(), nn.AdaptiveAvgPool2d(2),
                        nn.Flatten(), nn.Linear(32, 5)).double().eval()
    shape = (3, 16, 16)
    C = curvature_bound(net, shape)
    n = int(np.prod(shape))
    g = torch.Generator().manual_seed(1)
    worst = 0.0
    for k in range(4):
        x = torch.randn(shape, generator=g, dtype=torch.float64) * (0.5 + k)
        for i in (0, 4):
            def hvp(v, x=x, i=i):
                v = torch.as_tensor(np.ascontiguousarray(v).reshape(shape))
                return torch.autograd.functional.hvp(lambda z: net(z[None])[0, i], x, v)[1].reshape(-1).numpy()
            op = LinearOperator((n, n), matvec=hvp, dtype=np.float64)
            worst = max(worst, float(np.abs(eigsh(op, k=1, which="LM", tol=1e-8)[0]).max()))
    assert 0 < worst <= C


def test_the_bound_is_exact_for_one_smooth_neuron():
    """``f(x) = softplus(a . x)``: the Hessian is ``s''(a.x) a a^T``, top eigenvalue ``||a||^2 / 4`` at
    ``a . x = 0`` -- what the bound gives (to its ``tol``)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 1), nn.Softplus()).double()
    x = -net[1].bias.detach() * net[1].weight.detach().reshape(1, 4, 4) / net[1].weight.detach().square().sum()
    C = curvature_bound(net, (1, 4, 4), tol=1e-6)
    true = _max_hessian_eig(net, (1, 4, 4), x)
    assert true == pytest.approx(C, rel=1e-5)


def test_lipschitz_true_returns_the_network_lipschitz_bound_alongside():
    net, shape = _build("residual_gelu", 0)
    L, C = curvature_bound(net, shape, lipschitz=True)
    assert L == pytest.approx(lipschitz_bound(net, shape), rel=1e-12)
    assert C == curvature_bound(net, shape)


def test_the_penalty_is_the_fantastic_four_bound_and_its_gradient_reaches_every_weight():
    net, shape = _build("bn_elu_avgpool", 0)
    penalty = curvature_penalty(net, shape)
    value = penalty()
    assert float(value.detach()) == pytest.approx(curvature_bound(net, shape, method="fantastic4"), rel=1e-6)
    value.backward()
    for name, p in net.named_parameters():
        if "bias" not in name:  # biases do not change the curvature
            assert p.grad is not None and float(p.grad.abs().sum()) > 0, name
    with torch.no_grad():  # the penalty follows the weights: no stale memo
        net[0].weight.mul_(0.5)
    assert float(penalty().detach()) < float(value.detach())


def test_a_step_on_the_penalty_lowers_it():
    net, shape = _build("softplus_tanh", 1)
    penalty = curvature_penalty(net, shape)
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    before = float(penalty())
    for _ in range(3):
        opt.zero_grad()
        penalty().backward()
        opt.step()
    assert float(penalty()) < before


class _Product(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x):
        return (self.conv(x) * torch.tanh(x)).flatten(1)


class _Softmax(nn.Module):
    def forward(self, x):
        return torch.softmax(x.flatten(1), dim=1)


@pytest.mark.parametrize("make, match", [
    (lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten()), r"module '1' \(ReLU\).*not twice"),
    (lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.LeakyReLU(), nn.Flatten()), "LeakyReLU.*not twice"),
    (lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.MaxPool2d(2), nn.Flatten()), "MaxPool2d.*not twice"),
    (lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.Hardswish(), nn.Flatten()), "Hardswish.*not twice"),
    (lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.SELU(), nn.Flatten()), "SELU.*not twice"),
    (lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.ELU(alpha=2.0), nn.Flatten()), "ELU.*alpha=2 makes its slope jump"),
    (_Product, "product of two input-dependent tensors"),
    (_Softmax, "softmax.*no curvature rule"),
])
def test_non_smooth_operations_are_refused_with_one_line_naming_the_node(make, match):
    with pytest.raises(UnsupportedLayerError, match=match) as e:
        curvature_bound(make(), (1, 6, 6))
    assert "\n" not in str(e.value) and str(e.value).startswith("curvature_bound: ")
    with pytest.raises(UnsupportedLayerError, match=match):  # the penalty refuses at once, not at the first step
        curvature_penalty(make(), (1, 6, 6))


def test_the_penalty_needs_a_differentiable_method():
    with pytest.raises(ConfigError, match="not differentiable"):
        curvature_penalty(nn.Sequential(nn.Conv2d(1, 1, 3), nn.Tanh()), (1, 6, 6), method="upper")


# --------------------------------------------------------------------------- the command line and training


def _cli(capsys, *argv):
    from sepconv.cli import main

    try:
        code = main(list(argv))
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_spectrum_curvature_reports_the_bound_of_the_api(capsys):
    import json

    from sepconv.models import create_model

    torch.manual_seed(0)
    code, out, err = _cli(capsys, "spectrum", "simple_cnn", "--model-arg", "act=softplus", "--input-size", "8", "8",
                          "--method", "fft", "--curvature", "--json")
    assert code == 0, err
    doc = json.loads(out)
    torch.manual_seed(0)
    model = create_model("simple_cnn", act="softplus")
    L, C = curvature_bound(model, (3, 8, 8), lipschitz=True)
    assert doc["curvature_bound"] == pytest.approx(C, rel=1e-9) and doc["lipschitz_bound"] == pytest.approx(L, rel=1e-9)
    code, out, _ = _cli(capsys, "spectrum", "simple_cnn", "--model-arg", "act=softplus", "--input-size", "8", "8",
                        "--method", "fft")
    assert code == 0 and "curvature" not in out


def test_spectrum_curvature_of_a_relu_model_and_model_args_on_a_directory_are_one_line_errors(capsys, tmp_path):
    code, _, err = _cli(capsys, "spectrum", "simple_cnn", "--input-size", "8", "8", "--method", "fft", "--curvature")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "(ReLU)" in err and "not twice differentiable" in err
    code, _, err = _cli(capsys, "spectrum", "simple_cnn", "--model-arg", "act=relu6", "--input-size", "8", "8")
    assert code == 2 and "act must be one of" in err and len(err.strip().splitlines()) == 1
    from sepconv.io import save_model
    from sepconv.models import create_model

    save_model(create_model("simple_cnn", num_classes=3), tmp_path / "m")
    code, _, err = _cli(capsys, "spectrum", str(tmp_path / "m"), "--model-arg", "act=tanh", "--input-size", "8", "8")
    assert code == 2 and "apply to registry names only" in err and len(err.strip().splitlines()) == 1


def test_training_with_the_curvature_penalty_logs_it_and_lowers_the_bound(tmp_path):
    import json

    from sepconv.train import TrainConfig, train

    tiny = dict(model="simple_cnn", model_kwargs={"act": "elu", "norm": False}, width=0.5, data="digits",
                image_size=8, batch_size=32, lr=0.05, epochs=2)
    bounds = {}
    for beta in (0.0, 0.05):
        res = train(TrainConfig(**tiny, curvature_beta=beta, out=str(tmp_path / f"b{beta}")), progress=False)
        rec = json.loads((tmp_path / f"b{beta}" / "metrics.jsonl").read_text().splitlines()[-1])
        assert ("loss_curvature" in rec) == (beta > 0)
        bounds[beta] = curvature_bound(res.model, (1, 8, 8), method="fantastic4")
    assert bounds[0.05] < bounds[0.0]


def test_training_a_relu_model_with_the_curvature_penalty_is_refused_before_the_first_step(capsys, tmp_path):
    code, _, err = _cli(capsys, "train", "--curvature-beta", "0.01", "--epochs", "1", "--out", str(tmp_path / "r"))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "curvature_penalty:" in err and "(ReLU)" in err
    assert not (tmp_path / "r" / "last.pt").exists()
    code, _, err = _cli(capsys, "train", "--curvature-beta", "-1", "--out", str(tmp_path / "n"))
    assert code == 2 and "--curvature-beta" in err
