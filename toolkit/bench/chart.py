"""The PNG beside a results file (X.json -> X.png): images/s against batch size, one panel per mode (train,
infer), one colour per device and precision; a solid line (circles) for the model-only step alone, a dashed one
(squares) for the trainer pipeline and a dotted one for the model-only step in the windows paired with it (its
own rows, or the rate a trainer row carries); and a line per compile, memory format or image size where those
vary in the file. Rows without a number (oom, error) are left out."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from toolkit.files import write_atomic

PAIRED = "model, paired"  # the model-only step in the windows paired with the trainer's
PIPELINE_STYLE = {"model": ("-", "o"), "trainer": ("--", "s"), PAIRED: (":", "o")}  # line and marker
PRECISION_NAMES = {"no": "fp32"}
VARYING = (("compile", lambda v: "compiled" if v else "eager"),
           ("channels_last", lambda v: "channels_last" if v else "contiguous"),
           ("image_size", lambda v: f"{v} px"))


def chart_path(json_path: Path) -> Path:
    return json_path.with_suffix(".png")


def write_chart(rows: list[dict[str, Any]], path: Path) -> str:
    """Draw the chart into `path`; a line saying where it went, or why there is none. Raises only what
    matplotlib raises while drawing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator
    except ImportError:
        return "chart: skipped, matplotlib is not installed (pip install matplotlib)"
    measured = [r for r in rows if r["status"] == "ok"]
    if not measured:
        return "chart: skipped, no configuration was measured"
    varying = [(field, name) for field, name in VARYING if len({r[field] for r in measured}) > 1]
    modes = list(dict.fromkeys(r["mode"] for r in measured))
    lines: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for row in measured:
        settings = tuple(row[field] for field, _ in varying)
        pipeline = PAIRED if row["pipeline"] == "model" and row.get("paired") else row["pipeline"]
        lines.setdefault((row["device"], row["precision"], pipeline, *settings), []).append(row)
    drawn = {(key, r["mode"], r["batch_size"]) for key, found in lines.items() for r in found}
    for row in measured:  # a trainer row alone (--pipeline trainer) carries the model's rate in its pairs
        key = (row["device"], row["precision"], PAIRED, *(row[field] for field, _ in varying))
        if row.get("paired_model_images_per_sec") and (key, row["mode"], row["batch_size"]) not in drawn:
            lines.setdefault(key, []).append({**row, "images_per_sec": row["paired_model_images_per_sec"]})
    colours = {}  # one per device and precision, the same in every panel
    for key in lines:
        colours.setdefault(key[:2], f"C{len(colours) % 10}")

    figure = Figure(figsize=(6.5 * len(modes), 4.8), layout="constrained")
    FigureCanvasAgg(figure)
    sizes = {r["image_size"] for r in measured}
    size = f", {sizes.pop()} px" if len(sizes) == 1 else ""
    figure.suptitle(f"AlexNet on MNIST{size}: images/s by batch size")
    for index, mode in enumerate(modes):
        axes = figure.add_subplot(1, len(modes), index + 1)
        axes.set_title(mode)
        rates = [r["images_per_sec"] for found in lines.values() for r in found if r["mode"] == mode]
        log_rates = max(rates) / min(rates) > 30  # a CPU beside a GPU: on a linear axis its line is flat at 0
        for key, found in lines.items():
            points = sorted((r["batch_size"], r["images_per_sec"]) for r in found if r["mode"] == mode)
            if not points:
                continue
            label = " ".join([key[0], PRECISION_NAMES.get(key[1], key[1]), key[2],
                              *(name(v) for (_, name), v in zip(varying, key[3:], strict=True))])
            line, marker = PIPELINE_STYLE.get(key[2], (":", "^"))
            axes.plot(*zip(*points, strict=True), line, marker=marker, color=colours[key[:2]], label=label)
        batch_sizes = sorted({r["batch_size"] for r in measured if r["mode"] == mode})
        axes.set_xscale("log", base=2)
        axes.xaxis.set_major_locator(FixedLocator(batch_sizes))
        axes.xaxis.set_minor_locator(NullLocator())
        axes.set_xticklabels([str(b) for b in batch_sizes])
        if log_rates:
            axes.set_yscale("log")
            axes.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.0f}" if value >= 1 else
                                                         f"{value:g}"))
        else:
            axes.set_ylim(bottom=0)
        axes.set_xlabel("batch size (per process)")
        axes.set_ylabel("images/s (log scale)" if log_rates else "images/s")
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize="small")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    write_atomic(path, buffer.getvalue())
    return f"chart: {path}"
