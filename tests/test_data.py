"""Tests for gradleak.data: real MNIST/CIFAR-100/LFW files, generated CIFAR-10/SVHN files."""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from gradleak.data import DATASETS, ImageDataset, default_data_dir, load_dataset, load_image
from gradleak.data import download as dl
from gradleak.errors import ConfigError, DataError

MNIST_FILES = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


@pytest.fixture(autouse=True)
def _no_download(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRADLEAK_NO_DOWNLOAD", "1")


def one_line_error(exc_type: type[Exception], call, *needles: str) -> str:
    """Run ``call``, expect ``exc_type``, check it is one line mentioning every needle."""
    with pytest.raises(exc_type) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message
    return message


def as_bytes(image: torch.Tensor) -> np.ndarray:
    """Undo the /255 scaling exactly."""
    return np.rint(image.numpy() * 255.0).astype(np.uint8)


def write_cifar10(folder: Path, data: np.ndarray, labels: list[int], name: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    batch = {b"batch_label": b"testing batch", b"labels": labels, b"data": data}
    (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {b"label_names": [f"class{i}".encode() for i in range(10)], b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))


# --- MNIST ---------------------------------------------------------------------------------


@pytest.mark.parametrize("sub", ["", "mnist"])
def test_mnist_real(data_root: Path, sub: str) -> None:
    ds = load_dataset("mnist", data_dir=data_root / sub if sub else data_root)
    assert isinstance(ds, ImageDataset)
    assert (ds.name, len(ds), ds.shape, ds.num_classes) == ("mnist", 10_000, (1, 28, 28), 10)
    assert [ds.label(i) for i in range(5)] == [7, 2, 1, 0, 4]
    assert np.bincount(ds.labels).tolist()[0] == 980
    image, label = ds[0]
    assert (image.dtype, tuple(image.shape), label) == (torch.float32, (1, 28, 28), 7)
    assert image.min() >= 0.0 and image.max() <= 1.0 and image.max() > 0.5
    # Pixel order: the tensor must equal the raw IDX bytes of image 0.
    raw = gzip.decompress((data_root / "mnist" / MNIST_FILES[0]).read_bytes())
    np.testing.assert_array_equal(
        as_bytes(image)[0], np.frombuffer(raw[16 : 16 + 784], np.uint8).reshape(28, 28)
    )


def test_mnist_uncompressed_in_torchvision_layout(data_root: Path, tmp_path: Path) -> None:
    raw_dir = tmp_path / "MNIST" / "raw"
    raw_dir.mkdir(parents=True)
    for name in MNIST_FILES:
        (raw_dir / name[:-3]).write_bytes(
            gzip.decompress((data_root / "mnist" / name).read_bytes())
        )
    ds = load_dataset("mnist", data_dir=str(tmp_path))
    ref = load_dataset("mnist", data_dir=data_root)
    assert ds.source == raw_dir and len(ds) == 10_000
    np.testing.assert_array_equal(ds.labels, ref.labels)
    for i in (0, 4321, 9999):
        assert torch.equal(ds[i][0], ref[i][0])


def test_mnist_truncated_gz(data_root: Path, tmp_path: Path) -> None:
    images, labels = (data_root / "mnist" / n for n in MNIST_FILES)
    (tmp_path / images.name).write_bytes(images.read_bytes()[:50_000])
    shutil.copy(labels, tmp_path / labels.name)
    load = lambda: load_dataset("mnist", data_dir=tmp_path)  # noqa: E731
    one_line_error(DataError, load, images.name, "corrupt or truncated", "download it again")


def test_mnist_header_mismatch(tmp_path: Path) -> None:
    header = (0x803).to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in (3, 28, 28))
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(header + bytes(2 * 784))  # 2 of 3 images
    labels = (0x801).to_bytes(4, "big") + (3).to_bytes(4, "big") + bytes(3)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(labels)
    load = lambda: load_dataset("mnist", data_dir=tmp_path)  # noqa: E731
    one_line_error(DataError, load, "t10k-images-idx3-ubyte", "expected 2,368")
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(header + bytes(3 * 784 + 1))
    one_line_error(DataError, load, "t10k-images-idx3-ubyte", "2,369 bytes")
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"\0\0\x08\x03" + labels[4:])
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(header + bytes(3 * 784))
    one_line_error(DataError, load, "t10k-labels-idx1-ubyte", "magic number 0x803")


# --- CIFAR ---------------------------------------------------------------------------------


@pytest.mark.parametrize("sub", ["", "cifar100", "cifar100/cifar-100-python"])
def test_cifar100_real(data_root: Path, sub: str) -> None:
    ds = load_dataset("cifar100", data_dir=data_root / sub if sub else data_root)
    assert (len(ds), ds.shape, ds.num_classes) == (916, (3, 32, 32), 100)
    assert [ds.label(i) for i in range(3)] == [49, 33, 72]
    assert ds.class_names is not None and len(ds.class_names) == 100
    assert [ds.class_names[i] for i in (49, 33, 72)] == ["mountain", "forest", "seal"]
    image, label = ds[0]
    assert label == 49 and image.dtype == torch.float32
    assert image.min() >= 0.0 and image.max() <= 1.0
    with (data_root / "cifar100" / "cifar-100-python" / "test").open("rb") as f:
        row = pickle.load(f, encoding="bytes")[b"data"][0]
    # Rows hold all red values, then green, then blue.
    np.testing.assert_array_equal(as_bytes(image), row.reshape(3, 32, 32))


def test_cifar10_generated_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, size=(5, 3072), dtype=np.uint8)
    write_cifar10(tmp_path / "cifar-10-batches-py", data, [3, 1, 4, 1, 5], "test_batch")
    ds = load_dataset("cifar10", data_dir=tmp_path)
    assert (len(ds), ds.shape, ds.num_classes) == (5, (3, 32, 32), 10)
    assert ds.class_names == tuple(f"class{i}" for i in range(10))
    assert [ds[i][1] for i in range(5)] == [3, 1, 4, 1, 5]
    for i in range(5):
        np.testing.assert_array_equal(as_bytes(ds[i][0]), data[i].reshape(3, 32, 32))
    # The red plane comes first: pixel (row 0, col 1) of the red channel is data[i, 1].
    assert as_bytes(ds[2][0])[0, 0, 1] == data[2, 1]
    assert as_bytes(ds[2][0])[2, 31, 31] == data[2, 3071]


def test_cifar10_train_concatenates_batches(tmp_path: Path) -> None:
    folder = tmp_path / "cifar10" / "cifar-10-batches-py"
    for b in range(1, 6):
        data = np.full((2, 3072), b, dtype=np.uint8)
        write_cifar10(folder, data, [b, b], f"data_batch_{b}")
    ds = load_dataset("cifar10", data_dir=tmp_path, split="train")
    assert len(ds) == 10 and ds.labels.tolist() == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert as_bytes(ds[9][0]).max() == 5
    one_line_error(DataError, lambda: load_dataset("cifar10", data_dir=tmp_path), "test_batch")


def test_garbage_and_truncated_pickles(data_root: Path, tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    shutil.copy(data_root / "cifar100" / "cifar-100-python" / "meta", folder / "meta")
    load = lambda: load_dataset("cifar100", data_dir=tmp_path)  # noqa: E731
    (folder / "test").write_bytes(b"this is not a pickle at all\n" * 10)
    one_line_error(DataError, load, str(folder / "test"), "download it again")
    real = (data_root / "cifar100" / "cifar-100-python" / "test").read_bytes()
    (folder / "test").write_bytes(real[:100_000])
    one_line_error(DataError, load, str(folder / "test"), "corrupt or truncated")


class _Opener:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_hostile_pickle_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": _Opener(marker)}, protocol=2))
    load = lambda: load_dataset("cifar10", data_dir=tmp_path)  # noqa: E731
    one_line_error(DataError, load, "test_batch", "open")
    assert not marker.exists()


# --- SVHN ----------------------------------------------------------------------------------


def test_svhn_generated_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, size=(32, 32, 3, 4), dtype=np.uint8)
    y = np.array([[10], [1], [9], [10]], dtype=np.uint8)
    (tmp_path / "svhn").mkdir()
    scipy.io.savemat(tmp_path / "svhn" / "test_32x32.mat", {"X": x, "y": y})
    ds = load_dataset("svhn", data_dir=tmp_path)
    assert (len(ds), ds.shape, ds.num_classes) == (4, (3, 32, 32), 10)
    assert ds.labels.tolist() == [0, 1, 9, 0]
    for i in range(4):
        image, label = ds[i]
        assert label == ds.label(i)
        np.testing.assert_array_equal(as_bytes(image), x[:, :, :, i].transpose(2, 0, 1))
    assert as_bytes(ds[3][0])[1, 5, 7] == x[5, 7, 1, 3]


# --- LFW -----------------------------------------------------------------------------------


def test_lfw_real(data_root: Path) -> None:
    ds = load_dataset("lfw", data_dir=data_root)
    assert (len(ds), ds.shape, ds.num_classes) == (1499, (3, 32, 32), 5749)
    assert ds.label(0) == 0 and ds.class_names is not None and ds.class_names[0] == "AJ_Cook"
    assert np.all(np.diff(ds.labels) >= 0)
    assert ds.label(len(ds) - 1) == 666 and ds.class_names[666] == "Brendan_Gaughan"
    image, label = ds[len(ds) - 1]
    assert label == 666 and tuple(image.shape) == (3, 32, 32)
    assert image.min() >= 0.0 and image.max() <= 1.0 and image.std() > 0.05
    first = data_root / "lfw" / "AJ_Cook" / "AJ_Cook_0001.jpg"
    assert torch.equal(ds[0][0], load_image(first, shape=(3, 32, 32)))
    assert load_dataset("lfw", data_dir=data_root / "lfw", num_classes=667).num_classes == 667
    load = lambda: load_dataset("lfw", data_dir=data_root, num_classes=100)  # noqa: E731
    one_line_error(DataError, load, "667 people", "num_classes=100")


def test_lfw_corrupt_jpeg_fails_on_access(tmp_path: Path) -> None:
    for person in ("Ann_A", "Bob_B"):
        (tmp_path / "lfw" / person).mkdir(parents=True)
    Image.new("RGB", (50, 40), (200, 10, 10)).save(tmp_path / "lfw" / "Ann_A" / "Ann_A_0001.jpg")
    broken = tmp_path / "lfw" / "Bob_B" / "Bob_B_0001.jpg"
    buffer = io.BytesIO()
    Image.new("RGB", (50, 40), (0, 0, 255)).save(buffer, format="JPEG")
    broken.write_bytes(buffer.getvalue()[:300])
    ds = load_dataset("lfw", data_dir=tmp_path)
    assert len(ds) == 2 and ds.labels.tolist() == [0, 1] and ds.label(1) == 1
    red = ds[0][0]
    assert red[0].mean() > 0.7 and red[2].mean() < 0.1
    # DataLoader workers started with "spawn" receive the dataset pickled.
    assert torch.equal(pickle.loads(pickle.dumps(ds))[0][0], red)
    one_line_error(DataError, lambda: ds[1], str(broken))


# --- built-in samples, single images ------------------------------------------------------


def test_samples_load_without_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GRADLEAK_DATA", str(tmp_path / "nothing-here"))
    mnist = load_dataset("sample")
    assert (mnist.name, len(mnist), mnist.shape, mnist.num_classes) == (
        "sample",
        8,
        (1, 28, 28),
        10,
    )
    assert mnist.labels.tolist() == [2, 0, 9, 7, 1, 4, 1, 4]
    assert load_dataset("sample-mnist").labels.tolist() == mnist.labels.tolist()  # alias
    cifar = load_dataset("sample-cifar100")
    assert (len(cifar), cifar.shape, cifar.num_classes) == (8, (3, 32, 32), 100)
    assert cifar.labels[:3].tolist() == [0, 43, 70] and cifar.class_names[0] == "apple"
    assert len(list(cifar)) == 8


def test_samples_match_real_data(data_root: Path) -> None:
    # The samples are real test images, picked by index (tools/make_samples.py says which).
    real = load_dataset("cifar100", data_dir=data_root)
    sample = load_dataset("sample-cifar100")
    for i, source in enumerate((9, 15, 18, 19, 12, 14, 16, 2)):
        assert torch.equal(sample[i][0], real[source][0]) and sample.label(i) == real.label(source)
    mnist = load_dataset("mnist", data_dir=data_root)
    digits = load_dataset("sample")
    for i, source in enumerate((1, 3, 7, 0, 2, 4, 5, 6)):
        assert torch.equal(digits[i][0], mnist[source][0]) and digits.label(i) == mnist.label(
            source
        )


def test_load_image(tmp_path: Path) -> None:
    rgb = np.random.default_rng(2).integers(0, 256, size=(6, 5, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    image = load_image(tmp_path / "rgb.png")
    assert image.dtype == torch.float32 and tuple(image.shape) == (3, 6, 5)
    np.testing.assert_array_equal(as_bytes(image), rgb.transpose(2, 0, 1))
    assert tuple(load_image(tmp_path / "rgb.png", shape=(1, 28, 28)).shape) == (1, 28, 28)
    Image.fromarray(np.full((4, 4), 128, np.uint8)).save(tmp_path / "gray.png")
    assert tuple(load_image(tmp_path / "gray.png").shape) == (1, 4, 4)
    # 16-bit samples are scaled to 8 bits, not clipped: 0x8080 -> 0x80.
    Image.fromarray(np.full((4, 4), 0x8080, np.uint16)).save(tmp_path / "deep.png")
    assert np.all(as_bytes(load_image(tmp_path / "deep.png")) == 0x80)
    single = load_dataset(str(tmp_path / "rgb.png"))
    assert (single.name, len(single), single.shape) == ("image", 1, (3, 32, 32))


def test_load_image_errors(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not an image\nat all\n")
    one_line_error(DataError, lambda: load_image(text), str(text))
    missing = tmp_path / "missing.png"
    one_line_error(DataError, lambda: load_image(missing), str(missing), "not found")
    one_line_error(DataError, lambda: load_dataset(str(missing)), str(missing))
    one_line_error(DataError, lambda: load_image(tmp_path), str(tmp_path))
    one_line_error(ConfigError, lambda: load_image(text, shape=(2, 8, 8)), "(2, 8, 8)")


# --- names, indices, missing files ---------------------------------------------------------


def test_names_and_options() -> None:
    assert DATASETS == ("sample", "sample-cifar100", "mnist", "cifar100", "cifar10", "lfw", "svhn")
    msg = one_line_error(ConfigError, lambda: load_dataset("foo"), "unknown dataset 'foo'")
    assert "sample, sample-cifar100, mnist, cifar100, cifar10, lfw, svhn" in msg
    one_line_error(ConfigError, lambda: load_dataset("sample", split="val"), "'val'")
    one_line_error(
        ConfigError, lambda: load_dataset("sample-cifar100", num_classes=10), "100 classes"
    )


def test_index_out_of_range(data_root: Path) -> None:
    ds = load_dataset("mnist", data_dir=data_root)
    msg = "index 20000 is out of range: mnist test has 10,000 images (0..9999)"
    assert one_line_error(DataError, lambda: ds[20000]) == msg
    assert one_line_error(DataError, lambda: ds.label(20000)) == msg
    one_line_error(DataError, lambda: load_dataset("sample")[-1], "index -1", "(0..7)")


@pytest.mark.parametrize("name", ["mnist", "cifar100", "cifar10", "svhn", "lfw"])
def test_empty_folder(tmp_path: Path, name: str) -> None:
    (tmp_path / name).mkdir()
    msg = one_line_error(DataError, lambda: load_dataset(name, data_dir=tmp_path), str(tmp_path))
    assert "not found" in msg and "GRADLEAK_NO_DOWNLOAD" in msg
    msg = one_line_error(DataError, lambda: load_dataset(name, data_dir=tmp_path, download=False))
    assert "GRADLEAK_NO_DOWNLOAD" not in msg


def test_missing_mnist_message(tmp_path: Path) -> None:
    msg = one_line_error(
        DataError, lambda: load_dataset("mnist", data_dir=tmp_path, download=False)
    )
    assert msg == (
        f"mnist test files not found: put t10k-images-idx3-ubyte.gz and "
        f"t10k-labels-idx1-ubyte.gz in {tmp_path} (or its MNIST/raw/ subfolder), "
        "or pass --data-dir"
    )


def test_default_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GRADLEAK_DATA", str(tmp_path))
    assert default_data_dir() == tmp_path
    monkeypatch.delenv("GRADLEAK_DATA")
    assert default_data_dir() == Path.home() / ".cache" / "gradleak" / "data"


# --- downloading, from local file:// URLs only ---------------------------------------------


def _archive(tmp_path: Path, members: dict[str, bytes]) -> tuple[str, str]:
    path = tmp_path / "archive.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path.as_uri(), hashlib.md5(path.read_bytes()).hexdigest()


def _cifar10_members(tmp_path: Path) -> dict[str, bytes]:
    data = np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072)
    write_cifar10(tmp_path / "src", data, [7, 8], "test_batch")
    return {f"cifar-10-batches-py/{p.name}": p.read_bytes() for p in (tmp_path / "src").iterdir()}


def test_download_extracts_and_verifies(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    url, md5 = _archive(tmp_path, _cifar10_members(tmp_path))
    remote = dl.Remote(url, md5, "cifar10", extract=True)
    monkeypatch.setitem(dl.SOURCES, ("cifar10", "test"), (remote,))
    ds = load_dataset("cifar10", data_dir=tmp_path / "data", download=True)
    assert ds.labels.tolist() == [7, 8]
    assert ds.source == tmp_path / "data" / "cifar10" / "cifar-10-batches-py"
    assert not list((tmp_path / "data" / "cifar10").glob("*.tar.gz*"))


def test_download_failures(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    url, _ = _archive(tmp_path, _cifar10_members(tmp_path))
    bad = dl.Remote(url, "0" * 32, "cifar10", extract=True)
    monkeypatch.setitem(dl.SOURCES, ("cifar10", "test"), (bad,))
    load = lambda: load_dataset("cifar10", data_dir=tmp_path / "data", download=True)  # noqa: E731
    one_line_error(DataError, load, "not found", "download failed", "checksum mismatch")
    assert not list((tmp_path / "data" / "cifar10").iterdir())
    gone = dl.Remote((tmp_path / "nope.tar.gz").as_uri(), "0" * 32, "cifar10", extract=True)
    monkeypatch.setitem(dl.SOURCES, ("cifar10", "test"), (gone,))
    one_line_error(DataError, load, "download failed", "nope.tar.gz")


def test_unsafe_archive_is_refused(tmp_path: Path) -> None:
    _archive(tmp_path, {"../evil.txt": b"x"})
    with pytest.raises(dl.DownloadError, match="unsafe"):
        dl.extract_tar(tmp_path / "archive.tar.gz", tmp_path / "out")
    assert not (tmp_path / "evil.txt").exists()
