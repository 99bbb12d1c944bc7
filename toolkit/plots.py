"""Pictures of an evaluation: the confusion matrix, and a grid of misclassified digits with their true and
predicted labels. Each is an RGB array, uint8 (H, W, 3), for TensorBoard (`add_image(tag, image, step,
dataformats="HWC")`) and for PNG files (`toolkit.evaluate --plots DIR`): the trainer and the command draw the
same pictures through `evaluation_images`.

Drawn with matplotlib, which does what these need and we would otherwise write: tick labels, a colour bar with a
log scale, text fitted in cells, a font with the → glyph. It is imported inside the functions (importing the
toolkit stays light), and draws on an Agg canvas of its own: no pyplot, so no global figure state and no
display, safe inside a training process.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from toolkit.metrics import EvalResult

MISCLASSIFIED_SHOWN = 64  # digits in the grid: 8 x 8, each still large enough to read
COLUMNS = 8
DPI = 100
TILE_SCALE = 3  # screen pixels per MNIST pixel in the grid
LABEL_BAND_PX = 11  # MNIST pixels of space above each digit for its label


def _array(values: Any) -> np.ndarray:
    return values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)


def _render(figure: Figure) -> np.ndarray:
    """The figure's pixels, uint8 (H, W, 3)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def confusion_image(confusion: torch.Tensor | np.ndarray) -> np.ndarray:
    """The confusion matrix (true digit by row, predicted by column), int (10, 10), as uint8 (H, W, 3): each
    cell's count written in it, coloured on a log scale so single mistakes stand out next to the diagonal's
    hundreds; the share of each true digit answered right on the right."""
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    counts = _array(confusion).astype(np.int64)
    classes = len(counts)
    total, correct = int(counts.sum()), int(np.trace(counts))
    figure = Figure(figsize=(7.6, 6.2), dpi=DPI)
    # fixed places (in figure fractions): the matrix, the per-digit shares right of it, then the colour bar
    axes = figure.add_axes((0.08, 0.08, 0.70, 0.86))
    # from a light blue, not white, so a single mistake still shows; zero (masked): white, no text
    colormap = _colormap("Blues").with_extremes(bad="white")
    norm = LogNorm(vmin=1, vmax=max(2, int(counts.max())))
    shown = axes.imshow(np.ma.masked_less(counts, 1), cmap=colormap, norm=norm)
    for true in range(classes):
        for predicted in range(classes):
            count = int(counts[true, predicted])
            if count:
                red, green, blue, _ = colormap(norm(count))
                dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5
                axes.text(predicted, true, f"{count:,}", ha="center", va="center", fontsize=9 if count < 1000 else 8,
                          color="white" if dark else "black", fontweight="bold" if true == predicted else "normal")
    axes.set_xticks(range(classes))
    axes.set_yticks(range(classes))
    axes.set_xlabel("predicted digit")
    axes.set_ylabel("true digit")
    axes.tick_params(length=0)
    accuracy = f"{correct / total:.2%}" if total else "no images"
    axes.set_title(f"confusion: {correct:,} of {total:,} correct ({accuracy})")
    # the right-hand side: the share of each true digit answered right
    per_class = axes.secondary_yaxis("right")
    per_class.set_yticks(range(classes), [f"{c / max(n, 1):.1%}" for c, n in
                                          zip(np.diagonal(counts), counts.sum(axis=1), strict=True)])
    per_class.tick_params(length=0)
    axes.text(1.015, 1.005, "correct", transform=axes.transAxes, ha="left", va="bottom")
    bar = figure.colorbar(shown, cax=figure.add_axes((0.885, 0.15, 0.025, 0.72)))
    ticks = [t for t in (1, 3, 10, 30, 100, 300, 1000, 3000, 10_000, 30_000) if t * 1.5 <= norm.vmax]
    ticks.append(int(norm.vmax))  # the largest count
    bar.set_ticks(ticks, labels=[f"{t:,}" for t in ticks])  # plain numbers, not powers of ten
    bar.minorticks_off()
    bar.set_label("images (log scale; blank: none)")
    return _render(figure)


def misclassified_image(images: torch.Tensor | np.ndarray, true: torch.Tensor | np.ndarray,
                        predicted: torch.Tensor | np.ndarray, index: torch.Tensor | np.ndarray | None = None,
                        total: int | None = None) -> np.ndarray:
    """A grid of misclassified digits, uint8 (N, 28, 28) white on black as MNIST, each titled "true → predicted"
    (and its position in the evaluation set when `index` is given), as uint8 (H, W, 3). At most
    MISCLASSIFIED_SHOWN are drawn; `total` (all misclassified) goes in the title."""
    from matplotlib.figure import Figure

    images, true, predicted = _array(images)[:MISCLASSIFIED_SHOWN], _array(true), _array(predicted)
    count = len(images)
    total = count if total is None else total
    if count == 0:
        figure = Figure(figsize=(4.8, 1.2), dpi=DPI)
        text = "no misclassified images" if not total else f"{total:,} misclassified, none kept to show"
        figure.text(0.5, 0.5, text, ha="center", va="center", fontsize=12)
        return _render(figure)
    height, width = images.shape[1:]
    columns = COLUMNS  # a fixed width: the title fits, and the picture keeps its width from one evaluation to the next
    rows = -(-count // columns)
    pitch_y, pitch_x = height + LABEL_BAND_PX, width + 6  # each tile: a label band, then the digit
    sheet = np.full((rows * pitch_y, columns * pitch_x), 255, dtype=np.uint8)  # white page, black tiles
    title_px = 44
    sheet_px = sheet.shape[0] * TILE_SCALE
    figure = Figure(figsize=(sheet.shape[1] * TILE_SCALE / DPI, (sheet_px + title_px) / DPI), dpi=DPI)
    axes = figure.add_axes((0, 0, 1, sheet_px / (sheet_px + title_px)))
    positions = None if index is None else _array(index)
    for n in range(count):
        row, column = divmod(n, columns)
        top, left = row * pitch_y + LABEL_BAND_PX, column * pitch_x + 3
        sheet[top:top + height, left:left + width] = images[n]
        axes.text(left + width, top - 1.5, f"{int(true[n])} → {int(predicted[n])}", ha="right", va="bottom",
                  fontsize=10, fontweight="bold")
        if positions is not None:
            axes.text(left, top - 1.5, f"#{int(positions[n])}", ha="left", va="bottom", fontsize=7, color="0.35")
    axes.imshow(sheet, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    axes.set_axis_off()
    shown = f"the first {count} of {total:,}" if count < total else f"all {count:,}"
    where = ", #: position in the evaluation set" if positions is not None else ""
    figure.text(0.5, 1 - 8 / (sheet_px + title_px), f"misclassified: true → predicted{where}; {shown}",
                ha="center", va="top", fontsize=11)
    return _render(figure)


def evaluation_images(result: EvalResult, images: torch.Tensor) -> dict[str, np.ndarray]:
    """{TensorBoard tag: picture} for an evaluation: "eval/confusion" and "eval/misclassified". `images` are the
    evaluation set's uint8 (N, 28, 28), on any device, in the order `result` indexes (the misclassified
    examples kept by `metrics.evaluate(..., keep_misclassified=K)`; none drawn when K was 0)."""
    wrong = result.misclassified
    return {"eval/confusion": confusion_image(result.confusion),
            "eval/misclassified": misclassified_image(images[wrong.index.to(images.device)].cpu(), wrong.true,
                                                      wrong.predicted, index=wrong.index,
                                                      total=result.count - result.correct)}


def png_bytes(image: np.ndarray) -> bytes:
    """An RGB uint8 (H, W, 3) image encoded as PNG."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(buffer, format="PNG")  # (H, W, 3): RGB
    return buffer.getvalue()


def _colormap(name: str) -> Any:
    """Matplotlib's colormap `name` without its palest 15%."""
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap

    return ListedColormap(colormaps[name](np.linspace(0.15, 1, 256)), name=f"{name}_from_15")
