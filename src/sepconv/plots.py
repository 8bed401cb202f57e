"""Figures: matplotlib on the Agg backend, saved atomically as PNG.

:func:`spectrum_plot` draws what ``sepconv spectrum --plot`` shows: the per-layer norms by method
and the singular value spectrum of one convolution (exact where the geometry allows it, else the
spectrum of its circulant majorant, an upper bound index by index; docs/spectral.md Sec. 1-2).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from .errors import ConfigError, ResourceError
from .files import atomic_path
from .spectral import (
    ConvSpec,
    LayerRecord,
    all_block_singular_values,
    layer_inputs,
    majorant_kernel,
    singular_values,
)

__all__ = ["figure", "spectrum_plot"]


@contextlib.contextmanager
def figure(path: str | os.PathLike, *subplots: int, figsize: tuple[float, float] = (6.4, 4.8),
           dpi: int = 130) -> Iterator[tuple]:
    """``with figure(path, 1, 2) as (fig, axes):`` draw, and the PNG is written atomically on exit
    (nothing is written if the block raises); the figure is closed either way."""
    # NB: pyplot takes ~0.4 s to import and only plotting needs it, so it is imported here.
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(*(subplots or (1, 1)), figsize=figsize)
    try:
        yield fig, axes
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi)
    finally:
        plt.close(fig)


def _largest_layer(records: Sequence[LayerRecord]) -> str | None:
    """The convolution with the largest norm (by ``exact`` if measured, else the first method)."""
    convs = [r for r in records if r.kind == "Conv2d"]
    if not convs:
        return None
    key = "exact" if "exact" in convs[0].values else next(iter(convs[0].values))
    return max(convs, key=lambda r: r.values[key]).name


def _layer_spectrum(model: nn.Module, shape: Sequence[int], layer: str) -> tuple[torch.Tensor, str, str]:
    """All singular values of ``layer`` (sorted as computed), what they are, and its geometry."""
    found = layer_inputs(model, shape).get(layer)
    if found is None or not isinstance(found[0], nn.Conv2d):
        raise ConfigError(f"--layer {layer!r}: no such Conv2d in the model")
    mod, in_shape = found
    w = mod.weight.detach().to(torch.float64)
    spec = ConvSpec.of(mod, in_shape[-2:])
    try:
        return singular_values(w, spec), "exact", spec.describe(mod.kernel_size)
    except (ConfigError, ResourceError):
        # NB: not circulant and too large for the dense operator: the circulant majorant's spectrum
        # dominates the layer's index by index, so the plot is an upper envelope, and says so.
        maj, kernel, grid = majorant_kernel(w, spec)
        sv = maj.factor * all_block_singular_values(kernel, grid)
        return sv, "circulant majorant (upper bound per index)", spec.describe(mod.kernel_size)


def spectrum_plot(path: str | os.PathLike, records: Sequence[LayerRecord], model: nn.Module,
                  shape: Sequence[int], layer: str | None = None) -> str:
    """Write a PNG: left, each layer's norm by method (log scale); right, the singular value
    spectrum of ``layer`` (default: the convolution with the largest norm). Returns the layer shown
    ("" when the model has no convolution)."""
    layer = layer if layer is not None else _largest_layer(records)
    with figure(path, 1, 2, figsize=(13, 4.5)) as (_, (ax1, ax2)):
        for m in (list(records[0].values) if records else []):
            ax1.plot(range(len(records)), [r.values[m] for r in records], marker="o", ms=3, label=m)
        ax1.set_xticks(range(len(records)), [r.name for r in records], rotation=90, fontsize=6)
        ax1.set_ylabel("spectral norm")
        ax1.set_yscale("log")
        ax1.set_title("per-layer norms by method")
        ax1.legend(fontsize=7)
        title = "no convolution to show"
        if layer is not None:
            sv, what, geometry = _layer_spectrum(model, shape, layer)
            ax2.semilogy(sv.numpy() if sv.numel() else [], lw=1)
            ax2.set_xlabel("index")
            ax2.set_ylabel("singular value")
            title = f"{layer}: {geometry}\n{what}"
        ax2.set_title(title, fontsize=8)
    return layer or ""
