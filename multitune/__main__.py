"""`python -m multitune ...` is the `multitune` command; `accelerate launch [...] -m multitune train RECIPE` runs one
rank of a launched job (it finds LOCAL_RANK set and trains instead of launching)."""

import sys

from multitune.launch.cli import entry

if __name__ == "__main__":
    sys.exit(entry())
