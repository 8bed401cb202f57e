"""Image classification datasets read from local files; nothing is ever downloaded.

``load_dataset(name, root, split, image_size)`` returns an :class:`ImageDataset`:

========================  ===========================================================  ======
name                      files under ``root``                                          size
========================  ===========================================================  ======
``digits``                none: scikit-learn's bundled ``load_digits`` (1797 8x8 images)  32
``cifar10``               ``cifar-10-batches-bin/`` or ``cifar-10-batches-py/``           32
``cifar100``              ``cifar-100-binary/`` or ``cifar-100-python/``                  32
``mnist``                 IDX files, plain or ``.gz``, in ``root`` or ``root/MNIST/raw``   28
``fashion_mnist``         the same in ``root`` or ``root/FashionMNIST/raw``                28
``imagefolder``           ``root/{train,test|val}/<class>/<image>`` or ``root/<class>/..``  224
========================  ===========================================================  ======

``root`` may also be the batches directory itself (CIFAR) or the ``raw`` directory (MNIST);
``root=None`` means ``$SEPCONV_DATA`` or else ``./data``.

In-memory datasets (all but ``imagefolder``) hold their images as one uint8 NCHW tensor at
the final size, so :meth:`ImageDataset.get_batch` is plain tensor indexing; ``imagefolder``
decodes its files on demand. Every dataset normalizes with fixed per-channel constants,
``(x / 255 - mean) / std``: the standard train-set statistics of CIFAR-10/100, MNIST and
Fashion-MNIST, the ImageNet statistics for image folders, and for ``digits`` the statistics
of its own train split at the requested size (computed, deterministic).

Fixed splits. ``digits``, and an image folder without ``train/``/``test/`` subfolders, are
split 80/20 per class: within each class (in ascending label order) the sample indices are
permuted by ``numpy.random.RandomState(0)`` (the legacy generator, whose stream NumPy keeps
fixed) and the first ``round(0.2 * n)`` go to the test split (at least one and never all of
a class with two or more samples). Both splits keep the original sample order.

Python-format CIFAR files are pickles. They are read by an unpickler that admits only the
globals a numpy array needs (and Python 3's protocol-2 spelling of ``bytes``); any other
global is refused with :class:`~sepconv.errors.DataError` before anything runs.

Every data file is from elsewhere, so hostile: it never runs code, nothing is allocated for it
before its size is known and checked (against the file's own size and against the memory budget,
:func:`sepconv.guard.memory_budget`), and a bad one is a one-line
:class:`~sepconv.errors.SepconvError` naming the file and the reason. Only regular files are read
(a FIFO, ``/dev/zero`` or a directory in a data file's place is refused, without blocking); a
permission error is reported as one, never as "does not exist"; IDX sizes are counted in Python
integers and a gzip is inflated no further than its header announces; a pickle's arrays consist
of bytes the file holds (no zero-stride views) and its opcodes are scanned before it is loaded;
images are decoded only by the PIL plugins of ``IMAGE_EXTENSIONS``, within PIL's
decompression-bomb limit and the budget, and resized at a cost bounded by the output size; a
resize to ``image_size`` is refused when the result would not fit the budget.
"""

from __future__ import annotations

import errno
import gzip
import io
import os
import pickle
import pickletools
import re
import stat
import struct
import warnings
import zlib
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from .errors import ConfigError, DataError, DataNotFoundError
from .guard import check_memory, format_bytes, os_reason, tensor_bytes

DATASETS = ("digits", "cifar10", "cifar100", "mnist", "fashion_mnist", "imagefolder")
SPLITS = ("train", "test")

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".pbm", ".pgm", ".png", ".ppm",
                    ".tif", ".tiff", ".webp")

# Standard per-channel train-set statistics, (mean, std) of x / 255.
MEAN_STD: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # ImageNet
}
DEFAULT_SIZE = {"digits": 32, "imagefolder": 224}
TEST_FRACTION = 0.2
SPLIT_SEED = 0

# --------------------------------------------------------------------------- datasets


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


class ImageFolderDataset(ImageDataset):
    """Image files decoded on demand: RGB, shorter side resized to ``size``, center crop."""

    def __init__(self, files: Sequence[Path], targets: Tensor, size: int, **meta: Any) -> None:
        self.files = list(files)
        self.size = size
        super().__init__(in_chans=3, image_size=(size, size), targets=targets, **meta)

    def pixels(self, indices: Tensor) -> Tensor:
        out = torch.empty(len(indices), 3, self.size, self.size, dtype=torch.uint8)
        for k, i in enumerate(indices.tolist()):
            out[k] = read_image(self.files[i], self.size)
        return out


# --------------------------------------------------------------------------- entry point


def load_dataset(name: str, root: str | os.PathLike | None = None, split: str = "train",
                 image_size: int | None = None) -> ImageDataset:
    """Load split ``"train"`` or ``"test"`` of dataset ``name`` from the files under ``root``.

    ``image_size=None`` keeps the native size (32 for digits, 224 for image folders); any
    other positive int resizes to ``image_size x image_size`` (bilinear, antialiased).
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise ConfigError(f"split must be 'train' or 'test', got {split!r}")
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int)
                                   or image_size <= 0):
        raise ConfigError(f"image_size must be a positive integer or None, got {image_size!r}")
    size = image_size if image_size is not None else DEFAULT_SIZE.get(name)
    if name == "digits":
        return _load_digits(split, size)
    if root is None:
        env = os.environ.get("SEPCONV_DATA")
        root = env or "data"
        if env and _stat(Path(env)) is None:
            raise DataNotFoundError(f"{name}: $SEPCONV_DATA is {env!r}, which does not exist; set it to the "
                                    f"directory holding the datasets, or give the directory")
    root = Path(root)
    if name == "imagefolder":
        return _load_imagefolder(root, split, size)
    if name in ("cifar10", "cifar100"):
        images, targets, classes = _load_cifar(name, root, split)
    else:
        images, targets = _load_mnist(name, root, split)
        classes = FASHION_MNIST_CLASSES if name == "fashion_mnist" else tuple(map(str, range(10)))
    mean, std = MEAN_STD[name]
    return TensorImageDataset(resize_uint8(images, size, what=f"{name}: {len(images)} images"), targets,
                              name=name, split=split,
                              classes=classes, mean=mean, std=std, flip_ok=name != "mnist")


# --------------------------------------------------------------------------- shared helpers


#: Float32 working memory a resize may use at once (the chunk of images shrinks to fit it).
_RESIZE_WORK = 256 << 20


def _resize_plan(shape: Sequence[int], size: int, chunk: int) -> tuple[int, int]:
    """``(images per chunk, estimated peak bytes)`` of :func:`resize_uint8` on NCHW ``shape``: the
    uint8 result, and per chunk the float32 input, the separable pass between, the float32
    output and its uint8 copy (Python integers: no overflow, whatever ``size``)."""
    n, c, h, w = (int(s) for s in shape)
    per_image = 4 * c * (h * w + max(h, w) * size + size * size) + c * size * size
    chunk = max(1, min(chunk, _RESIZE_WORK // max(per_image, 1), n))
    return chunk, n * c * size * size + chunk * per_image


def resize_uint8(images: Tensor, size: int | None, chunk: int = 2048, what: str = "images") -> Tensor:
    """Bilinear (antialiased) resize of uint8 NCHW ``images`` to ``size x size``, rounded.

    The memory it needs (:func:`_resize_plan`) is checked against the budget before anything is
    allocated; ``what`` names the images in the message."""
    if size is None or tuple(images.shape[2:]) == (size, size):
        return images
    chunk, need = _resize_plan(images.shape, size, chunk)
    check_memory(need, f"{what} resized to {size}x{size}", hint="lower the image size")
    out = images.new_empty(len(images), images.shape[1], size, size)
    for i in range(0, len(images), chunk):
        out[i:i + chunk] = F.interpolate(images[i:i + chunk].float(), size=(size, size), mode="bilinear",
                                         align_corners=False, antialias=True).round_().clamp_(0, 255)
    return out


def stratified_split(targets: np.ndarray, split: str, test_fraction: float = TEST_FRACTION,
                     seed: int = SPLIT_SEED) -> np.ndarray:
    """Sorted indices of ``split`` in the fixed per-class split described in the module doc."""
    rng = np.random.RandomState(seed)
    is_test = np.zeros(len(targets), dtype=bool)
    for c in np.unique(targets):
        members = rng.permutation(np.flatnonzero(targets == c))
        n_test = int(test_fraction * len(members) + 0.5)
        if len(members) >= 2:
            n_test = min(max(n_test, 1), len(members) - 1)
        is_test[members[:n_test]] = True
    return np.flatnonzero(is_test if split == "test" else ~is_test)


def _reason(e: OSError) -> str:
    return "a symbolic link loop" if e.errno == errno.ELOOP else os_reason(e)


def _kind(mode: int) -> str:
    """What a non-regular file is, for a message: ``'a FIFO (named pipe)'``."""
    for test, what in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return what
    return "a regular file" if stat.S_ISREG(mode) else "a special file"


def _stat(path: Path) -> os.stat_result | None:
    """``os.stat(path)`` (links followed); ``None`` when nothing is there (a broken link included);
    :class:`DataError` naming the path and the reason when it cannot be looked at -- permission
    denied is never reported as "does not exist"."""
    try:
        return os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        raise DataError(f"{path}: cannot access it ({_reason(e)})") from None
    except ValueError as e:  # an embedded NUL
        raise DataError(f"{str(path)!r}: not a valid path ({e})") from None


def _open_regular(path: Path) -> tuple[BinaryIO, int]:
    """``(file, size)`` of ``path`` opened for reading, if it is a regular file. The open does not
    block (a FIFO where a data file belongs is refused at once, not waited on), and ``/dev/zero`` or
    a directory is refused before a byte is read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({_reason(e)})") from None
    try:
        mode, size = (st := os.fstat(fd)).st_mode, st.st_size
        if not stat.S_ISREG(mode):
            raise DataError(f"{path}: is {_kind(mode)}, not a regular file")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb"), size


def _read_bytes(path: Path, what: str, limit: int | None = None) -> bytes:
    """The whole of regular file ``path`` (``what``, for messages), checked against ``limit`` bytes
    and the memory budget before it is read."""
    f, size = _open_regular(path)
    with f:
        if limit is not None and size > limit:
            raise DataError(f"{path}: {size} bytes, too large for {what} (at most {limit})")
        check_memory(size, f"reading {path}")
        try:
            data = f.read(size)
        except OSError as e:
            raise DataError(f"{path}: cannot read it ({_reason(e)})") from None
    if len(data) != size:
        raise DataError(f"{path}: {len(data)} of {size} bytes read (the file shrank while being read)")
    return data


def _find(path: Path, gz_ok: bool) -> Path | None:
    """``path`` (or ``path.gz``) when it is there; :class:`DataError` when what is there is not a
    regular file (a directory, a FIFO, a device, a broken link) or cannot be looked at."""
    for p in (path, path.with_name(path.name + ".gz")) if gz_ok else (path,):
        st = _stat(p)
        if st is None:
            if os.path.islink(p):
                raise DataError(f"{p}: a broken symbolic link (its target does not exist)")
            continue
        if not stat.S_ISREG(st.st_mode):
            raise DataError(f"{p}: is {_kind(st.st_mode)}, not a regular file")
        return p
    return None


def _check_root(name: str, root: Path, expected: str) -> None:
    """``root`` is a directory; else :class:`DataNotFoundError` (nothing there) or
    :class:`DataError` (a file, or no permission), naming it."""
    st = _stat(root)
    if st is None:
        raise DataNotFoundError(f"{name}: directory {root} does not exist; expected {expected}")
    if not stat.S_ISDIR(st.st_mode):
        raise DataError(f"{name}: {root} is {_kind(st.st_mode)}, not a directory; expected {expected}")


def _locate(name: str, root: Path, layouts: Sequence[tuple[str, Sequence[str]]],
            gz_ok: bool = False) -> tuple[int, list[Path]]:
    """First layout ``(subdir, files)`` whose files all exist under ``root``: (index, paths).

    Raises :class:`DataNotFoundError` naming the directory and the files expected there.
    """
    suffix = " (optionally .gz)" if gz_ok else ""
    expected = " or ".join(f"{(root / sub)}/{{{', '.join(files)}}}" for sub, files in layouts)
    _check_root(name, root, expected + suffix)
    partial = None
    for k, (sub, files) in enumerate(layouts):
        found = [_find(root / sub / f, gz_ok) for f in files]
        if all(found):
            return k, found  # type: ignore[return-value]
        if partial is None and any(found):
            missing = [f for f, p in zip(files, found) if p is None]
            partial = (root / sub, missing, files)
    if partial is not None:
        d, missing, files = partial
        raise DataNotFoundError(f"{name}: {d} lacks {', '.join(missing)}; expected there: "
                                f"{', '.join(files)}{suffix}")
    raise DataNotFoundError(f"{name}: no {name} files in {root}; expected {expected}{suffix}")


# --------------------------------------------------------------------------- digits


@lru_cache(maxsize=1)
def _digits_uint8() -> tuple[Tensor, np.ndarray]:
    """scikit-learn's digits as uint8 (1797, 1, 8, 8) with 0..16 mapped onto 0..255."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    return torch.from_numpy(images[:, None]), bunch.target.astype(np.int64)


def _pixel_stats(images: Tensor) -> tuple[float, float]:
    """Mean and standard deviation (population) of ``images / 255`` in float64 (the sizes that
    reach here passed the memory check of :func:`_load_digits`)."""
    x = images.double() / 255
    return x.mean().item(), x.std(correction=0).item()


def _load_digits(split: str, size: int) -> TensorImageDataset:
    images, targets = _digits_uint8()
    _, need = _resize_plan(images.shape, size, 2048)
    check_memory(need, f"digits: {len(images)} images resized to {size}x{size}", hint="lower the image size")
    train_idx = torch.from_numpy(stratified_split(targets, "train"))
    idx = train_idx if split == "train" else torch.from_numpy(stratified_split(targets, split))
    train = resize_uint8(images[train_idx], size, what="digits")
    mean, std = _pixel_stats(train)
    chosen = train if split == "train" else resize_uint8(images[idx], size, what="digits")
    return TensorImageDataset(chosen, torch.from_numpy(targets)[idx], name="digits",
                              split=split, classes=[str(d) for d in range(10)], mean=(mean,),
                              std=(std,), flip_ok=False)


# --------------------------------------------------------------------------- CIFAR

_CIFAR = {
    # name: (classes, label bytes, binary dir, binary files per split, binary class-name file,
    #        python dir, python files per split, python label key, python meta, meta key)
    "cifar10": (10, 1, "cifar-10-batches-bin",
                {"train": [f"data_batch_{i}.bin" for i in range(1, 6)], "test": ["test_batch.bin"]},
                "batches.meta.txt", "cifar-10-batches-py",
                {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
                "labels", "batches.meta", "label_names"),
    "cifar100": (100, 2, "cifar-100-binary", {"train": ["train.bin"], "test": ["test.bin"]},
                 "fine_label_names.txt", "cifar-100-python", {"train": ["train"], "test": ["test"]},
                 "fine_labels", "meta", "fine_label_names"),
}
_CIFAR_PIXELS = 3 * 32 * 32
#: Largest class-name file read: the real ones hold 10 or 100 short names (under 2 KiB).
_META_LIMIT = 1 << 20


def _load_cifar(name: str, root: Path, split: str) -> tuple[Tensor, Tensor, Sequence[str]]:
    (k, label_bytes, bin_dir, bin_files, bin_meta,
     py_dir, py_files, label_key, py_meta, meta_key) = _CIFAR[name]
    layouts = [(bin_dir, bin_files[split]), (py_dir, py_files[split]),
               ("", bin_files[split]), ("", py_files[split])]
    which, paths = _locate(name, root, layouts)
    binary = which % 2 == 0
    total = sum(os.stat(p).st_size for p in paths)  # the files, then the images concatenated
    named = str(paths[0]) if len(paths) == 1 else f"{paths[0].parent}/{{{', '.join(p.name for p in paths)}}}"
    check_memory(2 * total, f"{name}: reading {named} ({format_bytes(total)})")
    read = (lambda p: _read_cifar_binary(p, label_bytes, k)) if binary else \
        (lambda p: _read_cifar_python(p, label_key, k))
    parts = [read(p) for p in paths]
    images = torch.from_numpy(np.concatenate([im for im, _ in parts]))
    targets = torch.from_numpy(np.concatenate([t for _, t in parts]))
    meta = _find(paths[0].parent / (bin_meta if binary else py_meta), gz_ok=False)
    classes = _cifar_classes(meta, binary, meta_key, k) if meta is not None else \
        (CIFAR10_CLASSES if k == 10 else tuple(map(str, range(k))))
    return images, targets, classes


def _read_cifar_binary(path: Path, label_bytes: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Records of ``label_bytes`` (CIFAR-100: coarse, fine) + 3072 pixel bytes (R, G, B planes)."""
    record = label_bytes + _CIFAR_PIXELS
    size = os.stat(path).st_size
    if size == 0 or size % record:
        raise DataError(f"{path}: {size} bytes is not a whole number of {record}-byte "
                        f"CIFAR records (truncated or not a CIFAR binary file)")
    raw = np.frombuffer(_read_bytes(path, "a CIFAR binary file"), dtype=np.uint8)
    if raw.size % record:
        raise DataError(f"{path}: {raw.size} bytes is not a whole number of {record}-byte CIFAR records")
    raw = raw.reshape(-1, record)
    labels = raw[:, label_bytes - 1].astype(np.int64)
    _check_labels(path, labels, k)
    return raw[:, label_bytes:].reshape(-1, 3, 32, 32), labels


def _read_cifar_python(path: Path, label_key: str, k: int) -> tuple[np.ndarray, np.ndarray]:
    batch = _str_keys(path, safe_unpickle(path))
    data, labels = batch.get("data"), batch.get(label_key)
    if data is None or labels is None:
        raise DataError(f"{path}: not a CIFAR batch (needs keys 'data' and {label_key!r}, "
                        f"has {sorted(batch)[:20]})")
    size = os.stat(path).st_size
    data = _check_array(path, data, "data", size)
    if not (data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == _CIFAR_PIXELS):
        raise DataError(f"{path}: 'data' must be a uint8 array of shape (N, {_CIFAR_PIXELS}), "
                        f"got {data.dtype} {data.shape}")
    if isinstance(labels, np.ndarray):
        labels = _check_array(path, labels, label_key, size)
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
    _check_labels(path, labels, k)
    return data.reshape(-1, 3, 32, 32), labels


def _cifar_classes(meta: Path, binary: bool, key: str, k: int) -> list[str]:
    if binary:
        text = _read_bytes(meta, f"a list of {k} class names", _META_LIMIT).decode("utf-8", "replace")
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


def _check_labels(path: Path, labels: np.ndarray, k: int) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= k):
        raise DataError(f"{path}: labels must lie in 0..{k - 1}, found "
                        f"{labels.min()}..{labels.max()}")


def _str_keys(path: Path, obj: Any) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


# --------------------------------------------------------------------------- safe unpickling

#: Upper bound of the memory one pickle opcode can make the unpickler allocate beyond the bytes it
#: carries (a Python object, its memo entry and stack slot); the estimate of an unpickling is
#: ``3 x file size + this x opcodes`` (the file, the strings it holds, the bytes built from them).
_PICKLE_BYTES_PER_OP = 128
#: Dict keys one pickle may insert in all (a CIFAR batch has 4): colliding int or tuple keys would
#: make the inserts quadratic -- a pickle that takes hours is as hostile as one that runs code.
_PICKLE_MAX_DICT_KEYS = 4096
_REFUSED_OPCODES = {
    **dict.fromkeys(("INST", "OBJ", "NEWOBJ", "NEWOBJ_EX"), "it instantiates a class"),
    **dict.fromkeys(("EXT1", "EXT2", "EXT4"), "it uses the copyreg extension registry"),
    **dict.fromkeys(("PERSID", "BINPERSID"), "it uses persistent ids"),
    **dict.fromkeys(("EMPTY_SET", "ADDITEMS", "FROZENSET"), "it builds sets"),
    **dict.fromkeys(("NEXT_BUFFER", "READONLY_BUFFER"), "it uses out-of-band buffers"),
}


class _Refused(Exception):
    """Raised inside the unpickler; :func:`safe_unpickle` adds the file name."""


def _refuse_global(path: Path, module: str, name: str) -> DataError:
    return DataError(f"{path}: refused to unpickle: it asks for the global {module}.{name}, which would "
                     f"execute code; a dataset pickle may only hold numpy arrays, lists, dicts, strings, "
                     f"bytes and numbers")


_OPCODES = {ord(op.code): op for op in pickletools.opcodes}
_COUNT_BYTES = {pickletools.TAKEN_FROM_ARGUMENT1: 1, pickletools.TAKEN_FROM_ARGUMENT4: 4,
                pickletools.TAKEN_FROM_ARGUMENT4U: 4, pickletools.TAKEN_FROM_ARGUMENT8U: 8}


def _pickle_ops(data: bytes):
    """``(opcode, arg, pos)`` of each opcode of the pickle ``data`` up to STOP, like
    ``pickletools.genops`` -- but the payload of a counted string or bytes is skipped, not decoded,
    and ``arg`` is decoded only where :func:`_scan_pickle` looks at it (GLOBAL, PUT, FRAME);
    ``ValueError`` for a truncated pickle or a length past the end."""
    n, pos = len(data), 0
    while pos < n:
        op = _OPCODES.get(data[pos])
        if op is None:
            raise ValueError(f"unknown opcode 0x{data[pos]:02x} at byte {pos}")
        start, pos, desc, arg = pos, pos + 1, op.arg, None
        if desc is None:
            pass
        elif desc.n > 0:
            if pos + desc.n > n:
                raise ValueError(f"{op.name} at byte {start} is cut off")
            if op.name in ("BINPUT", "LONG_BINPUT", "FRAME"):
                arg = int.from_bytes(data[pos:pos + desc.n], "little")
            pos += desc.n
        elif desc.n == pickletools.UP_TO_NEWLINE:
            end = pos
            for _ in range(2 if desc.name == "stringnl_noescape_pair" else 1):
                end = data.find(b"\n", end) + 1
                if end == 0:
                    raise ValueError(f"{op.name} at byte {start} is cut off (no newline)")
            if op.name == "GLOBAL":
                arg = " ".join(data[pos:end].decode("latin1").split())
            elif op.name == "PUT":
                arg = int(data[pos:end])
            pos = end
        else:
            k = _COUNT_BYTES[desc.n]
            if pos + k > n:
                raise ValueError(f"{op.name} at byte {start} is cut off")
            length = int.from_bytes(data[pos:pos + k], "little", signed=desc.n == pickletools.TAKEN_FROM_ARGUMENT4)
            pos += k
            if not 0 <= length <= n - pos:
                raise ValueError(f"{op.name} at byte {start} claims {length} bytes, but only {n - pos} remain")
            pos += length
        yield op, arg, start
        if op.name == "STOP":
            return
    raise ValueError("the pickle ends without a STOP opcode (truncated)")


def _scan_pickle(data: bytes, path: Path) -> int:
    """Walk the opcodes of ``data`` without building anything; the number of opcodes.

    Refused before the real unpickler runs: the opcodes a dataset pickle never needs
    (:data:`_REFUSED_OPCODES`), globals other than numpy's, a counted string, bytes or frame
    longer than the rest of the file (:func:`_pickle_ops` reads lengths, not payloads: nothing of
    a claimed length is allocated), a memo index beyond the opcodes seen so far (the C unpickler
    sizes its memo table by the index: 8 bytes, ``r\\xff\\xff\\xff\\x3f``, would cost 16 GiB), and
    more than :data:`_PICKLE_MAX_DICT_KEYS` dict keys (counted with the stack depths that
    ``pickletools.dis`` tracks).
    """
    mark = pickletools.markobject
    depth, marks, ops, keys = 0, [], 0, 0
    try:
        for op, arg, pos in _pickle_ops(data):
            ops += 1
            name, before, after = op.name, op.stack_before, op.stack_after
            if name in _REFUSED_OPCODES:
                raise DataError(f"{path}: refused to unpickle: {_REFUSED_OPCODES[name]} (opcode {name} at "
                                f"byte {pos}); a dataset pickle may only hold numpy arrays, lists, dicts, "
                                f"strings, bytes and numbers")
            if name == "GLOBAL":
                module, _, attr = str(arg).partition(" ")
                if (module, attr) not in _ArrayOnlyUnpickler.ADMITTED:
                    raise _refuse_global(path, module, attr)
            elif name in ("PUT", "BINPUT", "LONG_BINPUT") and arg > ops:
                raise DataError(f"{path}: malformed pickle (memo index {arg} at byte {pos} after {ops} "
                                f"opcodes; picklers number their memo entries 0, 1, 2, ...)")
            elif name == "FRAME" and arg > len(data) - pos:
                raise DataError(f"{path}: malformed pickle (a frame of {arg} bytes at byte {pos}, past "
                                f"the end of the {len(data)}-byte file)")
            if mark in before or (name == "POP" and marks and depth == marks[-1]):
                if not marks:
                    raise DataError(f"{path}: malformed pickle ({name} at byte {pos} without a MARK)")
                top = marks.pop()
                if name in ("SETITEMS", "DICT"):
                    keys += (depth - top) // 2
                depth = top - (before.index(mark) if mark in before else 0)
            else:
                depth -= len(before)
                keys += name == "SETITEM"
            if depth < 0:
                raise DataError(f"{path}: malformed pickle ({name} at byte {pos} pops an empty stack)")
            if mark in after:
                marks.append(depth)
            else:
                depth += len(after)
            if keys > _PICKLE_MAX_DICT_KEYS:
                raise DataError(f"{path}: refused to unpickle: its dicts hold more than "
                                f"{_PICKLE_MAX_DICT_KEYS} keys (a dataset pickle has a handful)")
    except DataError:
        raise
    except (ValueError, struct.error, EOFError) as e:  # truncated, unknown opcode, bad number
        raise DataError(f"{path}: malformed pickle ({type(e).__name__}: {e})") from None
    return ops


class _NdarrayToken:
    """What a pickle gets for ``numpy.ndarray``: an argument for ``_reconstruct``, not a callable.
    Calling ``numpy.ndarray(shape, dtype, buffer, offset, strides)`` views a few bytes as an array
    of any size (zero strides: 163 bytes can ask for 8.6 GiB, which a copy then allocates)."""

    __slots__ = ()

    def __call__(self, *args: Any) -> Any:
        raise _Refused("it calls numpy.ndarray(...) directly, which views a few bytes as an array of any "
                       "shape and strides (numpy itself writes arrays through _reconstruct)")


_NDARRAY = _NdarrayToken()
_reconstruct_array = np.zeros(0).__reduce__()[0]  # numpy's _reconstruct, whichever module it lives in


class _DType:
    """A pickled dtype, built from a plain number type only; its pickled state may set the byte order."""

    __slots__ = ("dtype",)
    _SPEC = re.compile(r"[<>|=]?(b1|[iu][1248]|f[248]|c(8|16))")

    def __init__(self, spec: Any, align: Any = False, copy: Any = False) -> None:
        if isinstance(spec, bytes):
            spec = spec.decode("latin1")
        if not isinstance(spec, str) or not self._SPEC.fullmatch(spec):
            raise _Refused(f"numpy.dtype({spec!r:.40}) is not a plain number type (bool, int, uint, "
                           f"float, complex)")
        self.dtype = np.dtype(spec)

    def __setstate__(self, state: Any) -> None:
        if not (isinstance(state, tuple) and len(state) in (8, 9) and state[0] in (3, 4)
                and all(s is None for s in state[2:5]) and state[5] in (-1, self.dtype.itemsize)):
            raise _Refused(f"a {self.dtype} dtype with the state {state!r:.80} (fields, subarrays or "
                           f"another size)")
        order = state[1].decode("latin1") if isinstance(state[1], bytes) else state[1]
        if order not in ("<", ">", "|", "="):
            raise _Refused(f"dtype byte order {order!r:.20}")
        if order in "<>":
            self.dtype = self.dtype.newbyteorder(order)


def _plain_dtype(dt: Any) -> np.dtype:
    if not isinstance(dt, _DType):
        raise _Refused(f"an array's dtype is a {type(dt).__name__}, not a numpy.dtype")
    return dt.dtype


def _check_shape(shape: Any, dtype: np.dtype, nbytes: int) -> tuple[int, ...]:
    """``shape`` of an array that ``nbytes`` of raw data fill exactly (sizes in Python integers)."""
    if not (isinstance(shape, tuple) and len(shape) <= 32
            and all(type(d) is int and d >= 0 for d in shape)):
        raise _Refused(f"an array shape {shape!r:.80} (not a tuple of at most 32 sizes)")
    need = dtype.itemsize
    for d in shape:
        need *= d
    if need != nbytes:
        raise _Refused(f"an array of shape {shape} and dtype {dtype} needs {need} bytes of data but the "
                       f"pickle holds {nbytes}")
    return shape


class _CheckedArray(np.ndarray):
    """What ``_reconstruct`` builds: an empty array whose pickled state is checked before numpy's
    ``__setstate__`` sees it -- a plain number dtype and exactly the raw bytes its shape needs, bytes
    that the pickle holds (so an array is never larger than its file)."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        raise _Refused("numpy.ndarray(...) called directly")

    def __setstate__(self, state: Any) -> None:
        if not (isinstance(state, tuple) and len(state) in (4, 5)):
            raise _Refused(f"an array state {type(state).__name__} (not (version, shape, dtype, fortran, data))")
        shape, dt, fortran, raw = state[-4:]
        dtype = _plain_dtype(dt)
        if not isinstance(raw, (bytes, bytearray)):
            raise _Refused(f"an array of {dtype} whose data is a {type(raw).__name__}, not bytes")
        shape = _check_shape(shape, dtype, len(raw))
        np.ndarray.__setstate__(self, (1, shape, dtype, fortran is True or fortran == 1, bytes(raw)))


def _np_reconstruct(subtype: Any, shape: Any, typecode: Any) -> np.ndarray:
    if subtype is not _NDARRAY or shape != (0,) or typecode not in (b"b", "b"):
        raise _Refused(f"numpy's _reconstruct called as {subtype!r:.40}, {shape!r:.40}, {typecode!r:.10} "
                       f"rather than as numpy writes it (ndarray, (0,), b'b')")
    return _reconstruct_array(_CheckedArray, (0,), b"b")


def _np_scalar(dt: Any, raw: Any = None) -> Any:
    dtype = _plain_dtype(dt)
    if not isinstance(raw, bytes) or len(raw) != dtype.itemsize:
        raise _Refused(f"a numpy {dtype} scalar from {type(raw).__name__} data")
    return np.frombuffer(raw, dtype, count=1)[0]


def _np_frombuffer(buf: Any, dt: Any, shape: Any, order: Any, axis_order: Any = None) -> np.ndarray:
    dtype = _plain_dtype(dt)
    if not isinstance(buf, (bytes, bytearray)) or order not in ("C", "F") or axis_order is not None:
        raise _Refused(f"numpy's _frombuffer with {type(buf).__name__} data and order {order!r:.10}")
    return np.frombuffer(buf, dtype).reshape(_check_shape(shape, dtype, len(buf)), order=order)


def _latin1_bytes(text: Any, encoding: Any) -> bytes:
    if not isinstance(text, str) or encoding != "latin1":
        raise _Refused(f"_codecs.encode with {encoding!r:.20}")
    return text.encode("latin1")


class _Admitted:
    """A callable handed to a pickle; immutable (no ``__dict__``, no settable slot), so that BUILD
    cannot alter it for this or any later unpickling."""

    __slots__ = ("_fn",)

    def __init__(self, fn: Any) -> None:
        object.__setattr__(self, "_fn", fn)

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError(key)

    def __call__(self, *args: Any) -> Any:
        return self._fn(*args)


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickler that builds numpy arrays and plain Python data, and refuses every other global.

    Containers, strings, bytes and numbers need no globals; numpy arrays need the reconstructor,
    ``ndarray``, ``dtype`` (and ``scalar``/``_frombuffer`` for scalars and protocol 5), under
    both the ``numpy.core`` and ``numpy._core`` spellings. Python 3 writes ``bytes`` in
    protocol 2 as ``_codecs.encode(text, "latin1")`` or ``bytes()``: both are admitted only in
    exactly that form. None of these is numpy's own function: each is a stand-in that accepts only
    what numpy writes (``_reconstruct(ndarray, (0,), b'b')`` then a checked ``__setstate__``, plain
    number dtypes, data bytes that fill the shape exactly), so every array consists of bytes the
    file holds: ``numpy.ndarray(shape, dtype, buffer, offset, strides)`` -- a zero-stride view of any
    size -- is refused.
    """

    ADMITTED: dict[tuple[str, str], Any] = {
        **{(m, "_reconstruct"): _Admitted(_np_reconstruct) for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
        **{(m, "scalar"): _Admitted(_np_scalar) for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
        **{(m, "_frombuffer"): _Admitted(_np_frombuffer) for m in ("numpy.core.numeric", "numpy._core.numeric")},
        ("numpy", "ndarray"): _NDARRAY,
        ("numpy", "dtype"): _Admitted(_DType),
        ("_codecs", "encode"): _Admitted(_latin1_bytes),
        ("__builtin__", "bytes"): _Admitted(lambda: b""),
        ("builtins", "bytes"): _Admitted(lambda: b""),
    }

    def __init__(self, file: io.BufferedIOBase, path: Path) -> None:
        super().__init__(file, encoding="bytes")
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        found = self.ADMITTED.get((module, name))
        if found is None:
            raise _refuse_global(self.path, module, name)
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise DataError(f"{self.path}: refused to unpickle: it uses persistent ids")


def safe_unpickle(path: Path, limit: int | None = None) -> Any:
    """Read a pickle of arrays and plain data without executing code; see the unpickler.

    The file (a regular file, at most ``limit`` bytes when given) is read into memory and its
    opcodes scanned first (:func:`_scan_pickle`); the memory it can make the unpickler allocate is
    checked against the budget before anything is built.
    """
    data = _read_bytes(path, "a pickle", limit)
    ops = _scan_pickle(data, path)
    check_memory(3 * len(data) + _PICKLE_BYTES_PER_OP * ops, f"unpickling {path} ({ops} opcodes)")
    try:
        return _plain_arrays(_ArrayOnlyUnpickler(io.BytesIO(data), path).load(), 0, set())
    except DataError:
        raise
    except _Refused as e:
        raise DataError(f"{path}: refused to unpickle: {e}") from None
    except Exception as e:  # a malformed pickle can raise almost anything
        raise DataError(f"{path}: malformed pickle ({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None


def _plain_arrays(obj: Any, depth: int, seen: set[int]) -> Any:
    """``obj`` with every :class:`_CheckedArray` in its dicts, lists and tuples as a plain ndarray
    view (dicts and lists changed in place, tuples rebuilt; cycles followed once)."""
    if isinstance(obj, _CheckedArray):
        return obj.view(np.ndarray)
    if type(obj) not in (dict, list, tuple) or id(obj) in seen:
        return obj
    if depth > 100:
        raise _Refused("containers nested more than 100 deep")
    seen.add(id(obj))
    if type(obj) is tuple:
        return tuple(_plain_arrays(v, depth + 1, seen) for v in obj)
    for k, v in obj.items() if type(obj) is dict else enumerate(obj):
        obj[k] = _plain_arrays(v, depth + 1, seen)
    return obj


def _check_array(path: Path, a: Any, key: str, file_size: int) -> np.ndarray:
    """``a`` as a plain ndarray, if it consists of real bytes of the file: contiguous, positive
    strides, at most ``file_size`` bytes (a broadcast or zero-stride view is refused before any copy)."""
    if not isinstance(a, np.ndarray):
        raise DataError(f"{path}: {key!r} must be a numpy array, got {type(a).__name__}")
    if a.dtype.hasobject or a.dtype.fields is not None:
        raise DataError(f"{path}: {key!r} must be an array of numbers, got dtype {a.dtype}")
    if (a.nbytes > file_size or not (a.flags.c_contiguous or a.flags.f_contiguous)
            or any(s <= 0 for s, d in zip(a.strides, a.shape) if d > 1)):
        raise DataError(f"{path}: {key!r} is a {a.shape} view with strides {a.strides} "
                        f"({format_bytes(a.nbytes)} from a {file_size}-byte file), not data; refused")
    return np.asarray(a).view(np.ndarray)


# --------------------------------------------------------------------------- MNIST (IDX)

_IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


#: Deflate expands at most 1032:1 (RFC 1951's longest match, 258 bytes, in a code of at least
#: 2 bits): a gzip of n bytes never holds more than this times n.
_DEFLATE_MAX_RATIO = 1032


def _load_mnist(name: str, root: Path, split: str) -> tuple[Tensor, Tensor]:
    files = _IDX_FILES[split]
    raw = "FashionMNIST/raw" if name == "fashion_mnist" else "MNIST/raw"
    _, (image_path, label_path) = _locate(name, root, [(raw, files), ("", files)], gz_ok=True)
    images, labels = read_idx(image_path, 3), read_idx(label_path, 1)
    if len(images) != len(labels):
        raise DataError(f"{label_path}: {len(labels)} labels for {len(images)} images "
                        f"in {image_path.name}")
    labels = labels.astype(np.int64)
    _check_labels(label_path, labels, 10)
    return torch.from_numpy(images[:, None]), torch.from_numpy(labels)


def _fill(f: BinaryIO, buf: np.ndarray | bytearray) -> int:
    """Read into ``buf`` until it is full or the stream ends; the bytes read."""
    view, got = memoryview(buf).cast("B"), 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            break
        got += n
    return got


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """An IDX file of unsigned bytes (magic ``0x0000080<ndim>``, big-endian dims), gzipped or not.

    Nothing is allocated before the header's size, computed in Python integers, has been checked:
    against the file size (plain), against what a gzip of that size can hold (deflate expands at
    most 1032:1), and against the memory budget. A gzip is inflated as a stream into a buffer of
    exactly that size, and refused as soon as it holds more.
    """
    f, size = _open_regular(path)
    header = 4 + 4 * ndim
    with f:
        try:
            gz = f.read(2) == b"\x1f\x8b"
            f.seek(0)
            stream = gzip.GzipFile(fileobj=f, mode="rb") if gz else f
            head = bytearray(header)
            got = _fill(stream, head)
            if got < 4:
                raise DataError(f"{path}: {got} bytes, too short for an IDX file (truncated)")
            magic = int.from_bytes(head[:4], "big")
            if magic != 0x800 + ndim:
                raise DataError(f"{path}: bad magic number 0x{magic:08x}, expected 0x{0x800 + ndim:08x} "
                                f"(IDX unsigned bytes, {ndim}-d)")
            if got < header:
                raise DataError(f"{path}: truncated IDX header ({got} of {header} bytes)")
            dims = struct.unpack(f">{ndim}I", bytes(head[4:]))
            if ndim > 1 and 0 in dims[1:]:
                raise DataError(f"{path}: empty image dimensions {dims[1:]}")
            count = 1
            for d in dims:
                count *= d  # Python integers: 2**32 x 2**32 x 2**32 does not wrap
            says = f"the header says {'x'.join(map(str, dims))} = {count}"
            if not gz and size - header != count:
                raise DataError(f"{path}: {size - header} data bytes but {says} (truncated or corrupt)")
            if gz and header + count > _DEFLATE_MAX_RATIO * size:
                raise DataError(f"{path}: {says} bytes, more than a {size}-byte gzip can hold (deflate "
                                f"expands at most {_DEFLATE_MAX_RATIO}:1); corrupt or a decompression bomb")
            check_memory(count, f"{path} ({'x'.join(map(str, dims))} bytes)")
            data = np.empty(count, dtype=np.uint8)
            got = _fill(stream, data)
            if got != count:
                raise DataError(f"{path}: {got} data bytes but {says} (truncated or corrupt)")
            if gz and stream.read(1):
                raise DataError(f"{path}: inflates past the {header + count} bytes its header announces "
                                f"({says}); corrupt or a decompression bomb, refused")
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
    return data.reshape(dims)


# --------------------------------------------------------------------------- image folders


#: The colour transparent pixels are composited onto (alpha blending, as a viewer shows them on a page).
ALPHA_BACKGROUND = (255, 255, 255)
#: The PIL decoders an image folder may use: the formats of IMAGE_EXTENSIONS, sniffed by content.
#: Never EPS (PIL runs Ghostscript on it), nor any other plugin, whatever a file's name says.
_PIL_FORMATS = ("BMP", "GIF", "JPEG", "PPM", "PNG", "TIFF", "WEBP")
_MODE_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}  # PIL: else 4


def _decode_bytes(w: int, h: int, mode: str) -> int:
    """Estimated peak bytes of decoding a ``w x h`` PIL image of ``mode`` and turning it into 8-bit
    RGB (:func:`_to_rgb8`): the decoded pixels plus at most four 4-byte-per-pixel copies."""
    return w * h * (_MODE_BYTES.get(mode, 4) + 16)


def _resized_bytes(size: int) -> int:
    """Estimated bytes of one image's final ``size x size`` RGB (PIL's, its resize pass, numpy's, torch's)."""
    return 16 * size * size


def _to_rgb8(im: Any) -> Any:
    """8-bit RGB of a decoded PIL image, whatever its mode.

    16-bit samples (``I;16*``, and ``I``, which PIL gives 16-bit PGM/TIFF) are scaled by
    ``round(v * 255 / 65535)`` -- PIL's own conversion clips them at 255, i.e. white; ``F`` keeps
    PIL's 0..255 scale (rounded, clipped, NaN as 0); an alpha channel or a transparent colour
    (``RGBA``, ``LA``, ``PA``, ``La``, ``RGBa``, palette or grey ``transparency``) is composited onto
    :data:`ALPHA_BACKGROUND`, so hidden colours never show; everything else (``1``, ``L``, ``P``,
    ``CMYK``, ``YCbCr``, ...) is PIL's conversion.
    """
    from PIL import Image

    if im.mode.startswith("I;16") or im.mode == "I":
        v = np.asarray(im)
        v = (np.clip(v, 0, 65535) if im.mode == "I" else v).astype(np.uint32)
        v *= 255
        v += 32767
        v //= 65535
        im = Image.fromarray(v.astype(np.uint8), "L")
    elif im.mode == "F":
        v = np.nan_to_num(np.asarray(im, dtype=np.float32), nan=0.0)
        im = Image.fromarray(np.clip(np.rint(v), 0, 255).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info:
        im = (im.convert("LA") if im.mode == "La" else im).convert("RGBA")
        background = Image.new("RGBA", im.size, (*ALPHA_BACKGROUND, 255))
        return Image.alpha_composite(background, im).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


def read_image(path: Path, size: int) -> Tensor:
    """uint8 (3, size, size): RGB (:func:`_to_rgb8`), the center square of the shorter side resized
    to ``size`` (bilinear, antialiased) -- what resizing the shorter side and cropping the center
    gives, computed on the crop alone, so a 1 x 100000 image costs what a square one does.

    Refused: a file that is not a regular file, or not one of the formats of ``IMAGE_EXTENSIONS``
    (by content, whatever its name), an image above PIL's decompression-bomb limit
    (``PIL.Image.MAX_IMAGE_PIXELS``: an error here, not PIL's warning), an image whose decoding
    would need more than the memory budget (:class:`~sepconv.errors.ResourceError`, checked from
    its header before any pixel is decoded), a truncated or malformed file (:class:`DataError`).
    """
    from PIL import Image

    f, _ = _open_regular(path)
    with f, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(f, formats=_PIL_FORMATS) as im:
                w, h = im.size
                check_memory(_decode_bytes(w, h, im.mode), f"{path}: decoding its {w}x{h} {im.mode} pixels")
                im.load()
                im = _to_rgb8(im)
            scale = size / min(w, h)
            new = (max(size, round(w * scale)), max(size, round(h * scale)))
            left, top = (new[0] - size) // 2, (new[1] - size) // 2
            if new == (w, h):
                im = im.crop((left, top, left + size, top + size))
            else:  # the crop of the resized image as a box in the original: the same pixels, up to +-1
                sx, sy = w / new[0], h / new[1]
                im = im.resize((size, size), Image.Resampling.BILINEAR,
                               box=(left * sx, top * sy, (left + size) * sx, (top + size) * sy))
            pixels = np.asarray(im, dtype=np.uint8)
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
            raise DataError(f"{path}: refused as a decompression bomb ({e}; the limit is "
                            f"PIL.Image.MAX_IMAGE_PIXELS)") from None
        except Exception as e:  # noqa: BLE001 -- a malformed image can make a decoder raise almost anything
            if isinstance(e, (DataError, MemoryError)):
                raise
            raise DataError(f"{path}: cannot read image ({type(e).__name__}: "
                            f"{' '.join(str(e).split())[:200]})") from None
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1)


def _entries(d: Path) -> list[os.DirEntry]:
    """Visible entries of directory ``d``, sorted by name; :class:`DataError` if it cannot be listed."""
    try:
        with os.scandir(d) as it:
            return sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    except OSError as e:
        raise DataError(f"imagefolder: {d}: cannot list it ({_reason(e)})") from None


def _subdirs(d: Path) -> list[Path]:
    """Visible subdirectories of ``d`` (links followed), sorted."""
    out = []
    for e in _entries(d):
        st = _stat(Path(e.path))
        if st is not None and stat.S_ISDIR(st.st_mode):
            out.append(Path(e.path))
    return out


def _image_files(folder: Path, seen: dict[tuple[int, int], Path]) -> list[Path]:
    """Sorted image files under ``folder``, searched recursively, links followed; every directory is
    visited once (``seen``): one reached twice -- a symbolic link loop, or a link to a directory
    already read -- is a :class:`DataError`, as are unreadable directories, broken links and
    non-regular files (FIFOs, devices) named like images."""
    files, stack = [], [(folder, ())]
    while stack:
        d, ancestors = stack.pop()
        st = _stat(d)
        if st is None:
            continue
        key = (st.st_dev, st.st_ino)
        if key in seen:
            if key in ancestors:
                raise DataError(f"imagefolder: {d}: a symbolic link loop (it leads back to {seen[key]})")
            raise DataError(f"imagefolder: {d} is the same directory as {seen[key]} (linked twice)")
        seen[key] = d
        for e in _entries(d):
            p = Path(e.path)
            st = _stat(p)
            is_image = p.suffix.lower() in IMAGE_EXTENSIONS
            if st is None:
                if is_image and e.is_symlink():
                    raise DataError(f"{p}: a broken symbolic link (its target does not exist)")
            elif stat.S_ISDIR(st.st_mode):
                stack.append((p, (*ancestors, key)))
            elif is_image:
                if not stat.S_ISREG(st.st_mode):
                    raise DataError(f"{p}: is {_kind(st.st_mode)}, not a regular file")
                files.append(p)
    return sorted(files)


def _class_folders(d: Path) -> dict[str, list[Path]]:
    """Sorted class name -> sorted image files (searched recursively) of each visible subfolder."""
    seen: dict[tuple[int, int], Path] = {}
    return {c.name: _image_files(c, seen) for c in _subdirs(d)}


def _load_imagefolder(root: Path, split: str, size: int) -> ImageFolderDataset:
    layout = "<class>/<image>"
    _check_root("imagefolder", root, f"train/{layout} and test/ or val/{layout}, or {layout} there "
                                     f"(images: {' '.join(IMAGE_EXTENSIONS)})")
    check_memory(_resized_bytes(size), f"imagefolder: one image at image_size {size}")
    subdirs = {p.name for p in _subdirs(root)}
    if "train" in subdirs:
        train = _class_folders(root / "train")
        classes = [c for c, files in train.items() if files]
        if split == "train":
            folders, where = train, root / "train"
        else:
            test = next((root / s for s in ("test", "val") if s in subdirs), None)
            if test is None:
                raise DataNotFoundError(f"imagefolder: {root} has train/ but no test/ or val/; "
                                        f"expected test/{layout} there")
            folders, where = _class_folders(test), test
            unknown = sorted(set(folders) - set(classes))
            if unknown:
                raise DataError(f"imagefolder: {test} has classes not in {root / 'train'}: "
                                f"{', '.join(unknown)}")
        files = [(f, classes.index(c)) for c, fs in folders.items() for f in fs]
    elif subdirs & {"test", "val"}:
        raise DataNotFoundError(f"imagefolder: {root} has test/ or val/ but no train/; "
                                f"expected train/{layout} there")
    else:
        folders, where = _class_folders(root), root
        classes = [c for c, fs in folders.items() if fs]
        everything = [(f, classes.index(c)) for c, fs in folders.items() for f in fs]
        labels = np.array([t for _, t in everything], dtype=np.int64)
        files = [everything[i] for i in stratified_split(labels, split)]
    empty = [c for c, fs in folders.items() if not fs]
    if empty or not classes:
        raise DataNotFoundError(f"imagefolder: no images in {where}/{empty[0] if empty else ''}; "
                                f"expected {layout} there (images: {' '.join(IMAGE_EXTENSIONS)})")
    mean, std = MEAN_STD["imagefolder"]
    return ImageFolderDataset([f for f, _ in files],
                              torch.tensor([t for _, t in files], dtype=torch.int64), size,
                              name="imagefolder", split=split, classes=classes, mean=mean,
                              std=std, flip_ok=True)


# --------------------------------------------------------------------------- augmentation


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


__all__ = [
    "DATASETS",
    "SPLITS",
    "ImageDataset",
    "TensorImageDataset",
    "ImageFolderDataset",
    "load_dataset",
    "augment_batch",
    "resize_uint8",
    "stratified_split",
    "safe_unpickle",
    "read_idx",
    "read_image",
]
