"""What every dataset is: :class:`ImageDataset`, the in-memory kind, labels and the fixed splits.

A dataset normalizes with fixed per-channel constants, ``(x / 255 - mean) / std``, and serves
batches by index (:meth:`ImageDataset.get_batch`, the training engine's fast path) or one sample
at a time (``__getitem__``, for a ``DataLoader``). :func:`stratified_split` is the fixed 80/20
per-class split of datasets that ship without one (see :mod:`sepconv.data`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import DataError
from ..guard import check_memory, tensor_bytes
from .transforms import resize_uint8

__all__ = ["SPLITS", "SPLIT_SEED", "TEST_FRACTION", "ImageDataset", "TensorImageDataset", "check_labels",
           "in_memory_dataset", "stratified_split"]

SPLITS = ("train", "test")
TEST_FRACTION = 0.2
SPLIT_SEED = 0


class ImageDataset(Dataset):
    """A labelled image dataset: metadata, normalization and batched access.

    Subclasses provide :meth:`pixels` (uint8 NCHW images at the final size). ``get_batch``
    is the fast path used by the training engine; ``__getitem__`` serves a ``DataLoader``.
    """

    def __init__(self, *, name: str, split: str, classes: Sequence[str], in_chans: int,
                 image_size: tuple[int, int], targets: Tensor, mean: Sequence[float],
                 std: Sequence[float], flip_ok: bool) -> None:
        self.name = name
        self.split = split
        self.classes = [str(c) for c in classes]
        self.in_chans = in_chans
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.targets = targets.to(torch.int64)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.flip_ok = flip_ok
        self._mean = torch.tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1)
        self._std = torch.tensor(self.std, dtype=torch.float32).view(1, -1, 1, 1)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.targets)

    def __repr__(self) -> str:
        c, (h, w) = self.in_chans, self.image_size
        return (f"{type(self).__name__}({self.name!r}, split={self.split!r}, {len(self)} images "
                f"{c}x{h}x{w}, {self.num_classes} classes)")

    def pixels(self, indices: Tensor) -> Tensor:
        """uint8 images ``(len(indices), C, H, W)`` at the final size, before normalization."""
        raise NotImplementedError

    def normalize(self, images: Tensor) -> Tensor:
        """float32 ``(x / 255 - mean) / std`` of uint8 NCHW ``images``."""
        return (images.float() / 255 - self._mean) / self._std

    def get_batch(self, indices: Tensor | Sequence[int]) -> tuple[Tensor, Tensor]:
        """``(x, y)``: normalized float32 NCHW images and int64 labels of ``indices``; refused
        (:class:`~sepconv.errors.ResourceError`) when the batch would not fit the memory budget."""
        indices = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        shape = (len(indices), self.in_chans, *self.image_size)
        check_memory(tensor_bytes(shape, torch.uint8) + 2 * tensor_bytes(shape, torch.float32),
                     f"{self.name}: a batch of {shape[0]} images of {'x'.join(map(str, shape[1:]))}")
        return self.normalize(self.pixels(indices)), self.targets[indices]

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} images")
        x, y = self.get_batch(torch.tensor([i]))
        return x[0], int(y[0])


class TensorImageDataset(ImageDataset):
    """A dataset held in memory: ``images`` is uint8 ``(N, C, H, W)`` at the final size."""

    def __init__(self, images: Tensor, targets: Tensor, **meta: Any) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4 or len(images) != len(targets):
            raise DataError(f"{meta.get('name')}: images must be uint8 NCHW with one label each")
        self.images = images.contiguous()
        super().__init__(in_chans=images.shape[1], image_size=tuple(images.shape[2:]),
                         targets=targets, **meta)

    def pixels(self, indices: Tensor) -> Tensor:
        return self.images[indices]


def in_memory_dataset(name: str, split: str, images: Tensor, targets: Tensor, classes: Sequence[str],
                      size: int | None, mean: Sequence[float], std: Sequence[float],
                      flip_ok: bool) -> TensorImageDataset:
    """A :class:`TensorImageDataset` of uint8 NCHW ``images`` resized to ``size`` (``None``: as they are)."""
    return TensorImageDataset(resize_uint8(images, size, what=f"{name}: {len(images)} images"), targets,
                              name=name, split=split, classes=classes, mean=mean, std=std, flip_ok=flip_ok)


def stratified_split(targets: np.ndarray, split: str, test_fraction: float = TEST_FRACTION,
                     seed: int = SPLIT_SEED) -> np.ndarray:
    """Sorted indices of ``split`` in the fixed per-class split described in :mod:`sepconv.data`."""
    rng = np.random.RandomState(seed)
    is_test = np.zeros(len(targets), dtype=bool)
    for c in np.unique(targets):
        members = rng.permutation(np.flatnonzero(targets == c))
        n_test = int(test_fraction * len(members) + 0.5)
        if len(members) >= 2:
            n_test = min(max(n_test, 1), len(members) - 1)
        is_test[members[:n_test]] = True
    return np.flatnonzero(is_test if split == "test" else ~is_test)


def check_labels(path: Path, labels: np.ndarray, k: int) -> None:
    """:class:`DataError` naming ``path`` unless every label lies in ``0..k-1``."""
    if labels.size and (labels.min() < 0 or labels.max() >= k):
        raise DataError(f"{path}: labels must lie in 0..{k - 1}, found "
                        f"{labels.min()}..{labels.max()}")
