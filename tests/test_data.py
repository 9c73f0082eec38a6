"""Tests for diffusionblocks.data: dataset readers, npz validation, augmentation and batching."""

from __future__ import annotations

import gzip
import io
import pickle
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusionblocks import data
from diffusionblocks.data import (
    Batches,
    DataError,
    ImageDataset,
    augment,
    iterate_eval,
    load_dataset,
    to_float,
)

REAL_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


@pytest.fixture(autouse=True)
def isolated_data_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may see the machine's /usr/share/datasets, the user's cache or the network."""
    monkeypatch.setattr(data, "SYSTEM_FASHION_MNIST_DIR", tmp_path / "no-system-dir")
    monkeypatch.setenv("DIFFUSIONBLOCKS_CACHE", str(tmp_path / "env-cache"))

    def no_network(*args: object, **kwargs: object) -> None:
        raise OSError("network disabled in tests")

    monkeypatch.setattr(data.urllib.request, "urlopen", no_network)


# -----------------------------------------------------------------------------
# Fashion-MNIST / IDX


def _idx_bytes(arr: np.ndarray, magic: int) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def _write_fashion(directory: Path, seed: int = 0, gz: bool = True) -> dict[str, np.ndarray]:
    """Write 5 train / 3 test 28x28 images in the official IDX layout; return the arrays written."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (5, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.array([9, 0, 3, 7, 1], dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (3, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": np.array([2, 5, 8], dtype=np.uint8),
    }
    directory.mkdir(parents=True, exist_ok=True)
    for stem, arr in arrays.items():
        raw = _idx_bytes(arr, 2051 if arr.ndim == 3 else 2049)
        if gz:
            (directory / f"{stem}.gz").write_bytes(gzip.compress(raw))
        else:
            (directory / stem).write_bytes(raw)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_idx_reader(tmp_path: Path, gz: bool) -> None:
    arrays = _write_fashion(tmp_path / "fm", gz=gz)
    ds = load_dataset("fashion-mnist", root=tmp_path / "fm", download=False)
    assert ds.x_train.shape == (5, 1, 28, 28) and ds.x_test.shape == (3, 1, 28, 28)
    assert ds.x_train.dtype == torch.uint8 and ds.y_train.dtype == torch.int64
    assert np.array_equal(ds.x_train[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    assert np.array_equal(ds.x_test[:, 0].numpy(), arrays["t10k-images-idx3-ubyte"])
    assert ds.y_train.tolist() == [9, 0, 3, 7, 1] and ds.y_test.tolist() == [2, 5, 8]
    assert ds.num_classes == 10 and ds.hflip and ds.channels == 1 and ds.image_size == (28, 28)
    assert "5 train" in ds.describe() and "1x28x28" in ds.describe()


def test_fashion_mnist_root_takes_priority(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_fashion(tmp_path / "system", seed=1)
    monkeypatch.setattr(data, "SYSTEM_FASHION_MNIST_DIR", tmp_path / "system")
    arrays = _write_fashion(tmp_path / "root", seed=2)
    ds = load_dataset("fashion_mnist", root=tmp_path / "root", download=False)
    assert np.array_equal(ds.x_train[:, 0].numpy(), arrays["train-images-idx3-ubyte"])


def test_fashion_mnist_found_in_cache_dir(tmp_path: Path) -> None:
    arrays = _write_fashion(tmp_path / "cache" / "fashion-mnist")
    ds = load_dataset("fashion-mnist", cache_dir=tmp_path / "cache", download=False)
    assert np.array_equal(ds.x_test[:, 0].numpy(), arrays["t10k-images-idx3-ubyte"])


def test_idx_corrupt_magic_raises(tmp_path: Path) -> None:
    _write_fashion(tmp_path)
    bad = _idx_bytes(np.zeros((5, 28, 28), np.uint8), 2049)  # a labels magic on an images file
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(bad))
    with pytest.raises(DataError, match="magic number 2049, expected 2051"):
        load_dataset("fashion-mnist", root=tmp_path, download=False)


def test_idx_truncated_raises(tmp_path: Path) -> None:
    _write_fashion(tmp_path)
    raw = _idx_bytes(np.zeros((5, 28, 28), np.uint8), 2051)[:-10]
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(raw))
    with pytest.raises(DataError, match="corrupt IDX file"):
        load_dataset("fashion-mnist", root=tmp_path, download=False)


def test_fashion_mnist_missing_names_places_looked(tmp_path: Path) -> None:
    root, cache = tmp_path / "root", tmp_path / "cache"
    with pytest.raises(DataError) as info:
        load_dataset("fashion-mnist", root=root, cache_dir=cache, download=False)
    msg = str(info.value)
    for place in (root, data.SYSTEM_FASHION_MNIST_DIR, cache / "fashion-mnist"):
        assert str(place) in msg
    assert "apt-get install dataset-fashion-mnist" in msg and ".npz" in msg


def test_fashion_mnist_failed_download_is_reported(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="network disabled in tests") as info:
        load_dataset("fashion-mnist", cache_dir=tmp_path / "cache", download=True)
    assert str(tmp_path / "cache" / "fashion-mnist") in str(info.value)
    assert list((tmp_path / "cache" / "fashion-mnist").glob("*")) == []  # no partial files left behind


def test_fashion_mnist_download_writes_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    arrays = _write_fashion(tmp_path / "server")
    served = {name: (tmp_path / "server" / name).read_bytes() for name in data.FASHION_MNIST_MD5}
    fake_md5 = {name: data.hashlib.md5(raw).hexdigest() for name, raw in served.items()}
    monkeypatch.setattr(data, "FASHION_MNIST_MD5", fake_md5)
    monkeypatch.setattr(
        data.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(served[url.split("/")[-1]])
    )
    ds = load_dataset("fashion-mnist", cache_dir=tmp_path / "cache", download=True)
    assert np.array_equal(ds.x_train[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    assert sorted(p.name for p in (tmp_path / "cache" / "fashion-mnist").iterdir()) == sorted(served)


def test_download_checksum_mismatch_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(b"not the real file"))
    with pytest.raises(DataError, match="checksum mismatch"):
        load_dataset("fashion-mnist", cache_dir=tmp_path / "cache", download=True)
    assert list((tmp_path / "cache" / "fashion-mnist").iterdir()) == []


@pytest.mark.skipif(
    not REAL_FASHION_MNIST.exists(),
    reason=f"real Fashion-MNIST not installed ({REAL_FASHION_MNIST}; apt-get install dataset-fashion-mnist)",
)
def test_real_fashion_mnist(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "SYSTEM_FASHION_MNIST_DIR", REAL_FASHION_MNIST.parent)
    ds = load_dataset("fashion-mnist", download=False)
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert ds.num_classes == 10 and sorted(ds.y_train.unique().tolist()) == list(range(10))
    assert ds.y_train[:4].tolist() == [9, 0, 0, 3]  # the well-known first labels of the training set


# -----------------------------------------------------------------------------
# CIFAR


def _cifar_batch(rng: np.random.Generator, n: int, label_key: bytes, num_classes: int) -> dict[bytes, object]:
    return {
        b"batch_label": b"test batch",
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        label_key: rng.integers(0, num_classes, n).tolist(),
        b"filenames": [f"img{i}.png".encode() for i in range(n)],
    }


def _write_tar_gz(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tf:
        for name, raw in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            tf.addfile(info, io.BytesIO(raw))


def _cifar10_members() -> tuple[list[dict], dict, dict[str, bytes]]:
    rng = np.random.default_rng(0)
    train = [_cifar_batch(rng, 2, b"labels", 10) for _ in range(5)]
    test = _cifar_batch(rng, 3, b"labels", 10)
    members = {f"cifar-10-batches-py/data_batch_{i + 1}": pickle.dumps(b) for i, b in enumerate(train)}
    members["cifar-10-batches-py/test_batch"] = pickle.dumps(test)
    members["cifar-10-batches-py/batches.meta"] = pickle.dumps({b"label_names": [b"x"] * 10})
    return train, test, members


def _check_cifar10(ds: ImageDataset, train: list[dict], test: dict) -> None:
    assert ds.name == "cifar10" and ds.num_classes == 10 and ds.hflip
    assert ds.x_train.shape == (10, 3, 32, 32) and ds.x_test.shape == (3, 3, 32, 32)
    assert ds.x_train.dtype == torch.uint8 and ds.y_train.dtype == torch.int64
    # image 3 is the second image of data_batch_2; row-major (3, 32, 32) layout
    row = train[1][b"data"][1]
    assert ds.x_train[3, 2, 5, 7].item() == row[2 * 1024 + 5 * 32 + 7]
    assert np.array_equal(ds.x_train[3].numpy(), row.reshape(3, 32, 32))
    assert np.array_equal(ds.x_test.numpy(), test[b"data"].reshape(3, 3, 32, 32))
    assert ds.y_train.tolist() == [label for b in train for label in b[b"labels"]]
    assert ds.y_test.tolist() == test[b"labels"]


def test_cifar10_from_archive(tmp_path: Path) -> None:
    train, test, members = _cifar10_members()
    _write_tar_gz(tmp_path / "cifar-10-python.tar.gz", members)
    _check_cifar10(load_dataset("cifar10", root=tmp_path, download=False), train, test)


def test_cifar10_from_extracted_folder_in_cache(tmp_path: Path) -> None:
    train, test, members = _cifar10_members()
    for name, raw in members.items():  # the layout `tar xzf cifar-10-python.tar.gz` leaves behind
        (tmp_path / "cache" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "cache" / name).write_bytes(raw)
    _check_cifar10(load_dataset("cifar10", cache_dir=tmp_path / "cache", download=False), train, test)


def test_cifar100_from_archive(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    train, test = _cifar_batch(rng, 4, b"fine_labels", 100), _cifar_batch(rng, 2, b"fine_labels", 100)
    for b in (train, test):
        b[b"coarse_labels"] = [0] * len(b[b"fine_labels"])
    _write_tar_gz(
        tmp_path / "cifar-100-python.tar.gz",
        {"cifar-100-python/train": pickle.dumps(train), "cifar-100-python/test": pickle.dumps(test)},
    )
    ds = load_dataset("cifar100", root=tmp_path, download=False)
    assert ds.num_classes == 100 and ds.x_train.shape == (4, 3, 32, 32) and ds.x_test.shape == (2, 3, 32, 32)
    assert np.array_equal(ds.x_train.numpy(), train[b"data"].reshape(4, 3, 32, 32))
    assert ds.x_test[1, 1, 31, 0].item() == test[b"data"][1][1 * 1024 + 31 * 32 + 0]
    assert ds.y_train.tolist() == train[b"fine_labels"] and ds.y_test.tolist() == test[b"fine_labels"]


def test_cifar_archive_missing_member(tmp_path: Path) -> None:
    _write_tar_gz(tmp_path / "cifar-10-python.tar.gz", {"cifar-10-batches-py/data_batch_1": b"x"})
    with pytest.raises(DataError, match="lacks .*data_batch_2"):
        load_dataset("cifar10", root=tmp_path, download=False)


def test_cifar_missing_names_places_looked(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        load_dataset("cifar100", root=tmp_path / "r", cache_dir=tmp_path / "c", download=False)
    msg = str(info.value)
    assert str(tmp_path / "r") in msg and str(tmp_path / "c") in msg and "cifar-100-python.tar.gz" in msg


# -----------------------------------------------------------------------------
# npz


def _npz_arrays(channels_last: int | None = None) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    shape = (6, 10, 12) if channels_last is None else (6, 10, 12, channels_last)
    test_shape = (4, *shape[1:])
    return {
        "x_train": rng.integers(0, 256, shape, dtype=np.uint8),
        "y_train": np.array([0, 1, 2, 1, 0, 2]),
        "x_test": rng.integers(0, 256, test_shape, dtype=np.uint8),
        "y_test": np.array([3, 0, 1, 2], dtype=np.int32),
    }


def _save(tmp_path: Path, arrays: dict[str, np.ndarray], name: str = "mine.npz") -> Path:
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def test_npz_grayscale(tmp_path: Path) -> None:
    arrays = _npz_arrays()
    ds = load_dataset(str(_save(tmp_path, arrays)))
    assert ds.name == "mine" and not ds.hflip
    assert ds.x_train.shape == (6, 1, 10, 12) and ds.x_test.shape == (4, 1, 10, 12)
    assert np.array_equal(ds.x_train[:, 0].numpy(), arrays["x_train"])
    assert ds.num_classes == 4  # label 3 appears only in test: fine, and counted
    assert ds.y_test.dtype == torch.int64 and ds.y_test.tolist() == [3, 0, 1, 2]


def test_npz_channels_last(tmp_path: Path) -> None:
    arrays = _npz_arrays(channels_last=3)
    ds = load_dataset(_save(tmp_path, arrays))
    assert ds.x_train.shape == (6, 3, 10, 12) and ds.channels == 3 and ds.image_size == (10, 12)
    assert ds.x_train[2, 1, 4, 5].item() == arrays["x_train"][2, 4, 5, 1]


def test_npz_explicit_num_classes(tmp_path: Path) -> None:
    ds = load_dataset(_save(tmp_path, {**_npz_arrays(), "num_classes": np.array(7)}))
    assert ds.num_classes == 7


def _expect_npz_error(tmp_path: Path, arrays: dict[str, np.ndarray], match: str) -> None:
    with pytest.raises(DataError, match=match):
        load_dataset(_save(tmp_path, arrays))


def test_npz_missing_array(tmp_path: Path) -> None:
    arrays = _npz_arrays()
    del arrays["y_test"]
    _expect_npz_error(tmp_path, arrays, r"missing array 'y_test'.*'x_test', 'x_train', 'y_train'")


def test_npz_length_mismatch(tmp_path: Path) -> None:
    _expect_npz_error(
        tmp_path, {**_npz_arrays(), "y_train": np.array([0, 1, 2])}, "6 images but y_train has 3"
    )


def test_npz_negative_label(tmp_path: Path) -> None:
    _expect_npz_error(tmp_path, {**_npz_arrays(), "y_test": np.array([0, -1, 1, 2])}, "labels out of range")


def test_npz_label_above_num_classes(tmp_path: Path) -> None:
    arrays = {**_npz_arrays(), "num_classes": np.array(3)}  # y_test contains 3
    _expect_npz_error(tmp_path, arrays, "labels out of range: y_test contains 3 but num_classes is 3")


def test_npz_sparse_labels_are_refused_unless_num_classes_says_so(tmp_path: Path) -> None:
    stray = {**_npz_arrays(), "y_train": np.array([0, 1, 2, 1, 0, 100000])}  # 100,001 classes from one label
    _expect_npz_error(tmp_path, stray, r"labels are sparse: 5 distinct values.*100,001 classes.*remap them to 0..4")
    _expect_npz_error(tmp_path, {**stray, "y_train": np.array([0, 1, 2, 1, 0, 10**9])}, "labels are sparse")
    assert load_dataset(_save(tmp_path, {**stray, "num_classes": np.array(100001)})).num_classes == 100001
    # a few classes absent from a small file is not sparse: labels 0..3 present of 0..6 inferred
    assert load_dataset(_save(tmp_path, {**_npz_arrays(), "y_test": np.array([6, 0, 1, 2])})).num_classes == 7


def test_npz_float_images(tmp_path: Path) -> None:
    arrays = _npz_arrays()
    arrays["x_train"] = arrays["x_train"].astype(np.float32) / 255
    _expect_npz_error(tmp_path, arrays, "x_train has dtype float32, expected uint8")


def test_npz_wrong_ndim(tmp_path: Path) -> None:
    _expect_npz_error(tmp_path, {**_npz_arrays(), "x_test": np.zeros((4, 120), np.uint8)}, "ndim 2")


def test_npz_float_labels(tmp_path: Path) -> None:
    _expect_npz_error(tmp_path, {**_npz_arrays(), "y_train": np.zeros(6)}, "expected integer class labels")


def test_npz_train_test_shapes_differ(tmp_path: Path) -> None:
    arrays = {**_npz_arrays(), "x_test": np.zeros((4, 10, 11), np.uint8)}
    _expect_npz_error(tmp_path, arrays, "1x10x12 .* 1x10x11")


def test_npz_file_missing_or_invalid(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        load_dataset(tmp_path / "nope.npz")
    (tmp_path / "junk.npz").write_bytes(b"this is not a zip file")
    with pytest.raises(DataError, match="not a valid .npz"):
        load_dataset(tmp_path / "junk.npz")


# -----------------------------------------------------------------------------
# digits and names


def test_digits() -> None:
    pytest.importorskip("sklearn")
    ds = load_dataset("digits")
    assert ds.x_train.shape == (1437, 1, 8, 8) and ds.x_test.shape == (360, 1, 8, 8)
    assert ds.num_classes == 10 and not ds.hflip
    assert ds.x_train.dtype == torch.uint8 and int(ds.x_train.max()) == 255 and int(ds.x_train.min()) == 0
    again = load_dataset("digits")
    assert torch.equal(ds.x_test, again.x_test) and torch.equal(ds.y_train, again.y_train)


def test_digits_without_sklearn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # makes the import fail
    data._digits_arrays.cache_clear()  # as in a process that has not read them yet
    with pytest.raises(DataError, match="pip install scikit-learn"):
        load_dataset("digits")


def test_unknown_name_lists_known() -> None:
    with pytest.raises(DataError, match="unknown dataset 'mnistt'") as info:
        load_dataset("mnistt")
    for known in data.KNOWN_DATASETS:
        assert known in str(info.value)
    assert ".npz" in str(info.value)


# -----------------------------------------------------------------------------
# preprocessing and augmentation


def test_to_float_range() -> None:
    x = torch.tensor([0, 51, 255], dtype=torch.uint8)
    assert torch.allclose(to_float(x), torch.tensor([-1.0, -0.6, 1.0]))
    assert to_float(x).dtype == torch.float32


def test_augment_identity() -> None:
    x = torch.randn(4, 3, 8, 8)
    assert torch.equal(augment(x, generator=torch.Generator().manual_seed(0)), x)


def test_augment_hflip_only() -> None:
    x = torch.randn(64, 2, 5, 7)
    out = augment(x, generator=torch.Generator().manual_seed(0), hflip=True)
    same = (out == x).flatten(1).all(1)
    flipped = (out == x.flip(-1)).flatten(1).all(1)
    assert bool((same | flipped).all())
    assert 0 < int(flipped.sum()) < 64  # some but not all flipped


def test_augment_crop_is_shifted_window() -> None:
    p = 2
    x = torch.randn(32, 3, 6, 5)
    out = augment(x, generator=torch.Generator().manual_seed(0), crop_padding=p)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (p, p, p, p))
    offsets = set()
    for i in range(len(x)):
        matches = [
            (dy, dx)
            for dy in range(2 * p + 1)
            for dx in range(2 * p + 1)
            if torch.equal(out[i], padded[i, :, dy : dy + 6, dx : dx + 5])
        ]
        assert matches, f"sample {i} is not a window of the padded input"
        offsets.add(matches[0])
    assert len(offsets) > 1  # offsets differ per sample


def test_augment_same_seed_same_output() -> None:
    x = torch.randn(16, 1, 8, 8)
    a = augment(x, generator=torch.Generator().manual_seed(3), crop_padding=2, hflip=True)
    b = augment(x, generator=torch.Generator().manual_seed(3), crop_padding=2, hflip=True)
    c = augment(x, generator=torch.Generator().manual_seed(4), crop_padding=2, hflip=True)
    assert torch.equal(a, b) and not torch.equal(a, c)


# -----------------------------------------------------------------------------
# batching


def test_batches_each_sample_once_per_epoch() -> None:
    x, y = torch.arange(10).float()[:, None], torch.arange(10)
    batches = Batches(x, y, 3, seed=0, drop_last=False)
    for epoch in range(2):
        seen = []
        for _ in range(batches.batches_per_epoch):
            xb, yb = next(batches)
            assert torch.equal(xb[:, 0].long(), yb)
            seen += yb.tolist()
        assert sorted(seen) == list(range(10))
        assert batches.epoch == epoch + 1 and batches.epoch_float == epoch + 1


def test_batches_drop_last_and_epochs_differ() -> None:
    y = torch.arange(10)
    batches = Batches(y, y, 4, seed=0)
    first = [next(batches)[1] for _ in range(2)]
    assert all(len(b) == 4 for b in first) and len(set(torch.cat(first).tolist())) == 8
    assert batches.epoch == 1 and batches.index == 0
    second = torch.cat([next(batches)[1] for _ in range(2)])
    assert not torch.equal(torch.cat(first), second)


def test_batches_resume_matches_uninterrupted() -> None:
    x, y = torch.randn(23, 2), torch.arange(23)
    reference = Batches(x, y, 5, seed=7)
    expected = [next(reference)[1] for _ in range(15)]  # crosses several epoch boundaries

    first = Batches(x, y, 5, seed=7)
    for _ in range(6):
        next(first)
    state = first.state_dict()
    assert set(state) == {"epoch", "index", "seed"}
    resumed = Batches(x, y, 5, seed=123)  # the seed comes from the state_dict
    resumed.load_state_dict(state)
    assert resumed.epoch_float == pytest.approx(6 / 4)
    for k in range(6, 15):
        xb, yb = next(resumed)
        assert torch.equal(yb, expected[k]) and torch.equal(xb, x[yb])


def test_batches_errors() -> None:
    y = torch.arange(5)
    with pytest.raises(DataError, match="batch_size 6 is larger than the dataset"):
        Batches(y, y, 6, seed=0)
    with pytest.raises(DataError, match="index=9"):
        Batches(y, y, 2, seed=0).load_state_dict({"epoch": 0, "index": 9, "seed": 0})


def test_iterate_eval_in_order() -> None:
    x, y = torch.arange(7).float(), torch.arange(7)
    chunks = list(iterate_eval(x, y, 3))
    assert [c[1].tolist() for c in chunks] == [[0, 1, 2], [3, 4, 5], [6]]
    assert torch.equal(torch.cat([c[0] for c in chunks]), x)


def test_image_dataset_validates() -> None:
    x = torch.zeros(2, 1, 4, 4, dtype=torch.uint8)
    with pytest.raises(DataError, match="labels out of range"):
        ImageDataset("t", x, torch.tensor([0, 5]), x, torch.tensor([0, 1]), num_classes=2, hflip=False)
