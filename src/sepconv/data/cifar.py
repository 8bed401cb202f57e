"""CIFAR-10 and CIFAR-100 (Krizhevsky, 2009) from their binary or Python-pickle distributions.

Either the binary batches (``cifar-10-batches-bin/``, ``cifar-100-binary/``: records of label
bytes then 3072 pixel bytes, R, G, B planes) or the Python ones (``cifar-10-batches-py/``,
``cifar-100-python/``: pickled dicts, read by :func:`~sepconv.data.safe_pickle.safe_unpickle`),
under ``root`` or with ``root`` the batches directory itself. CIFAR-100 uses its fine labels.
Images are normalized with the standard train-set statistics.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import DataError
from ..guard import check_memory, format_bytes
from .base import TensorImageDataset, check_labels, in_memory_dataset
from .registry import register_dataset
from .safe_files import find_file, locate, read_bytes
from .safe_pickle import check_array, safe_unpickle

__all__ = ["CIFAR10_CLASSES", "load_cifar"]

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")


@dataclass(frozen=True)
class _CifarFormat:
    """Where one CIFAR variant keeps its files, in both distributions, and its statistics."""

    classes: int
    label_bytes: int                   # per binary record (CIFAR-100: coarse, fine)
    bin_dir: str
    bin_files: dict[str, list[str]]    # per split
    bin_meta: str                      # class names, one a line
    py_dir: str
    py_files: dict[str, list[str]]     # per split
    label_key: str                     # of a pickled batch
    py_meta: str                       # pickled dict of class names
    meta_key: str
    mean: tuple[float, ...]            # per-channel train-set (mean, std) of x / 255
    std: tuple[float, ...]


_CIFAR = {
    "cifar10": _CifarFormat(
        10, 1, "cifar-10-batches-bin",
        {"train": [f"data_batch_{i}.bin" for i in range(1, 6)], "test": ["test_batch.bin"]},
        "batches.meta.txt", "cifar-10-batches-py",
        {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
        "labels", "batches.meta", "label_names",
        (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": _CifarFormat(
        100, 2, "cifar-100-binary", {"train": ["train.bin"], "test": ["test.bin"]},
        "fine_label_names.txt", "cifar-100-python", {"train": ["train"], "test": ["test"]},
        "fine_labels", "meta", "fine_label_names",
        (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
_CIFAR_PIXELS = 3 * 32 * 32
#: Largest class-name file read: the real ones hold 10 or 100 short names (under 2 KiB).
_META_LIMIT = 1 << 20


def load_cifar(name: str, root: Path, split: str, size: int | None) -> TensorImageDataset:
    """Split ``split`` of CIFAR variant ``name`` (``"cifar10"``, ``"cifar100"``) under ``root``,
    resized to ``size`` (``None``: 32)."""
    images, targets, classes = _read_split(name, root, split)
    fmt = _CIFAR[name]
    return in_memory_dataset(name, split, images, targets, classes, size, fmt.mean, fmt.std, flip_ok=True)


for _name in _CIFAR:
    register_dataset(_name, partial(load_cifar, _name))


def _read_split(name: str, root: Path, split: str) -> tuple[Tensor, Tensor, Sequence[str]]:
    fmt = _CIFAR[name]
    k = fmt.classes
    layouts = [(fmt.bin_dir, fmt.bin_files[split]), (fmt.py_dir, fmt.py_files[split]),
               ("", fmt.bin_files[split]), ("", fmt.py_files[split])]
    which, paths = locate(name, root, layouts)
    binary = which % 2 == 0
    total = sum(os.stat(p).st_size for p in paths)  # the files, then the images concatenated
    named = str(paths[0]) if len(paths) == 1 else f"{paths[0].parent}/{{{', '.join(p.name for p in paths)}}}"
    check_memory(2 * total, f"{name}: reading {named} ({format_bytes(total)})")
    read = (lambda p: _read_binary(p, fmt.label_bytes, k)) if binary else \
        (lambda p: _read_python(p, fmt.label_key, k))
    parts = [read(p) for p in paths]
    images = torch.from_numpy(np.concatenate([im for im, _ in parts]))
    targets = torch.from_numpy(np.concatenate([t for _, t in parts]))
    meta = find_file(paths[0].parent / (fmt.bin_meta if binary else fmt.py_meta), gz_ok=False)
    classes = _class_names(meta, binary, fmt.meta_key, k) if meta is not None else \
        (CIFAR10_CLASSES if k == 10 else tuple(map(str, range(k))))
    return images, targets, classes


def _read_binary(path: Path, label_bytes: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Records of ``label_bytes`` (CIFAR-100: coarse, fine) + 3072 pixel bytes (R, G, B planes)."""
    record = label_bytes + _CIFAR_PIXELS
    size = os.stat(path).st_size
    if size == 0 or size % record:
        raise DataError(f"{path}: {size} bytes is not a whole number of {record}-byte "
                        f"CIFAR records (truncated or not a CIFAR binary file)")
    raw = np.frombuffer(read_bytes(path, "a CIFAR binary file"), dtype=np.uint8)
    if raw.size % record:
        raise DataError(f"{path}: {raw.size} bytes is not a whole number of {record}-byte CIFAR records")
    raw = raw.reshape(-1, record)
    labels = raw[:, label_bytes - 1].astype(np.int64)
    check_labels(path, labels, k)
    return raw[:, label_bytes:].reshape(-1, 3, 32, 32), labels


def _read_python(path: Path, label_key: str, k: int) -> tuple[np.ndarray, np.ndarray]:
    batch = _str_keys(path, safe_unpickle(path))
    data, labels = batch.get("data"), batch.get(label_key)
    if data is None or labels is None:
        raise DataError(f"{path}: not a CIFAR batch (needs keys 'data' and {label_key!r}, "
                        f"has {sorted(batch)[:20]})")
    size = os.stat(path).st_size
    data = check_array(path, data, "data", size)
    if not (data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == _CIFAR_PIXELS):
        raise DataError(f"{path}: 'data' must be a uint8 array of shape (N, {_CIFAR_PIXELS}), "
                        f"got {data.dtype} {data.shape}")
    if isinstance(labels, np.ndarray):
        labels = check_array(path, labels, label_key, size)
    elif not isinstance(labels, (list, tuple)):
        raise DataError(f"{path}: {label_key!r} must be a list of integers, got {type(labels).__name__}")
    try:
        labels = np.asarray(labels)
    except (TypeError, ValueError, OverflowError, RecursionError) as e:
        raise DataError(f"{path}: {label_key!r} is not a list of integers ({type(e).__name__}: {e})") from None
    if labels.ndim != 1 or (labels.size and labels.dtype.kind not in "iu"):
        raise DataError(f"{path}: {label_key!r} must be a flat list of integers, got {labels.dtype} "
                        f"of shape {labels.shape}")
    if len(labels) != len(data):
        raise DataError(f"{path}: {len(data)} images but {len(labels)} labels")
    if labels.dtype == np.uint64 and labels.size and labels.max() > np.iinfo(np.int64).max:
        raise DataError(f"{path}: labels must lie in 0..{k - 1}, found {labels.max()}")
    labels = labels.astype(np.int64)
    check_labels(path, labels, k)
    return data.reshape(-1, 3, 32, 32), labels


def _class_names(meta: Path, binary: bool, key: str, k: int) -> list[str]:
    if binary:
        text = read_bytes(meta, f"a list of {k} class names", _META_LIMIT).decode("utf-8", "replace")
        names = [ln.strip() for ln in text.splitlines() if ln.strip()]
    else:
        names = _str_keys(meta, safe_unpickle(meta, _META_LIMIT)).get(key)
        if not isinstance(names, list):
            raise DataError(f"{meta}: no list {key!r} of class names")
        if len(names) == k and not all(isinstance(n, (bytes, str)) for n in names):
            raise DataError(f"{meta}: the class names in {key!r} must be strings")
        names = [n.decode("utf-8", "replace") if isinstance(n, bytes) else n for n in names]
    if len(names) != k:
        raise DataError(f"{meta}: {len(names)} class names, expected {k}")
    return names


def _str_keys(path: Path, obj: Any) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}
