"""``python -m utils.sweep``: a sweep file -> runs, launched locally or on Slurm (the command lives in ``utils.launch.sweep``)."""
import sys

from utils.launch.sweep import main

if __name__ == "__main__":
    sys.exit(main())
