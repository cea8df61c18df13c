"""``python -m adaptive_tokenizer``: the command line (see :mod:`adaptive_tokenizer.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
