"""The one exception class for bad input that every layer may raise.

``UserError``: the input (config, data, checkpoint, experiment directory) is refused.  The
entry points print its message as one line and exit with status 2; nothing half-written.
"""


class UserError(Exception):
    """Bad input: printed as one line; exit status 2."""


class MaskSyncError(RuntimeError):
    """The ranks' masks differ after pruning (exit status 3)."""
