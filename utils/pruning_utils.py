"""``python -m utils.pruning_utils``: a level's masks for a checkpoint, as the harness computes them (the command lives in ``utils.pruning.command``)."""
import sys

from utils.pruning.command import main

if __name__ == "__main__":
    sys.exit(main())
