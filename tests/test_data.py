"""sepconv.data: every format written here in its real on-disk layout, then read back exactly."""

from __future__ import annotations

import gzip
import importlib
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sepconv.data import DATASETS, augment_batch, load_dataset
from sepconv.errors import ConfigError, DataError, DataNotFoundError

RNG = np.random.default_rng(1234)


def hwc_images(n: int, h: int = 32, w: int = 32, c: int = 3) -> np.ndarray:
    """Random uint8 images in the usual HWC layout (distinct rows/columns, so flips show)."""
    return RNG.integers(0, 256, size=(n, h, w, c), dtype=np.uint8)


def chw(images_hwc: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images_hwc).permute(0, 3, 1, 2)


# --------------------------------------------------------------------------- writers


def cifar_planes(images_hwc: np.ndarray) -> np.ndarray:
    """(N, 3072) rows as in the official files: 1024 red, 1024 green, 1024 blue, row-major."""
    return images_hwc.transpose(0, 3, 1, 2).reshape(len(images_hwc), -1)


def write_cifar_bin(path: Path, images: np.ndarray, labels: list[int],
                    coarse: list[int] | None = None) -> None:
    label_cols = [np.array(labels, np.uint8)[:, None]]
    if coarse is not None:
        label_cols.insert(0, np.array(coarse, np.uint8)[:, None])
    path.parent.mkdir(parents=True, exist_ok=True)
    np.concatenate(label_cols + [cifar_planes(images)], axis=1).tofile(path)


def write_pickle(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj, protocol=2))


def cifar10_tree(root: Path, fmt: str, sizes=(3, 2, 4, 1, 2), n_test=3):
    """A CIFAR-10 tree in format ``fmt`` ("bin"|"py"); returns {split: (images_hwc, labels)}."""
    out = {}
    d = root / ("cifar-10-batches-bin" if fmt == "bin" else "cifar-10-batches-py")
    for split, names in (("train", [f"data_batch_{i}" for i in range(1, 6)]),
                         ("test", ["test_batch"])):
        counts = sizes if split == "train" else (n_test,)
        all_images, all_labels = [], []
        for name, n in zip(names, counts):
            images, labels = hwc_images(n), RNG.integers(0, 10, n).tolist()
            if fmt == "bin":
                write_cifar_bin(d / f"{name}.bin", images, labels)
            else:
                write_pickle(d / name, {b"batch_label": b"x", b"labels": labels,
                                        b"data": cifar_planes(images),
                                        b"filenames": [b"f.png"] * n})
            all_images.append(images)
            all_labels += labels
        out[split] = (np.concatenate(all_images), all_labels)
    return d, out


def write_idx(path: Path, array: np.ndarray, compress: bool = False, magic: int | None = None):
    header = struct.pack(">I", magic if magic is not None else 0x800 + array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)


def mnist_tree(d: Path, compress: bool, n_train=5, n_test=3):
    out = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        images = hwc_images(n, 28, 28, 1)[..., 0]
        labels = RNG.integers(0, 10, n).astype(np.uint8)
        write_idx(d / f"{prefix}-images-idx3-ubyte", images, compress)
        write_idx(d / f"{prefix}-labels-idx1-ubyte", labels, compress)
        out[split] = (images, labels)
    return out


# --------------------------------------------------------------------------- CIFAR


@pytest.mark.parametrize("fmt", ["bin", "py"])
def test_cifar10_pixels_labels_and_order_read_back_exactly(tmp_path, fmt):
    batches_dir, truth = cifar10_tree(tmp_path, fmt)
    for root in (tmp_path, batches_dir):  # parent dir or the batches dir itself
        for split in ("train", "test"):
            ds = load_dataset("cifar10", root, split)
            images, labels = truth[split]
            assert torch.equal(ds.images, chw(images))
            assert ds.targets.tolist() == labels and ds.targets.dtype == torch.int64
            assert (ds.in_chans, ds.image_size, ds.num_classes, len(ds)) == \
                (3, (32, 32), 10, len(labels))
            assert ds.classes[0] == "airplane" and ds.flip_ok


def test_cifar10_class_names_come_from_the_meta_file(tmp_path):
    names = [f"class{i}" for i in range(10)]
    batches_dir, _ = cifar10_tree(tmp_path / "py", "py")
    write_pickle(batches_dir / "batches.meta", {b"label_names": [n.encode() for n in names],
                                                b"num_vis": 3072})
    assert load_dataset("cifar10", tmp_path / "py").classes == names
    bin_dir, _ = cifar10_tree(tmp_path / "bin", "bin")
    (bin_dir / "batches.meta.txt").write_text("\n".join(names) + "\n\n")
    assert load_dataset("cifar10", tmp_path / "bin", "test").classes == names


def test_cifar100_binary_and_python_use_the_fine_label(tmp_path):
    images = {s: hwc_images(n) for s, n in (("train", 5), ("test", 2))}
    fine = {s: RNG.integers(0, 100, len(im)).tolist() for s, im in images.items()}
    coarse = {s: RNG.integers(0, 20, len(im)).tolist() for s, im in images.items()}
    for s in images:
        write_cifar_bin(tmp_path / "cifar-100-binary" / f"{s}.bin", images[s], fine[s], coarse[s])
        write_pickle(tmp_path / "py" / "cifar-100-python" / s,
                     {b"data": cifar_planes(images[s]), b"fine_labels": fine[s],
                      b"coarse_labels": coarse[s], b"filenames": [b"a"] * len(fine[s])})
    write_pickle(tmp_path / "py" / "cifar-100-python" / "meta",
                 {b"fine_label_names": [f"f{i}".encode() for i in range(100)],
                  b"coarse_label_names": [f"c{i}".encode() for i in range(20)]})
    for root in (tmp_path, tmp_path / "py"):
        for s in images:
            ds = load_dataset("cifar100", root, s)
            assert torch.equal(ds.images, chw(images[s])) and ds.targets.tolist() == fine[s]
            assert ds.num_classes == 100
    assert load_dataset("cifar100", tmp_path / "py").classes[7] == "f7"
    assert load_dataset("cifar100", tmp_path).classes[7] == "7"


class _Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def test_pickle_with_code_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    d = tmp_path / "cifar-10-batches-py"
    write_pickle(d / "test_batch", {b"labels": [1], b"data": cifar_planes(hwc_images(1)),
                                    b"batch_label": _Payload(marker)})
    with pytest.raises(DataError, match=r"test_batch.*refused.*system.*execute code"):
        load_dataset("cifar10", tmp_path, "test")
    assert not marker.exists()
    pickle.loads((d / "test_batch").read_bytes())  # the payload is live for a plain unpickler
    assert marker.exists()


@pytest.mark.parametrize("call, spelled", [((eval, ("1",)), r"__builtin__\.eval"),
                                           ((importlib.import_module, ("os",)),
                                            r"importlib\.import_module")])
def test_pickle_asking_for_any_other_global_is_refused(tmp_path, call, spelled):
    class Evil:
        def __reduce__(self):
            return call

    write_pickle(tmp_path / "test_batch", {b"labels": [], b"data": Evil()})
    with pytest.raises(DataError, match=rf"refused.*global {spelled}, which would execute"):
        load_dataset("cifar10", tmp_path, "test")


def test_cifar_missing_directory_and_files_name_directory_and_expected_files(tmp_path):
    with pytest.raises(DataNotFoundError, match=r"nowhere.*data_batch_1\.bin.*data_batch_5"):
        load_dataset("cifar10", tmp_path / "nowhere")
    with pytest.raises(DataNotFoundError, match=rf"{tmp_path}.*cifar-100-binary.*train\.bin"):
        load_dataset("cifar100", tmp_path)
    batches_dir, _ = cifar10_tree(tmp_path, "bin")
    (batches_dir / "data_batch_4.bin").unlink()
    with pytest.raises(DataNotFoundError, match=r"cifar-10-batches-bin lacks data_batch_4\.bin"):
        load_dataset("cifar10", tmp_path)
    err = pytest.raises(FileNotFoundError, load_dataset, "cifar10", tmp_path).value
    assert len(str(err).splitlines()) == 1


def test_truncated_or_malformed_cifar_files_are_data_errors_naming_the_file(tmp_path):
    bin_dir, _ = cifar10_tree(tmp_path / "b", "bin")
    f = bin_dir / "test_batch.bin"
    f.write_bytes(f.read_bytes()[:-7])
    with pytest.raises(DataError, match=r"test_batch\.bin.*3073-byte"):
        load_dataset("cifar10", tmp_path / "b", "test")
    write_cifar_bin(f, hwc_images(2), [3, 10])
    with pytest.raises(DataError, match=r"test_batch\.bin.*labels must lie in 0\.\.9"):
        load_dataset("cifar10", tmp_path / "b", "test")

    py_dir, _ = cifar10_tree(tmp_path / "p", "py")
    f = py_dir / "test_batch"
    f.write_bytes(f.read_bytes()[:500])
    with pytest.raises(DataError, match=r"test_batch: malformed pickle"):
        load_dataset("cifar10", tmp_path / "p", "test")
    write_pickle(f, {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]})
    with pytest.raises(DataError, match=r"test_batch: 'data' must be a uint8 array"):
        load_dataset("cifar10", tmp_path / "p", "test")
    write_pickle(f, {b"data": cifar_planes(hwc_images(2)), b"labels": [0]})
    with pytest.raises(DataError, match=r"test_batch: 2 images but 1 labels"):
        load_dataset("cifar10", tmp_path / "p", "test")


# --------------------------------------------------------------------------- MNIST


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("name, sub", [("mnist", ""), ("mnist", "MNIST/raw"),
                                       ("fashion_mnist", ""), ("fashion_mnist", "FashionMNIST/raw")])
def test_mnist_idx_files_read_back_exactly(tmp_path, name, sub, compress):
    truth = mnist_tree(tmp_path / sub, compress)
    for split, (images, labels) in truth.items():
        ds = load_dataset(name, tmp_path, split)
        assert torch.equal(ds.images, torch.from_numpy(images)[:, None])
        assert ds.targets.tolist() == labels.tolist()
        assert (ds.in_chans, ds.image_size, ds.num_classes) == (1, (28, 28), 10)
        assert ds.flip_ok == (name == "fashion_mnist")
    assert load_dataset(name, tmp_path).classes[9] == ("Ankle boot" if name == "fashion_mnist"
                                                       else "9")


def test_mnist_bad_magic_truncation_and_count_mismatch_are_data_errors(tmp_path):
    truth = mnist_tree(tmp_path, compress=False)
    images, labels = truth["test"]
    write_idx(tmp_path / "t10k-images-idx3-ubyte", images, magic=0x801)
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte: bad magic number 0x00000801"):
        load_dataset("mnist", tmp_path, "test")
    f = tmp_path / "t10k-images-idx3-ubyte"
    write_idx(f, images)
    f.write_bytes(f.read_bytes()[:-1])
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte: 2351 data bytes.*3x28x28"):
        load_dataset("mnist", tmp_path, "test")
    write_idx(f, images)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels[:2])
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte: 2 labels for 3 images"):
        load_dataset("mnist", tmp_path, "test")
    gz = tmp_path / "gz"
    mnist_tree(gz, compress=True)
    g = gz / "train-labels-idx1-ubyte.gz"
    g.write_bytes(g.read_bytes()[:-10])
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte\.gz: cannot read"):
        load_dataset("mnist", gz)


def test_mnist_missing_file_names_directory_and_expected_files(tmp_path):
    mnist_tree(tmp_path, compress=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataNotFoundError, match=rf"{tmp_path} lacks t10k-labels-idx1-ubyte;"
                                                r".*t10k-images-idx3-ubyte.*\.gz"):
        load_dataset("fashion_mnist", tmp_path, "test")
    with pytest.raises(DataNotFoundError, match=r"FashionMNIST/raw/\{train-images-idx3-ubyte"):
        load_dataset("fashion_mnist", tmp_path / "empty_parent_missing")


def test_native_size_datasets_resize_on_request(tmp_path):
    mnist_tree(tmp_path, compress=False)
    native = load_dataset("mnist", tmp_path)
    same = load_dataset("mnist", tmp_path, image_size=28)
    big = load_dataset("mnist", tmp_path, image_size=32)
    assert torch.equal(native.images, same.images)
    assert big.images.shape == (5, 1, 32, 32) and big.image_size == (32, 32)
    flat = torch.full((1, 1, 28, 28), 77, dtype=torch.uint8)
    from sepconv.data import resize_uint8
    assert torch.equal(resize_uint8(flat, 13), torch.full((1, 1, 13, 13), 77, dtype=torch.uint8))


# --------------------------------------------------------------------------- image folders


def save_image(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def test_imagefolder_with_train_and_test_folders_reads_png_exactly_and_jpeg_as_pil(tmp_path):
    pngs = hwc_images(3, 16, 16)
    save_image(tmp_path / "train" / "zebra" / "b.png", pngs[0])
    save_image(tmp_path / "train" / "zebra" / "a.png", pngs[1])
    save_image(tmp_path / "train" / "ant" / "x.png", pngs[2])
    save_image(tmp_path / "train" / "ant" / "y.jpg", hwc_images(1, 16, 16)[0])
    (tmp_path / "train" / "ant" / "notes.txt").write_text("not an image")
    save_image(tmp_path / "val" / "zebra" / "c.png", pngs[0])

    train = load_dataset("imagefolder", tmp_path, "train", image_size=16)
    assert train.classes == ["ant", "zebra"] and train.num_classes == 2
    assert [p.name for p in train.files] == ["x.png", "y.jpg", "a.png", "b.png"]
    assert train.targets.tolist() == [0, 0, 1, 1]
    x, y = train.get_batch(torch.tensor([3, 0, 2]))
    expected = chw(np.stack([pngs[0], pngs[2], pngs[1]])).float() / 255
    mean, std = torch.tensor(train.mean).view(3, 1, 1), torch.tensor(train.std).view(3, 1, 1)
    torch.testing.assert_close(x, (expected - mean) / std)
    assert y.tolist() == [1, 0, 1]
    jpeg = np.array(Image.open(tmp_path / "train" / "ant" / "y.jpg").convert("RGB"))
    assert torch.equal(train.pixels(torch.tensor([1]))[0], chw(jpeg[None])[0])

    test = load_dataset("imagefolder", tmp_path, "test", image_size=16)
    assert test.classes == train.classes and test.targets.tolist() == [1] and len(test) == 1
    assert load_dataset("imagefolder", tmp_path).image_size == (224, 224)


def test_imagefolder_resizes_shorter_side_then_center_crops(tmp_path):
    wide = np.zeros((20, 60, 3), np.uint8)  # 20 high, 60 wide: left, middle, right thirds
    wide[:, :20] = (255, 0, 0)
    wide[:, 20:40] = (0, 255, 0)
    wide[:, 40:] = (0, 0, 255)
    save_image(tmp_path / "train" / "c" / "wide.png", wide)
    save_image(tmp_path / "test" / "c" / "gray.png", np.full((30, 10), 128, np.uint8))
    ds = load_dataset("imagefolder", tmp_path, image_size=10)
    img = ds.pixels(torch.tensor([0]))[0]  # 20x60 -> 10x30, center 10 columns = the green third
    assert img.shape == (3, 10, 10) and (img[1, :, 2:8] == 255).all() and (img[0, :, 2:8] == 0).all()
    gray = load_dataset("imagefolder", tmp_path, "test", image_size=4).pixels(torch.tensor([0]))
    assert gray.shape == (1, 3, 4, 4) and (gray == 128).all()  # grayscale is read as RGB


def test_center_square_resize_matches_resizing_the_whole_image_then_cropping(tmp_path):
    from sepconv.data import read_image

    for h, w, size in ((20, 60, 10), (37, 23, 16), (64, 65, 64), (31, 200, 7), (50, 50, 50)):
        pixels = hwc_images(1, h, w)[0]
        save_image(tmp_path / "x.png", pixels)
        scale = size / min(w, h)
        new = (max(size, round(w * scale)), max(size, round(h * scale)))
        im = Image.fromarray(pixels)
        im = im.resize(new, Image.Resampling.BILINEAR) if new != (w, h) else im
        left, top = (new[0] - size) // 2, (new[1] - size) // 2
        want = chw(np.array(im.crop((left, top, left + size, top + size)))[None])[0]
        got = read_image(tmp_path / "x.png", size)
        assert got.shape == (3, size, size) and (got.int() - want.int()).abs().max() <= 1


def test_imagefolder_without_split_folders_has_a_fixed_disjoint_stratified_split(tmp_path):
    for c, n in (("cat", 10), ("dog", 5), ("owl", 1)):
        for i in range(n):
            save_image(tmp_path / c / f"{i:02d}.png", hwc_images(1, 4, 4)[0])
    train = load_dataset("imagefolder", tmp_path, "train", image_size=4)
    test = load_dataset("imagefolder", tmp_path, "test", image_size=4)
    assert train.classes == test.classes == ["cat", "dog", "owl"]
    assert not set(train.files) & set(test.files) and len(train) + len(test) == 16
    assert test.targets.bincount(minlength=3).tolist() == [2, 1, 0]
    again = load_dataset("imagefolder", tmp_path, "test", image_size=4)
    assert again.files == test.files


def test_imagefolder_errors_name_the_file_or_directory(tmp_path):
    with pytest.raises(DataNotFoundError, match=r"missing does not exist.*<class>/<image>"):
        load_dataset("imagefolder", tmp_path / "missing")
    save_image(tmp_path / "train" / "a" / "ok.png", hwc_images(1, 4, 4)[0])
    with pytest.raises(DataNotFoundError, match=r"has train/ but no test/ or val/"):
        load_dataset("imagefolder", tmp_path, "test")
    (tmp_path / "train" / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    ds = load_dataset("imagefolder", tmp_path, image_size=4)
    with pytest.raises(DataError, match=r"broken\.png: cannot read image"):
        ds.get_batch(torch.arange(len(ds)))
    (tmp_path / "train" / "empty").mkdir()
    with pytest.raises(DataNotFoundError, match=r"no images in .*train/empty"):
        load_dataset("imagefolder", tmp_path)


# --------------------------------------------------------------------------- digits


def test_digits_split_is_fixed_disjoint_stratified_and_covers_all_1797():
    train, test = load_dataset("digits"), load_dataset("digits", split="test")
    assert len(train) + len(test) == 1797 and len(test) == 359
    assert (train.images.shape[1:], train.image_size, train.in_chans) == ((1, 32, 32), (32, 32), 1)
    from sklearn.datasets import load_digits

    raw = load_digits()
    native = torch.cat([load_dataset("digits", image_size=8).images,
                        load_dataset("digits", split="test", image_size=8).images])
    expected = torch.from_numpy(np.rint(raw.images * 255 / 16).astype(np.uint8))[:, None]
    # every original image appears exactly once across the two splits (pixels are distinctive)
    keys = {bytes(im.numpy().tobytes()) for im in native}
    assert len(native) == 1797 and keys == {bytes(im.numpy().tobytes()) for im in expected}
    counts = test.targets.bincount(minlength=10).float() / torch.bincount(
        torch.from_numpy(raw.target), minlength=10)
    assert ((counts - 0.2).abs() < 0.01).all()
    assert torch.equal(load_dataset("digits", split="test").images, test.images)
    assert not train.flip_ok and train.classes == [str(i) for i in range(10)]


def test_digits_train_split_is_standardized_by_its_own_statistics():
    for size in (32, 12):
        train = load_dataset("digits", image_size=size)
        x, _ = train.get_batch(torch.arange(len(train)))
        assert x.shape == (len(train), 1, size, size)
        assert abs(x.mean().item()) < 1e-4 and abs(x.std(correction=0).item() - 1) < 1e-4
        assert load_dataset("digits", split="test", image_size=size).mean == train.mean


# --------------------------------------------------------------------------- API contract


def test_getitem_matches_get_batch_and_normalization_formula(tmp_path):
    cifar10_tree(tmp_path, "bin")
    ds = load_dataset("cifar10", tmp_path, "test")
    x, y = ds.get_batch(torch.tensor([2, 0]))
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape == (2, 3, 32, 32)
    mean, std = torch.tensor(ds.mean).view(3, 1, 1), torch.tensor(ds.std).view(3, 1, 1)
    torch.testing.assert_close(x[0], (ds.images[2].float() / 255 - mean) / std)
    item, label = ds[0]
    assert torch.equal(item, x[1]) and label == int(ds.targets[0]) and isinstance(label, int)
    assert ds.mean == (0.4914, 0.4822, 0.4465)
    loader = torch.utils.data.DataLoader(ds, batch_size=2)
    assert sum(len(b[0]) for b in loader) == 3
    with pytest.raises(IndexError):
        ds[3]


def test_bad_name_split_or_size_are_rejected_with_the_right_error():
    with pytest.raises(DataError, match="unknown dataset 'imagenet'.*" + ", ".join(DATASETS)):
        load_dataset("imagenet")
    with pytest.raises(ConfigError, match="split"):
        load_dataset("digits", split="val")
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ConfigError, match="image_size"):
            load_dataset("digits", image_size=bad)


# --------------------------------------------------------------------------- augmentation


def reference_augment(x, seed, pad, flip):
    """Loop over samples with the draws augment_batch documents (rows, columns, flips)."""
    g = torch.Generator().manual_seed(seed)
    n, _, h, w = x.shape
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=g) if pad else torch.zeros(n, dtype=int)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=g) if pad else torch.zeros(n, dtype=int)
    flips = torch.rand(n, generator=g) < 0.5 if flip else torch.zeros(n, dtype=bool)
    padded = torch.nn.functional.pad(x, (pad,) * 4)
    out = []
    for i in range(n):
        crop = padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
        out.append(crop.flip(-1) if flips[i] else crop)
    return torch.stack(out)


@pytest.mark.parametrize("pad, flip", [(4, True), (2, False), (0, True), (0, False)])
def test_augment_batch_is_a_seeded_padded_crop_and_flip_per_sample(pad, flip):
    x = torch.randn(64, 3, 9, 7)
    out = augment_batch(x, torch.Generator().manual_seed(5), pad, flip)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(out, reference_augment(x, 5, pad, flip))
    assert torch.equal(out, augment_batch(x, torch.Generator().manual_seed(5), pad, flip))
    other = augment_batch(x, torch.Generator().manual_seed(6), pad, flip)
    assert torch.equal(other, out) == (pad == 0 and not flip)


def test_augment_batch_rejects_negative_pad():
    with pytest.raises(ConfigError, match="pad"):
        augment_batch(torch.zeros(1, 1, 4, 4), torch.Generator(), -1, False)
