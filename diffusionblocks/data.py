"""Load small image-classification datasets as uint8 tensors, and batch and augment them for training."""

from __future__ import annotations

import copy
import dataclasses
import functools
import gzip
import hashlib
import http.client
import io
import math
import os
import pickle
import sys
import tarfile
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .io import atomic_file
from .io import cache_dir as default_cache_dir
from .text import CORPORA

# -----------------------------------------------------------------------------
# constants

# where the Debian/Ubuntu package `dataset-fashion-mnist` installs the original IDX files
# (image size, channels, classes) of the named datasets, for the memory planner (no data loaded)
DATA_SHAPES = {"fashion-mnist": ((28, 28), 1, 10), "digits": ((8, 8), 1, 10), "cifar10": ((32, 32), 3, 10),
               "cifar100": ((32, 32), 3, 100)}
SYSTEM_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
DOWNLOAD_TIMEOUT_S = 30.0  # per socket operation (connect / each read), not for the whole file

FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
# (split, images file, labels file), without the optional .gz suffix
FASHION_MNIST_FILES = (
    ("train", "train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    ("test", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
)
# md5 of the official .gz files; only downloads are checked (Debian recompresses its copies)
FASHION_MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned byte, 3 dims
IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned byte, 1 dim

DIGITS_NUM_TRAIN = 1437  # of 1797; the remaining 360 are the test set


@dataclass(frozen=True)
class _CifarSpec:
    folder: str  # directory inside the archive
    archive: str
    url: str
    md5: str
    train_members: tuple[str, ...]
    test_members: tuple[str, ...]
    label_key: bytes
    num_classes: int


_CIFAR_SPECS = {
    "cifar10": _CifarSpec(
        folder="cifar-10-batches-py",
        archive="cifar-10-python.tar.gz",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
        train_members=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_members=("test_batch",),
        label_key=b"labels",
        num_classes=10,
    ),
    "cifar100": _CifarSpec(
        folder="cifar-100-python",
        archive="cifar-100-python.tar.gz",
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
        train_members=("train",),
        test_members=("test",),
        label_key=b"fine_labels",
        num_classes=100,
    ),
}

KNOWN_DATASETS = ("fashion-mnist", "digits", "cifar10", "cifar100")
_ALIASES = {
    "fashion-mnist": "fashion-mnist",
    "fashion_mnist": "fashion-mnist",
    "fashionmnist": "fashion-mnist",
    "digits": "digits",
    "cifar10": "cifar10",
    "cifar-10": "cifar10",
    "cifar100": "cifar100",
    "cifar-100": "cifar100",
}


class DataError(ValueError):
    """A dataset is missing, malformed or used wrongly; the message says what and where."""


# -----------------------------------------------------------------------------
# the dataset container


@dataclass
class ImageDataset:
    name: str
    x_train: torch.Tensor  # (N, C, H, W) uint8
    y_train: torch.Tensor  # (N,) int64
    x_test: torch.Tensor  # (M, C, H, W) uint8
    y_test: torch.Tensor  # (M,) int64
    num_classes: int
    hflip: bool  # is a horizontal flip a label-preserving augmentation for these images?
    x_val: torch.Tensor | None = None  # a validation split held out from the training images (hold_out)
    y_val: torch.Tensor | None = None
    sources: dict[str, str] = field(default_factory=dict)  # sha256 of each file read, by name (a run checks them)

    def __post_init__(self) -> None:
        for split, x, y in (("train", self.x_train, self.y_train), ("test", self.x_test, self.y_test)):
            if x.dtype != torch.uint8 or x.ndim != 4:
                raise DataError(
                    f"{self.name}: x_{split} must be a uint8 N x C x H x W tensor, "
                    f"got {x.dtype} with shape {tuple(x.shape)}"
                )
            if y.dtype != torch.int64 or y.ndim != 1:
                raise DataError(
                    f"{self.name}: y_{split} must be an int64 tensor of shape (N,), "
                    f"got {y.dtype} with shape {tuple(y.shape)}"
                )
            if x.shape[0] != y.shape[0]:
                raise DataError(
                    f"{self.name}: x_{split} has {x.shape[0]} images but y_{split} has {y.shape[0]} labels"
                )
            if y.numel() > 0 and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
                raise DataError(
                    f"{self.name}: y_{split} labels out of range: found {int(y.min())}..{int(y.max())}, "
                    f"expected 0..{self.num_classes - 1} (num_classes={self.num_classes})"
                )
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise DataError(
                f"{self.name}: train images are {_chw(self.x_train.shape[1:])} but test images are "
                f"{_chw(self.x_test.shape[1:])}; they must share channels, height and width"
            )

    @property
    def channels(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.x_train.shape[2]), int(self.x_train.shape[3])

    def describe(self) -> str:
        h, w = self.image_size
        val = f" / {len(self.x_val)} validation (held out from train)" if self.x_val is not None else ""
        return (
            f"{self.name}: {len(self.x_train)} train{val} / {len(self.x_test)} test images, "
            f"{self.channels}x{h}x{w}, {self.num_classes} classes"
        )

    def hold_out(self, size: int, seed: int) -> None:
        """Move `size` training images, drawn by a permutation seeded with `seed`, to the validation split
        (both splits keep the original order)."""
        n = len(self.x_train)
        if not 0 < size < n:
            raise DataError(f"{self.name}: cannot hold out {size} of {n} training images for validation "
                            f"(data.val_size must be in 1..{n - 1})")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        val, keep = perm[:size].sort().values, perm[size:].sort().values
        self.x_val, self.y_val = self.x_train[val], self.y_train[val]
        self.x_train, self.y_train = self.x_train[keep], self.y_train[keep]


def _chw(shape: tuple[int, ...] | torch.Size) -> str:
    return "x".join(str(int(s)) for s in shape)


# -----------------------------------------------------------------------------
# loading


def load_dataset(
    name: str | os.PathLike[str],
    *,
    root: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
) -> ImageDataset:
    """Load a dataset by name ("fashion-mnist", "digits", "cifar10", "cifar100") or from a path to an .npz.

    root: a directory (or archive) to look in first. cache_dir: where downloads go and are looked for
    (default: $DIFFUSIONBLOCKS_CACHE, else ~/.cache/diffusionblocks). download: allow network downloads.
    """
    name_str = os.fspath(name)
    if name_str.lower().endswith(".npz"):
        return _load_npz(Path(name_str).expanduser())
    key = _ALIASES.get(name_str.strip().lower())
    root_path = Path(root).expanduser() if root is not None else None
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if key == "fashion-mnist":
        return _load_fashion_mnist(root_path, cache, download)
    if key == "digits":
        return _load_digits()
    if key in _CIFAR_SPECS:
        return _load_cifar(key, root_path, cache, download)
    raise DataError(
        f"unknown dataset {name_str!r}; known datasets are {', '.join(KNOWN_DATASETS)} "
        f"(alias fashion_mnist), or pass a path to an .npz file with x_train, y_train, x_test, y_test"
    )


def absolute_data_paths(cfg):
    """`cfg` with data.name (when a file or folder, not a built-in name), data.root and data.tokenizer_file made
    absolute, so that a run directory's config finds its data from any working directory."""
    d = cfg.data
    builtin = d.name.strip().lower() in _ALIASES or d.name in CORPORA
    name = d.name if builtin or not Path(d.name).expanduser().exists() else os.path.abspath(Path(d.name).expanduser())
    root, tokenizer_file = (os.path.abspath(Path(p).expanduser()) if p else p for p in (d.root, d.tokenizer_file))
    cfg = copy.copy(cfg)  # the other sections are shared
    cfg.data = dataclasses.replace(d, name=name, root=root, tokenizer_file=tokenizer_file)
    return cfg


def _read_bytes(path: Path) -> bytes:
    """A data file's bytes, with a DataError naming it when it cannot be read (permissions, a folder)."""
    try:
        return path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}; check that it is a file you may read") from None


def _sha256(data) -> str:  # bytes or a contiguous array
    return hashlib.sha256(data).hexdigest()


def _download(url: str, dest: Path, md5: str | None, timeout: float = DOWNLOAD_TIMEOUT_S) -> None:
    """Download url to dest atomically: stream into a temp file next to dest, check md5, then rename."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    print(f"diffusionblocks: downloading {url} -> {dest}", file=sys.stderr)
    digest = hashlib.md5(usedforsecurity=False)
    # an error inside the block (network, checksum) removes the temp file and leaves dest untouched
    with atomic_file(dest) as f, urllib.request.urlopen(url, timeout=timeout) as response:
        while chunk := response.read(1 << 20):
            f.write(chunk)
            digest.update(chunk)
        if md5 is not None and digest.hexdigest() != md5:
            raise DataError(f"checksum mismatch for {url}: md5 {digest.hexdigest()}, expected {md5}")


# errors that mean "the download did not work" (URLError and timeouts are OSErrors; DataError: checksum)
_DOWNLOAD_ERRORS = (OSError, ValueError, http.client.HTTPException)


# --- Fashion-MNIST (IDX files) ---


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """Read one IDX file (optionally gzipped) whose header must start with `magic`; returns uint8 array."""
    raw = _read_bytes(path)
    if raw[:2] == b"\x1f\x8b":  # gzip magic, whatever the file is called
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise DataError(f"corrupt IDX file {path}: cannot gunzip ({e})") from e
    if len(raw) < 4:
        raise DataError(f"corrupt IDX file {path}: only {len(raw)} bytes, too short for a header")
    got = int.from_bytes(raw[:4], "big")
    if got != magic:
        what = "images" if magic == IDX_IMAGES_MAGIC else "labels"
        raise DataError(f"corrupt IDX file {path}: magic number {got}, expected {magic} (uint8 {what})")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"corrupt IDX file {path}: truncated header ({len(raw)} bytes, need {header})")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(raw) - header != math.prod(dims):
        raise DataError(
            f"corrupt IDX file {path}: header says shape {dims} ({math.prod(dims)} bytes) "
            f"but the file holds {len(raw) - header} data bytes"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def _find_idx_file(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    return None


def _fashion_mnist_complete(directory: Path) -> bool:
    stems = [s for _, images, labels in FASHION_MNIST_FILES for s in (images, labels)]
    return all(_find_idx_file(directory, s) is not None for s in stems)


def _load_fashion_mnist(root: Path | None, cache: Path, download: bool) -> ImageDataset:
    cache_sub = cache / "fashion-mnist"
    places = ([root] if root is not None else []) + [SYSTEM_FASHION_MNIST_DIR, cache_sub]
    found = next((p for p in places if _fashion_mnist_complete(p)), None)
    download_note = "download=False, so nothing was downloaded"
    if found is None and download:
        try:
            for _, images, labels in FASHION_MNIST_FILES:
                for stem in (images, labels):
                    if _find_idx_file(cache_sub, stem) is None:
                        filename = f"{stem}.gz"
                        _download(
                            FASHION_MNIST_URL + filename, cache_sub / filename, FASHION_MNIST_MD5[filename]
                        )
            found = cache_sub
        except _DOWNLOAD_ERRORS as e:
            download_note = f"downloading from {FASHION_MNIST_URL} into {cache_sub} failed: {e}"
    if found is None:
        names = ", ".join(f"{s}[.gz]" for _, i, lab in FASHION_MNIST_FILES for s in (i, lab))
        looked = "\n".join(f"  - {p}" for p in places)
        raise DataError(
            f"Fashion-MNIST not found. Looked for {names} in:\n{looked}\n{download_note}.\n"
            f"To get it: `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or pass root=<directory "
            f"holding the 4 IDX files>, or load an .npz with load_dataset('path/to/data.npz')."
        )

    arrays, sources = {}, {}
    for split, images, labels in FASHION_MNIST_FILES:
        x_path, y_path = _find_idx_file(found, images), _find_idx_file(found, labels)
        assert x_path is not None and y_path is not None  # checked by _fashion_mnist_complete
        x = _read_idx(x_path, IDX_IMAGES_MAGIC)  # (N, H, W)
        y = _read_idx(y_path, IDX_LABELS_MAGIC)  # (N,)
        if len(x) != len(y):
            raise DataError(f"{x_path} has {len(x)} images but {y_path} has {len(y)} labels")
        if len(y) > 0 and int(y.max()) >= 10:
            raise DataError(f"{y_path}: labels out of range: found {int(y.max())}, expected 0..9")
        sources.update({images: _sha256(x), labels: _sha256(y)})  # of the content: Debian recompresses its copies
        arrays[split] = (torch.from_numpy(x).unsqueeze(1), torch.from_numpy(y.astype(np.int64)))
    return ImageDataset(
        name="fashion-mnist",
        x_train=arrays["train"][0],
        y_train=arrays["train"][1],
        x_test=arrays["test"][0],
        y_test=arrays["test"][1],
        num_classes=10,
        hflip=True,
        sources=sources,
    )


# --- scikit-learn digits ---


@functools.cache
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as uint8 images (1797, 1, 8, 8) and labels, parsed once per process (a compare's arms
    each load the data; scikit-learn parses its text file anew on every call)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise DataError(
            "the 'digits' dataset needs scikit-learn, which is not installed: "
            "`pip install scikit-learn` (or `pip install diffusionblocks[data]`)"
        ) from e
    digits = load_digits()
    images = np.asarray(digits.images, dtype=np.float64)  # (1797, 8, 8), values 0..16
    x = np.round(images * 255.0 / 16.0).clip(0, 255).astype(np.uint8)[:, None]  # (1797, 1, 8, 8)
    y = np.asarray(digits.target, dtype=np.int64)  # (1797,)
    x.flags.writeable = y.flags.writeable = False
    return x, y


def _load_digits() -> ImageDataset:
    x, y = _digits_arrays()  # indexed below, so every dataset gets arrays of its own
    perm = np.random.default_rng(0).permutation(len(x))
    train, test = perm[:DIGITS_NUM_TRAIN], perm[DIGITS_NUM_TRAIN:]
    return ImageDataset(
        name="digits",
        x_train=torch.from_numpy(x[train]),
        y_train=torch.from_numpy(y[train]),
        x_test=torch.from_numpy(x[test]),
        y_test=torch.from_numpy(y[test]),
        num_classes=10,
        hflip=False,
    )


# --- CIFAR-10 / CIFAR-100 (python pickle batches) ---


def _cifar_reader(spec: _CifarSpec, base: Path) -> Callable[[], dict[str, tuple[str, bytes]]] | None:
    """If base holds the dataset (extracted folder or .tar.gz), return a function reading all members as
    {member: (where it was read, its bytes)}."""
    members = spec.train_members + spec.test_members
    for folder in (base / spec.folder, base):
        if folder.is_dir() and all((folder / m).is_file() for m in members):
            return lambda folder=folder: {m: (str(folder / m), _read_bytes(folder / m)) for m in members}
    for archive in (base / spec.archive, base):
        if archive.is_file() and archive.name.endswith((".tar.gz", ".tgz", ".tar")):
            return lambda archive=archive: _read_tar_members(archive, spec.folder, members)
    return None


def _read_tar_members(archive: Path, folder: str, members: tuple[str, ...]) -> dict[str, tuple[str, bytes]]:
    """Read folder/<member> for each member from a tar archive in one sequential pass, without extracting."""
    wanted = {f"{folder}/{m}": m for m in members}
    out: dict[str, tuple[str, bytes]] = {}
    try:
        with tarfile.open(archive, "r:*") as tf:
            for info in tf:  # one pass: a .tar.gz cannot seek backwards cheaply
                member = wanted.get(info.name.removeprefix("./"))
                if member is not None and info.isfile():
                    f = tf.extractfile(info)
                    assert f is not None  # isfile() members always have a file object
                    out[member] = (f"{archive}:{info.name}", f.read())
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"cannot read CIFAR archive {archive}: {e}") from e
    missing = [f"{folder}/{m}" for m in members if m not in out]
    if missing:
        raise DataError(f"CIFAR archive {archive} lacks {', '.join(missing)}")
    return out


# the only globals a CIFAR batch names: numpy's array and dtype rebuilders (numpy 1 and 2 module names)
_CIFAR_GLOBALS = {("numpy", "ndarray"), ("numpy", "dtype")} | {
    (f"numpy.{core}.{module}", name) for core in ("core", "_core")
    for module, name in (("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer"))}


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles data only (dicts, lists, bytes, str, numbers, numpy arrays): a file naming any other global, which
    could run code, is refused."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _CIFAR_GLOBALS:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which a CIFAR batch never holds (loading it "
                                         "could run code)")
        return super().find_class(module, name)


def _parse_cifar_batch(raw: bytes, where: str, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Unpickle one CIFAR batch into images (N, 3, 32, 32) uint8 and labels (N,) int64 (data only: _CifarUnpickler)."""
    try:
        d = _CifarUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as e:  # any unpickling failure means "not a CIFAR batch"
        raise DataError(f"{where} is not a valid CIFAR batch: {e}; download the official one again") from None
    if not isinstance(d, dict) or b"data" not in d or label_key not in d:
        keys = sorted(d) if isinstance(d, dict) else type(d).__name__
        raise DataError(f"{where}: expected a dict with keys b'data' and {label_key!r}, got {keys}")
    data = np.asarray(d[b"data"])  # (N, 3072), each row is a row-major (3, 32, 32) image
    labels = np.asarray(d[label_key])  # (N,)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{where}: b'data' must be uint8 N x 3072, got {data.dtype} {data.shape}")
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"{where}: {label_key!r} must be {len(data)} integers, got {labels.dtype} {labels.shape}"
        )
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _load_cifar(key: str, root: Path | None, cache: Path, download: bool) -> ImageDataset:
    spec = _CIFAR_SPECS[key]
    places = ([root] if root is not None else []) + [cache]
    reader = next((r for r in (_cifar_reader(spec, p) for p in places) if r is not None), None)
    download_note = "download=False, so nothing was downloaded"
    if reader is None and download:
        try:
            _download(spec.url, cache / spec.archive, spec.md5)
            reader = _cifar_reader(spec, cache)
        except _DOWNLOAD_ERRORS as e:
            download_note = f"downloading {spec.url} into {cache} failed: {e}"
    if reader is None:
        looked = "\n".join(f"  - {p}/{spec.folder}/ or {p}/{spec.archive}" for p in places)
        raise DataError(
            f"{key} not found. Looked in:\n{looked}\n{download_note}.\n"
            f"To get it: download {spec.url} and pass root=<its directory> (or put it in the cache dir), "
            f"or load an .npz with load_dataset('path/to/data.npz')."
        )

    raw = reader()
    splits = {}
    for split, members in (("train", spec.train_members), ("test", spec.test_members)):
        parts = [_parse_cifar_batch(raw[m][1], raw[m][0], spec.label_key) for m in members]
        x = np.concatenate([p[0] for p in parts])  # (N, 3, 32, 32)
        y = np.concatenate([p[1] for p in parts])  # (N,)
        splits[split] = (torch.from_numpy(x), torch.from_numpy(y))
    return ImageDataset(
        name=key,
        x_train=splits["train"][0],
        y_train=splits["train"][1],
        x_test=splits["test"][0],
        y_test=splits["test"][1],
        num_classes=spec.num_classes,
        hflip=True,
        sources={m: _sha256(data) for m, (_, data) in raw.items()},
    )


# --- user .npz ---


def _npz_images(arr: np.ndarray, key: str, path: Path) -> np.ndarray:
    """Validate uint8 images N x H x W or N x H x W x C and return them as N x C x H x W."""
    if arr.dtype != np.uint8:
        raise DataError(
            f"{path}: {key} has dtype {arr.dtype}, expected uint8 images with values 0..255 "
            f"(e.g. convert [0, 1] floats with (x * 255).round().astype(np.uint8))"
        )
    if arr.ndim == 3:
        arr = arr[:, None]  # (N, H, W) -> (N, 1, H, W)
    elif arr.ndim == 4:
        if arr.shape[-1] not in (1, 3, 4):
            raise DataError(
                f"{path}: {key} has shape {arr.shape}; expected channels last, "
                f"N x H x W x C with C in 1, 3, 4"
            )
        arr = arr.transpose(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
    else:
        raise DataError(
            f"{path}: {key} has shape {arr.shape} (ndim {arr.ndim}), expected ndim 3 (N x H x W) "
            f"or 4 (N x H x W x C)"
        )
    if arr.shape[0] == 0:
        raise DataError(f"{path}: {key} is empty (shape {arr.shape})")
    return np.ascontiguousarray(arr)


def _npz_labels(arr: np.ndarray, key: str, num_images: int, path: Path) -> np.ndarray:
    if not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"{path}: {key} has dtype {arr.dtype}, expected integer class labels")
    if arr.ndim != 1:
        raise DataError(f"{path}: {key} has shape {arr.shape}, expected a 1-d array of labels")
    if len(arr) != num_images:
        x_key = "x" + key[1:]
        raise DataError(f"{path}: {x_key} has {num_images} images but {key} has {len(arr)} labels")
    if int(arr.min()) < 0:
        raise DataError(f"{path}: labels out of range: {key} contains {int(arr.min())}, labels must be >= 0")
    return arr.astype(np.int64)


def _load_npz(path: Path) -> ImageDataset:
    if not path.is_file():
        raise DataError(f".npz file not found: {path} (looked at {path.resolve()})")
    try:
        npz = np.load(path, allow_pickle=False)
    except Exception as e:  # BadZipFile, ValueError, OSError, EOFError... all mean "not a usable npz"
        raise DataError(f"{path} is not a valid .npz file: {e}") from e
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise DataError(f"{path} holds a single array, expected an .npz archive (np.savez) of named arrays")
    with npz:
        required = ("x_train", "y_train", "x_test", "y_test")
        for key in required:
            if key not in npz.files:
                raise DataError(
                    f"{path}: missing array {key!r}; it holds {sorted(npz.files)}, "
                    f"expected {', '.join(required)} (and optionally num_classes)"
                )
        try:
            arrays = {key: np.asarray(npz[key]) for key in (*required, "num_classes") if key in npz.files}
        except Exception as e:  # e.g. object arrays that would need pickle
            raise DataError(f"{path}: cannot read arrays ({e})") from e

    x_train = _npz_images(arrays["x_train"], "x_train", path)  # (N, C, H, W)
    x_test = _npz_images(arrays["x_test"], "x_test", path)  # (M, C, H, W)
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(
            f"{path}: x_train images are {_chw(x_train.shape[1:])} (CxHxW) but x_test images are "
            f"{_chw(x_test.shape[1:])}; train and test must share channels, height and width"
        )
    y_train = _npz_labels(arrays["y_train"], "y_train", len(x_train), path)
    y_test = _npz_labels(arrays["y_test"], "y_test", len(x_test), path)
    max_label = int(max(y_train.max(), y_test.max()))
    if "num_classes" in arrays:
        nc = arrays["num_classes"]
        if nc.size != 1 or not np.issubdtype(nc.dtype, np.integer) or int(nc.reshape(())) < 1:
            raise DataError(f"{path}: num_classes must be a positive integer scalar, got {nc!r}")
        num_classes = int(nc.reshape(()))
        for key, y in (("y_train", y_train), ("y_test", y_test)):
            if int(y.max()) >= num_classes:
                raise DataError(
                    f"{path}: labels out of range: {key} contains {int(y.max())} "
                    f"but num_classes is {num_classes} (labels must be 0..{num_classes - 1})"
                )
    else:
        num_classes = max_label + 1
        present = len(np.union1d(y_train, y_test))
        if present * 2 < num_classes:  # e.g. one stray label of 100000 among 0..9
            raise DataError(
                f"{path}: labels are sparse: {present} distinct values, but the largest, {max_label}, would make "
                f"{num_classes:,} classes; remap them to 0..{present - 1}, or store num_classes in the .npz "
                f"if the unused classes are meant"
            )
    return ImageDataset(
        name=path.stem,
        x_train=torch.from_numpy(x_train),
        y_train=torch.from_numpy(y_train),
        x_test=torch.from_numpy(x_test),
        y_test=torch.from_numpy(y_test),
        num_classes=num_classes,
        hflip=False,
        sources={path.name: _sha256(_read_bytes(path))},
    )


# -----------------------------------------------------------------------------
# preprocessing and augmentation


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 images in 0..255 -> float32 in [-1, 1], same shape."""
    if x.dtype != torch.uint8:
        raise DataError(f"to_float expects uint8 images, got {x.dtype}")
    return x.to(torch.float32).div(255.0).mul(2.0).sub(1.0)


def augment(
    x: torch.Tensor,
    *,
    generator: torch.Generator | None,
    crop_padding: int = 0,
    hflip: bool = False,
) -> torch.Tensor:
    """Random crop (zero padding, per-sample offsets) then per-sample random horizontal flip.

    x: (N, C, H, W) float. All randomness comes from `generator` (the global torch RNG if None).
    With crop_padding=0 and hflip=False the input is returned unchanged.
    """
    if x.ndim != 4:
        raise DataError(f"augment expects an N x C x H x W tensor, got shape {tuple(x.shape)}")
    if not isinstance(crop_padding, (int, np.integer)) or crop_padding < 0:
        raise DataError(f"crop_padding must be an int >= 0, got {crop_padding!r}")
    n, c, h, w = x.shape
    rng_device = generator.device if generator is not None else x.device
    if crop_padding > 0:
        p = int(crop_padding)
        padded = torch.nn.functional.pad(x, (p, p, p, p))  # (N, C, H+2p, W+2p), zeros outside
        dy = torch.randint(0, 2 * p + 1, (n,), generator=generator, device=rng_device).to(x.device)  # (N,)
        dx = torch.randint(0, 2 * p + 1, (n,), generator=generator, device=rng_device).to(x.device)  # (N,)
        rows = dy[:, None] + torch.arange(h, device=x.device)  # (N, H)
        cols = dx[:, None] + torch.arange(w, device=x.device)  # (N, W)
        x = padded[
            torch.arange(n, device=x.device)[:, None, None, None],  # (N, 1, 1, 1)
            torch.arange(c, device=x.device)[None, :, None, None],  # (1, C, 1, 1)
            rows[:, None, :, None],  # (N, 1, H, 1)
            cols[:, None, None, :],  # (N, 1, 1, W)
        ]  # (N, C, H, W)
    if hflip:
        flip = torch.rand(n, generator=generator, device=rng_device).to(x.device) < 0.5  # (N,)
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x


# -----------------------------------------------------------------------------
# batching


def _epoch_seed(seed: int, epoch: int) -> int:
    # mix (seed, epoch) into one 64-bit seed so that nearby pairs give unrelated permutations
    return int(np.random.SeedSequence([seed % 2**64, epoch]).generate_state(1, dtype=np.uint64)[0])


class Batches:
    """Infinite, resumable iterator over shuffled minibatches (x[idx], y[idx]) of a dataset.

    Epoch e uses torch.randperm(n) from a generator seeded by (seed, e), so the position
    {"epoch", "index", "seed"} is all it takes to resume with exactly the same batches.
    """

    def __init__(
        self, x: torch.Tensor, y: torch.Tensor, batch_size: int, *, seed: int, drop_last: bool = True
    ):
        if x.shape[0] != y.shape[0]:
            raise DataError(f"x has {x.shape[0]} samples but y has {y.shape[0]}")
        n = int(x.shape[0])
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise DataError(f"batch_size must be a positive int, got {batch_size!r}")
        if batch_size > n:
            raise DataError(f"batch_size {batch_size} is larger than the dataset ({n} samples)")
        self.x, self.y = x, y
        self.n = n
        self.batch_size = int(batch_size)
        self.drop_last = drop_last
        self.seed = int(seed)
        self.epoch = 0  # epochs completed
        self.index = 0  # batches already yielded in the current epoch
        self._perm: torch.Tensor | None = None
        self._perm_key: tuple[int, int] | None = None  # (seed, epoch) that _perm belongs to

    @property
    def batches_per_epoch(self) -> int:
        return self.n // self.batch_size if self.drop_last else math.ceil(self.n / self.batch_size)

    @property
    def epoch_float(self) -> float:
        return self.epoch + self.index / self.batches_per_epoch

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._perm_key != (self.seed, self.epoch):
            g = torch.Generator().manual_seed(_epoch_seed(self.seed, self.epoch))
            self._perm = torch.randperm(self.n, generator=g).to(self.x.device)  # (n,)
            self._perm_key = (self.seed, self.epoch)
        assert self._perm is not None
        start = self.index * self.batch_size
        idx = self._perm[start : start + self.batch_size]  # (B,), shorter for a final partial batch
        self.index += 1
        if self.index == self.batches_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        return self.x[idx], self.y[idx.to(self.y.device)]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        missing = [k for k in ("epoch", "index", "seed") if k not in state]
        if missing:
            raise DataError(f"Batches state_dict lacks {missing}; got keys {sorted(state)}")
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index < self.batches_per_epoch:
            raise DataError(
                f"invalid Batches state epoch={epoch} index={index}: expected epoch >= 0 and "
                f"0 <= index < {self.batches_per_epoch} (batches per epoch for n={self.n}, "
                f"batch_size={self.batch_size})"
            )
        self.epoch, self.index, self.seed = epoch, index, int(state["seed"])


def iterate_eval(
    x: torch.Tensor, y: torch.Tensor, batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield consecutive (x, y) chunks of at most batch_size, in order (the last one may be short)."""
    if x.shape[0] != y.shape[0]:
        raise DataError(f"x has {x.shape[0]} samples but y has {y.shape[0]}")
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise DataError(f"batch_size must be a positive int, got {batch_size!r}")
    return ((x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, x.shape[0], batch_size))
