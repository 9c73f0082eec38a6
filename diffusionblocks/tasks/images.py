"""The image pipeline the image tasks share (tasks/classify.py, tasks/imagegen.py); no TASK here. Labelled images
(data.py) with their limits and validation split, one batch stream per unit with its own augmentation randomness,
batches made float in [-1, 1] and augmented, and the data's shapes without loading it (the memory planner)."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from ..config import RunConfig
from ..data import DATA_SHAPES, Batches, DataError, ImageDataset, augment, iterate_eval, load_dataset, to_float
from .base import VALIDATION_SEED, Task, split_arrays

VALIDATION_SHARE = 10  # compare's settings sweep holds out 1/10 of the training images without data.val_size


@dataclass(frozen=True)
class ImageShapes:
    """The shapes an image task builds its model from, without loading data (the memory planner)."""

    image_size: tuple[int, int]
    channels: int
    num_classes: int


def fitting_batch(batch_size: int, data: ImageDataset) -> int:
    """`batch_size`, when the training images hold that many (a smaller batch would train another setting)."""
    if batch_size > len(data.y_train):
        raise ValueError(f"train.batch_size={batch_size} is larger than the {len(data.y_train):,} training images "
                         f"(after data.train_limit and data.val_size): lower train.batch_size")
    return batch_size


class ImageStream:
    """One unit's image batches and augmentation randomness (resumable)."""

    def __init__(self, data: ImageDataset, batch_size: int, seed: int, member: int = 0):
        self.batches = Batches(data.x_train, data.y_train, fitting_batch(batch_size, data), seed=seed)
        self.aug = torch.Generator().manual_seed(seed + 1 + 1_000 * member)  # data-parallel members differ

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return next(self.batches)

    def state_dict(self) -> dict:
        return {"batches": self.batches.state_dict(), "aug": self.aug.get_state()}

    def load_state_dict(self, state: dict):
        self.batches.load_state_dict(state["batches"])
        self.aug.set_state(state["aug"])


class ImageTask(Task):
    """Labelled images: uint8 batches made float in [-1, 1] and augmented per unit stream."""

    train_preset = "fashion"

    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        if cfg.model.positions != "learned":
            raise ValueError(f"model.positions={cfg.model.positions!r}: the image models use learned positions "
                             "(rotary positions are for the language models)")

    def sweep_validation(self, base: RunConfig) -> tuple[int, str]:
        """A tenth of the training images, held out for compare's settings sweep only."""
        n = len(self.load_data(base).x_train)
        return max(1, n // VALIDATION_SHARE), (f"a tenth of the {n} training images, held out for the sweep only; the "
                                               f"test arms train on all {n}")

    def load_data(self, cfg: RunConfig) -> ImageDataset:
        ds = load_dataset(cfg.data.name, root=cfg.data.root or None)
        if cfg.data.train_limit:  # before the validation split: it comes out of these
            ds.x_train, ds.y_train = ds.x_train[:cfg.data.train_limit], ds.y_train[:cfg.data.train_limit]
        if cfg.data.test_limit:
            ds.x_test, ds.y_test = ds.x_test[:cfg.data.test_limit], ds.y_test[:cfg.data.test_limit]
        if cfg.data.val_size:
            ds.hold_out(cfg.data.val_size, VALIDATION_SEED)
        return ds

    def stream(self, data: ImageDataset, cfg: RunConfig, seed: int, member: int = 0) -> ImageStream:
        return ImageStream(data, cfg.train.batch_size, seed, member)

    def prepare(self, raw, stream: ImageStream, cfg: RunConfig, data: ImageDataset, device) -> tuple:
        x, y = raw
        x = augment(to_float(x), generator=stream.aug, crop_padding=cfg.data.crop_padding,
                    hflip=cfg.data.hflip and data.hflip)
        return x.to(device), y.to(device)

    def probe_batch(self, data: ImageDataset, cfg: RunConfig, device) -> tuple:
        n = fitting_batch(cfg.train.batch_size, data)
        # copies, as a training batch is: a slice would make the whole label tensor's storage count as saved
        return to_float(data.x_train[:n]).to(device), data.y_train[:n].clone().to(device)

    def eval_batches(self, data: ImageDataset, cfg: RunConfig, split: str, limit: int):
        """(batches of the split's first `limit` images, all if 0; how many; the evaluation's generator)."""
        x, y = split_arrays(data, split)
        if limit:
            x, y = x[:limit], y[:limit]
        gen = torch.Generator().manual_seed(cfg.train.seed + 999)
        return iterate_eval(x, y, cfg.train.eval_batch_size), len(y), gen

    def compare_preset(self, quick: bool) -> str:
        """The digits presets where Fashion-MNIST is missing (it is never downloaded here)."""
        try:
            load_dataset("fashion-mnist", download=False)
        except DataError:
            print("Fashion-MNIST not found (apt-get install dataset-fashion-mnist); comparing on digits",
                  file=sys.stderr)
            return self.presets["offline-quick" if quick else "offline"]
        return super().compare_preset(quick)

    def shapes_record(self, data) -> dict:
        return {"image_size": list(data.image_size), "channels": data.channels, "num_classes": data.num_classes}

    def shapes_from_record(self, record: dict) -> ImageShapes:
        return ImageShapes(tuple(record["image_size"]), record["channels"], record["num_classes"])

    def plan_shapes(self, cfg: RunConfig, image_size=None, channels=None, classes=None) -> ImageShapes:
        known = DATA_SHAPES.get(cfg.data.name, (None, None, None))
        image_size, channels, classes = (v if v is not None else k
                                         for v, k in zip((image_size, channels, classes), known))
        if image_size is None or channels is None or classes is None:
            raise ValueError(f"data {cfg.data.name!r} has no known shape; give --image-size, --channels and --classes")
        for name, value in (("image height", image_size[0]), ("image width", image_size[-1]), ("channels", channels),
                            ("classes", classes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        return ImageShapes((image_size[0], image_size[-1]), channels, classes)

    def random_batch(self, cfg: RunConfig, shapes: ImageShapes, generator: torch.Generator) -> tuple:
        n = cfg.train.batch_size
        return (torch.rand(n, shapes.channels, *shapes.image_size, generator=generator),
                torch.randint(shapes.num_classes, (n,), generator=generator))
