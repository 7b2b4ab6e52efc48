"""Pruning structures: the unit a mask keeps or drops, one registry (``prune.structure``).

``base`` holds the contract (``Structure``: what a structure answers, and ``Scoring``: what a
level's masks are scored with); ``unstructured``, ``channel`` and ``nm`` the built-in ones.
``get_structure(name)`` returns the class for a registered name or a user's
``package.module:Name`` (a ``Structure`` subclass); a run instantiates it with its prune settings.
Nothing outside these modules compares a structure's name: callers ask the object.

May import: ``utils.core``, ``utils.models``, ``utils.runs`` and the rest of ``utils.pruning``.
"""
from __future__ import annotations

from typing import Dict, List, Type

from utils.core.registry import lookup_or_import
from utils.pruning.structures.base import Scoring, Structure  # noqa: F401  (the contract, for outside structures)
from utils.pruning.structures.channel import Channel
from utils.pruning.structures.nm import NM
from utils.pruning.structures.unstructured import Unstructured

STRUCTURES: Dict[str, Type[Structure]] = {cls.name: cls for cls in (Unstructured, Channel, NM)}


class StructureRegistryError(ValueError):
    """An unknown structure, or a user's object that is not a Structure subclass; one line."""


def structure_names() -> List[str]:
    return list(STRUCTURES)


def get_structure(name: str) -> Type[Structure]:
    """The registered structure ``name``, or a user's ``package.module:Name`` (a ``Structure`` subclass)."""
    obj = lookup_or_import(STRUCTURES, "structure", name, StructureRegistryError)
    if not (isinstance(obj, type) and issubclass(obj, Structure)):
        raise StructureRegistryError(f"{name} is a {type(obj).__name__}, not a subclass of "
                                     f"utils.pruning.structures.base.Structure (docs/extending.md)")
    if not obj.description:
        raise StructureRegistryError(f"{name} has no description (a one-line class attribute `description`)")
    return obj
