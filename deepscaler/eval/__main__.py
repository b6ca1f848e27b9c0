"""``python -m deepscaler.eval``: the command line of ``deepscaler/eval/cli.py``."""

import sys

from deepscaler.eval.cli import main

if __name__ == "__main__":
    sys.exit(main())
