"""The base every other package stands on: writing files atomically, the one user-error class,
importing a user's ``package.module:name``, registry look-ups, the callback hooks of the level
loop, the process group (torchrun's environment, collectives) and the launcher watch.

May import: nothing of ``utils`` outside ``utils.core``."""
