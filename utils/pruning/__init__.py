"""Pruning: which weights a mask keeps.  Density schedules and per-layer rates, criteria (what a
weight or channel scores), allocations (how many each layer keeps), exact top-k, masks from
scores, the pruning structures (unstructured, channel, N:M: one registry, ``utils.pruning.structures``),
the typed view of a config's prune section (``settings``), compaction of a pruned network, and the
pruning command (``python -m utils.pruning_utils``).  (Which levels a run trains -- the level plan --
is ``utils.training.level_plan``: it needs the training types.)

May import: ``utils.core``, ``utils.data``, ``utils.models``, ``utils.runs``.  The pruning command
alone also reads a config the harness's way, inside its command-line function."""
