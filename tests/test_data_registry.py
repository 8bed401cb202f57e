"""sepconv.data.registry: a dataset registered in one place is loadable and listed everywhere."""

from __future__ import annotations

import pytest
import torch

import sepconv.data as data
from sepconv.data import registry
from sepconv.data.base import TensorImageDataset
from sepconv.errors import ConfigError, DataError


@pytest.fixture
def fresh_registry(monkeypatch):
    """The registry as it is, in a copy that the test may add to and that is dropped after it."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


def test_builtin_datasets_in_their_documented_order():
    assert data.list_datasets() == ("digits", "cifar10", "cifar100", "mnist", "fashion_mnist", "imagefolder")
    assert data.DATASETS == data.list_datasets()
    assert data.dataset_spec("digits").default_size == 32 and not data.dataset_spec("digits").needs_root
    assert data.dataset_spec("imagefolder").default_size == 224 and data.dataset_spec("mnist").default_size is None


def test_a_registered_toy_dataset_is_loaded_and_listed(fresh_registry, tmp_path):
    calls = []

    @data.register_dataset("toy", default_size=5)
    def load_toy(root, split, size):
        calls.append((root, split, size))
        images = torch.full((3, 1, size, size), 7, dtype=torch.uint8)
        return TensorImageDataset(images, torch.tensor([0, 1, 0]), name="toy", split=split, classes=["a", "b"],
                                  mean=(0.5,), std=(0.25,), flip_ok=False)

    assert data.DATASETS[-1] == "toy" and "toy" in data.list_datasets()
    ds = data.load_dataset("toy", tmp_path, split="test")
    assert calls == [(tmp_path, "test", 5)] and ds.image_size == (5, 5) and ds.num_classes == 2
    data.load_dataset("toy", tmp_path, image_size=3)
    assert calls[-1] == (tmp_path, "train", 3)
    with pytest.raises(ConfigError, match="'toy' is already registered"):
        data.register_dataset("toy", load_toy)


def test_a_dataset_that_needs_no_files_gets_no_root(fresh_registry, monkeypatch, tmp_path):
    seen = []
    data.register_dataset("bundled", lambda root, split, size: seen.append(root), needs_root=False)
    monkeypatch.setenv("SEPCONV_DATA", str(tmp_path / "nowhere"))  # would be refused if it were resolved
    data.load_dataset("bundled")
    assert seen == [None]
    with pytest.raises(DataError, match="unknown dataset 'nope'; known datasets: .*bundled"):
        data.load_dataset("nope")
