"""Honest throughput of AlexNet on MNIST per device, precision and batch size: images/s, step time, peak memory,
achieved TFLOP/s and the fraction of the device's peak, as a table, a JSON file and a chart.

    python -m toolkit.bench [--device auto|cpu|cuda|mps|all] [--mode train|infer|both]
                            [--pipeline model|trainer|both] [--batch-size 64,128] [--precision no,bf16]
                            [--full] ...
    python -m toolkit.bench --compare A.json B.json

By default a quick answer (windows sized by a time budget per case); --full for the long, fixed measurement.
How it measures (pipelines, windows, pairing, budgets, FLOPs, peaks, processes, stopping) is written once, in
benchmarks/README.md, "What is measured, and how". One module per job:

- `cli`: the command line; `plan`: the cases a command asks for, their windows and the trainer config of each;
- `timing`: the timed window and the windows of a case; `peaks`: FLOPs per image and the device's peak;
- `measure`: one case in this process, driving the trainer; `worker`: cases in fresh processes, and ending them;
- `progress`: the plan, the estimate and a line per case; `results`: a result row and the JSON file;
- `environment`: what the run ran on; `tables`: the console tables; `chart`: the PNG;
- `compare`: `--compare A.json B.json`.
"""
