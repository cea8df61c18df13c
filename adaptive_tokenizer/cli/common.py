"""What the commands share: the one-line user error, argument types and options, image lists, model loading."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import torch

from ..image_io import list_image_files
from ..tokenizer import AdaptiveTokenizer

PROG = "adaptive-tokenizer"
USER_ERROR = 2
MODEL_HELP = ("a model name (see `adaptive-tokenizer models`), a Hub repo id org/name[@revision], or a directory "
              "holding config.json + model.safetensors")


class Command(NamedTuple):
    name: str
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]  # adds the command's options to its parser
    run: Callable[[argparse.Namespace], int]  # the command itself; returns the exit status


COMMANDS: list[Command] = []  # in the order the command modules register them


def command(name: str, help: str, arguments: Callable[[argparse.ArgumentParser], None]):
    """Register the decorated function as the command ``name`` (``help``: its line in ``--help``; ``arguments``:
    adds its options)."""

    def register(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS.append(Command(name, help, arguments, run))
        return run

    return register


class UsageError(Exception):
    """A mistake of the user's (bad argument, missing or malformed file): reported in one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises :class:`UsageError` (one line, no usage dump) instead of exiting."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def positive_int(text: str) -> int:
    """argparse type for sizes such as ``--batch-size``."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", metavar="MODEL", help=MODEL_HELP + " (default: the embedded default model)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--dtype", default=None, metavar="DTYPE",
                        help="float32 (default), bfloat16, or float16 (CUDA only)")


def collect_images(inputs: Sequence[str]) -> list[str]:
    """Image files given directly, plus the image files inside each folder given (sorted by name)."""
    paths: list[str] = []
    for item in inputs:
        if os.path.isdir(item):
            found = list_image_files(item)
            if not found:
                raise UsageError(f"no image files in folder {item}")
            paths += [str(p) for p in found]
        elif os.path.isfile(item):
            paths.append(item)
        else:
            raise FileNotFoundError(f"no such image file or folder: {item}")
    return paths


def load_tokenizer(args: argparse.Namespace) -> AdaptiveTokenizer:
    """The model of ``--model`` (anything ``from_pretrained`` takes) on ``--device`` in ``--dtype``."""
    return AdaptiveTokenizer.from_pretrained(args.model, device=parse_device(args.device), dtype=args.dtype)


def model_label(args: argparse.Namespace) -> str:
    """How messages name the model of ``--model``."""
    return args.model if args.model is not None else "the embedded default model"


def parse_device(name: str) -> torch.device:
    """``--device`` value -> torch device, refusing backends this machine lacks."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"invalid device {name!r} (e.g. cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {name!r} requested but CUDA is not available")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"device {name!r} requested but MPS is not available")
    return device


def output_names(sources: Sequence[str], suffix: str = ".png") -> list[str]:
    """One file name per source, ``<stem><suffix>``; repeated stems get ``_1``, ``_2``, ... appended."""
    names, taken = [], set()
    for index, source in enumerate(sources):
        stem = Path(source).stem
        stem = stem if stem not in ("", ".", "..") else f"image_{index}"
        name, count = f"{stem}{suffix}", 0
        while name.casefold() in taken:  # casefold: case-insensitive file systems
            count += 1
            name = f"{stem}_{count}{suffix}"
        taken.add(name.casefold())
        names.append(name)
    return names
