"""The command line: `python -m toolkit.bench` and `toolkit-bench`. Flags are checked by argparse (`type=`,
`choices=`) and config values by the trainer's own rules (`toolkit.config.coerce`), each a one-line error."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from toolkit import devices
from toolkit.bench import chart, tables
from toolkit.bench.compare import compare
from toolkit.bench.environment import environment
from toolkit.bench.plan import FULL, PROG, QUICK, Case, plan
from toolkit.bench.progress import Progress
from toolkit.bench.results import default_json_path, document, results_dir
from toolkit.bench.worker import Stopped, run_in_processes, stopped_by_signals
from toolkit.config import COMPILE_MODES, PRECISIONS, ArgumentParser, TrainConfig, coerce
from toolkit.errors import UsageError, exit_on_user_error
from toolkit.files import Outputs

DESCRIPTION = ("Honest throughput of AlexNet on MNIST per device, precision and batch size: images/s, step time, "
               "peak memory, achieved TFLOP/s and the fraction of the device's peak. By default a quick answer "
               "(about a minute on a 2-core CPU, seconds of measuring on a GPU); --full for the long measurement. "
               "Method: benchmarks/README.md.")


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
    cpu, gpu = QUICK["cpu"], QUICK["cuda"]
    parser = ArgumentParser(prog=f"python -m {PROG}", description=DESCRIPTION,
                            epilog=f"Results: a table here, JSON in --json (default: a new file in "
                                   f"{results_dir()}, $XDG_DATA_HOME/toolkit/bench) written as each case "
                                   f"finishes, and a chart beside it (.png).")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps", "all"),
                        help="auto, cpu, cuda, mps, or all: every device this machine has, side by side "
                             "(default auto)")
    parser.add_argument("--mode", default="both", choices=("train", "infer", "both"), help="default both")
    parser.add_argument("--pipeline", default="both", choices=("model", "trainer", "both"),
                        help="model: the step alone on a batch already on the device; trainer: the trainer's "
                             "data path plus the step, in windows alternating with the model-only step's; both: "
                             "those pairs, a row for each pipeline (default: their ratio is the data path's cost)")
    parser.add_argument("--batch-size", default=None, metavar="N[,N...]",
                        type=comma_list(config_value("batch_size", "--batch-size")),
                        help=f"images per step, one or a list (default {cpu.batch_size} on the CPU, "
                             f"{gpu.batch_size} elsewhere and with --full or --device all)")
    parser.add_argument("--precision", default="auto", metavar="P[,P...]", type=comma_list(precision),
                        help="no, bf16, fp16 or auto (the trainer's choice for the device), one or a list "
                             "(default auto)")
    parser.add_argument("--channels-last", default=None, action=argparse.BooleanOptionalAction,
                        help="channels-last memory format (default: what the trainer uses on the device)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (warm-up includes "
                                                               "compilation: give it a few steps)")
    parser.add_argument("--compile-mode", default="default", choices=COMPILE_MODES,
                        help="torch.compile's mode with --compile: reduce-overhead is CUDA graphs (default default)")
    parser.add_argument("--image-size", default=TrainConfig.image_size, metavar="PX",
                        type=config_value("image_size", "--image-size"),
                        help=f"input size in pixels, at least 65 (default {TrainConfig.image_size})")
    parser.add_argument("--full", action="store_true",
                        help=f"the long measurement: batch {FULL.batch_size}, {FULL.warmup} warm-up steps, then "
                             f"{FULL.repeats} windows of {FULL.steps} steps on every device (minutes a case on a "
                             f"2-core CPU)")
    parser.add_argument("--warmup", default=None, type=at_least(0), metavar="STEPS",
                        help=f"untimed steps first (default {cpu.warmup} on the CPU, {gpu.warmup} elsewhere)")
    parser.add_argument("--steps", default=None, type=at_least(1), metavar="STEPS",
                        help=f"steps per timed window (default {cpu.steps} on the CPU, {gpu.steps} elsewhere)")
    parser.add_argument("--repeats", default=None, type=at_least(1), metavar="N",
                        help=f"timed windows, exactly (default: as many as fill about {cpu.budget_s:g} s on the "
                             f"CPU, {gpu.budget_s:g} s on a GPU, at least {cpu.repeats}; {FULL.repeats} with --full)")
    parser.add_argument("--config", default="", metavar="YAML",
                        help="trainer recipe to start from, e.g. configs/seed.yaml (default: the trainer's "
                             "defaults); the flags above override it")
    parser.add_argument("--json", default="", metavar="PATH", help="where to write the results (default: a new "
                                                                   "file in the folder named below)")
    parser.add_argument("--chart", default=True, action=argparse.BooleanOptionalAction,
                        help="also draw images/s against batch size beside the JSON, X.json -> X.png (default on; "
                             "skipped with a note where matplotlib is missing)")
    parser.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"),
                        help="print the ratios B/A between two result files, and nothing else")
    return parser


def draw_chart(rows: list[dict[str, Any]], path: Path, json_path: Path) -> str:
    """The chart's line for the console; a failure to draw it is reported, never raised: the JSON is written."""
    try:
        return chart.write_chart(rows, path)
    except Exception as error:  # noqa: BLE001 - the results are safe in the JSON whatever the chart does
        return f"chart: failed ({type(error).__name__}: {error}); the results are in {json_path}"


class Results:
    """The results file, rewritten whole (atomically) as each case's rows arrive, so an interrupted or failed run
    keeps every row it finished; and the run's progress lines. A worker's `Progress`."""

    def __init__(self, outputs: Outputs, path: Path, environment: dict[str, Any], cases: list[Case],
                 progress: Progress) -> None:
        self.outputs, self.path, self.environment, self.cases, self.progress = \
            outputs, path, environment, cases, progress
        self.rows: list[dict[str, Any]] = []
        self.cases_done = 0

    def starting(self, index: int) -> None:
        self.progress.starting(index)

    def warmed(self, index: int, step_s: float) -> None:
        self.progress.warmed(index, step_s)

    def finished(self, index: int, rows: list[dict[str, Any]]) -> None:
        self.rows.extend(rows)
        self.cases_done += 1
        self.write()
        self.progress.finished(index, rows)

    def write(self, stopped_by: str | None = None) -> None:
        self.outputs.write({self.path: document(self.environment, self.rows, len(self.cases), self.cases_done,
                                                stopped_by)})


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        with exit_on_user_error(PROG), Outputs() as outputs:
            args = build_parser().parse_args(argv)
            if args.compare:
                return compare(*args.compare)
            return run(args, argv, outputs)
    except KeyboardInterrupt:  # Ctrl-C before measuring: once it measures, a stop keeps the finished rows
        print(f"{PROG}: interrupted before anything was measured: nothing written", file=sys.stderr)
        return 130


def run(args: argparse.Namespace, argv: list[str], outputs: Outputs) -> int:
    """Check every file the run writes, plan, say the plan, measure (the rows written as each case finishes),
    then the table and the chart. A SIGTERM or SIGINT while measuring ends it there, keeping what finished."""
    label = "all" if args.device == "all" else devices.resolve(args.device)
    json_path = outputs.file(args.json or str(default_json_path(label)), "--json")
    chart_path = outputs.file(str(chart.chart_path(json_path)), "--json") if args.chart else None
    outputs.make_ready()
    console = tables.console_for_tables()

    def announce(line: str) -> None:
        console.print(line, markup=False, soft_wrap=True)  # a path is never broken in two

    device_list, cases = plan(args, announce)
    if not cases:
        raise UsageError("nothing to measure: no requested precision is supported on the chosen device(s)")
    progress = Progress(cases, announce)
    progress.plan()
    announce(f"results (written as each case finishes): {json_path}")
    known: dict[str, Any] = {}
    workers: dict[str, Any] = {}
    results = Results(outputs, json_path, environment(" ".join([f"python -m {PROG}", *argv]), workers), cases,
                      progress)
    try:
        with stopped_by_signals() as stop:
            run_in_processes(cases, known, progress=results, workers=workers, stop=stop)
    except Stopped as stopped:
        results.write(stopped_by=str(stopped))
        if results.rows:
            show(console, results.rows, device_list)
        announce(f"stopped by {stopped} after {results.cases_done} of {len(cases)} cases: "
                 + (f"their rows are in {json_path}" if results.rows else f"no rows; {json_path} says so"))
        return 128 + stopped.signum
    show(console, results.rows, device_list)
    announce(f"results: {json_path}")
    if chart_path:
        announce(draw_chart(results.rows, chart_path, json_path))
    return 1 if any(row["status"] == "error" for row in results.rows) else 0


def show(console: Any, rows: list[dict[str, Any]], device_list: list[str]) -> None:
    console.print(tables.results_table(rows))
    for line in tables.footnote(rows):
        console.print(line, markup=False, soft_wrap=True)
    if len(device_list) > 1:
        console.print(tables.side_by_side_table(rows, device_list))
