"""scikit-learn's bundled digits (Alpaydin & Kaynak, 1998): 1797 8x8 images, no files needed.

The default dataset: always there, small enough for a demo on a laptop. It ships without a test
split, so it gets the fixed 80/20 per-class split of :func:`~sepconv.data.base.stratified_split`,
and without published statistics, so it is normalized by those of its own train split at the
requested size (float64 mean and population standard deviation: computed, deterministic).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..guard import check_memory
from .base import TensorImageDataset, stratified_split
from .registry import register_dataset
from .transforms import resize_plan, resize_uint8

__all__: list[str] = []


@lru_cache(maxsize=1)
def _digits_uint8() -> tuple[Tensor, np.ndarray]:
    """scikit-learn's digits as uint8 (1797, 1, 8, 8) with 0..16 mapped onto 0..255."""
    # NB: imported here, not at the top: sklearn.datasets takes ~0.6 s to import and only digits needs it
    from sklearn.datasets import load_digits  # noqa: PLC0415

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    return torch.from_numpy(images[:, None]), bunch.target.astype(np.int64)


def _pixel_stats(images: Tensor) -> tuple[float, float]:
    """Mean and standard deviation (population) of ``images / 255`` in float64 (the sizes that
    reach here passed the memory check of :func:`_load_digits`)."""
    x = images.double() / 255
    return x.mean().item(), x.std(correction=0).item()


@register_dataset("digits", default_size=32, needs_root=False)
def _load_digits(root: Path | None, split: str, size: int) -> TensorImageDataset:
    images, targets = _digits_uint8()
    _, need = resize_plan(images.shape, size, 2048)
    check_memory(need, f"digits: {len(images)} images resized to {size}x{size}", hint="lower the image size")
    train_idx = torch.from_numpy(stratified_split(targets, "train"))
    idx = train_idx if split == "train" else torch.from_numpy(stratified_split(targets, split))
    train = resize_uint8(images[train_idx], size, what="digits")
    mean, std = _pixel_stats(train)
    chosen = train if split == "train" else resize_uint8(images[idx], size, what="digits")
    return TensorImageDataset(chosen, torch.from_numpy(targets)[idx], name="digits",
                              split=split, classes=[str(d) for d in range(10)], mean=(mean,),
                              std=(std,), flip_ok=False)
