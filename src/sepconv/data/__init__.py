"""Image classification datasets read from local files; nothing is ever downloaded.

``load_dataset(name, root, split, image_size, folds=None, fold=0)`` returns an :class:`ImageDataset`:

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

Cross-validation folds. ``load_dataset(..., folds=K, fold=i)`` (K >= 2, i in ``0..K-1``)
pools the dataset's own train and test splits, train first, and returns fold i of a fixed
stratified K-fold partition of the pool as ``"test"`` and the other K-1 folds as ``"train"``
(a :class:`SubsetDataset`: index arrays into the two splits, read on demand). The partition
(:func:`kfold_indices`): within each class, in ascending label order, the pool indices are
permuted by ``numpy.random.RandomState(0)``; the permuted classes, laid end to end, are dealt
round-robin into the K folds, so folds differ by at most one image per class and one overall.
Training over i = 0..K-1 tests every image exactly once (digits, 1797 images, K = 3: 599 a
fold). Normalization stays fixed per dataset -- for ``digits`` the statistics of its own train
split -- and is not refitted per fold. Every class needs at least K images in the pool.

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

Modules, one concept each: :mod:`~sepconv.data.registry` (name -> loader; add a dataset with
:func:`register_dataset` in its family module), :mod:`~sepconv.data.base` (the dataset classes,
labels, fixed splits and folds), :mod:`~sepconv.data.transforms` (bounded resize, augmentation), the families
:mod:`~sepconv.data.digits`, :mod:`~sepconv.data.cifar`, :mod:`~sepconv.data.mnist` and
:mod:`~sepconv.data.imagefolder` (with :mod:`~sepconv.data.images`, one image file decoded), and
the hostile-input readers :mod:`~sepconv.data.safe_files` and :mod:`~sepconv.data.safe_pickle`.
"""

from __future__ import annotations

# NB: the families register their datasets on import, in this order, which is the order of
# list_datasets() and so of the CLI's help and "known datasets" messages (digits first: the default).
# isort: off
from . import digits, cifar, mnist, imagefolder  # noqa: F401 -- imported to register
# isort: on
from .base import SPLITS, ImageDataset, SubsetDataset, TensorImageDataset, kfold_indices, stratified_split
from .imagefolder import ImageFolderDataset
from .images import IMAGE_EXTENSIONS, read_image
from .mnist import read_idx
from .registry import DatasetSpec, dataset_spec, list_datasets, load_dataset, register_dataset
from .safe_pickle import safe_unpickle
from .transforms import augment_batch, resize_uint8

__all__ = [
    "DATASETS",
    "SPLITS",
    "IMAGE_EXTENSIONS",
    "ImageDataset",
    "TensorImageDataset",
    "SubsetDataset",
    "ImageFolderDataset",
    "DatasetSpec",
    "dataset_spec",
    "list_datasets",
    "load_dataset",
    "register_dataset",
    "augment_batch",
    "resize_uint8",
    "stratified_split",
    "kfold_indices",
    "safe_unpickle",
    "read_idx",
    "read_image",
]


def __getattr__(name: str) -> tuple[str, ...]:
    """``DATASETS``: the registered dataset names, read from the registry at each access (PEP 562),
    so a dataset registered later is listed too; the same as :func:`list_datasets`."""
    if name == "DATASETS":
        return list_datasets()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
