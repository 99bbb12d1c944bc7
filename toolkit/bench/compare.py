"""`--compare A.json B.json`: B/A for each configuration found in both result files. A file that is not one, or a
row that lacks what the table needs, is one line naming the file, the row and the field; a row measured as
`oom` or `error` has no numbers, and its cells say so."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from toolkit.bench.results import STATUSES
from toolkit.bench.tables import console_for_tables
from toolkit.errors import UsageError

# What identifies a configuration, and the type each field must have.
IDENTITY: dict[str, type] = {"device": str, "mode": str, "pipeline": str, "image_size": int, "batch_size": int,
                             "precision": str, "channels_last": bool, "compile": bool}


def load_results(path: str) -> list[dict[str, Any]]:
    """The rows of a results file, each checked for the fields `compare` reads."""
    try:
        document = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UsageError(f"--compare: {path} does not exist") from None
    except OSError as error:
        raise UsageError(f"--compare: {path}: cannot read it ({error.strerror})") from None
    except ValueError as error:  # not JSON, or not text
        raise UsageError(f"--compare: {path} is not a toolkit.bench results file ({error})") from None
    except RecursionError:  # JSON nested deeper than the parser's stack
        raise UsageError(f"--compare: {path} is not a toolkit.bench results file (nested too deeply)") from None
    rows = document.get("results") if isinstance(document, dict) else None
    if not isinstance(rows, list):
        raise UsageError(f"--compare: {path} is not a toolkit.bench results file (no 'results' list)")
    seen: dict[tuple[Any, ...], int] = {}
    for index, row in enumerate(rows):
        check_row(row, f"--compare: {path}: results[{index}]")
        key = tuple(row[f] for f in IDENTITY)
        if key in seen:
            raise UsageError(f"--compare: {path}: results[{seen[key]}] and results[{index}] are the same "
                             f"configuration ({label(row)})")
        seen[key] = index
    return rows


def check_row(row: Any, where: str) -> None:
    if not isinstance(row, dict):
        raise UsageError(f"{where} is {json.dumps(row)[:40]}, not a row of results")
    for field, kind in IDENTITY.items():
        value = row.get(field)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise UsageError(f"{where}: {field} is {shown(row, field)}, expected {kind.__name__}: not a "
                             f"toolkit.bench result row")
    where = f"{where} ({label(row)})"
    if row.get("status") not in STATUSES:
        raise UsageError(f"{where}: status is {shown(row, 'status')}, expected one of {', '.join(STATUSES)}")
    if row["status"] != "ok":
        return  # measured, without numbers: its cells say so
    needs = "a row with status ok needs a positive number"
    if not positive_number(row.get("images_per_sec")):
        raise UsageError(f"{where}: images_per_sec is {shown(row, 'images_per_sec')}; {needs}")
    if not isinstance(row.get("step_ms"), dict):
        raise UsageError(f"{where}: step_ms is {shown(row, 'step_ms')}; a row with status ok needs its median, "
                         f"p10 and p90")
    if not positive_number(row["step_ms"].get("median")):
        raise UsageError(f"{where}: step_ms.median is {shown(row['step_ms'], 'median')}; {needs}")


def positive_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def shown(container: dict[str, Any], key: str) -> str:
    """A field's value as the file has it: missing, null, or its JSON, cut short."""
    if key not in container:
        return "missing"
    return json.dumps(container[key])[:40]


def label(row: dict[str, Any]) -> str:
    return " ".join(str(row[f]) for f in ("device", "mode", "pipeline")) + f" batch {row['batch_size']}"


def compare(path_a: str, path_b: str) -> int:
    """Print B/A for each configuration found in both files. A setting that varies within a file identifies
    rows; one that is constant within each file is what is being compared (cpu.json vs cuda.json, an eager run
    vs a compiled one) and is left out of the match."""
    from rich.table import Table

    rows_a, rows_b = load_results(path_a), load_results(path_b)
    fields = [f for f in IDENTITY if len({r[f] for r in rows_a}) > 1 or len({r[f] for r in rows_b}) > 1]
    compared = [f for f in IDENTITY if f not in fields and rows_a and rows_b and rows_a[0][f] != rows_b[0][f]]

    def keyed(rows: list[dict[str, Any]]) -> dict[tuple[Any, ...], dict[str, Any]]:
        return {tuple(r[f] for f in fields): r for r in rows}

    a, b = keyed(rows_a), keyed(rows_b)
    title = f"B / A   (A = {Path(path_a).name}, B = {Path(path_b).name})"
    if compared:
        title += ("   A: " + ", ".join(f"{f}={rows_a[0][f]}" for f in compared)
                  + "; B: " + ", ".join(f"{f}={rows_b[0][f]}" for f in compared))
    table = Table(title=title, title_justify="left")
    for f in fields:
        table.add_column(f.replace("_", " "))
    for column in ("A images/s", "B images/s", "B/A images/s", "A step ms", "B step ms"):
        table.add_column(column, justify="right")
    for key in (k for k in a if k in b):
        ra, rb = a[key], b[key]
        both_ok = ra["status"] == rb["status"] == "ok"
        ratio = f"{rb['images_per_sec'] / ra['images_per_sec']:.3f}" if both_ok else "-"
        table.add_row(*(str(v) for v in key), rate(ra), rate(rb), ratio, step(ra), step(rb))
    console = console_for_tables()
    console.print(table)
    for name, only in (("A", [k for k in a if k not in b]), ("B", [k for k in b if k not in a])):
        for key in only:
            settings = ", ".join(f"{f}={v}" for f, v in zip(fields, key, strict=True))
            console.print(f"only in {name}: {settings}", markup=False)
    if not any(k in b for k in a):
        console.print("no configuration is in both files")
    return 0


def rate(row: dict[str, Any]) -> str:
    return f"{row['images_per_sec']:,.1f}" if row["status"] == "ok" else row["status"]


def step(row: dict[str, Any]) -> str:
    return f"{row['step_ms']['median']:,.1f}" if row["status"] == "ok" else "-"
