"""A user's own code named ``package.module:function`` (model factories, score functions).

``model.name`` and ``prune.criterion`` take either a registry name or this form (docs/design.md
section 4).  The module is imported the way ``python -m`` would find it: from ``sys.path``
plus the current working directory (``python harness.py`` puts the harness's own directory
first on ``sys.path``, not the directory the command runs in; a user's package usually
sits in the latter).  The part after the colon may be dotted (``module:Class.method``).

Every failure is a ``UserCodeError`` (a ``ValueError``) whose message is one line naming
the value and the cause, so the caller can refuse the config with it.
"""
from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
from typing import Any, Callable, Sequence

_IDENTIFIER = r"[A-Za-z_][A-Za-z0-9_]*"
IMPORT_PATH = re.compile(rf"^{_IDENTIFIER}(\.{_IDENTIFIER})*:{_IDENTIFIER}(\.{_IDENTIFIER})*$")


class UserCodeError(ValueError):
    """A ``package.module:function`` that cannot be imported or used; one line."""


def is_import_path(text: Any) -> bool:
    """True for strings of the form ``package.module:function`` (syntax only, nothing imported)."""
    return isinstance(text, str) and IMPORT_PATH.match(text) is not None


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:200]}" if lines else type(error).__name__


def import_object(path: str) -> Any:
    """The object ``package.module:attribute`` names; UserCodeError when it cannot be had."""
    if not is_import_path(path):
        raise UserCodeError(f"{path!r} is not of the form package.module:function")
    module_name, attribute = path.split(":", 1)
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)  # after everything else: never shadows an installed package
    try:
        obj = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        raise UserCodeError(f"{path}: cannot import module {module_name!r} ({_first_line(error)}; "
                            f"searched sys.path and the current directory {cwd})") from None
    except Exception as error:  # noqa: BLE001 -- the module itself failed while importing
        raise UserCodeError(f"{path}: importing module {module_name!r} failed ({_first_line(error)})") from None
    for part in attribute.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise UserCodeError(f"{path}: module {module_name!r} has no attribute {attribute!r}") from None
    return obj


def import_callable(path: str, positional: Sequence[str] = (), keywords: Sequence[str] = ()) -> Callable:
    """``import_object`` that must be callable and accept the given arguments.

    ``positional``: names of arguments passed positionally (checked by count);
    ``keywords``: arguments passed by name.  A signature Python cannot inspect (a C
    function) is accepted as it is.
    """
    obj = import_object(path)
    if not callable(obj):
        raise UserCodeError(f"{path} is a {type(obj).__name__}, not a function")
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        return obj
    try:
        signature.bind(*[None] * len(positional), **{name: None for name in keywords})
    except TypeError as error:
        wanted = ", ".join([*positional, *(f"{name}=" for name in keywords)])
        raise UserCodeError(f"{path} must accept ({wanted}): {error}") from None
    return obj


def accepted_keywords(function: Callable, names: Sequence[str]) -> list:
    """The subset of ``names`` that ``function`` accepts as keywords (all of them with **kwargs)."""
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):
        return list(names)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return list(names)
    usable = {name for name, p in parameters.items()
              if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}
    return [name for name in names if name in usable]
