"""toolkit.plots: the confusion matrix and the misclassified digits as RGB images, for TensorBoard and PNG files."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from toolkit import plots
from toolkit.metrics import EvalResult, Misclassified


def confusion(correct_per_digit: int = 95) -> torch.Tensor:
    counts = torch.zeros(10, 10, dtype=torch.int64)
    counts.fill_diagonal_(correct_per_digit)
    counts[4, 9], counts[7, 2], counts[3, 5] = 23, 1, 1200  # one count past a thousand
    return counts


def assert_rgb(image: np.ndarray) -> None:
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert image.min() < 64 and image.max() == 255  # text on a white page


def test_confusion_image_is_an_rgb_picture_drawn_the_same_each_time():
    image = plots.confusion_image(confusion())
    assert_rgb(image)
    assert np.array_equal(image, plots.confusion_image(confusion().numpy()))  # tensor or array, same pixels
    assert not np.array_equal(image, plots.confusion_image(confusion(96)))
    assert_rgb(plots.confusion_image(torch.zeros(10, 10, dtype=torch.int64)))  # no images at all


def test_misclassified_image_is_a_grid_of_at_most_64_of_a_fixed_width():
    images = torch.randint(0, 256, (70, 28, 28), dtype=torch.uint8)
    true, predicted = torch.arange(70) % 10, (torch.arange(70) + 1) % 10
    full = plots.misclassified_image(images, true, predicted, index=torch.arange(70) * 3, total=70)
    assert_rgb(full)
    assert full.shape == plots.misclassified_image(images[:64], true[:64], predicted[:64]).shape  # 64 drawn
    few = plots.misclassified_image(images[:3], true[:3], predicted[:3])
    assert few.shape[1] == full.shape[1] and few.shape[0] < full.shape[0] / 4  # one row of eight places
    assert_rgb(plots.misclassified_image(images[:0], true[:0], predicted[:0]))


def test_png_bytes_hold_the_same_pixels():
    image = plots.confusion_image(confusion())
    with Image.open(io.BytesIO(plots.png_bytes(image))) as saved:
        assert saved.mode == "RGB" and np.array_equal(np.asarray(saved), image)


def test_evaluation_images_log_to_tensorboard_as_the_trainer_does(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    images = torch.randint(0, 256, (200, 28, 28), dtype=torch.uint8)
    wrong = Misclassified(index=torch.tensor([4, 17, 150]), true=torch.tensor([1, 2, 3]),
                          predicted=torch.tensor([7, 7, 8]))
    result = EvalResult(loss=0.1, correct=1085, count=1100 + 20, confusion=confusion(), misclassified=wrong)
    pictures = plots.evaluation_images(result, images)
    assert list(pictures) == ["eval/confusion", "eval/misclassified"]
    assert np.array_equal(pictures["eval/misclassified"], plots.misclassified_image(
        images[[4, 17, 150]], wrong.true, wrong.predicted, index=wrong.index, total=35))
    writer = SummaryWriter(str(tmp_path))
    for tag, image in pictures.items():
        writer.add_image(tag, image, global_step=7, dataformats="HWC")
    writer.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    logged = events.Images("eval/confusion")
    assert [(e.step, e.width, e.height) for e in logged] == [(7, pictures["eval/confusion"].shape[1],
                                                              pictures["eval/confusion"].shape[0])]
