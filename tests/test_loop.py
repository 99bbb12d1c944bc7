"""The training loop in this process: gradient accumulation, host syncs, the tally, the schedule and the
warm-up warning. Quick: a trainer on a few hundred images at 65 px."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_trainer

import toolkit
from toolkit.assemble import build_schedule
from toolkit.config import TrainConfig
from toolkit.stopping import first_request
from toolkit.tally import StepTally
from toolkit.train import warmup_warning

# Steps without randomness and in fp32, so two ways of computing the same step can be compared.
EXACT = {"dropout": 0.0, "shift_px": 0.0, "ema_decay": 0.0, "precision": "no"}


@pytest.mark.slow
@pytest.mark.parametrize("large, accumulate", [(32, 2), (64, 4)])
def test_accumulated_micro_batches_equal_one_large_batch(tmp_path, large, accumulate):
    """80 images: batch 32 gives steps of 32, 32 and 16 images (batch 64: 64 and 16); batch 16 with 2 (4)
    micro-batches per step gives the same groups (the last step has one micro-batch). SGD with momentum is linear
    in the gradient, so the weights agree to float rounding: within 1e-6 (measured 9e-8, after the weights moved
    by up to 0.37). AdamW divides by the gradient's running scale, which turns rounding on near-zero gradients
    into differences near its lr."""
    settings = {**EXACT, "optimizer": "sgd", "lr": 0.01, "train_samples": 80}
    steps = -(-80 // large)
    with tiny_trainer(tmp_path / "one", batch_size=large, **settings) as one:
        initial = {k: v.clone() for k, v in one.net.network.state_dict().items()}
        one.train_steps(steps)
        expected = {k: v.clone() for k, v in one.net.network.state_dict().items()}
        assert (one.progress.step, one.progress.batch) == (steps, steps)
    with tiny_trainer(tmp_path / "accumulated", batch_size=16, grad_accum_steps=accumulate,
                      **settings) as accumulated:
        assert accumulated.net.steps_per_epoch == steps
        accumulated.train_steps(steps)
        assert (accumulated.progress.step, accumulated.progress.batch) == (steps, 5)
        got = accumulated.net.network.state_dict()
    assert max(float((expected[k] - initial[k]).abs().max()) for k in expected) > 0.1  # the weights did move
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, atol=1e-6, rtol=0, msg=key)


SYNCS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__")


def test_steps_that_do_not_log_make_no_host_sync(tmp_path, monkeypatch):
    """Each call from the toolkit's own code that makes the host wait for the device (.item(), .tolist(),
    float(t), int(t), bool(t), operator.index(t)) is counted with the step it happened at: only log steps have
    any."""
    package = str(Path(toolkit.__file__).parent)
    at_steps: list[tuple[str, int]] = []
    with tiny_trainer(tmp_path, log_every_steps=2, train_samples=96, batch_size=16) as trainer:
        for name in SYNCS:
            original = getattr(torch.Tensor, name)

            def counted(self, *args, _name=name, _original=original, **kwargs):
                if sys._getframe(1).f_code.co_filename.startswith(package):
                    at_steps.append((_name, trainer.progress.step))
                return _original(self, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)
        trainer.train_steps(5)
        monkeypatch.undo()
    steps = {step for _, step in at_steps}
    assert steps == {2, 4}, at_steps  # a sync at each log step, and none at steps 1, 3 and 5


def test_tally_sums_losses_and_notes_the_first_non_finite_step():
    tally = StepTally(torch.device("cpu"), step=10)
    tally.add(torch.tensor(2.0), 4)
    assert float(tally.end_step()) == 0.0
    tally.add(torch.tensor(float("nan")), 4)
    tally.add(torch.tensor(1.0), 2)  # accumulation: a bad micro-batch makes its whole step bad
    assert float(tally.end_step()) == 1.0
    tally.add(torch.tensor(float("inf")), 4)
    tally.end_step()
    reading = tally.read()
    assert (reading.loss_sum, reading.images, reading.first_bad_step) == (2.0 * 4 + 1.0 * 2, 14, 12)
    assert tally.read().images == 0 and tally.read().first_bad_step == 12  # the window restarts; the step stays


def test_schedule_warms_up_then_decays_to_zero():
    model = torch.nn.Linear(1, 1)
    config = TrainConfig(warmup_steps=4, lr_schedule="cosine", lr=1.0)
    schedule = build_schedule(torch.optim.SGD(model.parameters(), lr=1.0), config, total_steps=12)
    lrs = []
    for _ in range(12):
        lrs.append(schedule.get_last_lr()[0])
        schedule.optimizer.step()
        schedule.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0) and all(a > b for a, b in zip(lrs[4:], lrs[5:], strict=False))
    assert schedule.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)


def test_warmup_as_long_as_the_run_is_said():
    assert warmup_warning(100, 101) is None
    message = warmup_warning(100, 60)
    assert message.startswith("warning: warmup_steps 100 is not below the run's 60 optimizer steps")
    assert "lower --warmup-steps" in message


def test_stop_reasons_agree_in_priority_order():
    assert first_request([None, "time_limit", "SIGINT"]) == "SIGINT"
    assert first_request(["SIGINT", "SIGTERM"]) == "SIGTERM"
    assert first_request([None, None]) is None


@pytest.mark.slow
def test_a_non_finite_loss_is_skipped_on_the_device_and_stops_the_run_before_any_save(tmp_path):
    """The 3rd step's loss is made NaN: the fused optimizer skips that update on the device (the weights stay
    finite), the sync point before the next checkpoint names the step, and only the checkpoints of steps 1 and 2
    exist, with finite weights."""
    from safetensors.torch import load_file

    from toolkit.stopping import NonFiniteLoss

    with tiny_trainer(tmp_path, checkpoint_every_steps=1, log_every_steps=50, keep_last=5) as trainer:
        real = trainer.forward_backward

        def poisoned(images, labels, weight=1.0):
            loss = real(images, labels, weight)
            return loss * float("nan") if trainer.progress.step == 2 else loss

        trainer.forward_backward = poisoned
        with pytest.raises(NonFiniteLoss, match=r"^loss is not finite at step 3 \(rank 0\)"):
            trainer.train()
        assert all(torch.isfinite(p).all() for p in trainer.net.network.parameters())
    saved = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))
    assert [p.name for p in saved] == ["step-00000001", "step-00000002"]
    for folder in saved:
        assert all(torch.isfinite(t).all() for t in load_file(folder / "model.safetensors").values())


@pytest.mark.slow
def test_a_signal_at_an_epochs_last_step_saves_and_says_how_to_resume(tmp_path, capsys):
    """SIGTERM arriving during the epoch's last step: the run saves at that step, says where to resume (the line
    used to be missing there) and exits 143."""
    import signal

    from toolkit.stopping import Signals

    signals = Signals()
    try:
        with tiny_trainer(tmp_path, train_samples=64) as trainer:  # 2 steps an epoch
            trainer.report.console = type(trainer.report.console)(enabled=True)
            trainer.stops.signals = signals
            real = trainer.forward_backward

            def signalled(images, labels, weight=1.0):
                if trainer.progress.step == 1:
                    signals.signum = signal.SIGTERM  # what the handler sets
                return real(images, labels, weight)

            trainer.forward_backward = signalled
            assert trainer.train() == 143
    finally:
        signals.close()
    out = capsys.readouterr().out
    assert f"stopped at step 2; resume with --resume auto --output-dir {tmp_path / 'run'}" in out
    assert (tmp_path / "run" / "checkpoints" / "step-00000002" / "COMPLETE").is_file()


@pytest.mark.slow
def test_compile_resumes_an_eager_checkpoint_and_back_with_plain_weight_names(tmp_path, monkeypatch):
    """`compile: true` wraps the model in torch.compile; checkpoints hold the module's own names (no
    "_orig_mod." prefix), so a compiled run resumes an eager checkpoint and an eager run a compiled one. Dynamo's
    "eager" backend stands in for inductor here: the same wrapping, without minutes of C++ code generation."""
    import functools

    from safetensors.torch import load_file

    from toolkit.model import AlexNet

    folder = tmp_path / "run"
    steps = {"checkpoint_every_steps": 1, "output_dir": str(folder)}
    with tiny_trainer(tmp_path, max_steps=2, **steps) as eager:
        assert eager.train() == 0
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    with tiny_trainer(tmp_path, max_steps=3, compile=True, resume="auto", **steps) as compiled:
        assert type(compiled.net.model).__name__ == "OptimizedModule" and compiled.progress.step == 2
        assert compiled.train() == 0
    saved = load_file(folder / "checkpoints" / "step-00000003" / "model.safetensors")
    assert set(saved) == set(AlexNet().state_dict())
    monkeypatch.undo()
    with tiny_trainer(tmp_path, max_steps=4, resume="auto", **steps) as back:
        assert back.progress.step == 3 and back.train() == 0
    assert (folder / "checkpoints" / "step-00000004" / "COMPLETE").is_file()


def test_compile_modes_reach_torch_compile(tmp_path, monkeypatch):
    """`compile_mode: reduce-overhead` (CUDA graphs on a GPU) is torch.compile's own mode; dynamo's eager backend
    stands in for inductor on the CPU, and a step runs through the compiled model."""
    modes, real = [], torch.compile

    def compile_eagerly(model, mode=None, **kwargs):
        modes.append(mode)
        return real(model, backend="eager", **kwargs)

    monkeypatch.setattr(torch, "compile", compile_eagerly)
    with tiny_trainer(tmp_path, compile=True, compile_mode="reduce-overhead", train_samples=64) as trainer:
        assert type(trainer.net.model).__name__ == "OptimizedModule"
        trainer.train_steps(1)
        assert trainer.progress.step == 1
    assert modes == ["reduce-overhead"]


def test_the_global_batch_is_the_one_the_data_allows(tmp_path):
    """A batch size beyond a process's share of the data takes all of it: the header and metrics.jsonl say the
    batch a step really has (256 here, not 1000), and so does accumulation beyond an epoch's batches."""
    with tiny_trainer(tmp_path / "big", batch_size=1000) as trainer:
        assert (trainer.parts.images_per_step, trainer.parts.global_batch_size) == (256, 256)
    with tiny_trainer(tmp_path / "accumulated", batch_size=64, grad_accum_steps=1000) as trainer:
        assert trainer.parts.global_batch_size == 256  # 4 batches an epoch, all in one step


def test_a_profile_outside_the_run_is_said_before_it_starts():
    from toolkit.train import profile_warning

    assert profile_warning(TrainConfig(profile_steps="100:200", max_steps=2), 0, 10).startswith(
        "warning: profile_steps 100:200 lies outside the steps this run takes (1 to 2): nothing will be recorded")
    assert "steps 1 to 2 will be recorded" in profile_warning(TrainConfig(profile_steps="1:3", max_steps=2), 0, 10)
    assert profile_warning(TrainConfig(profile_steps="2:3"), 0, 10) is None
    assert profile_warning(TrainConfig(profile_steps="2:3"), 5, 10).startswith("warning: ")  # resumed past them


def test_a_non_finite_loss_before_any_checkpoint_says_none_was_saved(tmp_path):
    from toolkit.stopping import NonFiniteLoss

    with tiny_trainer(tmp_path, log_every_steps=1, max_steps=3) as trainer:
        real = trainer.forward_backward
        trainer.forward_backward = lambda images, labels, weight=1.0: real(images, labels, weight) * float("nan")
        with pytest.raises(NonFiniteLoss) as raised:
            trainer.train()
    assert str(raised.value).startswith("loss is not finite at step 1 (rank 0)")
    assert "no checkpoint had been saved" in str(raised.value) and "holds finite weights" not in str(raised.value)


def test_a_held_out_slice_is_described_as_it_is_evaluated(tmp_path):
    with tiny_trainer(tmp_path, validation_samples=500, eval_samples=128) as trainer:
        assert trainer.data.description == "the first 128 of the last 500 training images (held out)"
        assert trainer.data.eval.total == 128
    with tiny_trainer(tmp_path / "all", validation_samples=500, eval_samples=0) as trainer:
        assert trainer.data.description == "the last 500 training images (held out)"
