"""What a run prints without a terminal: plain lines, one per log step and per evaluation, then a summary."""

from toolkit.console import TrainConsole

RECORD = {"epoch": 1, "step": 63, "train_loss": 0.52345, "eval_loss": 0.2, "eval_accuracy": 0.9712, "epoch_s": 12.34,
          "images_per_sec": 1234.5, "complete": True}


def test_plain_lines_for_logs_evaluations_and_the_summary(capsys):
    console = TrainConsole(enabled=True)
    console.epoch_started(0, 2, 63, 0)
    console.log(10, {"train/loss": 1.23456, "perf/images_per_sec": 1500.4, "perf/data_ms_per_step": 1.0,
                     "perf/step_ms": 9.0, "perf/tflops": 0.5, "perf/mfu": 0.25, "memory/peak_gib": 2.04})
    console.evaluated(RECORD)
    console.evaluated({**RECORD, "complete": False, "step": 30})
    console.summary({"best eval accuracy": "97.12% at step 63", "wall time": "20.0 s"})
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("epoch 1/2 step 10/63 loss 1.2346 images/s 1,500 data 10% 0.50 TFLOP/s (25% of peak) "
                               "mem 2.0 GiB eta ")
    assert lines[1] == ("epoch 1/2 done: train loss 0.5234, eval loss 0.2000, accuracy 97.12%, time 12.3s, "
                        "images/s 1,234")
    assert lines[2].startswith("epoch 1/2 step 30 evaluated: train loss")
    assert lines[3:] == ["best eval accuracy: 97.12% at step 63", "wall time: 20.0 s"]
    assert "\x1b[" not in "".join(lines)


def test_a_silent_console_prints_nothing(capsys):
    console = TrainConsole(enabled=False)
    console.log(1, {"train/loss": None, "perf/images_per_sec": 1.0})
    console.summary({"a": "b"})
    assert capsys.readouterr().out == ""
