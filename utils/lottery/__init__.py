"""Lottery-ticket science on top of training: controls (another run's masks: none, reinit,
shuffle), linear-mode-connectivity stability, Early-Bird stopping, tickets as portable files
(``python -m utils.ticket``: export, show, plain).

May import: every package below it (``core``, ``data``, ``models``, ``runs``, ``pruning``, ``training``)."""
