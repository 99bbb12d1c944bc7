"""Photo-like digits made from MNIST test images, as a phone photo of a digit written on paper looks: a dark digit
on grey paper, smaller than the picture and away from its centre, under uneven light, with sensor noise. Each
image is made from its index alone (seeded), so any subset is the same on every machine.

The tests of `toolkit.predict` use them (test_predict.py), and so does the measurement in docs/inference.md:

    python tests/photo_digits.py --checkpoint runs/x [--count 2000]

which prints the accuracy on them with each way of preparing them, and on the MNIST images they were made from.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

SEED = 21  # the issue that asked for them


def photo_like(digit: torch.Tensor, index: int, seed: int = SEED) -> torch.Tensor:
    """uint8 (H, W), H 72-127 and W 72-159: MNIST's white-on-black uint8 (28, 28) `digit` as a photo of ink on paper.
    The 28x28 frame is enlarged 1.2-2.2 times (its 20-pixel digit is 24-44 pixels tall), placed anywhere inside;
    paper grey 150-215, ink 20-80, light falling off by up to 20 grey levels across the picture, and Gaussian
    noise of standard deviation 4-12."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + index)

    def uniform(low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand((), generator=generator))

    height, width = int(uniform(72, 128)), int(uniform(72, 160))
    side = int(28 * uniform(1.2, 2.2))
    ink = F.interpolate(digit[None, None].float() / 255, size=(side, side), mode="bilinear",
                        align_corners=False)[0, 0]  # (side, side), 1 where the digit is
    top, left = int(uniform(0, height - side + 1)), int(uniform(0, width - side + 1))
    darkness = torch.zeros(height, width)
    darkness[top:top + side, left:left + side] = ink
    paper, ink_level = uniform(150, 215), uniform(20, 80)
    angle = uniform(0, 2 * torch.pi)
    rows, columns = torch.meshgrid(torch.linspace(-0.5, 0.5, height), torch.linspace(-0.5, 0.5, width), indexing="ij")
    light = uniform(0, 20) * (rows * torch.sin(torch.tensor(angle)) + columns * torch.cos(torch.tensor(angle)))
    noise = torch.randn(height, width, generator=generator) * uniform(4, 12)
    photo = paper + light - (paper - ink_level) * darkness + noise
    return photo.round().clamp(0, 255).to(torch.uint8)


def write(folder: Path, images: torch.Tensor, labels: torch.Tensor, seed: int = SEED) -> list[tuple[Path, int]]:
    """The photo-like versions of uint8 (N, 28, 28) `images` as PNG files in `folder`: [(file, its label)]."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for index, (image, label) in enumerate(zip(images, labels.tolist(), strict=True)):
        path = folder / f"{index:05d}_label{label}.png"
        Image.fromarray(photo_like(image, index, seed).numpy()).save(path)
        written.append((path, label))
    return written


# (name, invert, center): the preparations compared; the first two are what predict did before auto polarity and
# MNIST framing (with and without --invert), the third is its default now.
PREPARATIONS = (("before: as read", False, False), ("before: --invert", True, False),
                ("now: defaults (auto polarity, MNIST framing)", None, True),
                ("--no-center (auto polarity only)", None, False), ("--invert (MNIST framing)", True, True))


def measure(checkpoint_path: Path, count: int, data_dir: str, folder: Path) -> list[tuple[str, float]]:
    """[(preparation, accuracy)] of the checkpoint on `count` photo-like digits written to `folder`, and on the
    MNIST images they come from."""
    from toolkit import inference, predict
    from toolkit.data import first, load_mnist, resolve_data_dir

    images, labels = first(*load_mnist(resolve_data_dir(data_dir), train=False, download=False), count)
    files = [path for path, _ in write(folder, images, labels)]
    loaded = inference.load(checkpoint_path, {"device": "cpu"})
    run = inference.runtime(loaded.config, loaded.meta, "no")
    model, preprocess = inference.on_device(loaded.model, loaded.config, run.accelerator)

    def accuracy(batch: torch.Tensor) -> float:
        probabilities = predict.predict(model, batch, preprocess, run.accelerator, loaded.config.eval_batch_size)
        return float((probabilities.argmax(dim=1) == labels).float().mean())

    results = [("MNIST images themselves", accuracy(images))]
    for name, invert, center in PREPARATIONS:
        _, prepared, errors = inference.read_images(files, invert, center)
        assert not errors, errors
        results.append((name, accuracy(inference.batch(prepared))))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description="Accuracy of a checkpoint on photo-like digits made from MNIST")
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder or run folder")
    parser.add_argument("--count", type=int, default=2000, help="MNIST test images to make photos of [2000]")
    parser.add_argument("--data-dir", default="", help="where MNIST is (as toolkit.train's --data-dir)")
    parser.add_argument("--folder", default="", help="write the photos here (else a temporary folder)")
    args = parser.parse_args()
    import tempfile

    with tempfile.TemporaryDirectory() as temporary:
        results = measure(Path(args.checkpoint), args.count, args.data_dir, Path(args.folder or temporary))
    print(f"{args.count} photo-like digits, checkpoint {args.checkpoint}")
    for name, accuracy in results:
        print(f"  {accuracy:7.2%}  {name}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
