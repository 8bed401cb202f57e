"""Deployment speed: do converted and separable networks run faster where users run them?

Regular networks against their conversions (``sepconv.decompose.convert``: dsc and bsconv_u, rank
1 and an energy-chosen rank) and the zoo's separable flavour, each in its deployable form
(``sepconv.deploy.deployable``: eval, BatchNorm folded), timed in PyTorch eager (NCHW and
channels_last) and in ONNX Runtime (the verified ``export_onnx`` file, CPU provider, all graph
optimizations), at 1 and 2 threads, batch 1 and a large batch. Every figure is the median of
interleaved calls (all variants of a model in one runtime family, one call each per round; the
runtime families one after the other, as idle threads of one would slow down the next). Weights are the models'
initial ones: latency depends on shapes, not values; the energy-chosen ranks are those of the
initial weights (stated per row).

The goal (issue 16): in ONNX Runtime on 1 thread every separable variant's latency ratio is at
most 1.25x its FLOP ratio, at batch 1 and at the large batch; in PyTorch eager (the better of
NCHW and channels_last) no separable variant is slower than the regular network. The profile
table says where the time goes: ONNX Runtime's own per-node profile, depthwise convs against the
other convs, in time and in FLOPs, and the latency ratio left if the depthwise convs took no time
(which rows no depthwise kernel could bring to the goal) or as long as a copy of their bytes (which
rows a depthwise kernel at memory speed could). Each block in the faster of its exact
forms (``sepconv.deploy.choose_forms``) is measured in ``bench_forms.py``.
"""

from __future__ import annotations

import collections
import copy
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from sepconv.decompose import convert
from sepconv.deploy import RUNTIMES, deployable, export_onnx, latency_ratio, measure, torch_threads
from sepconv.deploy.export import onnx_session
from sepconv.models import create_model, profile
from sepconv.probe import dry_forward
from sepconv.runtime import tune_allocator
from sepconv.spectral.spec import ConvSpec

from ._util import md_table

TITLE = "Deployment speed: regular vs converted and separable networks in PyTorch and ONNX Runtime"

ENERGY = 0.5  # the energy-chosen rank's target (per layer, mean retained spectral energy)
# (model, input (C, H, W), large batch, variants); variants: (label, conv flavour or convert arguments)
GROUPS = [
    ("resnet20", (3, 32, 32), 64, [
        ("regular", None), ("dsc rank 1", dict(to="dsc", rank=1)),
        (f"dsc energy {ENERGY}", dict(to="dsc", energy=ENERGY)),
        ("bsconv_u rank 1", dict(to="bsconv_u", rank=1)),
        (f"bsconv_u energy {ENERGY}", dict(to="bsconv_u", energy=ENERGY)), ("zoo conv=dsc", "dsc")]),
    ("resnet50", (3, 224, 224), 16, [
        ("regular", None), ("dsc rank 1", dict(to="dsc", rank=1)),
        (f"dsc energy {ENERGY}", dict(to="dsc", energy=ENERGY)),
        ("bsconv_u rank 1", dict(to="bsconv_u", rank=1)),
        (f"bsconv_u energy {ENERGY}", dict(to="bsconv_u", energy=ENERGY)), ("zoo conv=dsc", "dsc")]),
    ("mobilenet_v2", (3, 224, 224), 16, [
        ("published (separable)", None), ("stem converted, dsc rank 1", dict(to="dsc", rank=1))]),
]
THREADS = (1, 2)
ORT_GOAL = 1.25  # issue 16: ONNX Runtime latency ratio at most this times the FLOP ratio (1 thread)
EAGER = ("torch", "torch-cl")
COMPILE = ("resnet20",)  # torch.compile measured too (1 thread): compiling each ImageNet variant takes minutes


def _variants(name: str, shape, variants, quick: bool) -> dict[str, torch.nn.Module]:
    classes = 1000 if shape[1] >= 224 else 10
    base = create_model(name, num_classes=classes)
    out = {}
    for label, how in variants:
        if how is None:
            out[label] = base
        elif isinstance(how, str):
            out[label] = create_model(name, num_classes=classes, conv=how)
        else:
            out[label] = convert(base, input_size=shape, progress=False, **how)[0]
    return out


def _fn(runtime: str, net, x):
    """One forward pass of ``net`` (already deployable) on ``x``, built by ``sepconv.deploy``'s own
    runtime on a copy (channels_last converts a module in place; torch.compile compiles here)."""
    return RUNTIMES[runtime].build(copy.deepcopy(net), x, torch.get_num_threads(), Path(tempfile.gettempdir()))


_COPY_US: dict[int, float] = {}


def _copy_us(k: int) -> float:
    """Microseconds one thread takes to copy ``k`` float32 values (read ``4k`` bytes, write ``4k``) beyond a
    call's fixed cost: the median of 7 timed loops of ``np.copyto`` on the same (cache-warm) buffers, less
    the same for one value. A conv reading ``n`` values and writing ``m`` moves at least the bytes of a
    copy of ``(n + m) / 2`` values; its input was just written by the node before it, as the copy's was."""
    def per_call(n: int) -> float:
        src, dst = np.ones(n, np.float32), np.empty(n, np.float32)
        reps, times = max(10, min(1000, 10**7 // n)), []
        for _ in range(7):
            t = time.perf_counter()
            for _ in range(reps):
                np.copyto(dst, src)
            times.append((time.perf_counter() - t) / reps)
        return 1e6 * statistics.median(times)
    if k not in _COPY_US:
        _COPY_US[k] = max(per_call(k) - per_call(1), 0.0)
    return _COPY_US[k]


def _profile_ort(paths: dict[str, Path], x: torch.Tensor, runs: int) -> dict[str, dict[str, list[float]]]:
    """ONNX Runtime's per-node profile on 1 thread of each model of ``paths``, the sessions called interleaved
    (one run of each per round, as in ``measure``: drifts of a shared machine hit all alike): per model,
    {"depthwise"|"other conv"|"rest": [us per run, FLOPs, bytes read and written at least, us a copy of
    those bytes takes (:func:`_copy_us`)]}."""
    ort = __import__("onnxruntime")
    sessions = {}
    for k, path in paths.items():
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads, so.enable_profiling = 1, 1, True
        so.profile_file_prefix = str(path.with_suffix(""))
        s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        sessions[k] = (s, {s.get_inputs()[0].name: x.numpy()})
    for _ in range(runs + 1):  # the first round warms up: left out of the profile
        for s, feed in sessions.values():
            s.run(None, feed)
    return {k: _ort_events(json.loads(Path(s.end_profiling()).read_text()), runs) for k, (s, _) in sessions.items()}


def _ort_events(events: list[dict], runs: int) -> dict[str, list[float]]:
    """:func:`_profile_ort`'s aggregate of one session's profile events over ``runs`` runs, the first run
    (a warm-up) left out."""
    agg: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0, 0.0, 0.0])
    first = min((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"], default=None)
    after = first["ts"] + first["dur"] if first else -math.inf
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time") or e["ts"] < after:
            continue
        a = e["args"]
        kind = "rest"
        if a.get("op_name") == "Conv":
            shapes = [next(iter(d.values())) for d in a.get("input_type_shape", [])]
            out = [next(iter(d.values())) for d in a.get("output_type_shape", [])]
            w = shapes[1] if len(shapes) > 1 else None
            kind = "depthwise conv" if w is not None and w[1] == 1 and len(w) == 4 and w[2] * w[3] > 1 else "other conv"
            if w is not None and out:
                o = out[0]  # NCHWc outputs: channels blocked; FLOPs from the weight and output spatial size
                flops = 2 * w[0] * w[1] * w[2] * w[3] * o[0] * o[-2] * o[-1] if len(o) == 4 else 0
                if len(o) == 5:
                    flops = 2 * w[0] * w[1] * w[2] * w[3] * o[0] * o[2] * o[3]
                agg[kind][1] += flops / runs
            if kind == "depthwise conv" and shapes and out:
                values = math.prod(shapes[0]) + math.prod(out[0])
                agg[kind][2] += 4 * values / runs
                agg[kind][3] += _copy_us(values // 2) / runs
        agg[kind][0] += e["dur"] / runs
    return dict(agg)


def _depthwise_copy_ms(net: torch.nn.Module, x: torch.Tensor) -> float:
    """Milliseconds one thread takes to copy the bytes ``net``'s depthwise convs must read and write at least
    on ``x`` (their inputs and outputs, :func:`_copy_us`): what depthwise kernels at copy speed would take."""
    seen = dry_forward(net, tuple(x.shape[1:]), record=(torch.nn.Conv2d,), where="bench_deploy").inputs
    values = [math.prod(shape) + m.out_channels * math.prod(ConvSpec.of(m, shape[1:]).out_size(m.kernel_size))
              for m, shape in seen.values() if _is_depthwise(m.weight.shape)]
    return sum(_copy_us(x.shape[0] * v // 2) for v in values) / 1e3


def _is_depthwise(w) -> bool:
    """A conv weight of shape ``w`` is a depthwise one: one input channel per filter, a k x k kernel (k > 1)."""
    return len(w) == 4 and w[1] == 1 and w[2] * w[3] > 1


def _profile_eager(fns: dict[str, Callable[[], object]], runs: int) -> dict[str, dict[str, float]]:
    """PyTorch's own profile (``torch.profiler``, CPU, the current thread count) of each function of ``fns``
    (a model's forward in ``torch`` or ``torch-cl``), interleaved as in ``measure``: per round one profiled
    call of each, so that drifts of a shared machine hit all alike. Per function, the median over the rounds
    of: ms in the top-level aten ops -- depthwise convs, other convs (dense and pointwise), the rest (adds,
    activations, copies, slice sums) --, ms outside them ("outside": Python, module calls and the profiler's
    own cost), "wall" (the call's time), and the top-level op "calls" (and "<kind> calls" per kind)."""
    per: dict[str, list[collections.Counter]] = {k: [] for k in fns}
    for f in fns.values():
        f(), f()
    for _ in range(runs):
        for k, f in fns.items():
            out = collections.Counter()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as p:
                t = time.perf_counter()
                f()
                out["wall"] = 1e3 * (time.perf_counter() - t)
            for e in p.events():
                if e.cpu_parent is not None or not e.name.startswith("aten::"):
                    continue
                kind = "rest"
                if e.name in ("aten::conv2d", "aten::convolution", "aten::_convolution"):
                    kind = "depthwise conv" if _is_depthwise(e.input_shapes[1]) else "other conv"
                out[kind] += e.cpu_time_total / 1e3
                out["calls"] += 1
                out[f"{kind} calls"] += 1
            out["outside"] = out["wall"] - sum(out[k] for k in ("depthwise conv", "other conv", "rest"))
            per[k].append(out)
    return {k: {key: statistics.median(c[key] for c in runs_) for key in set().union(*runs_)}
            for k, runs_ in per.items()}


def _group(name, shape, big, variants, quick, notes) -> tuple[list[list[str]], list[list[str]], list[dict]]:
    models = _variants(name, shape, variants, quick)
    nets = {k: deployable(m, shape) for k, m in models.items()}  # the PyTorch forms; ONNX's are exported
    prof = {k: profile(m, shape) for k, m in nets.items()}
    base = next(iter(nets))
    rows, where, eager_where, results = [], [], [], []
    tmp = Path(tempfile.mkdtemp(prefix="bench_deploy."))
    paths = {}
    for i, k in enumerate(models):
        paths[k] = tmp / f"{i}.onnx"
        export_onnx(models[k], paths[k], shape)
    batches = (1, 2) if quick else (1, big)
    repeats = 3 if quick else (30 if shape[1] < 100 else 10)
    for threads in (1,) if quick else THREADS:
        for batch in batches:
            x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0))
            lat = {}
            with torch_threads(threads):
                # one runtime family at a time, its variants interleaved: idle threads of ONNX Runtime
                # and OpenMP spin after each call and would slow down another runtime called next
                groups = [{(k, r): _fn(r, net, x) for k, net in nets.items() for r in EAGER}]
                ort_fns = {}
                for k in nets:
                    sess = onnx_session(paths[k], threads)
                    feed = {sess.get_inputs()[0].name: x.numpy()}
                    ort_fns[(k, "onnxruntime")] = (lambda s=sess, f=feed: s.run(None, f))
                groups.append(ort_fns)
                if name in COMPILE and threads == 1 and not quick:
                    groups.append({(k, "torch-compile"): _fn("torch-compile", net, x) for k, net in nets.items()})
                for fns in groups:
                    lat.update(measure(fns, repeats=repeats, warmup=2, max_seconds=60 if not quick else 5))
                    fns.clear()
            for k in nets:
                best = min(EAGER, key=lambda r: lat[(k, r)].median)
                best_base = min(EAGER, key=lambda r: lat[(base, r)].median)
                eager, eager_base = lat[(k, best)], lat[(base, best_base)]
                ort, ort_base = lat[(k, "onnxruntime")].median, lat[(base, "onnxruntime")].median
                fr = prof[k].flops / prof[base].flops
                # paired rounds (the eager calls were interleaved): is the variant slower than the base?
                slower = latency_ratio(eager, eager_base, "no_greater")
                res = dict(model=name, variant=k, batch=batch, threads=threads, flop_ratio=fr,
                           eager_ratio=math.exp(slower.mean), ort_ratio=ort / ort_base,
                           eager_slower=slower.held is False, eager_ci=(math.exp(slower.lo), math.exp(slower.hi)))
                res["layout"] = best
                results.append(res)
                goal = ""
                if k != base and threads == 1:
                    goal = ("met" if res["ort_ratio"] <= ORT_GOAL * fr else "**not met**") + " / " + (
                        "**not met**" if res["eager_slower"] else "met" if res["eager_ratio"] <= 1
                        else "met (within noise)")
                ci = f" ({res['eager_ci'][0]:.2f}-{res['eager_ci'][1]:.2f})" if k != base else ""
                rows.append([name, k, batch, threads, f"{prof[k].params / 1e6:.2f}", f"{prof[k].flops / 1e6:,.1f}",
                             f"{fr:.3f}", *(str(lat[(k, r)]) if (k, r) in lat else "-"
                                            for r in ("torch", "torch-cl", "torch-compile", "onnxruntime")),
                             f"{res['eager_ratio']:.2f}{ci}", f"{res['ort_ratio']:.3f}",
                             f"{res['ort_ratio'] / fr:.2f}" if k != base else "", goal])
    eager_where = _where_eager(name, nets, results, shape, quick)
    base_total, profiled = {}, {}
    for batch in batches:
        profiled[batch] = _profile_ort(paths, torch.randn(batch, *shape), 3 if quick else (20 if shape[1] < 100 else 5))
    for k in nets:  # base first
        for batch in batches:
            agg = profiled[batch][k]
            total = sum(v[0] for v in agg.values())
            ftotal = sum(v[1] for v in agg.values()) or 1
            base_total.setdefault(batch, total)
            dw, dwf, dwb, dwc = agg.get("depthwise conv", [0.0] * 4)
            conv, convf = agg.get("other conv", [0.0] * 4)[:2]
            fr = prof[k].flops / prof[base].flops
            free = (total - dw) / base_total[batch]  # the latency ratio if depthwise convs took no time
            copy_speed = (total - dw + dwc) / base_total[batch]  # ... if they moved their bytes as fast as a copy
            for res in results:  # the profile (1 thread) beside the goal it explains
                if (res["variant"], res["batch"], res["threads"]) == (k, batch, 1):
                    res.update(free=free, copy_speed=copy_speed, kernels=total / base_total[batch])
            where.append([name, k, batch, f"{total / 1e3:.3f}", f"{dw / 1e3:.3f}", f"{100 * dw / total:.0f} %",
                          f"{100 * dwf / ftotal:.0f} %", f"{dwf / dw / 1e3:.1f}" if dw else "",
                          f"{conv / 1e3:.3f}", f"{convf / conv / 1e3:.1f}" if conv else "",
                          f"{(total - dw - conv) / 1e3:.3f}",
                          f"{dwb / dw / 1e3:.1f} ({dwb / dwc / 1e3:.1f})" if dw and dwc else "",
                          f"{total / base_total[batch]:.3f}" if k != base else "",
                          *(f"{r:.3f} ({'within' if r <= ORT_GOAL * fr else '**beyond**'} {ORT_GOAL * fr:.3f})"
                            if k != base else "" for r in (free, copy_speed))])
    return rows, where, eager_where, results


def _where_eager(name, nets, results, shape, quick) -> list[list[str]]:
    """The eager profile (:func:`_profile_eager`, 1 thread, each variant in its better layout of the timed
    rows) of every variant of one model at each batch, beside the regular network's, as table rows; each
    result (1 thread) gets the profiled ratios its eager goal is judged against (``e_free``: depthwise convs
    taking no time, ``e_copy``: taking a copy's time, ``e_ops``: the aten ops' time, ``e_wall``: as profiled)."""
    rows, base = [], next(iter(nets))
    for batch in sorted({r["batch"] for r in results if r["threads"] == 1}):
        x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0))
        runs = 3 if quick else (20 if shape[1] < 100 else 5)
        timed = {r["variant"]: r for r in results if r["threads"] == 1 and r["batch"] == batch}
        with torch_threads(1):
            profiled = _profile_eager({k: _fn(r["layout"], nets[k], x) for k, r in timed.items()}, runs)
            prof = {k: (r, profiled[k], _depthwise_copy_ms(nets[k], x)) for k, r in timed.items()}

        def op_ms(p):
            return sum(p.get(kind, 0.0) for kind in ("depthwise conv", "other conv", "rest"))
        ops0 = op_ms(prof[base][1])
        for k, (res, p, copy_ms) in prof.items():
            dw, ops = p.get("depthwise conv", 0.0), op_ms(p)
            if k != base:
                res.update(e_free=(ops - dw) / ops0, e_copy=(ops - dw + copy_ms) / ops0, e_ops=ops / ops0,
                           e_wall=p["wall"] / prof[base][1]["wall"])
            rows.append([name, k, batch, res["layout"], f"{p['wall']:.3f}", f"{dw:.3f}",
                         f"{p.get('other conv', 0.0):.3f}", f"{p.get('rest', 0.0):.3f}", f"{p['outside']:.3f}",
                         f"{p['calls']:.0f}",
                         f"{1e3 * dw / p['depthwise conv calls']:.0f} ({1e3 * copy_ms / p['depthwise conv calls']:.1f})"
                         if dw else "",
                         *(f"{v:.3f}" + (f" ({'within' if v <= 1 else '**beyond**'} 1)" if key != "e_wall" else "")
                           if k != base else "" for key, v in (
                               ("e_wall", res.get("e_wall", 0)), ("e_ops", res.get("e_ops", 0)),
                               ("e_free", res.get("e_free", 0)), ("e_copy", res.get("e_copy", 0))))])
    return rows


def _eager_ops(quick: bool) -> list[list[str]]:
    """Eager per-call cost at batch 1, 1 thread: a dense 3x3 conv against its separable parts at
    ResNet-20's and ResNet-50's shapes, per layout, and the cost of one nn.Module call."""
    rows = []
    shapes = [(16, 32), (64, 8)] if quick else [(16, 32), (32, 16), (64, 8), (128, 28)]
    with torch_threads(1), torch.inference_mode():
        for c, h in shapes:
            g = torch.Generator().manual_seed(0)
            convs = {"dense 3x3": torch.nn.Conv2d(c, c, 3, padding=1, bias=False),
                     "depthwise 3x3": torch.nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False),
                     "pointwise 1x1": torch.nn.Conv2d(c, c, 1, bias=False)}
            fns = {}
            for layout in ("NCHW", "channels_last"):
                x = torch.randn(1, c, h, h, generator=g)
                for k, conv in convs.items():
                    fns[(k, layout)] = _fn("torch-cl" if layout == "channels_last" else "torch", conv.eval(), x)
            lat = measure(fns, repeats=50 if quick else 300, warmup=10)
            for k, conv in convs.items():
                flops = 2 * conv.weight.numel() * h * h
                rows.append([f"{c} x {h} x {h}", k, f"{flops / 1e6:.2f}",
                             *(f"{lat[(k, lay)].median * 1e3:.1f} us ({flops / lat[(k, lay)].median / 1e6:.1f})"
                               for lay in ("NCHW", "channels_last"))])
        ident, x = torch.nn.Identity(), torch.randn(1)
        call = measure({"m": lambda: ident(x)}, repeats=50 if quick else 1000, warmup=10)["m"]
        rows.append(["any", "nn.Module call (Identity)", "0", f"{call.median * 1e3:.1f} us", ""])
    return rows


#: The ResNet-20 variants whose modules have deploy forms (multiplier-m DSC, b-blueprint BSConv-U, the zoo's
#: option-A shortcut and separable blocks), measured as built against their deploy forms.
FORMS = [(f"dsc energy {ENERGY}", dict(to="dsc", energy=ENERGY)),
         (f"bsconv_u energy {ENERGY}", dict(to="bsconv_u", energy=ENERGY)), ("zoo conv=dsc", "dsc")]


def _ort_as_built(net: torch.nn.Module, x: torch.Tensor) -> Callable[[], object]:
    """ONNX Runtime (1 thread) on ``net`` exported with its modules as they are (``export_onnx(...,
    forms=False)``: verified against torch like every export)."""
    path = Path(tempfile.mkdtemp(prefix="bench_deploy.")) / "as_built.onnx"
    export_onnx(net, path, tuple(x.shape[1:]), batch=x.shape[0], forms=False)
    sess = onnx_session(path, 1)
    feed = {sess.get_inputs()[0].name: x.numpy()}
    return lambda: sess.run(None, feed)


def _forms(quick: bool) -> list[list[str]]:
    """Each of :data:`FORMS` as built (eval, BatchNorm folded: ``deployable`` without an input shape) against
    its deploy forms (``deployable`` with one: PyTorch's, and in ONNX Runtime the ONNX forms, and PyTorch's
    exported as they are), interleaved, per runtime and batch at 1 thread: medians and the forms' latency
    ratio with its paired 95 % interval over the rounds."""
    shape = (3, 16, 16) if quick else (3, 32, 32)
    rows = []
    for label, net in _variants("resnet20", shape, FORMS, quick).items():
        built, forms = deployable(net), deployable(net, shape)
        for batch in (1, 2) if quick else (1, 64):
            x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0))
            with torch_threads(1):
                timed = {runtime: {"built": _fn(runtime, built, x), "forms": _fn(runtime, forms, x)}
                         for runtime in ("torch", "torch-cl")}
                timed["onnxruntime"] = {"built": _ort_as_built(built, x), "forms": _fn("onnxruntime", net, x)}
                timed["onnxruntime, PyTorch's forms"] = {"built": timed["onnxruntime"]["built"],
                                                         "forms": _ort_as_built(forms, x)}
                for runtime, fns in timed.items():
                    lat = measure(fns, repeats=3 if quick else 30, warmup=2, max_seconds=5 if quick else 60)
                    c = latency_ratio(lat["forms"], lat["built"])
                    rows.append([label, str(batch), runtime, str(lat["built"]), str(lat["forms"]),
                                 f"{lat['forms'].median / lat['built'].median:.2f} "
                                 f"({math.exp(c.lo):.2f}-{math.exp(c.hi):.2f})"])
    return rows


#: what limits a row that misses the ONNX Runtime goal, by its profile (the first that applies)
LIMITS = (
    ("the other kernels alone miss it (beyond without depthwise)", "free"),
    ("no depthwise kernel that moves its bytes at copy speed reaches it (beyond at copy speed)", "copy_speed"),
    ("ONNX Runtime's depthwise kernel, slower than a copy of its bytes, misses it (within at copy speed)",
     "kernels"),
    ("the profiled kernel time meets it (the miss lies outside the kernels: session overhead, or noise)", None),
)
#: the same for a row that misses the eager goal (ratios of profiled aten-op time to the regular network's)
EAGER_LIMITS = (
    ("the other ops alone are slower than the regular network (beyond without depthwise: pointwise convs, "
     "the calls' fixed cost, copies)", "e_free"),
    ("no depthwise kernel that moves its bytes at copy speed reaches it (beyond at copy speed)", "e_copy"),
    ("PyTorch's depthwise conv calls, slower than a copy of their bytes (at batch 1 their fixed cost), miss it "
     "(within at copy speed)", "e_ops"),
    ("the aten ops' time meets it (the miss lies outside them: Python and module calls, or noise)", None),
)


def _limits(sep: list[dict], runtime: str, limits, missed, goal, needs: str) -> str:
    """What limits each separable row (1 thread) that misses ``runtime``'s goal (``missed(row)``), from its
    profile (rows that have ``needs``): the first of ``limits`` (label, profiled ratio) whose ratio is above
    ``goal(row)`` names the limit."""
    kinds: dict[str, list[dict]] = {what: [] for what, _ in limits}
    for r in sep:
        if missed(r) and needs in r:
            kinds[next(what for what, key in limits if key is None or r[key] > goal(r))].append(r)
    n = sum(len(rows) for rows in kinds.values())

    def named(rows):
        return ", ".join(f"{r['model']} {r['variant']} batch {r['batch']}" for r in rows)
    parts = [f"{what}: {len(rows)} ({named(rows)})" for what, rows in kinds.items() if rows]
    return (f"**What limits the {n} rows (1 thread) that miss the {runtime} goal**, by their profile: "
            + "; ".join(parts) + "." if n else f"Every separable row (1 thread) meets the {runtime} goal.")


#: (model, input, batches, eager runtimes) measured again in fresh processes, with and without the allocator tuned
ALLOC = [("resnet20", (3, 32, 32), (1, 64), EAGER), ("resnet50", (3, 224, 224), (16,), ("torch-cl",))]


def _eager_alloc(quick: bool) -> list[dict]:
    """The eager rows of :data:`ALLOC` (1 thread; every variant of :data:`GROUPS`; the layouts interleaved):
    per variant, the better layout's median and its latency ratio to the regular network's better one
    (paired, 95 %). Run by :func:`_alloc_in_subprocess` in a fresh process."""
    out = []
    for name, shape, batches, layouts in ALLOC[:1] if quick else ALLOC:
        variants = next(v for n, _, _, v in GROUPS if n == name)
        if quick:
            shape, batches, variants = (shape[0], 16, 16), (1, 2), variants[:3]
        nets = {k: deployable(m, shape) for k, m in _variants(name, shape, variants, quick).items()}
        base = next(iter(nets))
        for batch in batches:
            x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0))
            with torch_threads(1):
                fns = {(k, r): _fn(r, net, x) for k, net in nets.items() for r in layouts}
                lat = measure(fns, repeats=3 if quick else (30 if shape[1] < 100 else 6), warmup=2,
                              max_seconds=5 if quick else 120)
            best0 = min(layouts, key=lambda r: lat[(base, r)].median)
            for k in nets:
                best = min(layouts, key=lambda r: lat[(k, r)].median)
                c = latency_ratio(lat[(k, best)], lat[(base, best0)], "no_greater")
                out.append(dict(model=name, variant=k, batch=batch, layout=best, median=lat[(k, best)].median,
                                ratio=math.exp(c.mean), lo=math.exp(c.lo), hi=math.exp(c.hi), slower=c.held is False))
    return out


def _alloc_in_subprocess(quick: bool, tuned: bool) -> list[dict] | None:
    """:func:`_eager_alloc` in a fresh process (``python -m benchmarks.bench_deploy``), which first calls
    :func:`sepconv.runtime.tune_allocator` when ``tuned``: the allocator's state is per process (and the
    tuning cannot be undone), so both are measured alike, each from a clean start. ``None`` when that process
    fails (or glibc's mallopt is missing for ``tuned``)."""
    args = [sys.executable, "-m", "benchmarks.bench_deploy", "--alloc"] + ["--quick"] * quick + ["--tuned"] * tuned
    r = subprocess.run(args, capture_output=True, text=True, timeout=3600)
    try:
        return json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None


def _alloc_rows(quick: bool) -> tuple[list[list[str]], str]:
    """The table comparing eager ratios with glibc's default allocator and with it tuned, and its summary."""
    runs = {tuned: _alloc_in_subprocess(quick, tuned) for tuned in (False, True)}
    if runs[True] is None or runs[False] is None:
        return [], "(the fresh-process measurement failed, or glibc's mallopt is not available here)"
    rows = []
    for a, b in zip(runs[False], runs[True]):
        sep = a["variant"] not in ("regular", "published (separable)")
        rows.append([a["model"], a["variant"], a["batch"], *(
            f"{r['median']:.3g} ms ({r['layout']})" for r in (a, b)), *(
            (f"{r['ratio']:.2f} ({r['lo']:.2f}-{r['hi']:.2f})" + (" **slower**" if r["slower"] else ""))
            if sep else "1.00" for r in (a, b))])
    sep = [(a, b) for a, b in zip(runs[False], runs[True]) if a["variant"] not in ("regular", "published (separable)")]
    met = [sum(not r[i]["slower"] for r in sep) for i in (0, 1)]
    return rows, (f"**Eager goal in fresh processes (never slower than regular, better layout, 1 thread):** met by "
                  f"{met[0]} of {len(sep)} rows with glibc's default allocator, {met[1]} of {len(sep)} with it tuned.")


def run(quick: bool) -> str:
    groups = [(n, (s[0], 16, 16) if quick else s, b, v[:3] if quick else v) for n, s, b, v in GROUPS]
    rows, where, eager_where, results, notes = [], [], [], [], []
    for name, shape, big, variants in groups:
        r, w, e, res = _group(name, shape, big, variants, quick, notes)
        rows += r
        where += w
        eager_where += e
        results += res
    sep = [r for r in results if r["threads"] == 1 and r["variant"] not in ("regular", "published (separable)")]
    alloc_rows, alloc_summary = _alloc_rows(quick)
    ort_met = [r for r in sep if r["ort_ratio"] <= ORT_GOAL * r["flop_ratio"]]
    eager_met = [r for r in sep if not r["eager_slower"]]
    worst = max(sep, key=lambda r: r["ort_ratio"] / r["flop_ratio"])
    worst_eager = max(sep, key=lambda r: r["eager_ratio"])
    head = ["model", "variant", "batch", "threads", "params (M)", "MFLOPs", "FLOP ratio", "torch ms",
            "torch-cl ms", "torch.compile ms", "onnxruntime ms", "eager ratio (best layout)", "ORT ratio",
            "ORT ratio / FLOP ratio", "goal: ORT / eager"]
    text = [
        "Median latency (quartiles) of one forward pass of the deployable model (eval, BatchNorm folded). "
        "Ratios are against the first row of the same model, batch and threads: eager ratio = the better of "
        "torch and torch-cl (by median) against the regular network's better one, the geometric mean of the "
        "latency ratio over the interleaved rounds with its paired 95 % interval (t-interval of the mean log "
        "ratio); ORT ratio = ratio of the ONNX Runtime medians. Each "
        "runtime is timed alone, its variants interleaved. "
        f"The energy-chosen rank keeps {ENERGY} of each layer's spectral energy of the initial weights. "
        "MobileNetV2 has no regular-conv flavour (the zoo's regular and dsc flavours are both the published, "
        "separable network): its rows show a depthwise-heavy network and the conversion of its stem. "
        "torch.compile (inductor, compile time excluded) is measured for ResNet-20 at 1 thread only, as one more "
        "column: it does not enter the eager ratio.",
        "",
        md_table(head, rows),
        "",
        f"**Goal, ONNX Runtime (1 thread, latency ratio <= {ORT_GOAL}x FLOP ratio):** met by {len(ort_met)} of "
        f"{len(sep)} separable rows; the farthest: {worst['model']} {worst['variant']} at batch {worst['batch']}, "
        f"{worst['ort_ratio']:.3f} against FLOP ratio {worst['flop_ratio']:.3f} "
        f"({worst['ort_ratio'] / worst['flop_ratio']:.2f}x).",
        f"**Goal, PyTorch eager (never slower than regular, best layout, 1 thread; slower = the paired 95 % "
        f"interval of the latency ratio over the interleaved rounds lies above 1):** met by {len(eager_met)} of "
        f"{len(sep)}; the slowest: {worst_eager['model']} {worst_eager['variant']} at batch {worst_eager['batch']}, "
        f"{worst_eager['eager_ratio']:.2f}x.",
        "",
        "### Deploy forms against the modules as built (ResNet-20, 1 thread)",
        "",
        "The same network, BatchNorm folded, once as built and once with every module that has an exact deploy "
        "form replaced by it (`sepconv.deploy.deployable` with the input shape). For PyTorch: a multiplier-m "
        "DSC's depthwise as m input copies into a multiplier-1 depthwise, a b-blueprint BSConv-U's grouped conv "
        "as a multiplier-1 depthwise on bC channels and a slice sum; for ONNX (`for_onnx=True`, what "
        "`export_onnx` exports): either block as m or b branches, each a multiplier-1 depthwise and a pointwise "
        "conv, summed; for both, the option-A shortcut as a fixed strided 1x1 conv. In ONNX Runtime 'as built' is "
        "the model exported as built (`export_onnx(..., forms=False)`), and a second row times "
        "PyTorch's forms exported as they are. Median (quartiles) ms; ratio = forms / as built with its paired "
        "95 % interval over the interleaved rounds. The rows above all use the deploy forms.",
        "",
        md_table(["variant", "batch", "runtime", "as built ms", "deploy forms ms", "ratio (95 % interval)"],
                 _forms(quick)),
        "",
        "### Where the time goes (ONNX Runtime, 1 thread, per-node profile)",
        "",
        "ONNX Runtime's own per-node profile of the optimized graph, per run: kernel time in all, in depthwise "
        "convs (their share of the time and of the FLOPs, and the GFLOP/s they reach), in the other convs "
        "(dense and pointwise, fused with their adds and activations) and in the rest. Depthwise convs do "
        "little arithmetic per byte they move: where their share of the time exceeds their share of the FLOPs, "
        "memory traffic and per-node overhead, not arithmetic, set the latency. Depthwise GB/s: the bytes a "
        "depthwise conv must read and write at least (its input and output, float32) per second of its kernel "
        "time, beside the rate at which one thread copies the same bytes on this machine (`np.copyto` on "
        "cache-warm buffers, the call's fixed cost taken out): how far the depthwise kernel is from moving "
        "memory as fast as the machine can. The last three columns are ratios of profiled kernel time to the "
        "regular network's: as measured; with the depthwise convs' time taken out, a bound no faster "
        "depthwise kernel can beat while the other kernels stay as they are; and with each depthwise conv "
        "taking as long as a copy of its bytes, what an (unfused) depthwise kernel running at copy speed "
        "would give. Against the goal (1.25x the FLOP ratio): **beyond** without depthwise means no depthwise "
        "kernel can reach the goal: the other convs alone (pointwise convs at small channel counts reach "
        "fewer GFLOP/s than the dense 3x3 convs they replace) take longer; **beyond** at copy speed means no "
        "depthwise kernel that moves its bytes can; **within** at copy speed means ONNX Runtime's depthwise "
        "kernel, slower than a copy of its bytes, is what misses the goal.",
        "",
        _limits(sep, "ONNX Runtime", LIMITS, lambda r: r["ort_ratio"] > ORT_GOAL * r["flop_ratio"],
                lambda r: ORT_GOAL * r["flop_ratio"], "free"),
        "",
        md_table(["model", "variant", "batch", "kernel ms", "depthwise ms", "depthwise time share",
                  "depthwise FLOP share", "depthwise GFLOP/s", "other conv ms", "other conv GFLOP/s", "rest ms",
                  "depthwise GB/s (a copy's)", "kernel ratio", "kernel ratio without depthwise (goal)",
                  "kernel ratio, depthwise at copy speed (goal)"], where),
        "",
        "### Where the time goes (PyTorch eager, 1 thread, torch.profiler)",
        "",
        "PyTorch's own profile (`torch.profiler`, CPU) of each variant in the layout it ran fastest in above, "
        "the variants interleaved (one profiled call of each per round), medians over the rounds: the call's "
        "wall time; time in the top-level aten ops, split into depthwise convs, other "
        "convs (dense and pointwise) and the rest (adds, activations, input copies, slice sums); time outside "
        "any aten op (Python, module calls, the profiler's own cost); the top-level op calls; and the time "
        "of one depthwise conv call beside the time one thread takes to copy the bytes it must read and write at "
        "least (as in the ONNX Runtime profile): where a call takes far longer than its copy at small shapes, "
        "its fixed cost (dispatch, oneDNN primitive setup, output allocation) sets it. The last four "
        "columns are ratios to the regular network's profile: wall time; "
        "aten-op time; aten-op time without the depthwise convs (a bound no faster depthwise kernel can beat "
        "while the other ops stay as they are); and with each depthwise conv taking a copy's time. Against the "
        "eager goal (a ratio of at most 1): **beyond** without depthwise means the other ops alone are slower "
        "than the regular network's (pointwise convs at small channel counts, each call's fixed cost, copies); "
        "**beyond** at copy speed means no depthwise kernel that moves its bytes can reach the goal; **within** "
        "at copy speed means PyTorch's depthwise kernel, slower than a copy of its bytes, is what misses it.",
        "",
        _limits(sep, "PyTorch eager", EAGER_LIMITS, lambda r: r["eager_slower"], lambda r: 1.0, "e_free"),
        "",
        md_table(["model", "variant", "batch", "layout", "wall ms", "depthwise ms", "other conv ms", "rest ms",
                  "outside ops ms", "op calls",
                  "us per depthwise call (at copy speed)", "wall ratio", "op ratio (goal)",
                  "op ratio without depthwise (goal)", "op ratio, depthwise at copy speed (goal)"], eager_where),
        "",
        "### Where the time goes (PyTorch eager, batch 1, 1 thread, one conv per call)",
        "",
        "Median time of one conv call (GFLOP/s) at the shapes of ResNet-20's stages and a ResNet-50 stage. A "
        "separable layer costs a depthwise and a pointwise call, each paying PyTorch's fixed per-call cost "
        "(dispatch, oneDNN primitive setup, output allocation) plus a module call: at ResNet-20's small "
        "shapes that fixed cost, not arithmetic, sets the latency, and two calls cost about as much as the "
        "dense one they replace.",
        "",
        md_table(["C x H x W", "conv", "MFLOPs", "NCHW", "channels_last"], _eager_ops(quick)),
        "",
        "### PyTorch eager and the memory allocator (1 thread, fresh processes)",
        "",
        "The eager rows of ResNet-20 (both layouts) and ResNet-50 at batch 16 (channels_last) measured again, "
        "each in a fresh process, once with glibc's default allocator and once after "
        "`sepconv.runtime.tune_allocator()` (what `sepconv train`, `demo` and `latency` call at start: freed "
        "memory stays in the heap instead of being unmapped, so the next forward pass reuses it instead of "
        "page-faulting fresh pages). glibc serves every block above its mmap threshold (at most 32 MiB) with "
        "pages of its own and returns them on free; a network whose activations are large pays those page "
        "faults on every call, and a separable one, with its input copies and wider depthwise outputs, pays "
        "more. Median ms (the better layout) and the latency ratio to the regular network of the same process "
        "(paired over the interleaved rounds, 95 % interval; **slower**: the interval lies above 1). The two "
        "processes ran minutes apart: compare their ratios, each paired within its process, not their medians.",
        "",
        alloc_summary,
        "",
        md_table(["model", "variant", "batch", "default allocator", "tuned", "ratio, default (95 %)",
                  "ratio, tuned (95 %)"], alloc_rows),
    ]
    return "\n".join(text)


if __name__ == "__main__":  # python -m benchmarks.bench_deploy --alloc [--quick] [--tuned]: see _alloc_in_subprocess
    if "--tuned" in sys.argv and not tune_allocator():
        raise SystemExit(1)
    print(json.dumps(_eager_alloc("--quick" in sys.argv)))
