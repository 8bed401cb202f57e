"""Image folders: ``root/{train,test|val}/<class>/<image>``, or ``root/<class>/<image>`` split 80/20.

Images are found recursively under each class folder (links followed, every directory visited
once: a link loop or a directory linked twice is an error, not an endless walk), decoded on demand
by :func:`~sepconv.data.images.read_image` and normalized with the ImageNet statistics. A folder
without ``train/`` gets the fixed per-class split of :func:`~sepconv.data.base.stratified_split`.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import DataError, DataNotFoundError
from ..guard import check_memory
from .base import ImageDataset, stratified_split
from .images import IMAGE_EXTENSIONS, read_image, resized_bytes
from .registry import register_dataset
from .safe_files import check_root, file_kind, reason, stat_or_none

__all__ = ["ImageFolderDataset"]

#: ImageNet's per-channel (mean, std) of x / 255, the usual constants for photographs.
_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


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


def _entries(d: Path) -> list[os.DirEntry]:
    """Visible entries of directory ``d``, sorted by name; :class:`DataError` if it cannot be listed."""
    try:
        with os.scandir(d) as it:
            return sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    except OSError as e:
        raise DataError(f"imagefolder: {d}: cannot list it ({reason(e)})") from None


def _subdirs(d: Path) -> list[Path]:
    """Visible subdirectories of ``d`` (links followed), sorted."""
    out = []
    for e in _entries(d):
        st = stat_or_none(Path(e.path))
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
        st = stat_or_none(d)
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
            st = stat_or_none(p)
            is_image = p.suffix.lower() in IMAGE_EXTENSIONS
            if st is None:
                if is_image and e.is_symlink():
                    raise DataError(f"{p}: a broken symbolic link (its target does not exist)")
            elif stat.S_ISDIR(st.st_mode):
                stack.append((p, (*ancestors, key)))
            elif is_image:
                if not stat.S_ISREG(st.st_mode):
                    raise DataError(f"{p}: is {file_kind(st.st_mode)}, not a regular file")
                files.append(p)
    return sorted(files)


def _class_folders(d: Path) -> dict[str, list[Path]]:
    """Sorted class name -> sorted image files (searched recursively) of each visible subfolder."""
    seen: dict[tuple[int, int], Path] = {}
    return {c.name: _image_files(c, seen) for c in _subdirs(d)}


@register_dataset("imagefolder", default_size=224)
def _load_imagefolder(root: Path, split: str, size: int) -> ImageFolderDataset:
    layout = "<class>/<image>"
    check_root("imagefolder", root, f"train/{layout} and test/ or val/{layout}, or {layout} there "
                                    f"(images: {' '.join(IMAGE_EXTENSIONS)})")
    check_memory(resized_bytes(size), f"imagefolder: one image at image_size {size}")
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
    mean, std = _MEAN_STD
    return ImageFolderDataset([f for f, _ in files],
                              torch.tensor([t for _, t in files], dtype=torch.int64), size,
                              name="imagefolder", split=split, classes=classes, mean=mean,
                              std=std, flip_ok=True)

