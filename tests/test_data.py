import struct

import pytest
import torch
import torch.nn.functional as F

from toolkit.data import (
    MNIST_FILES,
    MNIST_MEAN,
    MNIST_STD,
    DataError,
    EvalBatches,
    Preprocess,
    TrainBatches,
    epoch_permutation,
    eval_shard,
    load_mnist,
    train_shard,
    write_idx,
)


def test_reads_idx_files_written_here(tmp_path):
    generator = torch.Generator().manual_seed(0)
    train_images = torch.randint(0, 256, (7, 28, 28), dtype=torch.uint8, generator=generator)
    train_labels = torch.randint(0, 10, (7,), dtype=torch.uint8, generator=generator)
    test_images = torch.randint(0, 256, (3, 28, 28), dtype=torch.uint8, generator=generator)
    test_labels = torch.tensor([3, 1, 4], dtype=torch.uint8)
    write_idx(tmp_path, True, train_images, train_labels)
    write_idx(tmp_path, False, test_images, test_labels)
    images, labels = load_mnist(tmp_path, train=True, download=False)
    assert images.dtype == torch.uint8 and torch.equal(images, train_images)
    assert labels.dtype == torch.int64 and torch.equal(labels, train_labels.long())
    images, labels = load_mnist(tmp_path, train=False, download=False)
    assert torch.equal(images, test_images) and labels.tolist() == [3, 1, 4]


def test_missing_files_name_all_four_and_their_folder(tmp_path):
    with pytest.raises(DataError) as error:
        load_mnist(tmp_path, train=True, download=False)
    message = str(error.value)
    assert all(name in message for name in MNIST_FILES)
    assert str(tmp_path / "MNIST" / "raw") in message
    assert "\n" not in message


def test_failed_download_is_the_same_one_line_error(tmp_path, monkeypatch):
    from torchvision.datasets import MNIST

    def no_network(self):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried https://example.org/mnist/, got:\n"
                           "<urlopen error [Errno -2] Name or service not known>\n")

    monkeypatch.setattr(MNIST, "download", no_network)
    root = tmp_path / "data"
    with pytest.raises(DataError) as raised:
        load_mnist(root, train=True, download=True)
    assert str(raised.value).startswith(f"MNIST not found in {root / 'MNIST' / 'raw'} and could not be downloaded "
                                        f"(urlopen error [Errno -2] Name or service not known): put ")
    assert list(tmp_path.iterdir()) == []  # the folders the download made went with it
    with pytest.raises(DataError) as raised:
        load_mnist(root, train=True, download=False)
    assert "could not be downloaded" not in str(raised.value) and "or let it download (--download)" in str(raised.value)
    (tmp_path / "a-file").write_text("x")
    for where in (tmp_path / "a-file", tmp_path / "a-file" / "under"):
        with pytest.raises(DataError, match=f"the data folder {where} (is a file|lies under)"):
            load_mnist(where, train=True, download=True)


def test_train_shards_are_disjoint_equal_and_reshuffled_per_epoch():
    count, world = 1001, 3
    shards = [train_shard(count, seed=5, epoch=0, rank=r, world_size=world) for r in range(world)]
    assert {len(s) for s in shards} == {count // world}
    together = torch.cat(shards)
    assert len(set(together.tolist())) == len(together)  # disjoint
    assert torch.equal(train_shard(count, 5, 0, 1, world), shards[1])  # same on every call / every rank
    assert not torch.equal(train_shard(count, 5, 1, 1, world), shards[1])  # a new order each epoch
    assert torch.equal(torch.sort(epoch_permutation(count, 5, 0)).values, torch.arange(count))


@pytest.mark.parametrize("count, world", [(1001, 2), (1001, 3), (10, 4), (5, 1)])
def test_eval_shards_cover_every_sample_once(count, world):
    covered = [i for r in range(world) for i in eval_shard(count, r, world)]
    assert covered == list(range(count))


def test_preprocess_resizes_and_standardises_on_the_device():
    images = torch.randint(0, 256, (4, 28, 28), dtype=torch.uint8)
    x = Preprocess(image_size=96)(images)
    assert x.shape == (4, 1, 96, 96) and x.dtype == torch.float32
    expected = (F.interpolate(images.unsqueeze(1).float() / 255, size=(96, 96), mode="bilinear",
                              align_corners=False) - MNIST_MEAN) / MNIST_STD
    torch.testing.assert_close(x, expected)
    raw = Preprocess(image_size=96, normalize=False)(images)
    assert 0 <= float(raw.min()) and float(raw.max()) <= 1


def test_random_shift_moves_the_digit_and_keeps_the_size():
    image = torch.zeros(1, 28, 28, dtype=torch.uint8)
    image[0, 12:16, 12:16] = 255
    preprocess = Preprocess(image_size=112, normalize=False, shift_px=3)
    plain = preprocess(image)
    torch.manual_seed(0)
    shifted = torch.cat([preprocess(image, augment=True) for _ in range(8)])
    assert shifted.shape == (8, 1, 112, 112)
    centre = lambda x: (x[0, 0].sum(0) * torch.arange(112)).sum() / x[0, 0].sum()  # noqa: E731
    offsets = [float(centre(s[None]) - centre(plain)) for s in shifted]
    assert max(abs(o) for o in offsets) > 1  # moved
    assert max(abs(o) for o in offsets) <= 3 * 112 / 28 + 1e-3  # by at most 3 source pixels
    torch.testing.assert_close(shifted.sum(dim=(1, 2, 3)), plain.sum().expand(8), rtol=0.02, atol=0)


def test_batches_cover_the_shard_and_resume_mid_epoch():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1).expand(10, 28, 28).contiguous()
    labels = torch.arange(10)
    batches = TrainBatches(images, labels, batch_size=3, preprocess=Preprocess(65, normalize=False), seed=1)
    assert len(batches) == 4
    full = [y.tolist() for _, y in batches.epoch(0)]
    assert sorted(sum(full, [])) == list(range(10))
    assert [y.tolist() for _, y in batches.epoch(0, start_batch=2)] == full[2:]
    evaluation = EvalBatches(images, labels, batch_size=4, preprocess=Preprocess(65), rank=1, world_size=3)
    assert [y.tolist() for _, y in evaluation] == [[3, 4, 5]]


def _border_shift(x: torch.Tensor, shift_px: float) -> torch.Tensor:
    """The reference: the shift as it was written first, with padding_mode="border" (which MPS lacks before
    torch 2.13). It draws its random offsets exactly as `_shift` does."""
    batch = x.shape[0]
    theta = torch.zeros(batch, 2, 3)
    theta[:, 0, 0] = 1
    theta[:, 1, 1] = 1
    theta[:, :, 2] = (torch.rand(batch, 2) * 2 - 1) * (shift_px * 2 / 28)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def test_random_shift_equals_border_padding_without_using_it(monkeypatch):
    from toolkit.data import _shift

    # Random pixels up to the edges, so that what fills the vacated edge shows; shifts of up to 6 pixels, so
    # every image samples outside the source.
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 28, 28), dtype=torch.uint8, generator=generator)
    x = (images.unsqueeze(1).float() / 255 - MNIST_MEAN) / MNIST_STD
    torch.manual_seed(1)
    reference = _border_shift(x, shift_px=6)
    modes = []
    grid_sample = F.grid_sample
    monkeypatch.setattr(F, "grid_sample", lambda *a, **k: modes.append(k["padding_mode"]) or grid_sample(*a, **k))
    torch.manual_seed(1)
    shifted = _shift(x, shift_px=6)
    assert modes == ["zeros"]  # the one mode every backend has
    # Equal because border padding clamps each sampling position to the outermost pixel centres, and bilinear
    # sampling exactly at a pixel centre gives that pixel with weight 1 (its out-of-image neighbour, zero under
    # zero padding, has weight 0). Clamping the grid to ±(1 - 1/28) first is that clamp, in grid coordinates;
    # the float rounding of 1 - 1/28 is all that is left.
    torch.testing.assert_close(shifted, reference, rtol=0, atol=1e-5)
    # ... and the comparison has teeth: plain zero padding would differ at the edges by whole pixel values.
    torch.manual_seed(1)
    theta = torch.zeros(64, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, :, 2] = (torch.rand(64, 2) * 2 - 1) * (6 * 2 / 28)
    zeros = grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False), align_corners=False)
    assert (zeros - reference).abs().amax() > 1


def _mnist_files(tmp_path, count=7, labels=None, size=28):
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (count, size, size), dtype=torch.uint8, generator=generator)
    labels = torch.arange(count) % 10 if labels is None else labels
    write_idx(tmp_path, True, images, labels)
    write_idx(tmp_path, False, torch.zeros(3, 28, 28), labels[:3])
    return tmp_path / "MNIST" / "raw"


def _corrupt(raw, name, change):
    path = raw / name
    path.write_bytes(change(path.read_bytes()))


@pytest.mark.parametrize("case, file, expected", [
    ("empty images", "train-images-idx3-ubyte", "empty file (0 bytes)"),
    ("empty labels", "train-labels-idx1-ubyte", "empty file (0 bytes)"),
    ("bad magic", "train-images-idx3-ubyte", "magic number 0x00000804, expected 0x00000803"),
    ("swapped", "train-images-idx3-ubyte", "magic number 0x00000801, expected 0x00000803 (MNIST images: uint8, "
                                           "3 dimensions): it holds MNIST labels"),
    ("three bytes", "train-labels-idx1-ubyte", "magic number none (shorter than 4 bytes)"),
    ("truncated images", "train-images-idx3-ubyte", "5,503 bytes, but its header (7 x 28 x 28 images) makes "
                                                    "5,504: the file is truncated"),
    ("trailing labels", "train-labels-idx1-ubyte", "16 bytes, but its header (7 labels) makes 15: the file is "
                                                   "too long"),
    ("gzip", "train-labels-idx1-ubyte", "gzip-compressed"),
    ("label 10", "train-labels-idx1-ubyte", "label 10 at index 2 is outside 0-9 (1 such labels)"),
    ("one label short", "train-labels-idx1-ubyte", "6 labels but 7 images in train-images-idx3-ubyte"),
    ("32 px", "train-images-idx3-ubyte", "images are 32x32 pixels, MNIST's are 28x28"),
])
def test_wrong_mnist_files_are_one_line_naming_the_file(tmp_path, monkeypatch, case, file, expected):
    import gzip

    from torchvision.datasets import MNIST

    raw = _mnist_files(tmp_path, size=32 if case == "32 px" else 28)
    changes = {
        "empty images": lambda b: b"",
        "empty labels": lambda b: b"",
        "bad magic": lambda b: struct.pack(">I", 0x0804) + b[4:],
        "swapped": lambda b: (raw / "train-labels-idx1-ubyte").read_bytes(),
        "three bytes": lambda b: b[:3],
        "truncated images": lambda b: b[:-1],
        "trailing labels": lambda b: b + b"\0",
        "gzip": gzip.compress,
        "label 10": lambda b: b[:8 + 2] + bytes([10]) + b[8 + 3:],
        "one label short": lambda b: struct.pack(">II", 0x0801, 6) + b[8:-1],
        "32 px": lambda b: b,
    }
    _corrupt(raw, file, changes[case])
    # present files are never downloaded over, even with download on
    monkeypatch.setattr(MNIST, "download", lambda self: pytest.fail("downloaded although the files are there"))
    with pytest.raises(DataError) as error:
        load_mnist(tmp_path, train=True, download=True)
    message = str(error.value)
    assert message.startswith(f"{raw / file}: {expected}") and "\n" not in message
    load_mnist(tmp_path, train=False, download=False)  # the other split's files are fine and still load
