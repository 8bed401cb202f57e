"""The Lipschitz model family: certified <= 1 by lipschitz_bound after training steps, never beaten
by an empirical lower bound; registry entries, sizes, save/load and clear errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

from sepconv.errors import ConfigError
from sepconv.io import load_model, save_model
from sepconv.models import count_params, create_model, list_models, model_info
from sepconv.spectral import lipschitz_bound

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
SIZE = 12
CASES = [
    ("lip_simple_cnn", dict(width=0.5)),
    ("lip_simple_cnn", dict(width=0.5, act="relu", bn="bounded", downsample="stride", hidden=0)),
    ("lip_sep_cnn", dict(width=0.5)),  # orthogonal: paraunitary depthwise, Björck pointwise
    ("lip_sep_cnn", dict(width=0.5, act="groupsort", depth_multiplier=4)),
    ("lip_sep_cnn", dict(width=0.25, norm="product", act="groupsort", bn="bounded")),
    ("lip_sep_cnn", dict(width=0.25, norm="composite", downsample="stride", channels=(16, 32, 64), hidden=0)),
    ("lip_sep_mobilenet", dict(width=0.5)),
    ("lip_sep_mobilenet", dict(width=0.5, norm="product", bn="bounded", alpha=0.25)),
    ("lip_sep_mobilenet", dict(width=0.5, norm="orthogonal")),
]


def _trained(name: str, kw: dict, seed: int):
    """The model in float64 after a few Adam steps on random data (BatchNorm statistics included)."""
    torch.manual_seed(seed)
    model = create_model(name, num_classes=10, in_chans=1, image_size=SIZE, **kw).double()
    x, y = torch.randn(32, 1, SIZE, SIZE, dtype=F64), torch.randint(0, 10, (32,))
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(4):
        loss = F.cross_entropy(10 * model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _empirical_lipschitz(model, shape, seed: int, steps: int = 150) -> float:
    """A lower bound on the Lipschitz constant: the largest of the exact Jacobian norms at random
    points and of ||f(x + d) - f(x)|| / ||d|| maximized over (x, d) by Adam."""
    model.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    best = 0.0
    with parametrize.cached():
        for _ in range(3):
            J = torch.autograd.functional.jacobian(model, torch.randn(1, *shape, generator=g, dtype=F64))
            best = max(best, float(torch.linalg.svdvals(J.reshape(J.shape[1], -1))[0]))
        x = torch.randn(8, *shape, generator=g, dtype=F64).requires_grad_()
        d = (0.1 * torch.randn(8, *shape, generator=g, dtype=F64)).requires_grad_()
        opt = torch.optim.Adam([x, d], lr=0.02)
        for _ in range(steps):
            ratio = (model(x + d) - model(x)).norm(dim=1) / d.flatten(1).norm(dim=1)
            best = max(best, float(ratio.detach().max()))
            opt.zero_grad()
            (-ratio.sum()).backward()
            opt.step()
    model.requires_grad_(True)
    return best


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name,kw", CASES, ids=[f"{n}-{'-'.join(map(str, k.values()))}" for n, k in CASES])
def test_lipschitz_models_are_certified_after_training_and_never_beaten_empirically(name, kw, seed):
    model = _trained(name, kw, seed)
    shape = (1, SIZE, SIZE)
    bound = lipschitz_bound(model, shape)
    assert 0 < bound <= 1 + 1e-6
    assert lipschitz_bound(model, shape, method="fft") <= 1 + 1e-6  # the bound the layers were normalized by
    low = _empirical_lipschitz(model, shape, seed)
    assert 0 < low <= bound * (1 + 1e-12)  # up to float64 rounding (an isometric block reaches its bound)


def test_each_layer_is_certified_tightly_by_the_engine():
    """The network bound is a product of per-block bounds; for one block (a linear map) the empirical
    value reaches the certified one, so the engine's bound is not vacuous."""
    model = _trained("lip_sep_cnn", dict(width=0.25), 0)
    block = model.features[0]
    bound = lipschitz_bound(block, (1, SIZE, SIZE))
    low = _empirical_lipschitz(torch.nn.Sequential(block, torch.nn.Flatten()), (1, SIZE, SIZE), 0)
    assert bound <= 1 + 1e-6 and low <= bound * (1 + 1e-12) and low >= 0.999 * bound  # float64 rounding only


def test_a_model_normalized_at_32_is_certified_at_16_with_the_pooled_head():
    torch.manual_seed(0)
    model = create_model("lip_sep_cnn", num_classes=10, in_chans=1, width=0.25, head="pool").double().eval()
    assert lipschitz_bound(model, (1, 16, 16)) <= 1 + 1e-6


def test_the_family_is_registered_with_its_input_size_and_digit_sized_models_are_small():
    assert list_models(family="lipschitz") == ["lip_sep_cnn", "lip_sep_mobilenet", "lip_simple_cnn"]
    for name in list_models(family="lipschitz"):
        assert model_info(name).input_size == (3, 32, 32)
        with torch.device("meta"):
            n = count_params(create_model(name, num_classes=10, in_chans=1))
        assert 30_000 <= n <= 150_000, (name, n)


def test_a_saved_lipschitz_model_loads_with_the_same_outputs(tmp_path):
    torch.manual_seed(0)
    model = create_model("lip_sep_mobilenet", num_classes=10, in_chans=1, width=0.5, image_size=SIZE,
                         bn="bounded").eval()
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m").eval()
    x = torch.randn(2, 1, SIZE, SIZE)
    assert torch.allclose(loaded(x), model(x), atol=1e-6)


@pytest.mark.parametrize("kw,match", [(dict(act="tanh"), "act must be one of"), (dict(bn=True), "bn must be"),
                                      (dict(norm="spectral"), "norm must be one of"),
                                      (dict(hidden=-1), "hidden must be"), (dict(hidden=2.5), "hidden must be"),
                                      (dict(downsample="avg"), "downsample must be one of"),
                                      (dict(image_size=0), "image_size"), (dict(expand=0), "expand")])
def test_bad_options_are_clear_errors(kw, match):
    name = "lip_sep_mobilenet" if "expand" in kw else "lip_sep_cnn"
    with pytest.raises(ConfigError, match=match):
        create_model(name, num_classes=10, **kw)
