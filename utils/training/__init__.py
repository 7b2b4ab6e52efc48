"""Training: one step and one epoch, the evaluation, the training types (what happens between
levels), optimizers and learning-rate schedules, late-resetting points, network slimming's L1
term, test-time augmentation, progressive resizing.

May import: ``utils.core``, ``utils.data``, ``utils.models``, ``utils.runs``, ``utils.pruning``."""
