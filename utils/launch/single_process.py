"""Debug entry point: the harness's level loop in one process, no DDP, ever.

    python -m utils.single_gpu_harness --config configs/quickstart.yaml [--section.key=value ...]

Same config, same building blocks, same output files as ``harness.py``; it ignores
torchrun's environment (no process group is created), makes torch prefer deterministic
kernels, and can turn on autograd anomaly detection (``--detect-anomaly``) so a NaN names
the op that made it.  Use it with pdb/breakpoint(): there is only one process to stop.

Unlike the rest of utils/, this module is an entry point, so it imports the harness layer
(harness.py / harness_params.py); nothing in utils/ imports it.
"""
from __future__ import annotations

import sys
from typing import List, Optional

import torch


def main(argv: Optional[List[str]] = None) -> int:
    import harness
    import harness_params
    import harness_utils as hu
    from utils.core import distributed as du

    argv = list(sys.argv[1:] if argv is None else argv)
    detect_anomaly = "--detect-anomaly" in argv
    argv = [a for a in argv if a != "--detect-anomaly"]
    config = harness_params.load_config(argv)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        device = du.pick_device(config["training.device"], 0)
    except RuntimeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    ctx = du.DistributedContext(device=device)  # rank 0 of 1, whatever the environment says
    try:
        with torch.autograd.set_detect_anomaly(detect_anomaly):
            return harness.Experiment(config, ctx, use_ddp=False).run()
    except hu.UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
