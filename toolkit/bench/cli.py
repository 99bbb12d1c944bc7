"""The command line: `python -m toolkit.bench` and `toolkit-bench`. Flags are checked by argparse (`type=`,
`choices=`) and config values by the trainer's own rules (`toolkit.config.coerce`), each a one-line error."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from toolkit.bench import chart, tables
from toolkit.bench.compare import compare
from toolkit.bench.environment import environment
from toolkit.bench.plan import PROG, plan
from toolkit.bench.results import default_json_path, write_json
from toolkit.bench.worker import run_in_processes
from toolkit.config import PRECISIONS, ArgumentParser, TrainConfig, coerce
from toolkit.errors import UsageError, exit_on_user_error

DESCRIPTION = ("Honest throughput of AlexNet on MNIST per device, precision and batch size: images/s, step time, "
               "peak memory, achieved TFLOP/s and the fraction of the device's peak. Method: benchmarks/README.md.")


def comma_list(convert: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    """An argparse type: one value or a comma-separated list, each converted, duplicates dropped."""
    def values(text: str) -> list[Any]:
        found = [convert(part.strip()) for part in text.split(",") if part.strip()]
        if not found:
            raise argparse.ArgumentTypeError(f"expected one value or a comma-separated list, got {text!r}")
        return list(dict.fromkeys(found))

    return values


def config_value(key: str, flag: str) -> Callable[[str], Any]:
    """An argparse type: the text as the trainer's config key `key` takes it, by the config's own rules."""
    return lambda text: coerce(key, text, flag)


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer no smaller than `minimum`."""
    def integer(text: str) -> int:
        value = int(text)  # a ValueError becomes argparse's "invalid integer value"
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return integer


def precision(text: str) -> str:
    if text not in PRECISIONS:
        raise argparse.ArgumentTypeError(f"'{text}' is not one of {', '.join(PRECISIONS)}")
    return text


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog=f"python -m {PROG}", description=DESCRIPTION,
                            epilog="Results: a table here, JSON in --json (default "
                                   "benchmarks/results/<device>-<YYYYMMDD>.json) and a chart beside it (.png).")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps", "all"),
                        help="auto, cpu, cuda, mps, or all: every device this machine has, side by side "
                             "(default auto)")
    parser.add_argument("--mode", default="both", choices=("train", "infer", "both"), help="default both")
    parser.add_argument("--pipeline", default="both", choices=("model", "trainer", "both"),
                        help="model: the step alone on a batch already on the device; trainer: the trainer's "
                             "data path plus the step (default both: their ratio is the data path's cost)")
    parser.add_argument("--batch-size", default=str(TrainConfig.batch_size), metavar="N[,N...]",
                        type=comma_list(config_value("batch_size", "--batch-size")),
                        help=f"images per step, one or a list (default {TrainConfig.batch_size})")
    parser.add_argument("--precision", default="auto", metavar="P[,P...]", type=comma_list(precision),
                        help="no, bf16, fp16 or auto (the trainer's choice for the device), one or a list "
                             "(default auto)")
    parser.add_argument("--channels-last", default=None, action=argparse.BooleanOptionalAction,
                        help="channels-last memory format (default: what the trainer uses on the device)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (warm-up includes "
                                                               "compilation: give it a few steps)")
    parser.add_argument("--image-size", default=TrainConfig.image_size, metavar="PX",
                        type=config_value("image_size", "--image-size"),
                        help=f"input size in pixels, at least 65 (default {TrainConfig.image_size})")
    parser.add_argument("--warmup", default=5, type=at_least(0), metavar="STEPS",
                        help="untimed steps first (default 5)")
    parser.add_argument("--steps", default=10, type=at_least(1), metavar="STEPS",
                        help="steps per timed window (default 10)")
    parser.add_argument("--repeats", default=5, type=at_least(1), metavar="N", help="timed windows (default 5)")
    parser.add_argument("--config", default="", metavar="YAML",
                        help="trainer recipe to start from, e.g. configs/seed.yaml (default: the trainer's "
                             "defaults); the flags above override it")
    parser.add_argument("--json", default="", metavar="PATH", help="where to write the results")
    parser.add_argument("--chart", default=True, action=argparse.BooleanOptionalAction,
                        help="also draw images/s against batch size beside the JSON, X.json -> X.png (default on; "
                             "skipped with a note where matplotlib is missing)")
    parser.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"),
                        help="print the ratios B/A between two result files, and nothing else")
    return parser


def draw_chart(rows: list[dict[str, Any]], json_path: Path) -> str:
    """The chart's line for the console; a failure to draw it is reported, never raised: the JSON is written."""
    try:
        return chart.write_chart(rows, chart.chart_path(json_path))
    except Exception as error:  # noqa: BLE001 - the results are safe in the JSON whatever the chart does
        return f"chart: failed ({type(error).__name__}: {error}); the results are in {json_path}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    with exit_on_user_error(PROG):
        args = build_parser().parse_args(argv)
        if args.compare:
            return compare(*args.compare)
        console = tables.console_for_tables()

        def announce(line: str) -> None:
            console.print(line, markup=False)

        device_list, cases = plan(args, announce)
        if not cases:
            raise UsageError("nothing to measure: no requested precision is supported on the chosen device(s)")
        known: dict[str, Any] = {}
        workers: dict[str, Any] = {}
        try:
            rows = run_in_processes(cases, known, announce=announce, workers=workers)
        except KeyboardInterrupt:
            console.print("interrupted: no results written")
            return 130
        console.print(tables.results_table(rows))
        for line in tables.peaks_note(rows):
            announce(line)
        if len(device_list) > 1:
            console.print(tables.side_by_side_table(rows, device_list))
        path = Path(args.json) if args.json else default_json_path("all" if args.device == "all" else device_list[0])
        write_json(path, {"environment": environment(" ".join([f"python -m {PROG}", *argv]), workers),
                          "results": rows})
        announce(f"results: {path}")
        if args.chart:
            announce(draw_chart(rows, path))
        return 1 if any(row["status"] == "error" for row in rows) else 0
