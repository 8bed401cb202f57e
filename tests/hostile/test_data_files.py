"""Dataset files from elsewhere are hostile: they never run code, never allocate without a budget,
never hang, and every bad one is a one-line SepconvError naming the file and the reason.

Every file here is written in its real format (IDX, gzip, CIFAR pickles and binaries, PNG, TIFF,
PGM, JPEG) and kept small; a regression that would allocate gigabytes meets a lowered address
space limit (``address_space_cap``) and fails with MemoryError instead of eating the machine.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import pickle
import resource
import shutil
import signal
import struct
import tempfile
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import EpsImagePlugin, Image

from sepconv.data import load_dataset, read_idx, read_image, safe_unpickle
from sepconv.errors import ConfigError, DataError, DataNotFoundError, ResourceError, SepconvError

from .conftest import assert_one_line, run_cli, unprivileged

pytestmark = pytest.mark.usefixtures("one_thread")

GiB = 1 << 30
_reconstruct = np.zeros(0).__reduce__()[0]
_frombuffer = pickle.loads(pickle.dumps(np.zeros(1), protocol=5)).__reduce_ex__(5)[0]


# --------------------------------------------------------------------------- harness


@contextlib.contextmanager
def address_space_cap(extra: int = GiB):
    """The body may grow the address space by ``extra`` at most (RLIMIT_AS): a huge allocation
    fails with MemoryError instead of happening. Also asserts the peak RSS grew by less than that."""
    vm = next(int(ln.split()[1]) * 1024 for ln in open("/proc/self/status") if ln.startswith("VmSize"))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = vm + extra if hard == resource.RLIM_INFINITY else min(vm + extra, hard)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    assert grew < extra, f"peak RSS grew by {grew / GiB:.2f} GiB"


@contextlib.contextmanager
def traced_peak(limit: int):
    """Python/numpy allocations in the body peak below ``limit`` bytes (tracemalloc)."""
    tracemalloc.start()
    try:
        yield
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < limit, f"allocated {peak} bytes at peak"


@contextlib.contextmanager
def deadline(seconds: int = 20):
    """The body must finish within ``seconds`` (SIGALRM interrupts a blocking open or read)."""
    def boom(*_):
        raise TimeoutError(f"still running after {seconds}s: it blocks or reads forever")
    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture
def shared_dir():
    """A directory under /tmp that ``nobody`` can traverse (pytest's tmp_path is private to root)."""
    d = Path(tempfile.mkdtemp(dir="/tmp", prefix="sepconv-hostile-"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        for p in [d, *d.rglob("*")]:
            if not p.is_symlink():
                p.chmod(0o755)
        shutil.rmtree(d)


def raises(cls, fn, *args, **kwargs) -> str:
    """Call ``fn``; it must raise ``cls`` (a SepconvError) with a one-line message; the message."""
    with pytest.raises(cls) as info:
        fn(*args, **kwargs)
    assert isinstance(info.value, SepconvError)
    msg = str(info.value)
    assert len(msg.splitlines()) == 1, msg
    return msg


# --------------------------------------------------------------------------- writers


def idx_bytes(dims, data: bytes = b"", ndim: int | None = None) -> bytes:
    ndim = len(dims) if ndim is None else ndim
    return struct.pack(">I", 0x800 + ndim) + struct.pack(f">{len(dims)}I", *dims) + data


def mnist_dir(d: Path, n: int = 2) -> Path:
    rng = np.random.default_rng(0)
    d.mkdir(parents=True, exist_ok=True)
    for prefix in ("train", "t10k"):
        (d / f"{prefix}-images-idx3-ubyte").write_bytes(
            idx_bytes((n, 28, 28), rng.integers(0, 256, n * 784, dtype=np.uint8).tobytes()))
        (d / f"{prefix}-labels-idx1-ubyte").write_bytes(idx_bytes((n,), bytes(range(n))))
    return d


class Reduce:
    """Pickles as ``callable(*args)`` (then ``__setstate__(state)``): the raw material of a hostile pickle."""

    def __init__(self, *reduce):
        self.reduce = reduce

    def __reduce__(self):
        return self.reduce


def cifar_py(d: Path, batch: dict, protocol: int = 2) -> Path:
    d = d / "cifar-10-batches-py"
    d.mkdir(parents=True, exist_ok=True)
    (d / "test_batch").write_bytes(pickle.dumps(batch, protocol=protocol))
    return d / "test_batch"


def png_bytes(pixels: np.ndarray, color_type: int, bit_depth: int, chunks: bytes = b"") -> bytes:
    """A PNG written by hand (PIL writes no 16-bit colour or grey+alpha PNG): colour type 0 grey,
    2 RGB, 3 palette, 4 grey+alpha, 6 RGBA; ``chunks`` go before the image data (PLTE, tRNS)."""
    h, w = pixels.shape[:2]
    dtype = ">u2" if bit_depth == 16 else "u1"
    raw = b"".join(b"\0" + pixels[y].astype(dtype).tobytes() for y in range(h))
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0))
            + chunks + png_chunk(b"IDAT", zlib.compress(raw)) + png_chunk(b"IEND", b""))


def png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def image_dir(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def gray8_png(g: np.ndarray) -> bytes:
    return png_bytes(g, 0, 8)


GRAY = np.arange(0, 256, 4, dtype=np.uint16).reshape(8, 8)          # 0..252: every shade of the range
RGB = np.stack([GRAY, GRAY[::-1], GRAY.T], axis=-1)


# --------------------------------------------------------------------------- IDX (MNIST)


@pytest.mark.parametrize("compress", [False, True])
def test_idx_dims_that_overflow_int64_are_counted_exactly_and_refused_before_allocating(tmp_path, compress):
    dims = (2**32 - 1, 2**32 - 1, 2**32 - 1)  # product 2**96-ish: np.prod wraps around
    data = idx_bytes(dims, b"\0" * 64)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(gzip.compress(data) if compress else data)
    path = tmp_path / "t10k-images-idx3-ubyte"
    with address_space_cap(), traced_peak(1 << 20):
        msg = raises(DataError, read_idx, path, 3)
    assert str(path) in msg and str((2**32 - 1) ** 3) in msg  # the exact count, not a wrapped int64
    assert ("gzip can hold" if compress else "64 data bytes") in msg


def test_gzip_whose_header_claims_more_than_the_gzip_can_hold_is_refused_without_inflating(tmp_path):
    d = mnist_dir(tmp_path)
    gz = d / "t10k-images-idx3-ubyte.gz"
    (d / "t10k-images-idx3-ubyte").unlink()
    gz.write_bytes(gzip.compress(idx_bytes((60000, 28, 28), b"\0" * 784)))  # 47 MB claimed, ~50 bytes
    with traced_peak(1 << 20):
        msg = raises(DataError, load_dataset, "mnist", d, "test")
    assert str(gz) in msg and "60000x28x28 = 47040000" in msg and "gzip can hold" in msg


def test_gzip_that_inflates_past_its_header_is_cut_off_at_the_header_count(tmp_path):
    d = mnist_dir(tmp_path)
    gz = d / "t10k-labels-idx1-ubyte.gz"
    (d / "t10k-labels-idx1-ubyte").unlink()
    with gzip.GzipFile(gz, "wb", compresslevel=9) as f:  # 2 labels announced, then 64 MiB of zeros
        f.write(idx_bytes((2,), b"\0\1"))
        zeros = bytes(1 << 20)
        for _ in range(64):
            f.write(zeros)
    assert gz.stat().st_size < 200_000
    with traced_peak(4 << 20):
        msg = raises(DataError, load_dataset, "mnist", d, "test")
    assert str(gz) in msg and "inflates past the 10 bytes" in msg


def test_idx_errors_reach_the_command_line_as_one_line(capsys, tmp_path):
    d = mnist_dir(tmp_path / "data")
    (d / "train-images-idx3-ubyte").write_bytes(idx_bytes((2**31, 2**31, 28), b"\0" * 10))
    code, _, err = run_cli(capsys, "train", "--data", "mnist", "--data-dir", d, "--epochs", "1",
                           "--out", tmp_path / "o")
    assert_one_line(code, err, "train-images-idx3-ubyte", "header says", str(2**31 * 2**31 * 28))


# --------------------------------------------------------------------------- CIFAR pickles


ZERO_STRIDE = {
    b"data": Reduce(np.ndarray, ((3_000_000, 3072), np.dtype("u1"), b"\7", 0, (0, 0))),  # 8.6 GiB view
    b"labels": Reduce(np.ndarray, ((3_000_000,), np.dtype("u1"), b"\0", 0, (0,))),
}


def test_zero_stride_array_of_8_6_gib_in_a_tiny_pickle_is_refused_before_any_copy(tmp_path):
    path = cifar_py(tmp_path, ZERO_STRIDE)
    assert path.stat().st_size < 300
    start = time.perf_counter()
    with address_space_cap(), traced_peak(1 << 20):
        msg = raises(DataError, load_dataset, "cifar10", tmp_path, "test")
    assert str(path) in msg and "refused" in msg and "numpy.ndarray" in msg
    assert time.perf_counter() - start < 10


@pytest.mark.parametrize("array, words", [
    (Reduce(_reconstruct, (np.ndarray, (10**12,), b"b")), ["_reconstruct", "(0,)"]),       # 1 TB empty
    (Reduce(_reconstruct, (np.ndarray, (0,), b"b"),
            (1, (3_000_000, 3072), np.dtype("u1"), False, b"\0" * 16)), ["9216000000 bytes", "holds 16"]),
    (Reduce(_reconstruct, (np.ndarray, (0,), b"b"), (1, (2,), np.dtype("O"), False, [1, 2])),
     ["not a plain number type"]),
    (Reduce(_reconstruct, (np.ndarray, (0,), b"b"),
            (1, (1,), np.dtype([("a", "u1")]), False, b"\0")), ["not a plain number type"]),
], ids=["reconstruct-1TB", "state-larger-than-data", "object-dtype", "structured-dtype"])
def test_array_states_that_do_not_consist_of_the_files_bytes_are_refused(tmp_path, array, words):
    path = cifar_py(tmp_path, {b"data": array, b"labels": [0]})
    with address_space_cap():
        msg = raises(DataError, load_dataset, "cifar10", tmp_path, "test")
    assert str(path) in msg and "refused" in msg
    for w in words:
        assert w in msg


def test_protocol_5_buffer_whose_shape_asks_for_more_than_it_holds_is_refused(tmp_path):
    array = Reduce(_frombuffer, (bytearray(16), np.dtype("u1"), (10**6, 3072), "C"))
    path = cifar_py(tmp_path, {b"data": array, b"labels": [0]}, protocol=5)
    msg = raises(DataError, load_dataset, "cifar10", tmp_path, "test")
    assert str(path) in msg and "3072000000 bytes" in msg and "holds 16" in msg


def test_memo_index_bomb_is_refused_before_the_unpickler_sizes_its_memo(tmp_path):
    path = tmp_path / "test_batch"
    path.write_bytes(b"\x80\x02N" + b"r" + struct.pack("<I", 2**27) + b".")  # 9 bytes; 2 GiB memo table
    with address_space_cap(GiB // 2):
        msg = raises(DataError, safe_unpickle, path)
    assert str(path) in msg and "memo index 134217728" in msg


def test_counted_bytes_longer_than_the_file_are_refused_without_allocating_them(tmp_path):
    path = tmp_path / "test_batch"
    path.write_bytes(b"\x80\x04\x8e" + struct.pack("<Q", 2**40) + b"abc.")  # BINBYTES8 of 1 TiB
    with address_space_cap(), traced_peak(1 << 20):
        msg = raises(DataError, safe_unpickle, path)
    assert str(path) in msg and "1099511627776 bytes" in msg


@pytest.mark.parametrize("obj, words", [
    ({(2**61 - 1) * k: 0 for k in range(1, 5001)}, ["4096 keys"]),  # equal hashes: quadratic inserts
    ({b"data": frozenset(), b"labels": []}, ["builds sets", "FROZENSET"]),
], ids=["colliding-dict-keys", "sets"])
def test_pickles_that_would_take_forever_or_build_what_no_dataset_holds_are_refused(tmp_path, obj, words):
    path = cifar_py(tmp_path, obj, protocol=4)
    with deadline(20):
        msg = raises(DataError, load_dataset, "cifar10", tmp_path, "test")
    assert str(path) in msg and "refused" in msg
    for w in words:
        assert w in msg


@pytest.mark.parametrize("labels, words", [([0.5], "integers"), ([2**70], "integers"),
                                           ([[0]], "flat list"), ([True], "integers")])
def test_labels_that_are_not_integers_are_refused_not_truncated(tmp_path, labels, words):
    path = cifar_py(tmp_path, {b"data": np.zeros((1, 3072), np.uint8), b"labels": labels})
    msg = raises(DataError, load_dataset, "cifar10", tmp_path, "test")
    assert str(path) in msg and words in msg and "'labels'" in msg


def test_meta_files_with_huge_class_lists_are_refused_unread(tmp_path):
    d = cifar_py(tmp_path / "py", {b"data": np.zeros((1, 3072), np.uint8), b"labels": [1]}).parent
    (d / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"x%d" % i for i in range(300_000)]}))
    msg = raises(DataError, load_dataset, "cifar10", tmp_path / "py", "test")
    assert str(d / "batches.meta") in msg and "too large" in msg

    b = tmp_path / "bin" / "cifar-10-batches-bin"
    b.mkdir(parents=True)
    (b / "test_batch.bin").write_bytes(bytes(3073))
    with open(b / "batches.meta.txt", "wb") as f:  # 3 GB, sparse: read_text would read it all
        f.truncate(3 * GiB)
    with address_space_cap():
        msg = raises(DataError, load_dataset, "cifar10", tmp_path / "bin", "test")
    assert str(b / "batches.meta.txt") in msg and "too large" in msg


def test_cifar_binary_files_too_big_for_the_budget_are_refused_before_reading(tmp_path, monkeypatch):
    b = tmp_path / "cifar-10-batches-bin"
    b.mkdir()
    with open(b / "test_batch.bin", "wb") as f:  # 10 million records, 30.7 GB, sparse
        f.truncate(3073 * 10_000_000)
    monkeypatch.setenv("SEPCONV_MEMORY_LIMIT", "16G")
    with address_space_cap(), deadline(20):
        msg = raises(ResourceError, load_dataset, "cifar10", tmp_path, "test")
    assert str(b / "test_batch.bin") in msg and "memory budget" in msg and "16 GiB" in msg


def test_pickle_bomb_reaches_the_command_line_as_one_line(capsys, tmp_path):
    bomb = cifar_py(tmp_path / "data", ZERO_STRIDE)
    for i in range(1, 6):  # train reads the train split first
        shutil.copy(bomb, bomb.with_name(f"data_batch_{i}"))
    with address_space_cap():
        code, _, err = run_cli(capsys, "train", "--data", "cifar10", "--data-dir", tmp_path / "data",
                               "--epochs", "1", "--out", tmp_path / "o")
    assert_one_line(code, err, "data_batch_1", "numpy.ndarray", "refused")


# --------------------------------------------------------------------------- images


@pytest.mark.parametrize("shape", [(100_000, 1), (1, 100_000)], ids=["tall", "wide"])
def test_extreme_aspect_ratio_is_center_cropped_then_resized_at_bounded_cost(tmp_path, shape):
    h, w = shape
    band = np.zeros((h, w, 3), np.uint8)
    band[..., 0] = 255  # red, with a green band at the center of the long side
    if h > w:
        band[h // 2 - 10:h // 2 + 10] = (0, 255, 0)
    else:
        band[:, w // 2 - 10:w // 2 + 10] = (0, 255, 0)
    path = tmp_path / "long.png"
    Image.fromarray(band).save(path)
    with address_space_cap(), deadline(20):
        img = read_image(path, 224)  # before: 224 x 22.4M pixels, 15 GB
    assert img.shape == (3, 224, 224)
    assert (img[1] == 255).all() and (img[0] == 0).all()


@pytest.mark.parametrize("pixels", [40 * 40, 100 * 100], ids=["warned-by-PIL", "refused-by-PIL"])
def test_decompression_bomb_limit_is_an_error_not_a_warning(tmp_path, monkeypatch, pixels):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    side = int(pixels ** 0.5)
    path = tmp_path / "bomb.png"
    Image.new("L", (side, side)).save(path)
    msg = raises(DataError, read_image, path, 8)
    assert str(path) in msg and "decompression bomb" in msg and "MAX_IMAGE_PIXELS" in msg


def test_image_whose_decoding_exceeds_the_memory_budget_is_refused_from_its_header(tmp_path, monkeypatch):
    image_dir(tmp_path, {"train/a/big.png": png_bytes(np.zeros((2000, 2000), np.uint8), 0, 8),
                         "test/a/ok.png": gray8_png(GRAY)})
    monkeypatch.setenv("SEPCONV_MEMORY_LIMIT", "16M")
    ds = load_dataset("imagefolder", tmp_path, image_size=8)
    msg = raises(ResourceError, ds.get_batch, [0])
    assert str(tmp_path / "train/a/big.png") in msg and "2000x2000" in msg and "memory budget" in msg


SIXTEEN_BIT = {  # name: (16-bit file, 8-bit rendering of the same image)
    "grey16.png": (png_bytes(GRAY * 257, 0, 16), gray8_png(GRAY)),
    "rgb16.png": (png_bytes(RGB * 257, 2, 16), png_bytes(RGB, 2, 8)),
    "grey-alpha16.png": (png_bytes(np.stack([GRAY, GRAY.T], -1) * 257, 4, 16),
                         png_bytes(np.stack([GRAY, GRAY.T], -1), 4, 8)),
    "rgba16.png": (png_bytes(np.concatenate([RGB, GRAY[..., None]], -1) * 257, 6, 16),
                   png_bytes(np.concatenate([RGB, GRAY[..., None]], -1), 6, 8)),
}


def _tiff16() -> bytes:
    buf = io.BytesIO()
    Image.fromarray((GRAY * 257).astype(np.uint16)).save(buf, format="TIFF")
    return buf.getvalue()


SIXTEEN_BIT["grey16.tif"] = (_tiff16(), gray8_png(GRAY))
SIXTEEN_BIT["grey16.pgm"] = (b"P5\n8 8\n65535\n" + (GRAY * 257).astype(">u2").tobytes(), gray8_png(GRAY))


@pytest.mark.parametrize("name", list(SIXTEEN_BIT))
def test_16_bit_images_decode_like_their_8_bit_rendering_not_clipped_to_white(tmp_path, name):
    sixteen, eight = SIXTEEN_BIT[name]
    (tmp_path / name).write_bytes(sixteen)
    (tmp_path / "eight.png").write_bytes(eight)
    got, want = read_image(tmp_path / name, 8), read_image(tmp_path / "eight.png", 8)
    assert want.max() - want.min() > 150 and len(want.unique()) > 30
    assert torch.equal(got, want), (got - want.int()).abs().max()


def _palette_png(hidden: tuple[int, int, int]) -> bytes:
    idx = (GRAY // 64).astype(np.uint8)  # palette entries 0..3; entry 0 transparent
    palette = bytes([*hidden, 255, 0, 0, 0, 255, 0, 0, 0, 255])
    return png_bytes(idx, 3, 8, png_chunk(b"PLTE", palette) + png_chunk(b"tRNS", b"\0"))


def _alpha_cases():
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    alpha[::3] = 0
    hidden = rgb.copy()
    hidden[alpha == 0] = rng.integers(0, 256, (int((alpha == 0).sum()), 3), dtype=np.uint8)
    g, gh = rgb[..., 0], hidden[..., 0]
    return {
        "RGBA": (png_bytes(np.dstack([rgb, alpha]), 6, 8), png_bytes(np.dstack([hidden, alpha]), 6, 8),
                 rgb, alpha),
        "LA": (png_bytes(np.dstack([g, alpha]), 4, 8), png_bytes(np.dstack([gh, alpha]), 4, 8),
               np.dstack([g] * 3), alpha),
        "P+tRNS": (_palette_png((10, 20, 30)), _palette_png((200, 100, 0)),
                   np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)[GRAY // 64],
                   np.where(GRAY // 64 == 0, 0, 255).astype(np.uint8)),
    }


ALPHA = _alpha_cases()


@pytest.mark.parametrize("mode", list(ALPHA))
def test_alpha_is_composited_onto_white_so_hidden_colours_never_show(tmp_path, mode):
    first, second, rgb, alpha = ALPHA[mode]
    (tmp_path / "a.png").write_bytes(first)
    (tmp_path / "b.png").write_bytes(second)  # same image, other colours under alpha 0
    a, b = read_image(tmp_path / "a.png", 8), read_image(tmp_path / "b.png", 8)
    assert torch.equal(a, b)
    alpha = alpha.astype(np.float64)[..., None] / 255
    want = np.rint(rgb * alpha + 255 * (1 - alpha)).astype(np.int64).transpose(2, 0, 1)
    assert np.abs(a.numpy().astype(np.int64) - want).max() <= 1


def _truncated(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()[: len(buf.getvalue()) // 2]


@pytest.mark.parametrize("name, data", [("cut.png", _truncated("PNG")), ("cut.jpg", _truncated("JPEG")),
                                        ("cut.gif", _truncated("GIF")), ("empty.png", b"")])
def test_truncated_images_are_data_errors_naming_the_file(tmp_path, name, data):
    image_dir(tmp_path, {f"train/a/{name}": data, "test/a/ok.png": gray8_png(GRAY)})
    ds = load_dataset("imagefolder", tmp_path, image_size=8)
    msg = raises(DataError, ds.get_batch, [0])
    assert str(tmp_path / "train/a" / name) in msg and "cannot read image" in msg


def test_a_postscript_file_named_png_never_reaches_ghostscript(tmp_path, monkeypatch):
    marker = tmp_path / "ghostscript-ran"
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: marker.touch())
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", "gs", raising=False)
    path = tmp_path / "evil.png"
    path.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n%%EOF\n")
    msg = raises(DataError, read_image, path, 8)
    assert str(path) in msg and "cannot read image" in msg
    assert not marker.exists()


# --------------------------------------------------------------------------- image folder trees


def test_image_folder_symbolic_link_loops_are_named_not_followed_forever(tmp_path):
    image_dir(tmp_path, {"cat/a.png": gray8_png(GRAY), "dog/b.png": gray8_png(GRAY)})
    (tmp_path / "cat" / "again").symlink_to(tmp_path / "cat")
    with deadline(20):
        msg = raises(DataError, load_dataset, "imagefolder", tmp_path, image_size=8)
    assert str(tmp_path / "cat" / "again") in msg and "symbolic link loop" in msg
    (tmp_path / "cat" / "again").unlink()
    (tmp_path / "cat" / "self.png").symlink_to("self.png")  # a link to itself: ELOOP
    msg = raises(DataError, load_dataset, "imagefolder", tmp_path, image_size=8)
    assert str(tmp_path / "cat" / "self.png") in msg and "symbolic link loop" in msg


@pytest.mark.parametrize("make, words", [
    (lambda p: os.mkfifo(p), "FIFO"),
    (lambda p: p.symlink_to("/dev/zero"), "character device"),
    (lambda p: p.symlink_to(p.parent / "nowhere.png"), "broken symbolic link"),
], ids=["fifo", "dev-zero", "broken-link"])
def test_image_folder_entries_named_like_images_that_are_not_files_are_refused(tmp_path, make, words):
    image_dir(tmp_path, {"cat/a.png": gray8_png(GRAY), "dog/b.png": gray8_png(GRAY)})
    make(tmp_path / "cat" / "x.png")
    with deadline(20), address_space_cap():
        msg = raises(DataError, load_dataset, "imagefolder", tmp_path, image_size=8)
    assert str(tmp_path / "cat" / "x.png") in msg and words in msg


def test_a_directory_named_like_an_image_is_searched_not_decoded(tmp_path):
    image_dir(tmp_path, {"cat/a.png": gray8_png(GRAY), "cat/album.png/b.png": gray8_png(GRAY),
                         "dog/c.png": gray8_png(GRAY)})
    ds = load_dataset("imagefolder", tmp_path, image_size=8)
    every = set(ds.files) | set(load_dataset("imagefolder", tmp_path, "test", image_size=8).files)
    assert every == {tmp_path / "cat/a.png", tmp_path / "cat/album.png/b.png", tmp_path / "dog/c.png"}


# --------------------------------------------------------------------------- huge --image-size


def test_digits_at_image_size_100000_is_refused_quickly():
    start = time.perf_counter()
    with address_space_cap():
        msg = raises(ResourceError, load_dataset, "digits", image_size=100_000)
    assert "digits" in msg and "100000x100000" in msg and "memory budget" in msg
    assert time.perf_counter() - start < 10


def test_in_memory_dataset_resized_beyond_the_budget_is_refused_before_allocating(tmp_path):
    mnist_dir(tmp_path)
    with address_space_cap():
        msg = raises(ResourceError, load_dataset, "mnist", tmp_path, image_size=100_000)
    assert "mnist" in msg and "100000x100000" in msg and "memory budget" in msg


def test_image_folder_at_a_huge_image_size_is_refused_at_load(tmp_path):
    image_dir(tmp_path, {"cat/a.png": gray8_png(GRAY), "dog/b.png": gray8_png(GRAY)})
    with address_space_cap():
        msg = raises(ResourceError, load_dataset, "imagefolder", tmp_path, image_size=100_000)
    assert "imagefolder" in msg and "100000" in msg and "memory budget" in msg


def test_a_batch_beyond_the_budget_is_refused_before_it_is_built(tmp_path, monkeypatch):
    mnist_dir(tmp_path, n=5)
    ds = load_dataset("mnist", tmp_path, image_size=200)
    monkeypatch.setenv("SEPCONV_MEMORY_LIMIT", "1M")
    msg = raises(ResourceError, ds.get_batch, torch.arange(5))
    assert "mnist" in msg and "batch of 5" in msg and "1x200x200" in msg


def test_huge_image_size_reaches_the_command_line_as_one_line(capsys, tmp_path):
    with address_space_cap():
        code, _, err = run_cli(capsys, "train", "--image-size", "100000", "--epochs", "1", "--out", tmp_path / "o")
    assert_one_line(code, err, "100000", "memory budget")


def test_image_size_must_be_a_plain_positive_int():
    for bad in (True, 1.0, "32", 0):
        raises(ConfigError, load_dataset, "digits", image_size=bad)


# --------------------------------------------------------------------------- hostile environments


def test_unreadable_data_directory_says_permission_denied_not_missing(shared_dir):
    d = mnist_dir(shared_dir / "data")
    d.chmod(0)
    with unprivileged():
        with pytest.raises(DataError) as info:
            load_dataset("mnist", d, "test")
    msg = str(info.value)
    assert not isinstance(info.value, DataNotFoundError) and len(msg.splitlines()) == 1
    assert str(d) in msg and "Permission denied" in msg and "does not exist" not in msg


def test_unreadable_data_file_says_permission_denied(shared_dir):
    d = mnist_dir(shared_dir / "data")
    (d / "t10k-labels-idx1-ubyte").chmod(0)
    with unprivileged():
        msg = raises(DataError, load_dataset, "mnist", d, "test")
    assert str(d / "t10k-labels-idx1-ubyte") in msg and "Permission denied" in msg


def test_unreadable_image_class_folder_says_permission_denied_not_empty(shared_dir):
    image_dir(shared_dir, {"cat/a.png": gray8_png(GRAY), "dog/b.png": gray8_png(GRAY)})
    (shared_dir / "dog").chmod(0)
    with unprivileged():
        with pytest.raises(DataError) as info:
            load_dataset("imagefolder", shared_dir, image_size=8)
    assert not isinstance(info.value, DataNotFoundError)
    assert str(shared_dir / "dog") in str(info.value) and "Permission denied" in str(info.value)


def test_unreadable_data_directory_reaches_the_command_line_as_one_line(capsys, shared_dir):
    d = mnist_dir(shared_dir / "data")
    out = shared_dir / "out"
    out.mkdir()
    out.chmod(0o777)
    d.chmod(0)
    with unprivileged():
        code, _, err = run_cli(capsys, "train", "--data", "mnist", "--data-dir", d, "--epochs", "1",
                               "--out", out / "run")
    assert_one_line(code, err, str(d), "permission denied")


@pytest.mark.parametrize("make, words", [
    (lambda p: os.mkfifo(p), "FIFO"),
    (lambda p: p.symlink_to("/dev/zero"), "character device"),
    (lambda p: p.mkdir(), "a directory"),
    (lambda p: p.symlink_to(p.parent / "gone"), "broken symbolic link"),
], ids=["fifo", "dev-zero", "directory", "broken-link"])
def test_a_data_file_that_is_not_a_regular_file_is_refused_without_blocking(tmp_path, make, words):
    d = mnist_dir(tmp_path)
    (d / "t10k-images-idx3-ubyte").unlink()
    make(d / "t10k-images-idx3-ubyte")
    with deadline(20), address_space_cap():
        msg = raises(DataError, load_dataset, "mnist", d, "test")
        assert str(d / "t10k-images-idx3-ubyte") in msg and words in msg
        if words == "FIFO":  # opened directly (a race past the check): refused, not waited on
            assert "FIFO" in raises(DataError, read_idx, d / "t10k-images-idx3-ubyte", 3)


def test_a_data_directory_that_is_a_file_or_names_nothing(tmp_path, monkeypatch):
    f = tmp_path / "file"
    f.write_bytes(b"x")
    for name in ("mnist", "imagefolder", "cifar100"):
        msg = raises(DataError, load_dataset, name, f)
        assert str(f) in msg and "not a directory" in msg
    monkeypatch.setenv("SEPCONV_DATA", str(tmp_path / "nowhere"))
    msg = raises(DataNotFoundError, load_dataset, "cifar10")
    assert "$SEPCONV_DATA" in msg and str(tmp_path / "nowhere") in msg

