"""``python -m utils.compact``: a pruned level -> a physically smaller network (the command lives in ``utils.pruning.compact``)."""
import sys

from utils.pruning.compact import main

if __name__ == "__main__":
    sys.exit(main())
