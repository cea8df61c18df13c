"""Command line: ``adaptive-tokenizer {convert,encode,tokenize,decode,reconstruct,evaluate,info,models,push,bench}``.

``encode`` writes and ``decode`` reads token files (format: :mod:`adaptive_tokenizer.serialization`).

User errors print one line ``adaptive-tokenizer: error: ...`` and exit with status 2: bad arguments, the library's
errors for bad input (:mod:`adaptive_tokenizer.errors`: bad images, token files, models, settings), and missing or
unreadable paths (``FileNotFoundError``, ``PermissionError``, ``IsADirectoryError``, ``NotADirectoryError``), and a
full disk or a read-only file system. Anything
else is a bug: its traceback is printed with a line asking for a report, and the exit status is 1.
``tokenize`` exits with status 3 when the job completed but skipped inputs it could not read.
Outputs are all-or-nothing: every file goes through :func:`~adaptive_tokenizer.io_utils.write_atomic`, ``decode``
fills a staged directory, a failed command leaves no new file or directory, and an output that is also an input
is refused.
"""

from __future__ import annotations

import argparse
import errno
import sys
import traceback

# importing them registers their commands; --help lists them in this order
from . import tokens, models, measure  # noqa: F401, I001
from ..errors import AdaptiveTokenizerError
from .common import COMMANDS, PROG, USER_ERROR, UsageError, _Parser

BUG = 1
USER_MISTAKES = (UsageError, AdaptiveTokenizerError, FileNotFoundError, PermissionError, IsADirectoryError,
                 NotADirectoryError)
# what the system refuses for want of room or rights: no bug either
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EROFS, errno.EDQUOT}


def is_user_mistake(err: BaseException) -> bool:
    """A mistake in the input or a refusal of the system (exit 2), as opposed to a bug (exit 1)."""
    return isinstance(err, USER_MISTAKES) or (isinstance(err, OSError) and err.errno in ENVIRONMENT_ERRNOS)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="ALIT adaptive-length image tokenizer: images <-> variable-length tokens.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for command in COMMANDS:
        p = sub.add_parser(command.name, help=command.help)
        command.arguments(p)
        p.set_defaults(func=command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 for user errors, 1 for bugs)."""
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except SystemExit as done:  # --help
        return done.code if isinstance(done.code, int) else 0
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if is_user_mistake(err):
            message = " ".join(str(err).split()) or type(err).__name__
            print(f"{PROG}: error: {message}", file=sys.stderr)
            return USER_ERROR
        traceback.print_exc()  # a bug: show it, so that it can be reported
        print(f"{PROG}: internal error (a bug in adaptive-tokenizer, not in your input): please report it with the "
              "traceback above and the command you ran", file=sys.stderr)
        return BUG


if __name__ == "__main__":
    sys.exit(main())
