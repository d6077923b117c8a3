"""`accelerate launch [...] -m trainer RECIPE [key=value ...] [--resume]`: one training process of a launched job."""

import sys

from launch.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
