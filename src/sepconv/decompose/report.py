"""The conversion report: what :func:`sepconv.decompose.convert` did to each layer, measured.

Per layer: its shape and geometry, the rank, the retained energy of its spectrum, parameters and
FLOPs before and after, the relative weight error and the output error -- on the calibration
patches when there is data (inputs from the converted prefix against the original network's
responses; ``local_error`` is the layer alone on the original inputs), else on one Gaussian
random input of the layer's size, at most :data:`RANDOM_INPUT_MAX` on a side (the layer alone).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from . import factor as fz
from .targets import ConversionTarget, conv_macs

__all__ = ["RANDOM_INPUT_MAX", "ConversionReport", "conversion_totals", "layer_record"]

#: Largest side of the Gaussian inputs on which data-free conversions measure the output error.
RANDOM_INPUT_MAX = 16


@dataclass
class ConversionReport:
    """What :func:`~sepconv.decompose.convert` did: one record per converted layer and whole-model totals.

    ``layers``: dicts with ``name, shape ("n x c x kh x kw"), geometry, rank, mid_channels,
    energy, params_before, params_after, flops_before, flops_after, weight_error,
    output_error, local_error, seconds``. ``totals``: ``params_before/after`` and
    ``flops_before/after`` of the whole model (:func:`sepconv.models.profile`), the sums over
    the converted layers (``layer_*``), ``mean_output_error``, ``mean_weight_error``,
    ``error_on`` ("calibration" or "random"), ``seconds``. ``settings``: the arguments.
    """

    layers: list[dict] = field(default_factory=list)
    totals: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"settings": dict(self.settings), "layers": [dict(r) for r in self.layers], "totals": dict(self.totals)}

    def table(self) -> str:
        """A fixed-width text table: one row per layer, then the totals."""
        header = ["layer", "shape", "geometry", "rank", "params", "MFLOPs", "w_err", "out_err", "time"]
        rows = []
        for r in self.layers:
            rank = str(r["rank"]) + (f"/{r['mid_channels']}" if r.get("mid_channels") else "")
            rows.append([r["name"], r["shape"], r["geometry"], rank,
                         f"{r['params_before']:,}->{r['params_after']:,}",
                         f"{_mflops(r['flops_before'])}->{_mflops(r['flops_after'])}",
                         f"{r['weight_error']:.4f}", f"{r['output_error']:.4f}", f"{r['seconds'] * 1e3:.0f} ms"])
        widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
        lines = ["  ".join(str(c).ljust(w) if i < 4 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                 .rstrip() for row in [header] + rows]
        t = self.totals
        lines.append("")
        lines.append(f"{len(self.layers)} layers converted to {self.settings.get('to')} "
                     f"({self.settings.get('method')}); model params {t['params_before']:,} -> {t['params_after']:,} "
                     f"({t['params_after'] / max(t['params_before'], 1):.3f}x), {_flops_change(t)}; "
                     f"mean output error {t['mean_output_error']:.4f} (on {t['error_on']} inputs); "
                     f"{t['seconds']:.2f} s")
        return "\n".join(lines)


def _mflops(v: int | None) -> str:
    return "?" if v is None else f"{v / 1e6:.2f}"


def _flops_change(t: dict) -> str:
    if t["flops_before"] is None:
        return "FLOPs unknown (no input size; pass input_size or data)"
    return (f"FLOPs {t['flops_before'] / 1e6:,.2f}M -> {t['flops_after'] / 1e6:,.2f}M "
            f"({t['flops_after'] / max(t['flops_before'], 1):.3f}x)")


def _geometry(conv: nn.Conv2d) -> str:
    def two(v):
        return str(v[0]) if isinstance(v, tuple) and v[0] == v[1] else str(v)
    pad = conv.padding if isinstance(conv.padding, str) else two(conv.padding)
    return f"s{two(conv.stride)} p{pad} d{two(conv.dilation)} {conv.padding_mode}"


# ----------------------------------------------------------------- one layer


@torch.no_grad()
def layer_record(target: ConversionTarget, conv: nn.Conv2d, in_shape: tuple | None, block: nn.Module, rank: int,
                 mid: int | None, px: Tensor | None, ph: Tensor | None) -> dict:
    """The report's record of ``conv`` converted into ``block`` (``in_shape``: the conv's input
    ``(C, H, W)`` in the model, ``None`` when unknown; ``px``/``ph``: its sampled calibration
    patches in the original and in the converted network, ``None`` without data)."""
    w = conv.weight.detach().to(torch.float64)
    a = target.dense_weight(block).detach().to(torch.float64)
    hw = in_shape[-2:] if in_shape is not None else None
    rec = {
        "shape": " x ".join(map(str, conv.weight.shape)), "geometry": _geometry(conv), "rank": rank,
        "mid_channels": mid, "energy": fz.retained_energy(target.spectrum(conv), rank),
        "params_before": sum(q.numel() for q in conv.parameters()),
        "params_after": sum(q.numel() for q in block.parameters()),
        "flops_before": 2 * conv_macs(conv, hw) if hw is not None else None,
        "flops_after": 2 * target.macs(conv, hw, rank, mid) if hw is not None else None,
        "weight_error": float(torch.linalg.norm(w - a) / torch.linalg.norm(w).clamp_min(1e-300)),
    }
    if px is None:
        rec.update(_random_input_error(conv, block, hw))
    else:
        rec.update(_patch_errors(target, conv, block, w, a, px, ph))
    return rec


def _random_input_error(conv: nn.Conv2d, block: nn.Module, hw: tuple | None) -> dict:
    """The layer alone on one Gaussian random input (seed 0) of its size, at most
    :data:`RANDOM_INPUT_MAX` on a side: ``output_error = ||block(x) - conv(x)|| / ||conv(x)||``."""
    g = torch.Generator(device=conv.weight.device).manual_seed(0)
    if hw is not None:
        size = [min(v, RANDOM_INPUT_MAX) for v in hw]
    else:  # input size unknown: the largest random input, or the smallest the kernel fits on
        size = [max(RANDOM_INPUT_MAX, d * (k - 1) + 1) for k, d in zip(conv.kernel_size, conv.dilation)]
    x = torch.randn(1, conv.in_channels, *size, generator=g, device=conv.weight.device, dtype=conv.weight.dtype)
    y = conv(x)
    return {"output_error": float(torch.linalg.norm(block(x) - y) / torch.linalg.norm(y).clamp_min(1e-30)),
            "local_error": None}


def _patch_errors(target: ConversionTarget, conv: nn.Conv2d, block: nn.Module, w: Tensor, a: Tensor, px: Tensor,
                  ph: Tensor) -> dict:
    """Relative output errors on the calibration patches (float64, im2col: ``y = x W^T + b``):
    ``output_error`` with the converted network's patches ``xh`` (``||xh A^T + b' - y|| / ||y||``),
    ``local_error`` with the original's ``x``."""
    n = w.shape[0]
    wf, af = w.reshape(n, -1), a.reshape(n, -1)
    b = conv.bias.detach().to(torch.float64) if conv.bias is not None else torch.zeros(n, dtype=torch.float64)
    bias = target.output_bias(block)
    bb = bias.detach().to(torch.float64) if bias is not None else torch.zeros(n, dtype=torch.float64)
    x, xh = px.to(torch.float64), ph.to(torch.float64)
    y = x @ wf.T + b
    norm = torch.linalg.norm(y).clamp_min(1e-30)
    return {"output_error": float(torch.linalg.norm(xh @ af.T + bb - y) / norm),
            "local_error": float(torch.linalg.norm(x @ af.T + bb - y) / norm)}


# ----------------------------------------------------------------- the whole model


def conversion_totals(records: list[dict], params_before: int, params_after: int, flops_before: int | None,
                      calibrated: bool, seconds: float) -> dict:
    """The report's ``totals`` from the per-layer ``records``: whole-model parameters and FLOPs
    (``flops_before`` from the probe, ``None`` when the input size is unknown; ``flops_after`` is
    it minus the converted layers' savings, which equals :func:`sepconv.models.profile` of the new
    model), the sums over the converted layers and the mean errors."""
    known = flops_before is not None
    layer_delta = sum(r["flops_before"] - r["flops_after"] for r in records) if known else None
    return {
        "layers": len(records),
        "params_before": params_before, "params_after": params_after,
        "flops_before": flops_before,
        "flops_after": flops_before - layer_delta if known else None,
        "layer_params_before": sum(r["params_before"] for r in records),
        "layer_params_after": sum(r["params_after"] for r in records),
        "layer_flops_before": sum(r["flops_before"] for r in records) if known else None,
        "layer_flops_after": sum(r["flops_after"] for r in records) if known else None,
        "mean_output_error": sum(r["output_error"] for r in records) / len(records),
        "mean_weight_error": sum(r["weight_error"] for r in records) / len(records),
        "error_on": "calibration" if calibrated else "random",
        "seconds": seconds,
    }
