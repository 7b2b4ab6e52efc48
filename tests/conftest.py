"""Test-wide settings."""
import torch

# One intra-op thread: on a 2-core machine shared with subprocess-launched harness runs,
# a second thread mostly stalls (a small training step went from ~3 ms to 1-3 s).
torch.set_num_threads(1)
