"""Command line: ``adaptive-tokenizer {convert,encode,tokenize,decode,reconstruct,evaluate,info,models,push,bench}``.

``encode`` writes and ``decode`` reads token files (format: :mod:`adaptive_tokenizer.serialization`).

User errors (bad arguments, missing files, bad token files, anything the library rejects with ValueError,
FileNotFoundError or TypeError) print one line ``adaptive-tokenizer: error: ...`` and exit with status 2.
``tokenize`` exits with status 3 when the job completed but skipped inputs it could not read.
Outputs are all-or-nothing: every file goes through :func:`~adaptive_tokenizer.io_utils.write_atomic`, ``decode``
fills a staged directory, a failed command leaves no new file or directory, and an output that is also an input
is refused.
"""

from __future__ import annotations

import argparse
import sys

# importing them registers their commands; --help lists them in this order
from . import tokens, models, measure  # noqa: F401, I001
from .common import COMMANDS, PROG, USER_ERROR, UsageError, _Parser


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="ALIT adaptive-length image tokenizer: images <-> variable-length tokens.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for command in COMMANDS:
        p = sub.add_parser(command.name, help=command.help)
        command.arguments(p)
        p.set_defaults(func=command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 for user errors)."""
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except SystemExit as done:  # --help
        return done.code if isinstance(done.code, int) else 0
    except (UsageError, ValueError, FileNotFoundError, TypeError, OSError) as err:
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return USER_ERROR
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
