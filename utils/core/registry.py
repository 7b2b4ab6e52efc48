"""Looking a name up in a registry: the one message that names the valid choices."""
from __future__ import annotations

from typing import Any, Mapping, Type


def lookup(registry: Mapping[str, Any], kind: str, name: Any, error: Type[Exception] = ValueError) -> Any:
    """``registry[name]``, or ``error`` (one line) naming the valid names of ``kind``."""
    try:
        return registry[name]
    except (KeyError, TypeError):
        raise error(f"unknown {kind} {name!r}; valid names: {', '.join(sorted(registry))}") from None
