"""The console's tables of a run: one row per configuration, the peaks MFU is a fraction of, and with several
devices their images/s side by side."""

from __future__ import annotations

from typing import Any


def format_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:,.0f} {unit}" if unit == "B" else f"{count:,.1f} {unit}"
        count /= 1024
    return ""


def main_memory(peak: dict[str, int] | None) -> str:
    if not peak:
        return "-"
    for key, label in (("cuda_peak_allocated", ""), ("mps_driver_allocated", " driver"), ("cpu_peak_rss", " RSS")):
        if key in peak:
            return format_bytes(peak[key]) + label
    return "-"


def console_for_tables() -> Any:
    from rich.console import Console

    console = Console(highlight=False)
    return console if console.is_terminal else Console(highlight=False, width=200)


def results_table(rows: list[dict[str, Any]]) -> Any:
    from rich.table import Table

    table = Table(title="AlexNet on MNIST: throughput", title_justify="left")
    for column in ("device", "mode", "pipeline", "batch", "precision", "ch-last", "px"):
        table.add_column(column)
    for column in ("images/s", "step ms (p10-p90)", "vs model", "peak memory", "GFLOP/img", "TFLOP/s", "of peak"):
        table.add_column(column, justify="right")
    table.add_column("status")
    for r in rows:
        ok = r["status"] == "ok"
        ratio = r.get("trainer_over_model")
        table.add_row(
            r["device"], r["mode"], r["pipeline"], str(r["batch_size"]),
            r["precision"] + (" compiled" if r["compile"] else ""), "yes" if r["channels_last"] else "no",
            str(r["image_size"]),
            f"{r['images_per_sec']:,.1f}" if ok else "-",
            f"{r['step_ms']['median']:,.1f} ({r['step_ms']['p10']:,.1f}-{r['step_ms']['p90']:,.1f})" if ok else "-",
            f"{ratio:.3f}" if ratio else "",
            main_memory(r["peak_memory"]),
            f"{r['gflop_per_image']:.3f}" if ok else "-",
            f"{r['achieved_tflops']:.3f}" if ok else "-",
            f"{r['mfu']:.1%}" if ok else "-",
            r["status"] if ok else f"{r['status']}: {r['message'][:80]}",
        )
    return table


def peaks_note(rows: list[dict[str, Any]]) -> list[str]:
    seen = dict.fromkeys(f"{r['device']} {r['precision']}: peak {r['peak_tflops']:.2f} TFLOP/s ({r['peak_source']})"
                         for r in rows if r["status"] == "ok")
    return list(seen)


def side_by_side_table(rows: list[dict[str, Any]], device_list: list[str]) -> Any:
    """images/s of each device for the same setting, and each device's speedup over the CPU."""
    from rich.table import Table

    def key(row: dict[str, Any]) -> tuple[Any, ...]:
        return (row["mode"], row["pipeline"], row["batch_size"], row["requested_precision"])

    by_key: dict[tuple[Any, ...], dict[str, dict[str, Any]]] = {}
    for row in rows:
        by_key.setdefault(key(row), {})[row["device"]] = row
    table = Table(title="side by side (images/s; x = speedup over the CPU)", title_justify="left")
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
            cell = f"{row['images_per_sec']:,.1f} ({row['precision']})"
            if device != "cpu" and cpu and cpu["status"] == "ok":
                cell += f" {row['images_per_sec'] / cpu['images_per_sec']:,.1f}x"
            cells.append(cell)
        table.add_row(mode, pipeline, str(batch), precision, *cells)
    return table

