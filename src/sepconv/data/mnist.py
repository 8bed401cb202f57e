"""MNIST (LeCun et al., 1998) and Fashion-MNIST (Xiao et al., 2017) from their IDX files.

The four IDX files of a split (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
``t10k-...``), plain or ``.gz``, in ``root``, in ``root/MNIST/raw`` (``root/FashionMNIST/raw``)
as torchvision lays them out, or with ``root`` that ``raw`` directory. :func:`read_idx` reads one
IDX file as hostile input: its header's sizes are checked before anything is allocated.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from ..errors import DataError
from ..guard import check_memory
from .base import TensorImageDataset, check_labels, in_memory_dataset
from .registry import register_dataset
from .safe_files import locate, open_regular

__all__ = ["FASHION_MNIST_CLASSES", "load_mnist", "read_idx"]

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


@dataclass(frozen=True)
class _IdxDataset:
    """One dataset in the MNIST format: its torchvision directory, classes and statistics."""

    raw_dir: str
    classes: tuple[str, ...]
    mean: tuple[float, ...]   # train-set (mean, std) of x / 255
    std: tuple[float, ...]
    flip_ok: bool             # a mirrored digit is not a digit; a mirrored shoe is a shoe


_MNIST = {
    "mnist": _IdxDataset("MNIST/raw", tuple(map(str, range(10))), (0.1307,), (0.3081,), flip_ok=False),
    "fashion_mnist": _IdxDataset("FashionMNIST/raw", FASHION_MNIST_CLASSES, (0.2860,), (0.3530,),
                                 flip_ok=True),
}
_IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
#: Deflate expands at most 1032:1 (RFC 1951's longest match, 258 bytes, in a code of at least
#: 2 bits): a gzip of n bytes never holds more than this times n.
_DEFLATE_MAX_RATIO = 1032


def load_mnist(name: str, root: Path, split: str, size: int | None) -> TensorImageDataset:
    """Split ``split`` of IDX dataset ``name`` (``"mnist"``, ``"fashion_mnist"``) under ``root``,
    resized to ``size`` (``None``: 28)."""
    ds = _MNIST[name]
    files = _IDX_FILES[split]
    _, (image_path, label_path) = locate(name, root, [(ds.raw_dir, files), ("", files)], gz_ok=True)
    images, labels = read_idx(image_path, 3), read_idx(label_path, 1)
    if len(images) != len(labels):
        raise DataError(f"{label_path}: {len(labels)} labels for {len(images)} images "
                        f"in {image_path.name}")
    labels = labels.astype(np.int64)
    check_labels(label_path, labels, 10)
    return in_memory_dataset(name, split, torch.from_numpy(images[:, None]), torch.from_numpy(labels),
                             ds.classes, size, ds.mean, ds.std, flip_ok=ds.flip_ok)


for _name in _MNIST:
    register_dataset(_name, partial(load_mnist, _name))


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
    f, size = open_regular(path)
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
