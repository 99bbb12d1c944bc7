"""MNIST kept on the device as uint8 28x28, batched by index, resized and normalised there in one batched op.

The reference resized each image with PIL in the training process (about 4,300 images/s on one core), which
caps any accelerator. Here the whole split is one uint8 tensor on the device (47 MB for the training set);
a batch is an index gather, then (for training, with random shifts) one grid sample at 28x28, and one
interpolation to the training size. No worker processes, no per-sample Python.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    same_on_every_machine = True


def resolve_data_dir(data_dir: str = "") -> Path:
    """`data_dir` if given, else $TOOLKIT_DATA_DIR, else ./data. It holds MNIST/raw/."""
    return Path(data_dir or os.environ.get(DATA_DIR_ENV) or "data")


def mnist_present(root: Path) -> bool:
    """Whether root/MNIST/raw/ holds the four files."""
    return all((root / "MNIST" / "raw" / name).is_file() for name in MNIST_FILES)


def check_data_dir(root: Path) -> None:
    """A DataError when the data folder is a file, or lies under one."""
    for candidate in (root, *root.parents):
        if candidate.is_dir():
            return
        if candidate.exists():
            where = "is a file" if candidate == root else f"lies under {candidate}, a file"
            raise DataError(f"the data folder {root} {where}: point --data-dir / ${DATA_DIR_ENV} at the folder that "
                            f"holds MNIST/raw/ (or where it may be downloaded)")


def require_mnist(root: Path, reader: str = "this", alternative: str = "") -> None:
    """A DataError unless root/MNIST/raw/ holds the four files, for commands that never download (benchmarks):
    `reader` names what reads them, `alternative` what to do instead."""
    if not mnist_present(root):
        raise DataError(f"{reader} reads MNIST, which is not in {root / 'MNIST' / 'raw'}: set ${DATA_DIR_ENV} to the "
                        f"folder holding MNIST/ (toolkit.train downloads it there){alternative}")


def missing_files_message(root: Path, download_error: str | None = None) -> str:
    """Where MNIST was looked for, what to put there, and (when a download was tried) why it failed."""
    missing = [name for name in MNIST_FILES if not (root / "MNIST" / "raw" / name).is_file()]
    found = "MNIST not found" if len(missing) == len(MNIST_FILES) else f"MNIST incomplete (no {', '.join(missing)})"
    tried = f" and could not be downloaded ({download_error})" if download_error else ""
    allow = "" if download_error else ", or let it download (--download)"
    return (f"{found} in {root / 'MNIST' / 'raw'}{tried}: put {', '.join(MNIST_FILES)} (uncompressed) there, or point "
            f"--data-dir / ${DATA_DIR_ENV} at the folder that holds MNIST/{allow}")


# IDX headers: a big-endian magic number 0x0000TTDD (TT: 0x08 = uint8, DD: the number of dimensions), then
# each dimension as a big-endian uint32, then the data, row-major.
IMAGES_MAGIC = 0x00000803  # uint8, 3 dimensions: count, rows, columns
LABELS_MAGIC = 0x00000801  # uint8, 1 dimension: count
NUM_CLASSES = 10


def load_mnist(root: Path, train: bool, download: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 (N, 28, 28), labels int64 (N,)) of one split, read from root/MNIST/raw/ after checking
    both files' IDX headers, sizes, counts and labels (a DataError naming the file says what is wrong).
    torchvision downloads the files there first when they are missing and `download` is set."""
    raw = root / "MNIST" / "raw"
    check_data_dir(root)
    if not mnist_present(root):
        if not download:
            raise DataError(missing_files_message(root))
        download_mnist(root)
    prefix = "train" if train else "t10k"
    images_path, labels_path = raw / f"{prefix}-images-idx3-ubyte", raw / f"{prefix}-labels-idx1-ubyte"
    images = _read_idx(images_path, IMAGES_MAGIC)
    labels = _read_idx(labels_path, LABELS_MAGIC)
    if images.shape[1:] != (SOURCE_SIZE, SOURCE_SIZE):
        raise DataError(f"{images_path}: images are {images.shape[1]}x{images.shape[2]} pixels, "
                        f"MNIST's are {SOURCE_SIZE}x{SOURCE_SIZE}")
    if len(labels) != len(images):
        raise DataError(f"{labels_path}: {len(labels):,} labels but {len(images):,} images in {images_path.name}")
    bad = (labels >= NUM_CLASSES).nonzero()
    if len(bad):
        index = int(bad[0])
        raise DataError(f"{labels_path}: label {int(labels[index])} at index {index:,} is outside "
                        f"0-{NUM_CLASSES - 1} ({len(bad):,} such labels)")
    return images, labels.long()


def download_mnist(root: Path) -> None:
    """Fetch the four files into root/MNIST/raw/ with torchvision, unless they are there; the missing-files error,
    with the download's own reason, if they are not all there afterwards. Folders it made for a download that
    failed are removed again."""
    check_data_dir(root)
    if mnist_present(root):
        return
    from torchvision.datasets import MNIST

    raw = (root / "MNIST" / "raw").absolute()
    made = [folder for folder in (raw, *raw.parents) if not folder.exists()]  # innermost first
    reason = None
    try:
        # torchvision reports its download attempts on stdout; keep them off the console unless they fail.
        with contextlib.redirect_stdout(io.StringIO()) as said:
            MNIST(str(root), train=True, download=True)
    except (RuntimeError, OSError, ValueError) as error:
        # torchvision: "Error downloading X:", then for each mirror "Tried URL, got:" and the error it got
        lines = [line.strip().strip("<>") for line in f"{error}\n{said.getvalue()}".splitlines() if line.strip()]
        got = [line for line in lines if not line.startswith(("Tried ", "Error downloading", "Downloading"))]
        reason = (got[-1] if got else lines[0] if lines else type(error).__name__)[:200]
    if not mnist_present(root):
        for folder in made:  # innermost first: only what the download made, only if empty
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise DataError(missing_files_message(root, reason or "the files were not all there afterwards"))


def _read_idx(path: Path, magic: int) -> torch.Tensor:
    """The uint8 array in the IDX file `path`, after checking that its header has `magic` and that the file
    holds exactly the bytes the header announces."""
    kinds = {IMAGES_MAGIC: "images", LABELS_MAGIC: "labels"}
    kind, dims = kinds[magic], magic & 0xFF
    try:
        data = bytearray(path.read_bytes())  # writable, so torch.frombuffer can share it without a warning
    except OSError as error:
        raise DataError(f"{path}: cannot read: {error.strerror}") from None
    if not data:
        raise DataError(f"{path}: empty file (0 bytes): delete it to download MNIST again, or replace it")
    if data[:2] == b"\x1f\x8b":
        raise DataError(f"{path}: gzip-compressed: uncompress it (gunzip) in place")
    header_bytes = 4 + 4 * dims  # the magic number, then one uint32 per dimension
    found = struct.unpack_from(">I", data)[0] if len(data) >= 4 else None
    if found != magic:
        holds = f": it holds MNIST {kinds[found]}" if found in kinds else ""
        described = "none (shorter than 4 bytes)" if found is None else f"0x{found:08x}"
        raise DataError(f"{path}: magic number {described}, expected 0x{magic:08x} (MNIST {kind}: uint8, "
                        f"{dims} dimension{'s' if dims > 1 else ''}){holds}")
    if len(data) < header_bytes:
        raise DataError(f"{path}: {len(data)} bytes, shorter than the {header_bytes}-byte header of MNIST {kind}")
    shape = struct.unpack_from(f">{dims}I", data, 4)
    expected = header_bytes + math.prod(shape)
    if len(data) != expected:
        state = "truncated" if len(data) < expected else "too long"
        raise DataError(f"{path}: {len(data):,} bytes, but its header ({' x '.join(f'{n:,}' for n in shape)} "
                        f"{kind}) makes {expected:,}: the file is {state}")
    if expected == header_bytes:
        raise DataError(f"{path}: holds no {kind}")
    return torch.frombuffer(data, dtype=torch.uint8, offset=header_bytes).view(shape)


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

    @classmethod
    def for_config(cls, config: Any, device: str) -> Preprocess:
        """What a config's training does on `device` (the memory format as `devices.use_channels_last` has it)."""
        from toolkit.devices import use_channels_last

        return cls(config.image_size, config.normalize, config.shift_px,
                   use_channels_last(device, config.channels_last))

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
