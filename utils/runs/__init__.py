"""A run on disk and in time: the run directory (layout, CSV logs, ``config.yaml``, the fresh /
resume / finished decision), its lock, what a checkpoint holds, stopping on request and progress,
how a run was executed (run facts), trackers, and the faults tests inject.

May import: ``utils.core``, ``utils.models`` (a checkpoint holds a model's state)."""
