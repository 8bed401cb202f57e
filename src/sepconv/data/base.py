"""What every dataset is: :class:`ImageDataset`, the in-memory kind, labels and the fixed splits.

A dataset normalizes with fixed per-channel constants, ``(x / 255 - mean) / std``, and serves
batches by index (:meth:`ImageDataset.get_batch`, the training engine's fast path) or one sample
at a time (``__getitem__``, for a ``DataLoader``). :func:`stratified_split` is the fixed 80/20
per-class split of datasets that ship without one, :func:`kfold_indices` a fold of the fixed
stratified k-fold partition, and :class:`SubsetDataset` some images of pooled datasets, read
from them on demand (see :mod:`sepconv.data`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import ConfigError, DataError
from ..guard import check_memory, tensor_bytes
from .transforms import resize_uint8

__all__ = ["SPLITS", "SPLIT_SEED", "TEST_FRACTION", "ImageDataset", "SubsetDataset", "TensorImageDataset",
           "check_folds", "check_labels", "in_memory_dataset", "kfold_indices", "stratified_split"]

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


class SubsetDataset(ImageDataset):
    """The images ``indices`` of the concatenation of ``parents`` (in the order given), read from the
    parents' :meth:`~ImageDataset.pixels` on demand: nothing of the pool is copied, only index arrays
    and the labels are held, so it serves lazily-loaded parents (image folders) as they are.

    The parents must agree on classes, channels, image size and normalization constants
    (:class:`DataError` naming the first one if not); name, classes, ``mean``, ``std`` and
    ``flip_ok`` are the first parent's. ``indices`` are global: ``0..len(parents[0]) - 1`` are the
    first parent's images, the next ``len(parents[1])`` the second's, and so on.
    """

    def __init__(self, parents: Sequence[ImageDataset], indices: Tensor | Sequence[int] | np.ndarray, *,
                 split: str) -> None:
        parents = list(parents)
        _check_poolable(parents)
        first = parents[0]
        sizes = [len(p) for p in parents]
        idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= sum(sizes)):
            raise DataError(f"{first.name}: subset indices must lie in 0..{sum(sizes) - 1}, found "
                            f"{int(idx.min())}..{int(idx.max())}")
        starts = torch.tensor([0, *np.cumsum(sizes)[:-1].tolist()], dtype=torch.int64)
        self.parents = parents
        self.indices = idx
        self._parent = torch.bucketize(idx, starts, right=True) - 1  # which parent holds each image
        self._local = idx - starts[self._parent]                      # and its index there
        targets = torch.empty(len(idx), dtype=torch.int64)
        for p, parent in enumerate(parents):
            sel = torch.nonzero(self._parent == p).flatten()
            targets[sel] = parent.targets[self._local[sel]]
        super().__init__(name=first.name, split=split, classes=first.classes, in_chans=first.in_chans,
                         image_size=first.image_size, targets=targets, mean=first.mean, std=first.std,
                         flip_ok=first.flip_ok)

    def pixels(self, indices: Tensor) -> Tensor:
        indices = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        which, local = self._parent[indices], self._local[indices]
        out = torch.empty((len(indices), self.in_chans, *self.image_size), dtype=torch.uint8)
        for p, parent in enumerate(self.parents):
            sel = torch.nonzero(which == p).flatten()
            if len(sel):
                out[sel] = parent.pixels(local[sel])
        return out


def _check_poolable(parents: Sequence[ImageDataset]) -> None:
    """:class:`DataError` unless ``parents`` is not empty and its datasets agree on classes,
    channels, image size and normalization constants."""
    if not parents:
        raise DataError("a subset of pooled datasets needs at least one dataset to pool")
    first = parents[0]
    for other in parents[1:]:
        for attr in ("classes", "in_chans", "image_size", "mean", "std"):
            a, b = getattr(first, attr), getattr(other, attr)
            if a != b:
                raise DataError(f"{first.name}: cannot pool split {other.split!r} with split {first.split!r}: "
                                f"their {attr} differ ({a!r:.60} vs {b!r:.60})")


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


def check_folds(folds: int | None, fold: int) -> int:
    """``folds`` as an int (``None``: 0, the dataset's own split), once it is ``None``, 0 or an
    integer >= 2 and ``fold`` lies in ``0..folds - 1`` (0 without folds); else a one-line
    :class:`~sepconv.errors.ConfigError` naming the setting at fault."""
    def is_int(v) -> bool:
        return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))

    if folds is not None and not (is_int(folds) and (folds == 0 or folds >= 2)):
        raise ConfigError(f"folds must be an integer >= 2 (or 0/None: the dataset's own split), got {folds!r}")
    k = int(folds or 0)
    if not is_int(fold):
        raise ConfigError(f"fold must be an integer, got {fold!r}")
    if k == 0 and fold != 0:
        raise ConfigError(f"fold {fold!r} needs folds >= 2 (without folds the dataset's own split is used)")
    if k and not 0 <= fold < k:
        raise ConfigError(f"fold must be in 0..{k - 1} for {k} folds, got {fold!r}")
    return k


def kfold_indices(targets: np.ndarray, folds: int, fold: int, seed: int = SPLIT_SEED) -> np.ndarray:
    """Sorted indices of test fold ``fold`` (0-based) of the fixed stratified ``folds``-fold partition.

    The rule: within each class, in ascending label order, the class's sample indices are
    permuted by one ``numpy.random.RandomState(seed)`` (the legacy generator, whose stream NumPy
    keeps fixed; the same draws as :func:`stratified_split`); the permuted classes are laid end to
    end and dealt round-robin, the ``p``-th index of that sequence going to fold ``p % folds``.
    So any two folds hold the same number of images of each class give or take one, and the same
    number of images overall give or take one; the ``folds`` test folds are disjoint and together
    cover every index. A class with fewer than ``folds`` images is absent from some folds (this
    function allows it; :func:`~sepconv.data.load_dataset` refuses it). ``folds`` must be an
    integer >= 2 and ``fold`` lie in ``0..folds - 1`` (:class:`~sepconv.errors.ConfigError`).
    """
    if folds is None or check_folds(folds, fold) == 0:
        raise ConfigError(f"folds must be an integer >= 2, got {folds!r}")
    targets = np.asarray(targets)
    rng = np.random.RandomState(seed)
    dealt = np.concatenate([rng.permutation(np.flatnonzero(targets == c)) for c in np.unique(targets)]
                           or [np.zeros(0, dtype=np.int64)])
    return np.sort(dealt[fold::folds])


def check_labels(path: Path, labels: np.ndarray, k: int) -> None:
    """:class:`DataError` naming ``path`` unless every label lies in ``0..k-1``."""
    if labels.size and (labels.min() < 0 or labels.max() >= k):
        raise DataError(f"{path}: labels must lie in 0..{k - 1}, found "
                        f"{labels.min()}..{labels.max()}")
