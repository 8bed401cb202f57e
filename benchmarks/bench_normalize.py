"""Cost and effect of spectral normalization (sepconv.normalize) on CIFAR MobileNetV2, and
Lipschitz training on digits.

* Train step (forward, backward, SGD step) of ``cifar_mobilenet_v2`` width 1.0, 10 classes,
  3x32x32, batch 64, channels_last, medians over interleaved repeats, for no SN, each method of
  :func:`sepconv.normalize.spectral_normalize` and deel-torchlip's ``SpectralConv2d``; the
  normalizer alone (every parametrized weight, forward + backward); the persistent state the
  normalization adds; peak resident memory of a fresh process running 3 steps (``VmHWM``).
* The true zero-padding norm of the 17 depthwise layers after normalizing (target 1): the
  certified bracket of :func:`sepconv.spectral.bracket` on the effective weights.
* Digits: accuracy, the certified network Lipschitz bound and certified accuracy, trained
  without and with ``--sn dsc``.

    python -m benchmarks.bench_normalize --peak METHOD   # one peak-memory measurement
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from sepconv.models import create_model
from sepconv.normalize import spectral_normalize
from sepconv.runtime import tune_allocator
from sepconv.spectral import ConvSpec, spectral_norm
from sepconv.spectral.network import layer_inputs

from ._util import interleaved, md_table

#: Threads: 1, because the 2-core machine is shared with other jobs; with 2 threads under that load the
#: OpenMP barriers oversubscribe and a step is ~3.5x slower and erratic (measured 2026-12-01).
THREADS = 1

TITLE = "Spectral normalization: train-step cost, state and memory; tightness; digits certification"

METHODS = ("none", "dsc", "operator", "fantastic4", "gram", "reshape", "deel-torchlip")
SHAPE = (3, 32, 32)
BATCH = 64


def _torchlip(model: nn.Module) -> nn.Module:
    """Every Conv2d replaced by deel-torchlip's ``SpectralConv2d`` (torch reshape SN, Bjorck
    orthonormalization, then the ``lconv_norm`` factor), weights copied (the peer's docs require
    groups=1; it runs on depthwise layers, bounding their reshaped kernels); Linear by ``SpectralLinear``."""
    from deel.torchlip import SpectralConv2d, SpectralLinear

    for _name, mod in list(model.named_modules()):
        for cname, child in list(mod.named_children()):
            if isinstance(child, nn.Conv2d):
                new = SpectralConv2d(child.in_channels, child.out_channels, child.kernel_size, child.stride,
                                     child.padding, child.dilation, child.groups, child.bias is not None,
                                     child.padding_mode)
            elif isinstance(child, nn.Linear):
                new = SpectralLinear(child.in_features, child.out_features, child.bias is not None)
            else:
                continue
            with torch.no_grad():
                new.parametrizations.weight.original.copy_(child.weight)
            setattr(mod, cname, new)
    return model


def build(method: str, width: float = 1.0, in_size=SHAPE, scale: float = 1.0) -> nn.Module:
    torch.manual_seed(0)
    model = create_model("cifar_mobilenet_v2", num_classes=10, in_chans=in_size[0], width=width)
    if scale != 1.0:
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.Conv2d):
                    m.weight.mul_(scale)
    if method == "deel-torchlip":
        _torchlip(model)
    elif method == "dsc":  # the stem by the certified fft bound, so that every layer is certified
        spectral_normalize(model, method, in_size=in_size, full_conv="fft")
    elif method != "none":
        spectral_normalize(model, method, in_size=in_size)
    return model.to(memory_format=torch.channels_last)


def state_bytes(model: nn.Module) -> int:
    """Bytes of the buffers that normalization added (those inside parametrization modules)."""
    return sum(b.numel() * b.element_size() for n, b in model.named_buffers() if "parametrizations." in n)


def _batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, *SHAPE, generator=g).contiguous(memory_format=torch.channels_last)
    return x, torch.randint(0, 10, (BATCH,), generator=g)


def _train_step(model: nn.Module) -> Callable[[], None]:
    x, y = _batch()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def run():
        model.train()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return run


def _normalizer(model: nn.Module) -> Callable[[], None]:
    """Every parametrized weight computed as in one training forward (the depthwise group's scope
    open), then backward with a fixed cotangent."""
    mods = [m for m in model.modules() if parametrize.is_parametrized(m, "weight")]
    group = getattr(model, "_sepconv_dw_group", None)
    cot = [torch.randn_like(m.weight) for m in mods]

    def run():
        model.train()
        if group is not None:
            group.begin(model, ())
        ws = [m.weight for m in mods]
        if group is not None:
            group.end(model, (), None)
        torch.autograd.backward(ws, cot)
        model.zero_grad(set_to_none=True)
    return run


def peak_memory(method: str, tuned: bool = False) -> float:
    """Peak resident set (MiB) of this process after building the model and 3 train steps: ``VmHWM``
    of ``/proc/self/status`` (per address space; ``ru_maxrss`` is not usable here: Linux carries it
    over from the parent across fork and exec). ``tuned``: under :func:`sepconv.runtime.tune_allocator`."""
    if tuned:
        tune_allocator()
    torch.set_num_threads(THREADS)
    step = _train_step(build(method))
    for _ in range(3):
        step()
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _in_subprocess(*args: str, tuned: bool, timeout: float, check: bool = False) -> str:
    """stdout of this module run as ``python -m benchmarks.bench_normalize ARGS [--tuned]`` in a fresh
    process: after other benchmarks the allocator's state (a heap fragmented by large blocks, mmap
    thresholds raised) changes step times and peaks by several per cent, not equally for every
    model. ``--tuned``: that process first calls :func:`sepconv.runtime.tune_allocator`, as
    ``sepconv train`` does."""
    r = subprocess.run([sys.executable, "-m", "benchmarks.bench_normalize", *args] + (["--tuned"] if tuned else []),
                       capture_output=True, text=True, timeout=timeout, check=check)
    return r.stdout


def _peak_in_subprocess(method: str, tuned: bool) -> float | None:
    try:
        return float(_in_subprocess("--peak", method, tuned=tuned, timeout=900).strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None


def _cost(quick: bool, tuned: bool = False) -> str:
    if tuned and not tune_allocator():
        return "(glibc's mallopt is not available here: no tuned-allocator measurement)"
    repeats = 2 if quick else 9
    models, notes = {}, []
    for m in METHODS:
        try:
            models[m] = build(m)
        except Exception as e:  # a peer that cannot handle the model is reported, not fatal
            notes.append(f"{m}: could not be built ({type(e).__name__}: {' '.join(str(e).split())[:140]})")
    step = interleaved({m: _train_step(mod) for m, mod in models.items()}, repeats=repeats)
    norm = interleaved({m: _normalizer(mod) for m, mod in models.items() if m != "none"}, repeats=repeats)
    peaks = {m: (_peak_in_subprocess(m, tuned) if not quick else None) for m in models}
    op_state = state_bytes(models["operator"]) if "operator" in models else None
    rows = []
    for m, mod in models.items():
        sb = state_bytes(mod)
        pk = peaks[m]
        rows.append([m, f"{step[m] * 1e3:.0f}", f"{step[m] / step['none']:.3f}",
                     f"{norm[m] * 1e3:.1f}" if m in norm else "-",
                     f"{sb / 2**20:.3f}", f"{100 * sb / op_state:.2f}%" if op_state else "-",
                     f"{pk:.0f}" if pk else "-", f"{pk - peaks['none']:+.0f}" if pk and peaks.get("none") else "-"])
    table = md_table(["method", "train step (ms)", "step / no SN", "normalizer fwd+bwd (ms)", "state (MiB)",
                      "state / operator's", "peak RSS (MiB)", "vs no SN (MiB)"], rows)
    return ("cifar_mobilenet_v2 w1.0 (2.24 M params), 3x32x32, batch 64, channels_last, SGD momentum, "
            f"{THREADS} thread(s) (see `THREADS`); "
            f"medians of {repeats} interleaved repeats, in a fresh process. The normalizer column computes every "
            "parametrized weight "
            "as in one training forward and back-propagates a fixed cotangent. Peak RSS: `VmHWM` of a fresh "
            "process that builds the model and runs 3 steps.\n\n" + table
            + ("\n\n" + "\n".join(f"* {n}" for n in notes) if notes else ""))


def _depthwise_lower(weight: torch.Tensor, spec: ConvSpec, iters: int = 300) -> float:
    """Lower bound on a depthwise layer's norm: float64 power iteration on the true operator, every
    input channel normalized separately (the operator is block-diagonal over channels), so all
    channels converge at once; the max over channels of the Rayleigh quotients."""
    w = weight.detach().to(torch.float64)
    x = torch.randn(1, *spec.input_shape(w), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for _ in range(iters):
        x = spec.adjoint(spec.apply(x, w), w)
        x = x / x.flatten(2).norm(dim=2).clamp_min(1e-300)[..., None, None]
    m = w.shape[0] // spec.groups
    y = spec.apply(x, w).reshape(spec.groups, m, -1).flatten(1).norm(dim=1)
    return float((y / x.flatten(2).norm(dim=2)[0]).max())


def _tightness(quick: bool) -> str:
    methods = ("none", "dsc", "operator", "fantastic4", "reshape", "deel-torchlip")
    width, shape = (1.0, SHAPE) if not quick else (0.25, (3, 16, 16))
    rows = []
    for m in methods:
        model = build(m, width, shape, scale=3.0)
        model.train()
        x = torch.randn(2, *shape).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            for _ in range(3):  # a few training forwards, as after the first steps of training
                model(x)
        model.eval()
        lows, highs = [], []
        for mod, inp in layer_inputs(model, shape, types=(nn.Conv2d,)).values():
            if not (mod.groups == mod.in_channels and mod.in_channels > 1):
                continue
            with torch.no_grad():
                w = mod.weight.detach().to(torch.float64)
            spec = ConvSpec.of(mod, inp[-2:])
            lows.append(_depthwise_lower(w, spec, 30 if quick else 300))
            highs.append(float(spectral_norm(w, spec, "fft")))
        lows.sort()
        rows.append([m, len(lows), f"{lows[0]:.3f} / {lows[len(lows) // 2]:.3f} / {lows[-1]:.3f}",
                     f"{max(highs):.4f}", sum(v > 1.001 for v in lows), sum(v < 0.9 for v in highs)])
    return ("True norm of each depthwise layer after normalizing to target 1 (zero padding, at the input size it "
            "sees; eval mode, after 3 training forwards; the default-initialized conv weights multiplied by 3 first, "
            "so that "
            "every layer is above the target and each method has to act): lower end by 300 float64 power iterations "
            "on the true "
            "operator (per channel), upper end the certified FFT embedding bound.\n\n"
            + md_table(["method", "dw layers", "true norm (lower) min / median / max", "largest upper bound",
                        "layers above 1.001", "layers below 0.9 (upper bound)"], rows))


def _digits(quick: bool) -> str:
    from sepconv.train import TrainConfig, train

    eps = (1e-4, 1e-3, 3e-3)
    variants = (("none", {}), ("--logit-scale 10", dict(logit_scale=10.0)), ("--sn dsc", dict(sn="dsc")),
                ("--sn dsc --logit-scale 10", dict(sn="dsc", logit_scale=10.0)),
                ("--sn dsc --sn-target 2 --logit-scale 10", dict(sn="dsc", sn_target=2.0, logit_scale=10.0)),
                ("--sn dsc --sn-batchnorm --logit-scale 10", dict(sn="dsc", sn_batchnorm=True, logit_scale=10.0)))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, sn in variants:
            cfg = TrainConfig(model="simple_cnn", conv="dsc", data="digits", image_size=32, epochs=2 if quick else 10,
                              batch_size=32, lr=0.05, certify=eps, out=f"{tmp}/{len(rows)}", **sn)
            h = train(cfg, progress=False).history[-1]
            rows.append(["simple_cnn (dsc convs, BatchNorm)", label, f"{100 * h['test_acc']:.1f}",
                         f"{h['lipschitz_bound']:.3g}", *(f"{100 * h[f'cert_acc@{e:g}']:.1f}" for e in eps)])
    return ("Bundled digits at 32x32 (1,438 train / 359 test images), 10 epochs, SGD lr 0.05, batch 32, cosine "
            "schedule, seed 0; `--logit-scale 10` trains on cross_entropy(10 logits) / 10 (Bethune et al. 2022). "
            "Lipschitz bound: `lipschitz_bound(model, method='fft')` (certified, eval mode); "
            "certified accuracy at l2 radius eps in [0, 1]-scaled pixels (the normalization's std folded in): "
            "correct and certified by the larger of margin / (sqrt(2) L) (Tsuzuku et al. 2018) and the pairwise "
            "last-layer radius (`sepconv.spectral.certified_radii`).\n\n"
            + md_table(["model", "training", "test acc (%)", "Lipschitz bound",
                        *(f"certified acc @ eps={e:g} (%)" for e in eps)], rows))


def _cost_in_subprocess(quick: bool, tuned: bool = False) -> str:
    out = _in_subprocess("--cost", *(["--quick"] if quick else []), tuned=tuned, timeout=3600, check=True)
    return out.split("<!-- cost -->\n", 1)[1].rstrip()


def run(quick: bool = False) -> str:
    torch.set_num_threads(THREADS)
    return "\n\n".join([
        "### Train-step cost, persistent state, peak memory\n\n"
        "Measured twice, each in a fresh process: with glibc's default malloc, and with the allocator "
        "settings `sepconv train` applies (`sepconv.runtime.tune_allocator`: freed step buffers stay "
        "mapped, no page faults re-touching them; the PyTorch CPU guides get the same from jemalloc or "
        "tcmalloc). Every method is measured under the same allocator in each table.\n\n"
        "**Default allocator.** " + _cost_in_subprocess(quick)
        + "\n\n**As `sepconv train` runs (tuned allocator).** " + _cost_in_subprocess(quick, tuned=True),
        "### What each method does to the depthwise layers\n\n" + _tightness(quick),
        "### Digits: accuracy, Lipschitz bound, certified accuracy\n\n" + _digits(quick),
    ])


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--peak":
        print(json.dumps(peak_memory(sys.argv[2], tuned="--tuned" in sys.argv)))
    elif len(sys.argv) >= 2 and sys.argv[1] == "--cost":
        torch.set_num_threads(THREADS)
        print("<!-- cost -->\n" + _cost("--quick" in sys.argv, tuned="--tuned" in sys.argv))
    else:
        print(run(quick="--quick" in sys.argv))
