"""The console's tables of a run, in 100 columns: one row per configuration (settings common to every row in the
title, the others as columns), a footnote saying what each column is and the one line of peaks MFU is a fraction
of, and with several devices their images/s side by side."""

from __future__ import annotations

from typing import Any

WIDTH = 100  # the console's width where it is not a terminal (a log, a pipe)
METHOD = "method: benchmarks/README.md, 'What is measured, and how'"
# settings that identify a row: (field, column, how a value reads in the title)
SETTINGS = (("device", "device", str), ("batch_size", "batch", lambda v: f"batch {v}"),
            ("precision", "precision", lambda v: "fp32" if v == "no" else v),
            ("compile", "compiled", lambda v: "compiled" if v else "eager"),
            ("channels_last", "ch-last", lambda v: "channels_last" if v else "contiguous"),
            ("image_size", "px", lambda v: f"{v} px"))


def format_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:,.0f} {unit}" if unit == "B" else f"{count:,.1f} {unit}"
        count /= 1024
    return ""


def main_memory(peak: dict[str, int] | None) -> str:
    if not peak:
        return "-"
    for key in ("cuda_peak_allocated", "mps_driver_allocated", "cpu_peak_rss"):
        if key in peak:
            return format_bytes(peak[key])
    return "-"


def console_for_tables() -> Any:
    from rich.console import Console

    console = Console(highlight=False)
    return console if console.is_terminal else Console(highlight=False, width=WIDTH)


def number(value: float) -> str:
    """Three significant figures or more, thousands separated: 0.0123, 1.23, 12.3, 123, 1,234."""
    return f"{value:,.0f}" if value >= 100 else f"{value:#.3g}"


def shown(value: Any) -> str:
    return "yes" if value is True else "no" if value is False else "fp32" if value == "no" else str(value)


def results_table(rows: list[dict[str, Any]]) -> Any:
    from rich import box
    from rich.table import Table

    varying = [(field, column) for field, column, _ in SETTINGS if len({r[field] for r in rows}) > 1]
    common = [said(rows[0][field]) for field, _, said in SETTINGS if len({r[field] for r in rows}) == 1]
    table = Table(title=f"AlexNet on MNIST: {', '.join(common)}", title_justify="left", box=box.SIMPLE_HEAD,
                  pad_edge=False)
    ratios = any(r.get("trainer_over_model") for r in rows)
    for column in ("mode", "pipeline", *(column for _, column in varying)):
        table.add_column(column)
    for column in ("images/s", "step ms (p10-p90)", *(["trainer/model"] if ratios else []), "memory", "TFLOP/s",
                   "of peak"):
        table.add_column(column, justify="right")
    for r in rows:
        ok = r["status"] == "ok"
        ratio = r.get("trainer_over_model")
        step = r["step_ms"] if ok else None
        table.add_row(
            r["mode"], r["pipeline"], *(shown(r[field]) for field, _ in varying),
            number(r["images_per_sec"]) if ok else r["status"],
            f"{number(step['median'])} ({number(step['p10'])}-{number(step['p90'])})" if ok else "-",
            *([f"{ratio:.3f}" if ratio else ""] if ratios else []),
            main_memory(r["peak_memory"]),
            f"{r['achieved_tflops']:.3g}" if ok else "-",
            f"{r['mfu']:.1%}" if ok else "-",
        )
    return table


def footnote(rows: list[dict[str, Any]]) -> list[str]:
    """What each column is, the peaks, and any row's error: lines of at most 100 characters (a path or an error
    message may run longer)."""
    ok = [r for r in rows if r["status"] == "ok"]
    lines = ["images/s: median over the timed windows; step ms: median (p10-p90) of window time / steps."]
    if any(r.get("paired") for r in rows):
        lines += ["model: the step alone, on one batch prepared once; trainer: the trainer's own loop (train) or",
                  "evaluation (infer), data path included. A mode's rows come from the same windows, alternating",
                  "in one process; trainer/model is the median of the pairs' ratios (1: the data path is free)."]
    else:
        lines.append("model: the step alone, on one batch prepared once (train: a training step; infer: the "
                     "forward).")
    memory = [part for kind, part in (("cpu", "the process's peak RSS, torch included"),
                                      ("cuda", "the allocator's peak, reset per case"),
                                      ("mps", "the driver's allocation after the windows"))
              if any(kind in key for r in ok for key in (r["peak_memory"] or {}))]
    if memory:
        lines.append(f"memory: {'; '.join(memory)}.")
    flops = {}
    for r in ok:
        flops.setdefault(r["image_size"], {})[r["mode"]] = r["gflop_per_image"]
    for size, by_mode in flops.items():
        said = ", ".join(f"{gflop:.3f} {mode}" for mode, gflop in by_mode.items())
        lines.append(f"TFLOP/s: images/s x GFLOP an image ({size} px: {said}). of peak: of the peak line.")
    lines.append(peak_line(ok))
    lines.append(METHOD)
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"{r['status']}: {r['device']} {r['mode']} {r['pipeline']} batch {r['batch_size']}: "
                         f"{r['message']}")
    return [line for line in lines if line]


def peak_line(ok: list[dict[str, Any]]) -> str:
    """One line: the peak each device and precision's MFU is a fraction of, and where it comes from. A measured
    peak is measured in each case's own process: its range."""
    found: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in ok:
        found.setdefault((r["device"], r["precision"]), []).append(r)
    parts = []
    for (device, precision), measured in found.items():
        low, high = min(r["peak_tflops"] for r in measured), max(r["peak_tflops"] for r in measured)
        value = number(low) if number(low) == number(high) else f"{number(low)}-{number(high)}"
        source = measured[0]["peak_source"]
        if source.startswith("measured "):  # "measured 2048x2048 matmul, bf16"
            source = f"a {source.removeprefix('measured ').split(',')[0]} timed in each case's process"
        parts.append(f"{device} {shown(precision)} {value} TFLOP/s, {source}")
    return "peak: " + "; ".join(parts) + "." if parts else ""


def side_by_side_table(rows: list[dict[str, Any]], device_list: list[str]) -> Any:
    """images/s of each device for the same setting, and each device's speedup over the CPU."""
    from rich import box
    from rich.table import Table

    def key(row: dict[str, Any]) -> tuple[Any, ...]:
        return (row["mode"], row["pipeline"], row["batch_size"], row["requested_precision"])

    by_key: dict[tuple[Any, ...], dict[str, dict[str, Any]]] = {}
    for row in rows:
        by_key.setdefault(key(row), {})[row["device"]] = row
    table = Table(title="side by side (images/s; x = speedup over the CPU)", title_justify="left",
                  box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("mode", "pipeline", "batch", "precision"):
        table.add_column(column)
    for device in device_list:
        table.add_column(device, justify="right")
    for (mode, pipeline, batch, precision), found in by_key.items():
        cpu = found.get("cpu")
        cells = []
        for device in device_list:
            row = found.get(device)
            if not row or row["status"] != "ok":
                cells.append(row["status"] if row else "-")
                continue
            cell = f"{number(row['images_per_sec'])} ({shown(row['precision'])})"
            if device != "cpu" and cpu and cpu["status"] == "ok":
                cell += f" {row['images_per_sec'] / cpu['images_per_sec']:,.1f}x"
            cells.append(cell)
        table.add_row(mode, pipeline, str(batch), precision, *cells)
    return table
