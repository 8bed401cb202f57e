"""Batch transforms of uint8 and normalized NCHW images: the bounded resize, the training augmentation.

:func:`resize_uint8` brings a whole in-memory dataset to its final size once, in chunks whose
float32 working memory is bounded and checked against the budget first; :func:`augment_batch` is
the random translation and flip the training engine applies to each normalized batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError
from ..guard import check_memory

__all__ = ["augment_batch", "resize_plan", "resize_uint8"]

#: Float32 working memory a resize may use at once (the chunk of images shrinks to fit it).
_RESIZE_WORK = 256 << 20


def resize_plan(shape: Sequence[int], size: int, chunk: int) -> tuple[int, int]:
    """``(images per chunk, estimated peak bytes)`` of :func:`resize_uint8` on NCHW ``shape``: the
    uint8 result, and per chunk the float32 input, the separable pass between, the float32
    output and its uint8 copy (Python integers: no overflow, whatever ``size``)."""
    n, c, h, w = (int(s) for s in shape)
    per_image = 4 * c * (h * w + max(h, w) * size + size * size) + c * size * size
    chunk = max(1, min(chunk, _RESIZE_WORK // max(per_image, 1), n))
    return chunk, n * c * size * size + chunk * per_image


def resize_uint8(images: Tensor, size: int | None, chunk: int = 2048, what: str = "images") -> Tensor:
    """Bilinear (antialiased) resize of uint8 NCHW ``images`` to ``size x size``, rounded.

    The memory it needs (:func:`resize_plan`) is checked against the budget before anything is
    allocated; ``what`` names the images in the message."""
    if size is None or tuple(images.shape[2:]) == (size, size):
        return images
    chunk, need = resize_plan(images.shape, size, chunk)
    check_memory(need, f"{what} resized to {size}x{size}", hint="lower the image size")
    out = images.new_empty(len(images), images.shape[1], size, size)
    for i in range(0, len(images), chunk):
        out[i:i + chunk] = F.interpolate(images[i:i + chunk].float(), size=(size, size), mode="bilinear",
                                         align_corners=False, antialias=True).round_().clamp_(0, 255)
    return out



def augment_batch(x: Tensor, generator: torch.Generator, pad: int, flip: bool) -> Tensor:
    """Random ``pad``-pixel translation crop and optional horizontal flip of each sample.

    Each sample of ``x`` (N, C, H, W) is zero-padded by ``pad`` on every side (zero of the
    normalized batch, i.e. the dataset mean colour), cropped back to H x W at an offset drawn
    uniformly from ``0..2*pad`` in each direction, and mirrored left-right with probability
    1/2 if ``flip``. The draws (row offsets, column offsets, flips; N each, in that order)
    come from ``generator`` alone, so a seeded generator reproduces the batch exactly.
    Vectorised: two gathers (rows, then columns), no loop over samples.
    """
    if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
        raise ConfigError(f"augment_batch: pad must be a non-negative integer, got {pad!r}")
    if x.dim() != 4:
        raise ConfigError(f"augment_batch: expected an NCHW batch, got shape {tuple(x.shape)}")
    n, c, h, w = x.shape

    def draw(fn, *args) -> Tensor:
        return fn(*args, (n,), generator=generator, device=generator.device).to(x.device)

    zero = torch.zeros(n, dtype=torch.int64, device=x.device)
    dy, dx = (draw(torch.randint, 0, 2 * pad + 1), draw(torch.randint, 0, 2 * pad + 1)) \
        if pad else (zero, zero)
    cols = torch.arange(w, device=x.device).expand(n, w)
    if flip:
        cols = torch.where(draw(torch.rand)[:, None] < 0.5, cols.flip(1), cols)
    rows = dy[:, None] + torch.arange(h, device=x.device)                    # (N, H)
    cols = dx[:, None] + cols                                                 # (N, W)
    padded = F.pad(x, (pad, pad, pad, pad))
    padded = padded.gather(2, rows[:, None, :, None].expand(n, c, h, w + 2 * pad))
    return padded.gather(3, cols[:, None, None, :].expand(n, c, h, w))

