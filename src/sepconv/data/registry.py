"""The dataset registry: one entry per dataset name, read by :func:`load_dataset` and the CLI.

A dataset is added in one place, its family module, with :func:`register_dataset` (timm-style)::

    @register_dataset("svhn")
    def _load_svhn(root: Path, split: str, size: int | None) -> ImageDataset: ...

and the module imported by :mod:`sepconv.data`. A loader gets the resolved data directory (or
``None`` for a dataset that needs no files), the split (``"train"`` or ``"test"``, already
checked) and the image size (``None``: the native size); everything else about a dataset -- its
files, classes, statistics -- is the loader's business. Cross-validation folds need nothing of a
loader: :func:`load_dataset` pools its two splits.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, DataError, DataNotFoundError
from .base import SPLITS, ImageDataset, SubsetDataset, _check_poolable, check_folds, kfold_indices
from .safe_files import stat_or_none

__all__ = ["DatasetSpec", "Loader", "dataset_spec", "list_datasets", "load_dataset", "register_dataset"]

#: ``load(root, split, size)``: split ``"train"``/``"test"`` of a dataset, images ``size x size``.
Loader = Callable[[Path | None, str, int | None], ImageDataset]


@dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset: its name, its loader, and what :func:`load_dataset` needs to call it."""

    name: str
    load: Loader
    default_size: int | None = None  # the image size when none is asked for; None: the files' own
    needs_root: bool = True          # False: bundled data, no directory resolved or checked


_REGISTRY: dict[str, DatasetSpec] = {}


def register_dataset(name: str, load: Loader | None = None, *, default_size: int | None = None,
                     needs_root: bool = True):
    """Register ``load`` as dataset ``name``; without ``load``, a decorator that does. Returns ``load``.

    Names are listed in registration order; registering a name twice is a :class:`ConfigError`.
    """
    def add(fn: Loader) -> Loader:
        if name in _REGISTRY:
            raise ConfigError(f"dataset {name!r} is already registered")
        _REGISTRY[name] = DatasetSpec(name, fn, default_size, needs_root)
        return fn

    return add if load is None else add(load)


def list_datasets() -> tuple[str, ...]:
    """The names of the registered datasets, in registration order."""
    return tuple(_REGISTRY)


def dataset_spec(name: str) -> DatasetSpec:
    """The registry entry of ``name``; :class:`DataError` listing the known names if there is none."""
    spec = _REGISTRY.get(name)
    if spec is None:
        raise DataError(f"unknown dataset {name!r}; known datasets: {', '.join(_REGISTRY)}")
    return spec


def load_dataset(name: str, root: str | os.PathLike | None = None, split: str = "train",
                 image_size: int | None = None, folds: int | None = None, fold: int = 0) -> ImageDataset:
    """Load split ``"train"`` or ``"test"`` of dataset ``name`` from the files under ``root``.

    ``image_size=None`` keeps the native size (32 for digits, 224 for image folders); any
    other positive int resizes to ``image_size x image_size`` (bilinear, antialiased).
    ``root=None`` means ``$SEPCONV_DATA`` or else ``./data``.

    ``folds=None`` (or 0) gives the dataset's own split. ``folds=K >= 2`` gives fold ``fold``
    (``0..K-1``) of a stratified K-fold cross-validation instead: the dataset's own train and test
    splits are pooled (train first) and partitioned by :func:`~sepconv.data.base.kfold_indices`;
    ``"test"`` is fold ``fold`` and ``"train"`` the other folds, both a
    :class:`~sepconv.data.base.SubsetDataset` reading the two splits on demand. Over
    ``fold = 0..K-1`` every image is tested exactly once. The normalization constants stay those
    of the dataset's own train split (fixed per dataset, not refitted per fold). Every class needs
    at least ``K`` images in the pool (:class:`DataError` otherwise), so that every fold tests and
    trains on every class; bad ``folds`` or ``fold`` are a :class:`ConfigError`.
    """
    spec = dataset_spec(name)
    if split not in SPLITS:
        raise ConfigError(f"split must be 'train' or 'test', got {split!r}")
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int)
                                   or image_size <= 0):
        raise ConfigError(f"image_size must be a positive integer or None, got {image_size!r}")
    k = check_folds(folds, fold)
    size = image_size if image_size is not None else spec.default_size
    data_root = _data_root(name, root) if spec.needs_root else None
    if not k:
        return spec.load(data_root, split, size)
    return _fold_of(name, [spec.load(data_root, s, size) for s in SPLITS], split, k, int(fold))


def _fold_of(name: str, parents: list[ImageDataset], split: str, folds: int, fold: int) -> SubsetDataset:
    """Split ``split`` of fold ``fold`` of ``folds`` over the pooled ``parents`` (see :func:`load_dataset`)."""
    _check_poolable(parents)
    targets = np.concatenate([p.targets.numpy() for p in parents])
    classes = parents[0].classes
    counts = np.bincount(targets, minlength=len(classes))[:len(classes)]
    c = int(counts.argmin())
    if counts[c] < folds:
        raise DataError(f"{name}: {folds} folds need at least {folds} images of every class (each fold tests and "
                        f"trains on every class), but class {classes[c]!r} has {counts[c]}; use fewer folds")
    test = kfold_indices(targets, folds, fold)
    if split == "test":
        idx = test
    else:
        keep = np.ones(len(targets), dtype=bool)
        keep[test] = False
        idx = np.flatnonzero(keep)
    return SubsetDataset(parents, torch.from_numpy(idx), split=split)


def _data_root(name: str, root: str | os.PathLike | None) -> Path:
    """``root``, or ``$SEPCONV_DATA``, or ``./data``; a ``$SEPCONV_DATA`` naming nothing is refused."""
    if root is None:
        env = os.environ.get("SEPCONV_DATA")
        root = env or "data"
        if env and stat_or_none(Path(env)) is None:
            raise DataNotFoundError(f"{name}: $SEPCONV_DATA is {env!r}, which does not exist; set it to the "
                                    f"directory holding the datasets, or give the directory")
    return Path(root)
