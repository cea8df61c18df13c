"""The loop both training stages share (``training/loop.py``), as a specification, on a toy stage (a linear layer
on the mean colour of tiny images): resume continues the step count, the schedule and the clock; each stop condition
stops with a checkpoint and an export; ``train()`` raises and only ``main()`` turns errors into exit codes."""

from __future__ import annotations

import argparse
import json
import os
import signal

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from training import loop
from training.common import add_common_args


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("toy_images")
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


class ToyStage(loop.Stage):
    """``--width`` outputs from the mean colour; resuming with another ``--width`` is refused. ``on_step(step)``:
    called inside each step (a test's hook); ``seen``: (step, lr) of each step of this invocation."""

    name = "toy"
    on_step = None

    def __init__(self, args, device, state, log):
        if state is not None and state["args"]["width"] != args.width:
            raise loop.IncompatibleRun(f"trained with --width {state['args']['width']}")
        self.args, self.device = args, device
        self.image_size = self.crop_size = 16
        self.model = nn.Linear(3, args.width)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=args.lr)
        self.seen = []
        ToyStage.last = self

    def description(self):
        return "toy,"

    def state_dict(self):
        return {"model": self.model.state_dict()}

    def load_state_dict(self, state):
        self.model.load_state_dict(state["model"])

    def train_step(self, step, pixels):
        self.seen.append((step, self.optimizer.param_groups[0]["lr"]))
        loss = (self.model(pixels.mean((2, 3))) - 1).pow(2).mean()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        if ToyStage.on_step is not None:
            ToyStage.on_step(step)
        return {"loss": loss.item()}

    def validate(self, val, quick):
        with torch.no_grad():
            return {"val_loss": (self.model(val.mean((2, 3))) - 1).pow(2).mean().item(), "val_quick": quick}

    def export(self, out):
        (out / "export").mkdir(exist_ok=True)
        torch.save(self.model.state_dict(), out / "export" / "toy.pt")


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.toy")
    add_common_args(parser)
    parser.add_argument("--width", type=int, default=2)
    return parser


def main(argv):
    """A stage's ``main()``: parse, then :func:`loop.run_main`."""
    toy = parser()
    return loop.run_main(toy, toy.parse_args(argv), argv, lambda args: loop.train(args, ToyStage))


def argv(images, out, *extra):
    return ["--data", str(images), "--out", str(out), "--steps", "6", "--warmup", "2", "--lr", "0.1",
            "--batch-size", "2", "--val-fraction", "0.25", "--no-progress", "--cache-side", "20", "--seed", "1",
            *extra]


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_resume_continues_steps_schedule_and_clock(images, tmp_path):
    first = main(argv(images, tmp_path / "a", "--stop-after", "3"))
    assert (first["step"], first["stopped"]) == (3, "stop-after")
    resumed = main(argv(images, tmp_path / "a"))
    steps_after_resume = ToyStage.last.seen
    whole = main(argv(images, tmp_path / "b"))
    assert (resumed["step"], resumed["stopped"]) == (whole["step"], whole["stopped"]) == (6, "steps")
    # the step count continues: the second invocation trains steps 3..5, at the learning rates of an uninterrupted
    # run (warmup then cosine by step), on the same batches: the same weights
    assert steps_after_resume == ToyStage.last.seen[3:]
    a, b = (torch.load(tmp_path / run / loop.CHECKPOINT, weights_only=False) for run in "ab")
    assert a["step"] == b["step"] == 6
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=0)
    # the clock continues: one provenance session per invocation, the totals add up
    record = json.loads((tmp_path / "a" / "provenance.json").read_text())
    sessions = record["sessions"]
    assert [(s["start_step"], s["end_step"]) for s in sessions] == [(0, 3), (3, 6)]
    assert record["totals"]["steps"] == 6 and record["totals"]["images_seen"] == 12
    assert record["totals"]["wall_seconds"] == round(sum(s["wall_seconds"] for s in sessions), 1)
    # a metrics.jsonl record at each stop, the images seen counted across invocations, full validation at the end
    assert [(m["step"], m["images_seen"], m["val_quick"]) for m in metrics(tmp_path / "a")] == [(3, 6, False),
                                                                                                (6, 12, False)]
    assert set(metrics(tmp_path / "a")[0]) == {"step", "time", "images_seen", "lr", "loss", "val_loss", "val_quick"}
    assert (tmp_path / "a" / "export" / "toy.pt").is_file()
    # --resume no starts again from step 0 in the same folder
    assert main(argv(images, tmp_path / "a", "--resume", "no", "--stop-after", "1"))["step"] == 1


def test_stop_conditions(images, tmp_path):
    # --max-minutes: wall time of this invocation, checked after each step
    summary = main(argv(images, tmp_path / "time", "--max-minutes", "1e-9"))
    assert (summary["step"], summary["stopped"]) == (1, "time")
    assert torch.load(tmp_path / "time" / loop.CHECKPOINT, weights_only=False)["step"] == 1
    # --ckpt-minutes 0: a (quick) checkpoint after every step, then the final one
    main(argv(images, tmp_path / "often", "--ckpt-minutes", "0", "--steps", "2"))
    assert [(m["step"], m["val_quick"]) for m in metrics(tmp_path / "often")] == [(1, True), (2, True), (2, False)]

    # SIGTERM (or SIGINT): the step finishes, then checkpoint, export, return; the previous handler comes back
    def terminate(step):
        assert isinstance(getattr(signal.getsignal(signal.SIGTERM), "__self__", None), loop.StopFlag)
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.getsignal(signal.SIGTERM)
    ToyStage.on_step = terminate
    try:
        summary = main(argv(images, tmp_path / "signal"))
    finally:
        ToyStage.on_step = None
    assert (summary["step"], summary["stopped"]) == (2, "signal")
    assert signal.getsignal(signal.SIGTERM) is previous
    assert (tmp_path / "signal" / "export" / "toy.pt").is_file()
    # --stop-after a step already reached: no step, the checkpoint and export are written again
    assert main(argv(images, tmp_path / "signal", "--stop-after", "1"))["stopped"] == "stop-after"


def test_errors_raise_from_train_and_become_exit_codes_in_main(images, tmp_path, capsys):
    main(argv(images, tmp_path / "run", "--stop-after", "1"))
    before = (tmp_path / "run" / loop.CHECKPOINT).read_bytes()
    # train() raises the stage's refusal ...
    args = parser().parse_args(argv(images, tmp_path / "run", "--width", "3"))
    with pytest.raises(loop.IncompatibleRun, match="--width 2"):
        loop.train(args, ToyStage)
    # ... main() prints it and exits with 2, nothing written
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main(argv(images, tmp_path / "run", "--width", "3"))
    assert exited.value.code == 2
    assert capsys.readouterr().err == "python -m training.toy: error: trained with --width 2\n"
    assert (tmp_path / "run" / loop.CHECKPOINT).read_bytes() == before
    # a data folder without images is a TrainingError too
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exited:
        main(argv(tmp_path / "empty", tmp_path / "other"))
    assert exited.value.code == 2 and "--data" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:  # and a fraction outside [0, 1]
        main(argv(images, tmp_path / "third", "--grey-fraction", "1.5"))
    assert exited.value.code == 2 and "--grey-fraction is a fraction of training crops" in capsys.readouterr().err

    # anything unexpected is not a clean stop: it propagates out of main() (Python's exit code 1), the signal
    # handlers are restored, no checkpoint is written over the last good one
    def fail(step):
        raise RuntimeError("boom")

    previous = signal.getsignal(signal.SIGTERM)
    ToyStage.on_step = fail
    try:
        with pytest.raises(RuntimeError, match="boom"):
            main(argv(images, tmp_path / "run"))
    finally:
        ToyStage.on_step = None
    assert signal.getsignal(signal.SIGTERM) is previous
    assert (tmp_path / "run" / loop.CHECKPOINT).read_bytes() == before


def test_learning_rate_schedule():
    args = argparse.Namespace(lr=1.0, warmup=2, min_lr_frac=0.1, steps=10, schedule="steps", max_minutes=None)
    schedule = loop.Schedule(args, start_step=0)
    assert [schedule.lr(step) for step in (0, 1)] == [0.5, 1.0]  # linear warmup
    assert schedule.lr(5) == pytest.approx(0.55) and schedule.lr(10) == pytest.approx(0.1)  # cosine to lr * 0.1
    args.schedule, args.max_minutes = "time", 1e-9  # by this invocation's wall time: done at once
    assert loop.Schedule(args, start_step=4).lr(4) == pytest.approx(0.1)
