"""The training loop both stages share (``training.vq``, ``training.distill``).

A stage gives the loop a :class:`Stage`: its model and optimizer, one optimisation step, validation, its own
checkpoint entries and its export. The loop owns everything else:

- set-up: threads, device, run folder, seed; the data split and stream (:func:`load_data`);
- resume (``--resume auto``): ``OUT/checkpoint.pt`` restores the stage, the optimizer (this invocation's group
  settings kept), the data stream, the RNGs and the step count;
- the learning rate: warmup, then cosine by steps or by this invocation's wall time (:class:`Schedule`);
- stop conditions: ``--steps`` done, ``--stop-after``, ``--max-minutes`` of this invocation, SIGTERM/SIGINT;
- every ``--ckpt-minutes`` and when it stops: validation, a ``metrics.jsonl`` record, ``checkpoint.pt``,
  ``provenance.json`` (one session per invocation, so steps and wall time add up over resumes), the export;
- errors: :func:`train` raises; :func:`run_main`, called by each stage's ``main()``, is the one place that turns a
  :class:`TrainingError` into a message and an exit code.

Exit codes of ``python -m training.vq`` / ``training.distill``: 0 when training finished or stopped cleanly
(checkpoint and export written, whichever stop condition); 2 when the command line does not fit (argparse's usage
errors, a :class:`TrainingError` such as :class:`IncompatibleRun`: nothing is trained); 1 for anything unexpected
(Python's traceback).
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .common import (Progress, Provenance, apply_threads, atomic_torch_save, load_checkpoint, load_optimizer_state,
                     pick_device, rng_state, seed_everything, set_lr, set_rng_state)
from .data import TrainImages, load_val_images, prepare_split

CHECKPOINT = "checkpoint.pt"


class TrainingError(Exception):
    """Training cannot start as asked; nothing was trained. ``main()`` prints it and exits with ``exit_code``."""

    exit_code = 2


class IncompatibleRun(TrainingError):
    """The run folder's checkpoint (or ``--init``'s weights) was made with settings this command contradicts."""


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class Stage:
    """What a training stage gives the loop. A stage is built by ``build(args, device, state, log)`` where
    ``state`` is the checkpoint being resumed (``None``: a fresh run, which may start from ``--init``); the builder
    raises :class:`IncompatibleRun` when ``state["args"]`` contradicts ``args``."""

    name: str  # provenance stage and module: ``python -m training.<name>``
    model: nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device
    image_size: int  # validation images and the pixel scale of the crops
    crop_size: int  # training crops
    base_folder: str | None = None  # provenance: the frozen base's folder
    init_folder: str | None = None  # provenance: the exported weights a fresh run folder starts from (--init)

    def description(self) -> str:
        """The start of the opening log line (the loop adds data, device, precision, threads)."""
        raise NotImplementedError

    def provenance(self) -> dict[str, Any]:
        """Fields of this session's provenance record (config, parameters, ...)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """The stage's checkpoint entries (the loop adds optimizer, data, rng, step, args)."""
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def start(self) -> None:
        """Before the first step: training mode."""
        self.model.train()

    def next_batch(self, stream: TrainImages, step: int, progress: float) -> Tensor:
        return stream.next_batch().to(self.device)

    def train_step(self, step: int, pixels: Tensor) -> dict[str, float]:
        """One optimisation step at global ``step`` (counting from 0) on ``pixels``: the logged loss parts."""
        raise NotImplementedError

    def record(self) -> dict[str, Any]:
        """Extra fields of each metrics.jsonl record, before the smoothed losses."""
        return {}

    def validate(self, val: Tensor, quick: bool) -> dict[str, Any]:
        """Validation metrics (``val_*``); ``quick`` at intermediate checkpoints."""
        raise NotImplementedError

    def validation_message(self, metrics: dict[str, Any]) -> str:
        return " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in metrics.items() if k.startswith("val"))

    def export(self, out: Path) -> None:
        """Write the exported model(s) under ``out`` (after provenance.json is up to date)."""
        raise NotImplementedError


BuildStage = Callable[[argparse.Namespace, torch.device, "dict | None", Callable[[str], None]], Stage]


@dataclass
class Data:
    stream: TrainImages
    val: Tensor | None
    record: dict[str, Any]  # provenance's "data"
    train_count: int
    val_count: int


def load_data(args: argparse.Namespace, out: Path, stage: Stage, log: Callable[[str], None]) -> Data:
    """The split (``OUT/split.json``), the training stream of ``stage.crop_size`` crops and the validation images."""
    if not 0.0 <= args.grey_fraction <= 1.0:
        raise TrainingError(f"--grey-fraction is a fraction of training crops, in [0, 1]; got {args.grey_fraction}")
    try:
        train_names, val_names, record = prepare_split(args.data, out, args.val_fraction)
    except (FileNotFoundError, ValueError) as error:  # no such folder, no images in it
        raise TrainingError(f"--data {args.data}: {error}") from error
    stream = TrainImages(args.data, train_names, stage.crop_size, stage.image_size, args.batch_size, args.min_scale,
                         args.seed, args.cache_side, args.max_cache, args.workers, log=log,
                         grey_fraction=args.grey_fraction)
    val = load_val_images(args.data, val_names, stage.image_size, args.val_images) if val_names else None
    return Data(stream, val, record, len(train_names), len(val_names))


def train(args: argparse.Namespace, build: BuildStage) -> dict[str, Any]:
    """Train the stage ``build`` makes, as the command line ``args`` asks: ``{"step", "stopped", "metrics"}``."""
    apply_threads(args.threads)
    device = pick_device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(args.seed)
    log = Progress(total=args.steps, initial=0, disable=True).log  # before the bar exists
    state = load_checkpoint(out / CHECKPOINT) if args.resume == "auto" else None
    stage = build(args, device, state, log)
    data = load_data(args, out, stage, log)
    return Loop(args, stage, data, state, log).run()


class Loop:
    """One invocation of a stage's training: resume, steps until a stop condition, periodic and final checkpoints."""

    def __init__(self, args: argparse.Namespace, stage: Stage, data: Data, state: dict | None,
                 log: Callable[[str], None]):
        self.args, self.stage, self.data = args, stage, data
        self.out = Path(args.out)
        self.step = 0
        if state is not None:
            stage.load_state_dict(state)
            load_optimizer_state(stage.optimizer, state["optimizer"])
            data.stream.load_state_dict(state["data"])
            set_rng_state(state["rng"])
            self.step = state["step"]
            log(f"resumed from {self.out / CHECKPOINT} at step {self.step}")
        self.provenance = Provenance(self.out, stage.name, args, data.record, inherit=stage.init_folder,
                                     base=stage.base_folder)
        self.provenance.update(start_step=self.step, **stage.provenance())
        self.schedule = Schedule(args, self.step)
        self.bar = Progress(total=args.steps, initial=self.step, disable=args.no_progress, log_every=args.log_every)
        self.bar.log(f"{stage.description()} {data.train_count} train / {data.val_count} val images, device "
                     f"{stage.device}, precision {args.precision}, threads {torch.get_num_threads()}")
        self.t_start, self.start_images = time.time(), data.stream.images_seen
        self.metrics_file = None

    def run(self) -> dict[str, Any]:
        """Steps until a stop condition, then the final checkpoint and export."""
        stop_flag = StopFlag()
        clock = RunClock(self.args, stop_flag, self.t_start)
        try:
            with (self.out / "metrics.jsonl").open("a") as self.metrics_file:
                self.stage.start()
                stopped = self._steps(clock)
                self.checkpoint(final=True)
        finally:
            stop_flag.restore()
            self.bar.close()
        self.bar.log(f"stopped ({stopped}) at step {self.step}; export in {self.out / 'export'}")
        return {"step": self.step, "stopped": stopped, "metrics": self.bar.smoothed}

    def _steps(self, clock: RunClock) -> str:
        """Train until a stop condition; its name (``steps``, ``stop-after``, ``time``, ``signal``)."""
        args, stage, val = self.args, self.stage, self.data.val
        while self.step < args.steps:
            if args.stop_after is not None and self.step >= args.stop_after:
                return "stop-after"
            pixels = stage.next_batch(self.data.stream, self.step, self.schedule.progress(self.step))
            set_lr(stage.optimizer, self.schedule.lr(self.step))
            parts = stage.train_step(self.step, pixels)
            self.step += 1
            self.bar.update(self.step, pixels.shape[0], parts)
            if args.eval_every and self.step % args.eval_every == 0 and val is not None:
                self.bar.log(f"step {self.step}: " + json.dumps(stage.validate(val, quick=False)))
            if (reason := clock.after_step(self.checkpoint)) is not None:
                return reason
        return "steps"

    def checkpoint(self, final: bool = False) -> None:
        """Validate, append to metrics.jsonl, write checkpoint.pt and provenance.json, export."""
        stage, stream = self.stage, self.data.stream
        record = {"step": self.step, "time": utc_now(), "images_seen": stream.images_seen,
                  "lr": stage.optimizer.param_groups[0]["lr"], **stage.record(), **self.bar.smoothed}
        if self.data.val is not None:
            record.update(stage.validate(self.data.val, quick=not final))
            self.bar.log(f"step {self.step}: {stage.validation_message(record)}")
        self.metrics_file.write(json.dumps(record) + "\n")
        self.metrics_file.flush()
        atomic_torch_save({**stage.state_dict(), "optimizer": stage.optimizer.state_dict(),
                           "data": stream.state_dict(), "rng": rng_state(), "step": self.step,
                           "args": vars(self.args)}, self.out / CHECKPOINT)
        self.provenance.update(end_step=self.step, wall_seconds=round(time.time() - self.t_start, 1),
                               images_seen=stream.images_seen - self.start_images, last_metrics=record, final=final,
                               ended_utc=utc_now())
        stage.export(self.out)


def run_main(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str] | None,
             train_stage: Callable[[argparse.Namespace], dict]) -> dict:
    """A stage's ``main()``: ``train_stage(args)``, a :class:`TrainingError` printed as ``PROG: error: ...`` and
    exit code ``error.exit_code``. ``argv`` (``None``: ``sys.argv[1:]``) is kept for the provenance record."""
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    try:
        return train_stage(args)
    except TrainingError as error:
        parser.exit(error.exit_code, f"{parser.prog}: error: {error}\n")


# ---- clock, schedule, stop conditions -------------------------------------------------------------------------
class Schedule:
    """Training progress in [0, 1]: by steps (``--schedule steps``: step / --steps) or by wall time
    (``--schedule time``: elapsed / --max-minutes of this invocation, so a run sized by time still completes its
    LR decay; a resumed invocation starts a new cosine cycle from its own --lr)."""

    def __init__(self, args: argparse.Namespace, start_step: int):
        self.args, self.start_step, self.t0 = args, start_step, time.time()
        self.by_time = args.schedule == "time" and args.max_minutes

    def progress(self, step: int) -> float:
        if self.by_time:
            return min(1.0, (time.time() - self.t0) / (60 * self.args.max_minutes))
        return min(1.0, step / max(1, self.args.steps))

    def lr(self, step: int) -> float:
        return lr_at(step, self.progress(step), self.args)


def lr_at(step: int, progress: float, args: argparse.Namespace) -> float:
    """Linear warmup over the first --warmup steps (of the whole training), then cosine to lr * min_lr_frac."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


class RunClock:
    """After each step: checkpoint every ``--ckpt-minutes``; say why to stop (``--max-minutes`` or a signal)."""

    def __init__(self, args: argparse.Namespace, stop_flag: StopFlag, start: float):
        self.args, self.stop_flag = args, stop_flag
        self.start = self.last_checkpoint = start

    def after_step(self, checkpoint: Callable[[], None]) -> str | None:
        if time.time() - self.last_checkpoint >= 60 * self.args.ckpt_minutes:
            checkpoint()
            self.last_checkpoint = time.time()
        if self.args.max_minutes and time.time() - self.start >= 60 * self.args.max_minutes:
            return "time"
        if self.stop_flag.requested:
            return "signal"
        return None


class StopFlag:
    """Set by SIGTERM / SIGINT: the training loop then checkpoints, exports and exits at the end of its step."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. some test runners): no handler
                pass

    def _handle(self, signum, frame) -> None:
        if self.requested:  # second signal: give up at once
            raise KeyboardInterrupt
        self.requested = True

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
