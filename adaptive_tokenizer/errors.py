"""The errors the library raises for bad input: a mistake in what the caller gave (an argument, an image, a token
file, a model folder), never a bug. They subclass the built-in exception a caller would expect (``ValueError``,
``TypeError``, ``ImportError``), so ``except ValueError`` keeps working; the command line reports exactly these (and
missing or unreadable user paths) in one line with exit status 2, and anything else as a bug, with its traceback."""

from __future__ import annotations


class AdaptiveTokenizerError(Exception):
    """Base of the library's errors for bad input."""


class InputError(AdaptiveTokenizerError, ValueError):
    """A value the library cannot accept: out of range, malformed, inconsistent with the model."""


class InputTypeError(AdaptiveTokenizerError, TypeError):
    """An input of a type the library does not take."""


class MissingExtraError(AdaptiveTokenizerError, ImportError):
    """An optional feature whose extra is not installed (``pip install "adaptive-tokenizer[EXTRA]"``)."""
