"""Speed of the conv flavours in whole models, and of our BSConv blocks against the
`bsconv` package's: forward (eval, no grad) and train step (forward, backward, SGD step,
plus the orthonormal penalty where the model has one), batch 64 on CPU, medians over
interleaved repeats."""

from __future__ import annotations

from collections.abc import Callable

import torch
from bsconv.pytorch import BSConvS as RefBSConvS
from bsconv.pytorch import BSConvU as RefBSConvU
from torch import nn

from sepconv.layers import BSConvS, BSConvU, orthonormal_penalty
from sepconv.models import create_model, profile

from ._util import interleaved, md_table

TITLE = "Conv flavours in models; BSConv blocks vs the bsconv package"

# (model, flavours); the first flavour is the baseline of the ratios
MODELS = [
    ("resnet20", ("regular", "dsc", "bsconv_u", "bsconv_s")),
    ("cifar_mobilenet_v2", ("regular", "bsconv_s")),
    ("cifar_mobilenet_v1", ("dsc", "bsconv_u")),
]
BLOCKS = [  # (in, out, k, stride, with_bn)
    (64, 128, 3, 1, False),
    (64, 128, 3, 1, True),
    (128, 128, 3, 2, True),
]


def _forward(model: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    def run():
        model.eval()
        with torch.no_grad():
            model(x)
    return run


def _train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], object]:
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    def run():
        model.train()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y) + orthonormal_penalty(model)
        loss.backward()
        opt.step()
    return run


def _fwd_bwd(block: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    def run():
        block.zero_grad(set_to_none=True)
        block(x).sum().backward()
    return run


def _models(batch: int, repeats: int) -> str:
    rows = []
    torch.manual_seed(0)
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    for name, convs in MODELS:
        models = {c: create_model(name, num_classes=10, conv=c) for c in convs}
        fwd = interleaved({c: _forward(m, x) for c, m in models.items()}, repeats=repeats)
        step = interleaved({c: _train_step(m, x, y) for c, m in models.items()}, repeats=repeats)
        base = convs[0]
        for c, m in models.items():
            p = profile(m, (3, 32, 32))
            rows.append([name, c, f"{p.params / 1e6:.3f}", f"{p.macs / 1e6:.1f}",
                         f"{fwd[c] * 1e3:.1f}", f"{fwd[c] / fwd[base]:.2f}",
                         f"{step[c] * 1e3:.1f}", f"{step[c] / step[base]:.2f}"])
    return md_table(["model", "conv", "params (M)", "MMACs", "forward (ms)", "fwd / first", "train step (ms)",
                     "step / first"], rows)


def _blocks(batch: int, repeats: int, size: int) -> str:
    rows = []
    for cin, cout, k, s, bn in BLOCKS:
        torch.manual_seed(0)
        x = torch.randn(batch, cin, size, size)
        for ours_cls, ref_cls, extra in ((BSConvU, RefBSConvU, {}), (BSConvS, RefBSConvS, {"p": 0.25})):
            ref = ref_cls(cin, cout, k, s, k // 2, with_bn=bn, **extra)
            ours = ours_cls(cin, cout, k, s, k // 2, with_bn=bn, **extra)
            ours.load_state_dict(ref.state_dict())
            fwd = interleaved({"ours": _forward(ours, x), "ref": _forward(ref, x)}, repeats=repeats)
            fb = interleaved({"ours": _fwd_bwd(ours.train(), x), "ref": _fwd_bwd(ref.train(), x)}, repeats=repeats)
            rows.append([ours_cls.__name__, f"{cin}->{cout}, k{k}, s{s}{', BN' if bn else ''}",
                         f"{fwd['ours'] * 1e3:.2f}", f"{fwd['ref'] * 1e3:.2f}", f"{fwd['ours'] / fwd['ref']:.2f}",
                         f"{fb['ours'] * 1e3:.2f}", f"{fb['ref'] * 1e3:.2f}", f"{fb['ours'] / fb['ref']:.2f}"])
    return md_table(["block", "geometry", "fwd ours (ms)", "fwd bsconv (ms)", "ratio", "fwd+bwd ours (ms)",
                     "fwd+bwd bsconv (ms)", "ratio"], rows)


def run(quick: bool) -> str:
    batch, repeats, size = (8, 2, 16) if quick else (64, 11, 32)
    return (f"Batch {batch}, 32x32 input (blocks: {size}x{size}), float32, {torch.get_num_threads()} threads; "
            f"medians of {repeats} interleaved repeats after a warm-up. Ratios compare against the first "
            "flavour of each model. For MobileNetV2, `regular` is the published (depthwise separable) network "
            "and `bsconv_s` the same network plus the orthonormal penalty, so only the penalty differs; "
            "MobileNetV1 compares DSC units with their BSConv-U reordering.\n\n"
            + _models(batch, repeats)
            + "\n\nOur `BSConvU`/`BSConvS` against `bsconv.pytorch`'s (same weights, ratio < 1 = ours faster):\n\n"
            + _blocks(batch, repeats, size) + "\n")
