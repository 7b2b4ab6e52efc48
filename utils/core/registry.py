"""Looking a name up in a registry: the one message that names the valid choices, and the one
way a registry takes a user's ``package.module:Name`` beside its own names."""
from __future__ import annotations

from typing import Any, Mapping, Type

from utils.core.user_code import UserCodeError, import_object, is_import_path


def lookup(registry: Mapping[str, Any], kind: str, name: Any, error: Type[Exception] = ValueError) -> Any:
    """``registry[name]``, or ``error`` (one line) naming the valid names of ``kind``."""
    try:
        return registry[name]
    except (KeyError, TypeError):
        raise error(f"unknown {kind} {name!r}; valid names: {', '.join(sorted(registry))}") from None


def lookup_or_import(registry: Mapping[str, Any], kind: str, name: Any, error: Type[Exception] = ValueError) -> Any:
    """``registry[name]``, or the object a user's ``package.module:Name`` names; ``error`` (one
    line) for an unknown name (naming the valid ones) or an import that fails.  What the object
    must be is the caller's to check."""
    if name in registry:
        return registry[name]
    if not is_import_path(str(name)):
        raise error(f"unknown {kind} {name!r}; valid names: {', '.join(registry)} or package.module:Name")
    try:
        return import_object(str(name))
    except UserCodeError as failure:
        raise error(str(failure)) from None
