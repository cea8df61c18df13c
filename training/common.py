"""Shared training pieces: seeding, precision, common flags, optimizer helpers, checkpoint files (atomic), RNG
state, provenance, progress. The loop both stages run is ``training.loop``."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import random
import socket
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adaptive_tokenizer.io_utils import write_atomic


# ---- setup ---------------------------------------------------------------------------------------------------

REPO_ROOT = Path(__file__).resolve().parents[1]


def repo_relative(path: str | os.PathLike) -> str:
    """``path`` as recorded in provenance files: relative to the repository root (``../shared/corpus/photos``), so
    that no machine's absolute paths are recorded or shipped."""
    return os.path.relpath(Path(path).resolve(), REPO_ROOT)

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(name: str | None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(device: torch.device, precision: str):
    """bf16 autocast on CPU; bf16 (or fp16 with a GradScaler) autocast on CUDA; ``fp32``: none."""
    if precision == "fp32":
        return nullcontext()
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype)


def make_scaler(device: torch.device, precision: str):
    """A GradScaler for fp16 on CUDA, else a disabled one (bf16 needs no loss scaling)."""
    return torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and precision == "fp16")


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="image folder (searched recursively)")
    parser.add_argument("--out", required=True, help="run folder: checkpoint, export/, provenance.json, val split")
    parser.add_argument("--steps", type=int, default=20000, help="total optimisation steps (defines the LR schedule)")
    parser.add_argument("--schedule", choices=["steps", "time"], default="steps",
                        help="LR schedule / phase progress by step count or by wall time (--max-minutes)")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="stop cleanly (checkpoint + export) after this much wall time in this invocation")
    parser.add_argument("--stop-after", type=int, default=None,
                        help="stop (checkpoint + export) after this global step, as if interrupted; the schedule "
                             "still follows --steps")
    parser.add_argument("--ckpt-minutes", type=float, default=5.0, help="checkpoint + export every N minutes")
    parser.add_argument("--eval-every", type=int, default=0, help="validate every N steps (0: at checkpoints only)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--min-lr-frac", type=float, default=0.1, help="cosine decay to lr * this at --steps")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--grad-clip", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    parser.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default="bf16",
                        help="autocast dtype (fp16 only on CUDA, with loss scaling)")
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--val-images", type=int, default=0, help="validate on at most N held-out images (0: all)")
    parser.add_argument("--cache-side", type=int, default=192, help="decoded images are cached at this short side")
    parser.add_argument("--max-cache", type=int, default=20000,
                        help="cache decoded images in RAM when the training set has at most this many files")
    parser.add_argument("--workers", type=int, default=0, help="loader processes when not cached")
    parser.add_argument("--grey-fraction", type=float, default=0.0,
                        help="make this fraction of training crops greyscale (the corpus has 2%% greyscale photos)")
    parser.add_argument("--min-scale", type=float, default=0.6,
                        help="random-scale crops cover this..1 of the short side (at model scale)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bar (log lines only)")
    parser.add_argument("--log-every", type=int, default=50, help="log line every N steps")
    parser.add_argument("--resume", choices=["auto", "no"], default="auto",
                        help="auto: continue from OUT/checkpoint.pt when it exists")


# ---- argument types -------------------------------------------------------------------------------------------
def iteration_weights(text: str) -> tuple[float, ...]:
    """``"2.5,2,1.5"`` -> ``(2.5, 2.0, 1.5)``: positive per-iteration loss weights."""
    try:
        weights = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 2.5,2,1.5, got {text!r}")
    if not all(w > 0 for w in weights):
        raise argparse.ArgumentTypeError(f"iteration weights must be positive, got {text!r}")
    return weights


def loss_weight(text: str) -> float:
    """A loss weight: a number >= 0."""
    try:
        weight = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    if not weight >= 0:
        raise argparse.ArgumentTypeError(f"a loss weight must be >= 0, got {text!r}")
    return weight


def apply_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:
            pass


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Restore a checkpoint's optimizer moments and step counts, keeping this invocation's group settings
    (weight decay, ``lr_scale``): ``Optimizer.load_state_dict`` would otherwise bring back the flags the checkpoint
    was trained with, so a resumed run would silently ignore e.g. a new ``--base-decoder-lr-scale``."""
    settings = [{key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, own in zip(optimizer.param_groups, settings):
        group.update(own)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler, params: list[torch.Tensor],
                   grad_clip: float) -> None:
    """Backward (through the GradScaler when fp16 on CUDA), clip the gradient norm of ``params``, step."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    scaler.step(optimizer)
    scaler.update()


# ---- checkpoints ---------------------------------------------------------------------------------------------
def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` that leaves either the old file or the complete new one (checkpoints are ours: trusted)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, buffer.getvalue())


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, text.encode())


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    # our own file (written by atomic_torch_save); it holds RNG states (numpy arrays, tuples), so not weights_only
    return torch.load(path, map_location="cpu", weights_only=False)


# ---- provenance ------------------------------------------------------------------------------------------------
def machine_description() -> dict[str, Any]:
    info = {"hostname": socket.gethostname(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "cpu_count": os.cpu_count(), "threads": torch.get_num_threads()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    return info


class Provenance:
    """``provenance.json`` in the run folder: what data, which split, how long, on what, with which command.

    One record per invocation (``sessions``), so a model continued across sessions keeps its whole history: a
    fresh run folder started from exported weights (``inherit``: their folder) takes over the sessions recorded in
    their ``training_provenance.json``. ``base``: the frozen base's folder, whose record is kept as ``base``.
    """

    def __init__(self, out: Path, stage: str, args: argparse.Namespace, data_record: dict[str, Any],
                 inherit: str | Path | None = None, base: str | Path | None = None):
        self.path = out / "provenance.json"
        previous = json.loads(self.path.read_text()) if self.path.is_file() else read_provenance(inherit, stage)
        self.record = previous if previous.get("stage") == stage else {"stage": stage, "sessions": []}
        if base_record := read_provenance(base, "vq"):
            self.record["base"] = base_record
        self.record["data"] = data_record
        self.session = {"command": ["python", "-m", f"training.{stage}", *getattr(args, "argv", sys.argv[1:])],
                        "args": {k: v for k, v in vars(args).items() if k != "argv"},
                        "seed": args.seed, "machine": machine_description(),
                        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self.record["sessions"].append(self.session)

    def update(self, **fields: Any) -> None:
        self.session.update(fields)
        # a fresh run folder started from exported weights counts its steps from 0 again: sum each session's own
        totals = {"steps": sum(s.get("end_step", 0) - s.get("start_step", 0) for s in self.record["sessions"]),
                  "wall_seconds": round(sum(s.get("wall_seconds", 0) for s in self.record["sessions"]), 1),
                  "images_seen": sum(s.get("images_seen", 0) for s in self.record["sessions"])}
        self.record["totals"] = totals
        atomic_write_text(self.path, json.dumps(self.record, indent=2, default=str) + "\n")


def read_provenance(folder: str | Path | None, stage: str) -> dict[str, Any]:
    """The record of training ``stage`` in an exported folder's ``training_provenance.json``: the file itself or,
    for the base stage ("vq") of an ALIT model, its ``base`` entry. ``{}`` when there is none."""
    path = Path(folder) / "training_provenance.json" if folder is not None else None
    record = json.loads(path.read_text()) if path is not None and path.is_file() else {}
    if record.get("stage") != stage:
        record = record.get("base", {})
    return record if record.get("stage") == stage else {}


def file_list_hash(names: list[str]) -> str:
    return hashlib.sha256("\n".join(names).encode()).hexdigest()


# ---- progress --------------------------------------------------------------------------------------------------
class Progress:
    """tqdm bar with loss and images/s (plain log lines every ``log_every`` steps when there is no TTY)."""

    def __init__(self, total: int, initial: int, disable: bool, log_every: int = 50):
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=initial, dynamic_ncols=True, disable=disable, mininterval=5.0,
                        file=sys.stderr)
        self.log_every = log_every
        self.t0 = time.time()
        self.window_start, self.window_images = time.time(), 0
        self.rate = 0.0
        self.smoothed: dict[str, float] = {}

    def update(self, step: int, images: int, metrics: dict[str, float]) -> None:
        self.window_images += images
        now = time.time()
        if now - self.window_start >= 10.0:
            self.rate = self.window_images / (now - self.window_start)
            self.window_start, self.window_images = now, 0
        for k, v in metrics.items():
            self.smoothed[k] = v if k not in self.smoothed else 0.95 * self.smoothed[k] + 0.05 * v
        self.bar.update(1)
        self.bar.set_postfix({**{k: f"{v:.4f}" for k, v in self.smoothed.items()}, "img/s": f"{self.rate:.1f}"},
                             refresh=False)
        if step % self.log_every == 0:
            self.log(f"step {step} " + " ".join(f"{k}={v:.4f}" for k, v in self.smoothed.items())
                     + f" img/s={self.rate:.1f} elapsed={now - self.t0:.0f}s")

    def log(self, message: str) -> None:
        self.bar.write(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stdout)
        sys.stdout.flush()

    def close(self) -> None:
        self.bar.close()
