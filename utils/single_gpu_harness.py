"""``python -m utils.single_gpu_harness``: the harness in one process, without DDP, for a debugger (the command lives in ``utils.launch.single_process``)."""
import sys

from utils.launch.single_process import main

if __name__ == "__main__":
    sys.exit(main())
