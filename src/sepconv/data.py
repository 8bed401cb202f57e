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
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from .errors import ConfigError, DataError, DataNotFoundError

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
        """``(x, y)``: normalized float32 NCHW images and int64 labels of ``indices``."""
        indices = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
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
        if len(indices) == 0:
            return torch.empty(0, 3, self.size, self.size, dtype=torch.uint8)
        return torch.stack([read_image(self.files[int(i)], self.size) for i in indices])


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
    root = Path(root if root is not None else os.environ.get("SEPCONV_DATA", "data"))
    if name == "imagefolder":
        return _load_imagefolder(root, split, size)
    if name in ("cifar10", "cifar100"):
        images, targets, classes = _load_cifar(name, root, split)
    else:
        images, targets = _load_mnist(name, root, split)
        classes = FASHION_MNIST_CLASSES if name == "fashion_mnist" else tuple(map(str, range(10)))
    mean, std = MEAN_STD[name]
    return TensorImageDataset(resize_uint8(images, size), targets, name=name, split=split,
                              classes=classes, mean=mean, std=std, flip_ok=name != "mnist")


# --------------------------------------------------------------------------- shared helpers


def resize_uint8(images: Tensor, size: int | None, chunk: int = 2048) -> Tensor:
    """Bilinear (antialiased) resize of uint8 NCHW ``images`` to ``size x size``, rounded."""
    if size is None or tuple(images.shape[2:]) == (size, size):
        return images
    parts = [F.interpolate(images[i:i + chunk].float(), size=(size, size), mode="bilinear",
                           align_corners=False, antialias=True).round_().clamp_(0, 255)
             .to(torch.uint8) for i in range(0, len(images), chunk)]
    return torch.cat(parts) if parts else images.new_empty(0, images.shape[1], size, size)


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


def _find(path: Path, gz_ok: bool) -> Path | None:
    for p in (path, path.with_name(path.name + ".gz")) if gz_ok else (path,):
        if p.is_file():
            return p
    return None


def _locate(name: str, root: Path, layouts: Sequence[tuple[str, Sequence[str]]],
            gz_ok: bool = False) -> tuple[int, list[Path]]:
    """First layout ``(subdir, files)`` whose files all exist under ``root``: (index, paths).

    Raises :class:`DataNotFoundError` naming the directory and the files expected there.
    """
    suffix = " (optionally .gz)" if gz_ok else ""
    expected = " or ".join(f"{(root / sub)}/{{{', '.join(files)}}}" for sub, files in layouts)
    if not root.is_dir():
        raise DataNotFoundError(f"{name}: directory {root} does not exist; "
                                f"expected {expected}{suffix}")
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


def _load_digits(split: str, size: int) -> TensorImageDataset:
    images, targets = _digits_uint8()
    images = resize_uint8(images, size)
    train = images[torch.from_numpy(stratified_split(targets, "train"))].double() / 255
    mean, std = (train.mean().item(),), (train.std(correction=0).item(),)
    idx = torch.from_numpy(stratified_split(targets, split))
    return TensorImageDataset(images[idx], torch.from_numpy(targets)[idx], name="digits",
                              split=split, classes=[str(d) for d in range(10)], mean=mean,
                              std=std, flip_ok=False)


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


def _load_cifar(name: str, root: Path, split: str) -> tuple[Tensor, Tensor, Sequence[str]]:
    (k, label_bytes, bin_dir, bin_files, bin_meta,
     py_dir, py_files, label_key, py_meta, meta_key) = _CIFAR[name]
    layouts = [(bin_dir, bin_files[split]), (py_dir, py_files[split]),
               ("", bin_files[split]), ("", py_files[split])]
    which, paths = _locate(name, root, layouts)
    binary = which % 2 == 0
    read = (lambda p: _read_cifar_binary(p, label_bytes, k)) if binary else \
        (lambda p: _read_cifar_python(p, label_key, k))
    parts = [read(p) for p in paths]
    images = torch.from_numpy(np.concatenate([im for im, _ in parts]))
    targets = torch.from_numpy(np.concatenate([t for _, t in parts]))
    meta = paths[0].parent / (bin_meta if binary else py_meta)
    classes = _cifar_classes(meta, binary, meta_key, k) if meta.is_file() else \
        (CIFAR10_CLASSES if k == 10 else tuple(map(str, range(k))))
    return images, targets, classes


def _read_cifar_binary(path: Path, label_bytes: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Records of ``label_bytes`` (CIFAR-100: coarse, fine) + 3072 pixel bytes (R, G, B planes)."""
    raw = np.fromfile(path, dtype=np.uint8)
    record = label_bytes + _CIFAR_PIXELS
    if raw.size == 0 or raw.size % record:
        raise DataError(f"{path}: {raw.size} bytes is not a whole number of {record}-byte "
                        f"CIFAR records (truncated or not a CIFAR binary file)")
    raw = raw.reshape(-1, record)
    labels = raw[:, label_bytes - 1].astype(np.int64)
    _check_labels(path, labels, k)
    return raw[:, label_bytes:].reshape(-1, 3, 32, 32), labels


def _read_cifar_python(path: Path, label_key: str, k: int) -> tuple[np.ndarray, np.ndarray]:
    batch = _str_keys(path, safe_unpickle(path))
    data, labels = batch.get("data"), batch.get(label_key)
    if data is None or labels is None:
        raise DataError(f"{path}: not a CIFAR batch (needs keys 'data' and {label_key!r}, "
                        f"has {sorted(batch)})")
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
            and data.shape[1] == _CIFAR_PIXELS):
        raise DataError(f"{path}: 'data' must be a uint8 array of shape (N, {_CIFAR_PIXELS}), "
                        f"got {getattr(data, 'dtype', type(data).__name__)} "
                        f"{getattr(data, 'shape', '')}")
    try:
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError) as e:
        raise DataError(f"{path}: {label_key!r} is not a list of integers ({e})") from None
    if len(labels) != len(data):
        raise DataError(f"{path}: {len(data)} images but {len(labels)} labels")
    _check_labels(path, labels, k)
    return data.reshape(-1, 3, 32, 32), labels


def _cifar_classes(meta: Path, binary: bool, key: str, k: int) -> list[str]:
    if binary:
        names = [ln.strip() for ln in meta.read_text(errors="replace").splitlines() if ln.strip()]
    else:
        names = _str_keys(meta, safe_unpickle(meta)).get(key)
        if not isinstance(names, list):
            raise DataError(f"{meta}: no list {key!r} of class names")
        names = [n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n) for n in names]
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


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickler that builds numpy arrays and plain Python data, and refuses every other global.

    Containers, strings, bytes and numbers need no globals; numpy arrays need the reconstructor,
    ``ndarray``, ``dtype`` (and ``scalar``/``_frombuffer`` for scalars and protocol 5), under
    both the ``numpy.core`` and ``numpy._core`` spellings. Python 3 writes ``bytes`` in
    protocol 2 as ``_codecs.encode(text, "latin1")`` or ``bytes()``: both are admitted only in
    exactly that form.
    """

    _NUMPY = {(m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray")
              for n in ("_reconstruct", "scalar")} | \
             {(m, "_frombuffer") for m in ("numpy.core.numeric", "numpy._core.numeric")} | \
             {("numpy", "ndarray"), ("numpy", "dtype")}

    def __init__(self, file: io.BufferedIOBase, path: Path) -> None:
        super().__init__(file, encoding="bytes")
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._NUMPY:
            return super().find_class(module, name)
        if (module, name) == ("_codecs", "encode"):
            def latin1_bytes(text: str, encoding: str) -> bytes:
                if not isinstance(text, str) or encoding != "latin1":
                    raise DataError(f"{self.path}: refused: _codecs.encode with {encoding!r}")
                return text.encode("latin1")
            return latin1_bytes
        if (module, name) in (("__builtin__", "bytes"), ("builtins", "bytes")):
            def empty_bytes() -> bytes:
                return b""
            return empty_bytes
        raise DataError(f"{self.path}: refused to unpickle: it asks for the global "
                        f"{module}.{name}, which would execute code; a dataset pickle may only "
                        f"hold numpy arrays, lists, dicts, strings, bytes and numbers")

    def persistent_load(self, pid: Any) -> Any:
        raise DataError(f"{self.path}: refused to unpickle: it uses persistent ids")


def safe_unpickle(path: Path) -> Any:
    """Read a pickle of arrays and plain data without executing code; see the unpickler."""
    try:
        with open(path, "rb") as f:
            return _ArrayOnlyUnpickler(f, path).load()
    except DataError:
        raise
    except Exception as e:  # a malformed pickle can raise almost anything
        raise DataError(f"{path}: malformed pickle ({type(e).__name__}: {e})") from None


# --------------------------------------------------------------------------- MNIST (IDX)

_IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _load_mnist(name: str, root: Path, split: str) -> tuple[Tensor, Tensor]:
    files = _IDX_FILES[split]
    raw = "FashionMNIST/raw" if name == "fashion_mnist" else "MNIST/raw"
    _, (image_path, label_path) = _locate(name, root, [(raw, files), ("", files)], gz_ok=True)
    images, labels = read_idx(image_path, 3), read_idx(label_path, 1).astype(np.int64)
    if len(images) != len(labels):
        raise DataError(f"{label_path}: {len(labels)} labels for {len(images)} images "
                        f"in {image_path.name}")
    _check_labels(label_path, labels, 10)
    return torch.from_numpy(images.copy()[:, None]), torch.from_numpy(labels)


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """An IDX file of unsigned bytes (magic ``0x0000080<ndim>``, big-endian dims), gzipped or not."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    header = 4 + 4 * ndim
    if len(raw) < 4:
        raise DataError(f"{path}: {len(raw)} bytes, too short for an IDX file (truncated)")
    magic = int.from_bytes(raw[:4], "big")
    if magic != 0x800 + ndim:
        raise DataError(f"{path}: bad magic number 0x{magic:08x}, expected 0x{0x800 + ndim:08x} "
                        f"(IDX unsigned bytes, {ndim}-d)")
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} of {header} bytes)")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    if ndim > 1 and 0 in dims[1:]:
        raise DataError(f"{path}: empty image dimensions {dims[1:]}")
    count = int(np.prod(dims))
    if len(raw) - header != count:
        raise DataError(f"{path}: {len(raw) - header} data bytes but the header says "
                        f"{'x'.join(map(str, dims))} = {count} (truncated or corrupt)")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


# --------------------------------------------------------------------------- image folders


def read_image(path: Path, size: int) -> Tensor:
    """uint8 (3, size, size): RGB, shorter side resized to ``size`` (bilinear), center crop."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
        w, h = im.size
        scale = size / min(w, h)
        new = (max(size, round(w * scale)), max(size, round(h * scale)))
        if new != (w, h):
            im = im.resize(new, Image.Resampling.BILINEAR)
        left, top = (new[0] - size) // 2, (new[1] - size) // 2
        im = im.crop((left, top, left + size, top + size))
        pixels = np.asarray(im, dtype=np.uint8)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1)


def _class_folders(d: Path) -> dict[str, list[Path]]:
    """Sorted class name -> sorted image files (searched recursively) of each visible subfolder."""
    out = {}
    for c in sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")):
        out[c.name] = sorted(p for p in c.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS
                             and p.is_file() and not p.name.startswith("."))
    return out


def _load_imagefolder(root: Path, split: str, size: int) -> ImageFolderDataset:
    layout = "<class>/<image>"
    if not root.is_dir():
        raise DataNotFoundError(f"imagefolder: directory {root} does not exist; expected "
                                f"train/{layout} and test/ or val/{layout}, or {layout} there "
                                f"(images: {' '.join(IMAGE_EXTENSIONS)})")
    subdirs = {p.name for p in root.iterdir() if p.is_dir()}
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
