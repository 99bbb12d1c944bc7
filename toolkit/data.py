"""MNIST kept on the device as uint8 28x28, batched by index, resized and normalised there in one batched op.

The reference resized each image with PIL in the training process (about 4,300 images/s on one core), which
caps any accelerator. Here the whole split is one uint8 tensor on the device (47 MB for the training set);
a batch is an index gather, then (for training, with random shifts) one grid sample at 28x28, and one
interpolation to the training size. No worker processes, no per-sample Python.
"""

from __future__ import annotations

import contextlib
import io
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from toolkit.errors import UserError

SOURCE_SIZE = 28
MNIST_MEAN = 0.1307  # of the 60,000 training images, pixels in [0, 1]
MNIST_STD = 0.3081
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
DATA_DIR_ENV = "TOOLKIT_DATA_DIR"


class DataError(UserError):
    pass


def resolve_data_dir(data_dir: str = "") -> Path:
    """`data_dir` if given, else $TOOLKIT_DATA_DIR, else ./data. It holds MNIST/raw/."""
    return Path(data_dir or os.environ.get(DATA_DIR_ENV) or "data")


def mnist_present(root: Path) -> bool:
    """Whether root/MNIST/raw/ holds the four files."""
    return all((root / "MNIST" / "raw" / name).is_file() for name in MNIST_FILES)


def missing_files_message(root: Path) -> str:
    return (f"MNIST not found and could not be downloaded: put {', '.join(MNIST_FILES)} (uncompressed) in "
            f"{root / 'MNIST' / 'raw'}, or point --data-dir / ${DATA_DIR_ENV} at the folder that holds MNIST/")


def load_mnist(root: Path, train: bool, download: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 (N, 28, 28), labels int64 (N,)) of one split, read by torchvision from
    root/MNIST/raw/, downloaded there first when missing and `download` is set."""
    from torchvision.datasets import MNIST

    raw = root / "MNIST" / "raw"
    present = mnist_present(root)
    if not present and not download:
        raise DataError(missing_files_message(root))
    try:
        # torchvision reports its download attempts on stdout; keep them off the console unless they fail.
        with contextlib.redirect_stdout(io.StringIO()):
            dataset = MNIST(str(root), train=train, download=download and not present)
    except (RuntimeError, OSError) as error:
        if not present:
            raise DataError(missing_files_message(root)) from None
        raise DataError(f"cannot read MNIST in {raw}: {error}") from None
    return dataset.data, dataset.targets


def write_idx(root: Path, train: bool, images: torch.Tensor, labels: torch.Tensor) -> None:
    """Write one split in MNIST's IDX format under root/MNIST/raw/: a big-endian magic number (0x0803: uint8,
    3 dimensions; 0x0801: uint8, 1 dimension), the sizes, then the bytes."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    prefix = "train" if train else "t10k"
    count, rows, cols = images.shape
    (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
        struct.pack(">IIII", 0x0803, count, rows, cols) + images.to(torch.uint8).numpy().tobytes())
    (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(
        struct.pack(">II", 0x0801, count) + labels.to(torch.uint8).numpy().tobytes())


def first(images: torch.Tensor, labels: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `count` examples (0 = all)."""
    if count and count < len(labels):
        return images[:count], labels[:count]
    return images, labels


@dataclass(frozen=True)
class Preprocess:
    """uint8 (B, 28, 28) on the device -> float (B, 1, size, size): scale to [0, 1], standardise, for training
    an optional random shift of up to `shift_px` source pixels, and resize (bilinear)."""

    image_size: int
    normalize: bool = True
    shift_px: float = 0.0
    channels_last: bool = False

    def __call__(self, images: torch.Tensor, augment: bool = False) -> torch.Tensor:
        x = images.unsqueeze(1).float().div_(255)  # (B, 1, 28, 28) in [0, 1]
        if self.normalize:
            # before resizing: bilinear weights sum to one, so this equals standardising after, on 64x fewer pixels
            x = x.sub_(MNIST_MEAN).div_(MNIST_STD)
        if augment and self.shift_px > 0:
            x = _shift(x, self.shift_px)
        size = (self.image_size, self.image_size)
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)  # (B, 1, size, size)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x


def _shift(x: torch.Tensor, shift_px: float) -> torch.Tensor:
    """Translate each 28x28 image by its own random offset, uniform in [-shift_px, shift_px] pixels each way,
    with one bilinear grid sample at the source size (64x cheaper than at 224 px); the edge pixels (background)
    fill in the vacated edge."""
    batch, _, height, width = x.shape
    theta = torch.zeros(batch, 2, 3, device=x.device)
    theta[:, 0, 0] = 1
    theta[:, 1, 1] = 1
    # affine_grid coordinates span [-1, 1] over the image: one pixel is 2/28
    theta[:, :, 2] = (torch.rand(batch, 2, device=x.device) * 2 - 1) * (shift_px * 2 / SOURCE_SIZE)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # (B, 28, 28, 2): x then y, in [-1, 1]
    # Repeat the edge pixels, the same as padding_mode="border", which MPS lacks before torch 2.13
    # (pytorch#125098): hold every coordinate at the outermost pixel centres, 1 - 1/size with
    # align_corners=False, where bilinear sampling gives the edge pixel itself (as in kornia#4073).
    # (Python-number bounds: a bound tensor made here would be a host-to-device copy, and a sync, per batch.)
    grid[..., 0].clamp_(-(1 - 1 / width), 1 - 1 / width)
    grid[..., 1].clamp_(-(1 - 1 / height), 1 - 1 / height)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def epoch_permutation(count: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of epoch `epoch`: the same on every process and after every resume."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(count, generator=generator)


def train_shard(count: int, seed: int, epoch: int, rank: int, world_size: int) -> torch.Tensor:
    """This process's indices for one training epoch: a stride of one seeded permutation, cut to a multiple
    of the world size so every process takes the same number of steps (at most world_size - 1 images sit
    out an epoch, different ones each epoch; none is repeated)."""
    order = epoch_permutation(count, seed, epoch)
    usable = count // world_size * world_size
    return order[:usable][rank::world_size]


def eval_shard(count: int, rank: int, world_size: int) -> range:
    """This process's contiguous slice of the evaluation set; the slices cover it exactly once, no padding."""
    return range(rank * count // world_size, (rank + 1) * count // world_size)


class TrainBatches:
    """Batches of one training epoch for this process, from `start_batch` on (to resume mid-epoch)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, preprocess: Preprocess,
                 seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.images, self.labels = images, labels  # on the device, uint8 (N, 28, 28) and int64 (N,)
        self.batch_size, self.preprocess = batch_size, preprocess
        self.seed, self.rank, self.world_size = seed, rank, world_size

    @property
    def images_per_rank(self) -> int:
        return len(self.labels) // self.world_size

    def __len__(self) -> int:
        return -(-self.images_per_rank // self.batch_size)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        shard = train_shard(len(self.labels), self.seed, epoch, self.rank, self.world_size)
        shard = shard.to(self.images.device)
        for start in range(start_batch * self.batch_size, len(shard), self.batch_size):
            index = shard[start:start + self.batch_size]
            yield self.preprocess(self.images[index], augment=True), self.labels[index]


class EvalBatches:
    """This process's slice of the evaluation set, in order, in batches."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, preprocess: Preprocess,
                 rank: int = 0, world_size: int = 1) -> None:
        self.shard = eval_shard(len(labels), rank, world_size)
        self.images, self.labels = images, labels
        self.batch_size, self.preprocess = batch_size, preprocess
        self.total = len(labels)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(self.shard.start, self.shard.stop, self.batch_size):
            stop = min(start + self.batch_size, self.shard.stop)
            yield self.preprocess(self.images[start:stop]), self.labels[start:stop]

    def __len__(self) -> int:
        return -(-len(self.shard) // self.batch_size)
