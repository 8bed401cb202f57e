"""Converting trained regular convs into separable ones (sepconv.decompose, He et al. 2019):
conversion time (ResNet-50 data-free, ResNet-20 with 512 calibration images), forward speed of
converted vs original networks, per-layer output error of depth-wise decomposition vs BSConv-U
vs channel decomposition at equal FLOPs on a trained ResNet-20, tensorly-torch's CP/Tucker at
similar parameter counts, and the digits experiment (convert + fine-tune vs from scratch)."""

from __future__ import annotations

import copy
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from sepconv.data import load_dataset
from sepconv.decompose import convert, layer_macs
from sepconv.io import save_model
from sepconv.models import count_params, create_model, profile
from sepconv.train import TrainConfig, evaluate, train

from ._util import interleaved, md_table

TITLE = "Conversion of trained convs (sepconv.decompose)"


def _forward(model: nn.Module, x: torch.Tensor, channels_last: bool = False):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt).eval()  # trained models come back channels_last: time one format
    x = x.contiguous(memory_format=fmt)

    def run():
        with torch.no_grad():
            model(x)
    return run


def _best_of(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def _channel_ranks_at_dsc_flops(model: nn.Module, rep_dsc) -> dict[str, int]:
    """Per layer the largest channel-decomposition rank d' whose FLOPs do not exceed the
    rank-1 depth-wise decomposition's (equal FLOPs, layer by layer)."""
    mods = dict(model.named_modules())
    ranks = {}
    for r in rep_dsc.layers:
        conv = mods[r["name"]]
        budget = r["flops_after"] // 2
        hw = _in_hw(r)
        d = max([d for d in range(1, min(conv.out_channels, conv.in_channels * 9) + 1)
                 if layer_macs("channel", conv, hw, d) <= budget] or [1])
        ranks[r["name"]] = d
    return ranks


def _in_hw(rec) -> tuple[int, int]:
    return tuple(rec["_in_hw"])  # type: ignore[return-value]


def _with_in_hw(model, rep, shape):
    from sepconv.spectral.network import layer_inputs

    seen = layer_inputs(model, shape, types=(nn.Conv2d,))
    for r in rep.layers:
        r["_in_hw"] = seen[r["name"]][1][-2:]
    return rep


def run(quick: bool = False) -> str:
    tmp = Path(tempfile.mkdtemp(prefix="bench_decompose_"))
    try:
        return _run(quick, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run(quick: bool, tmp: Path) -> str:
    warnings.filterwarnings("ignore")
    epochs = 1 if quick else 3
    samples = 64 if quick else 512
    reps = 1 if quick else 3
    out = []

    # --- 1. ResNet-50 data-free conversion time ---------------------------------------------
    r50 = create_model("resnet50")
    x50 = torch.zeros(1, 3, 224, 224)
    t = time.perf_counter()
    convert(r50, to="dsc", rank=1, layers=["layer1.0.conv2"], progress=False)
    t_cold = time.perf_counter() - t  # the first call of a process imports FlopCounterMode's machinery
    _forward(r50, x50)()  # warm-up (first forward of a process pays for allocations)
    rows = []
    for to in ("dsc", "bsconv_u"):
        sec, (_, rep) = _best_of(lambda m=r50: convert(m, to=to, rank=1, progress=False), reps)
        t = rep.totals
        rows.append([f"ResNet-50 -> {to}, rank 1, svd", t["layers"], f"{sec:.2f} s",
                     f"{t['params_before'] / 1e6:.2f}M -> {t['params_after'] / 1e6:.2f}M",
                     f"{t['flops_before'] / 1e9:.2f} -> {t['flops_after'] / 1e9:.2f}",
                     f"{t['mean_output_error']:.3f} (random inputs)"])
    del r50

    # --- 2. train a regular ResNet-20 on digits -------------------------------------------------
    t0 = time.perf_counter()
    reg = train(TrainConfig(model="resnet20", data="digits", epochs=epochs, out=str(tmp / "regular")), progress=False)
    t_reg = time.perf_counter() - t0
    model = reg.model.eval()
    calib = load_dataset("digits", split="train")
    test = load_dataset("digits", split="test")
    shape = (calib.in_chans, *calib.image_size)

    conv = {}
    for to, method in [("dsc", "svd"), ("dsc", "gsvd"), ("bsconv_u", "svd"), ("bsconv_u", "gsvd")]:
        t = time.perf_counter()
        conv[(to, method)] = convert(model, to=to, rank=1, method=method, data=calib, num_samples=samples,
                                     progress=False)
        conv[(to, method)][1].totals["_time"] = time.perf_counter() - t
    _with_in_hw(model, conv[("dsc", "svd")][1], shape)
    ch_ranks = _channel_ranks_at_dsc_flops(model, conv[("dsc", "svd")][1])
    for method in ("svd", "gsvd"):
        t = time.perf_counter()
        conv[("channel", method)] = convert(model, to="channel", rank=ch_ranks, method=method, data=calib,
                                            num_samples=samples, progress=False)
        conv[("channel", method)][1].totals["_time"] = time.perf_counter() - t
    t = time.perf_counter()
    _, rep_single = convert(model, to="dsc", rank=1, method="gsvd", multilayer=False, data=calib,
                            num_samples=samples, progress=False)
    t_single = time.perf_counter() - t
    for (to, method), (_, rep) in conv.items():
        if method == "gsvd" or to == "dsc":
            tt = rep.totals
            rows.append([f"ResNet-20 (trained) -> {to}, {'rank 1' if to != 'channel' else 'equal FLOPs'}, {method}"
                         + (f" ({samples} images)" if method == "gsvd" else f" (errors measured on {samples} "
                                                                            "images)"), tt["layers"],
                         f"{tt['_time']:.2f} s", f"{tt['params_before'] / 1e3:.0f}k -> {tt['params_after'] / 1e3:.1f}k",
                         f"{tt['flops_before'] / 1e6:.1f}M -> {tt['flops_after'] / 1e6:.1f}M",
                         f"{tt['mean_output_error']:.3f}"])
    rows.append([f"ResNet-20 (trained) -> dsc, rank 1, gsvd single-layer ({samples} images)",
                 rep_single.totals["layers"], f"{t_single:.2f} s", "", "",
                 f"{rep_single.totals['mean_output_error']:.3f}"])
    out.append("**Conversion time** (2 threads; median of "
               f"{reps} for ResNet-50 at 224x224 after a warm-up forward; goal < 10 s; the first conversion of a "
               f"process also pays {t_cold:.1f} s of one-time imports and allocations). ResNet-20 is trained "
               f"{epochs} epochs on digits (1 input channel, 32x32, {t_reg:.0f} s); calibration images are its "
               "train split; errors are the mean relative output error of the converted layers, in the "
               "converted network against the original (calibration patches) or per layer on Gaussian inputs.\n")
    out.append(md_table(["conversion", "layers", "time", "params", "FLOPs", "mean output error"], rows))

    # --- 3. per-layer table ------------------------------------------------------------------
    keys = [("dsc", "svd"), ("dsc", "gsvd"), ("bsconv_u", "svd"), ("bsconv_u", "gsvd"), ("channel", "svd"),
            ("channel", "gsvd")]
    recs = {k: {r["name"]: r for r in conv[k][1].layers} for k in keys}
    rows = []
    wins = {"svd": [0, 0], "gsvd": [0, 0]}  # [in-network, layer alone]
    names = [r["name"] for r in conv[("dsc", "svd")][1].layers]
    for nm in names:
        d = recs[("dsc", "svd")][nm]
        row = [nm, d["shape"], d["geometry"], ch_ranks[nm],
               f"{d['flops_after'] / 1e6:.2f} / {recs[('channel', 'svd')][nm]['flops_after'] / 1e6:.2f}"]
        for k in keys:
            r = recs[k][nm]
            row.append(f"{r['output_error']:.3f} ({r['local_error']:.3f})")
        for m in ("svd", "gsvd"):
            wins[m][0] += recs[("dsc", m)][nm]["output_error"] <= recs[("channel", m)][nm]["output_error"]
            wins[m][1] += recs[("dsc", m)][nm]["local_error"] <= recs[("channel", m)][nm]["local_error"]
        rows.append(row)
    gsvd_le = sum(recs[(to, "gsvd")][nm]["output_error"] <= recs[(to, "svd")][nm]["output_error"] * (1 + 1e-6)
                  for to in ("dsc", "bsconv_u", "channel") for nm in names)
    out.append(f"\n**Per-layer relative output error on the trained ResNet-20** (rank 1 for DSC and BSConv-U; "
               "channel decomposition with the largest d' whose FLOPs do not exceed the DSC layer's). Each cell: "
               "error in the converted network against the original network's output (in brackets: the layer "
               f"alone on the original inputs), on {samples} calibration images, 4096 sampled patches per layer.\n")
    out.append(md_table(["layer", "shape", "geometry", "channel d'", "MFLOPs dsc / channel",
                         "dsc svd", "dsc gsvd", "bsconv_u svd", "bsconv_u gsvd", "channel svd", "channel gsvd"], rows))
    n = len(names)
    out.append(f"\nDSC error <= channel decomposition's at equal FLOPs: svd {wins['svd'][0]}/{n} layers in the "
               f"network ({wins['svd'][1]}/{n} alone); gsvd {wins['gsvd'][0]}/{n} ({wins['gsvd'][1]}/{n} alone). "
               f"gsvd error <= svd error: {gsvd_le}/{3 * n} (layer, target) pairs.")

    # --- 4. forward speed --------------------------------------------------------------------
    xb = calib.get_batch(torch.arange(64))[0]
    nets = {"regular": model, "dsc r1": conv[("dsc", "gsvd")][0], "bsconv_u r1": conv[("bsconv_u", "gsvd")][0],
            "channel (equal FLOPs)": conv[("channel", "gsvd")][0]}
    nets = {k: copy.deepcopy(m) for k, m in nets.items()}
    cl = {f"{k}|cl": _forward(copy.deepcopy(m), xb, channels_last=True) for k, m in nets.items()}
    times = interleaved({**{k: _forward(m, xb) for k, m in nets.items()}, **cl}, repeats=5 if quick else 15)
    rows = [[k, f"{count_params(m):,}", f"{profile(m, shape).flops / 1e6:.1f}", f"{times[k] * 1e3:.1f} ms",
             f"{times[k] / times['regular']:.2f}", f"{times[k + '|cl'] * 1e3:.1f} ms",
             f"{times[k + '|cl'] / times['regular|cl']:.2f}"] for k, m in nets.items()]
    out.append("\n**Forward speed**, ResNet-20 on digits, batch 64, 32x32, eval, no grad, interleaved medians, "
               "NCHW and channels_last:\n")
    out.append(md_table(["network", "params", "MFLOPs", "forward NCHW", "vs regular", "forward channels_last",
                         "vs regular"], rows))

    # --- 5. tensorly-torch CP / Tucker at similar parameter counts ----------------------------
    out.append(_tensorly_rows(model, calib, quick))

    # --- 6. digits: convert + fine-tune vs DSC from scratch ------------------------------------
    new, rep = conv[("dsc", "gsvd")]
    save_model(new, tmp / "converted")
    _, acc_conv = evaluate(new, test)
    ft = train(TrainConfig(init=str(tmp / "converted"), data="digits", epochs=1, lr=0.01, out=str(tmp / "ft")),
               progress=False)
    scratch = train(TrainConfig(model="resnet20", conv="dsc", data="digits", epochs=epochs + 1,
                                out=str(tmp / "scratch")), progress=False)
    _, acc_reg = evaluate(model, test)
    _, acc_ft = evaluate(ft.model, test)
    _, acc_scratch = evaluate(scratch.model, test)
    nets = {k: copy.deepcopy(m) for k, m in {
        "regular (trained)": model, "converted dsc r1 gsvd (no fine-tune)": new,
        "converted + 1 epoch fine-tune": ft.model, "DSC from scratch": scratch.model}.items()}
    accs = [acc_reg, acc_conv, acc_ft, acc_scratch]
    times = interleaved({k: _forward(m, xb) for k, m in nets.items()}, repeats=5 if quick else 15)
    rows = [[k, f"{a:.4f}", f"{count_params(m):,}", f"{profile(m, shape).flops / 1e6:.1f}", f"{times[k] * 1e3:.1f} ms"]
            for (k, m), a in zip(nets.items(), accs)]
    out.append(f"\n**Digits experiment**: regular ResNet-20 trained {epochs} epochs, converted to DSC (rank 1, "
               f"gsvd, {samples} calibration images), fine-tuned 1 epoch (lr 0.01), against the same DSC ResNet-20 "
               f"(`conv=\"dsc\"`) trained from scratch for {epochs + 1} epochs. Test accuracy on the digits test "
               "split; forward: batch 64, 32x32.\n")
    out.append(md_table(["network", "test acc", "params", "MFLOPs", "forward"], rows))
    return "\n".join(out)


def _tensorly_rows(model: nn.Module, calib, quick: bool) -> str:
    try:
        from tltorch import FactorizedConv
    except ImportError:  # pragma: no cover
        return "\n(tensorly-torch not installed: `make bench` installs it)\n"
    rows = []
    torch.manual_seed(0)
    big = nn.Conv2d(256, 256, 3, padding=1, bias=False)
    layer = dict(model.named_modules())["layer3.1.conv1"]
    from sepconv.spectral.network import layer_inputs  # noqa: F401  (shapes only)

    captured = {}
    h = layer.register_forward_pre_hook(lambda m, i: captured.setdefault("x", i[0].detach()))
    with torch.no_grad():
        model.eval()(calib.get_batch(torch.arange(64))[0])
    h.remove()
    cases = [("256->256 3x3, random weights", big, torch.randn(64 if not quick else 8, 256, 16, 16), 130,
              (63, 63, 3, 3)),
             ("trained ResNet-20 layer3.1.conv1 (64->64), real inputs", layer, captured["x"], 35, (17, 17, 3, 3))]
    warm = nn.Sequential()
    warm.add_module("c", big)
    convert(warm, to="dsc", rank=1, input_size=(256, 16, 16), progress=False)  # warm-up: first-call allocations
    for title, conv, x, cp_rank, tucker_rank in cases:
        with torch.no_grad():
            y = conv(x)
        methods = {}
        for to in ("dsc", "bsconv_u"):
            t = time.perf_counter()
            wrapper = nn.Sequential()
            wrapper.add_module("c", conv)
            new, _ = convert(wrapper, to=to, rank=1, input_size=tuple(x.shape[1:]), progress=False)
            methods[f"sepconv {to}, rank 1 (svd)"] = (new.c, time.perf_counter() - t)
        if not quick:
            for fac, rank in (("cp", cp_rank), ("tucker", tucker_rank)):
                t = time.perf_counter()
                f = FactorizedConv.from_conv(conv, rank=rank, factorization=fac, implementation="factorized")
                methods[f"tensorly-torch {fac.upper()} rank {rank}, factorized"] = (f, time.perf_counter() - t)
        fns = {"original": _forward(conv, x), **{k: _forward(m, x) for k, (m, _) in methods.items()}}
        times = interleaved(fns, repeats=3 if quick else 9)
        rows.append([f"**{title}**", f"{sum(p.numel() for p in conv.parameters()):,}", "0", "-", "1.00"])
        for k, (m, sec) in methods.items():
            with torch.no_grad():
                err = float((m(x) - y).norm() / y.norm())
            rows.append([k, f"{sum(p.numel() for p in m.parameters()):,}", f"{err:.3f}", f"{sec:.2f} s",
                         f"{times[k] / times['original']:.2f}"])
    return ("\n**Against tensorly-torch** (`FactorizedConv.from_conv(..., implementation='factorized')`) at "
            "similar parameter counts; output error on the given inputs (random N(0,1) at 16x16, batch 64, or the "
            "layer's real inputs for 64 digits); forward time relative to the original conv, interleaved medians:\n\n"
            + md_table(["method", "params", "rel. output error", "decompose time", "forward vs original"], rows))
