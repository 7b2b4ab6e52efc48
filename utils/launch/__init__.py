"""Launching: sweeps (the sweep file, the local launcher, the Slurm launcher through submitit),
Slurm's own rules, and the harness in one process for a debugger.

May import: every package of ``utils``; the harness layer only inside command-line functions."""
