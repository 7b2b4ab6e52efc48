"""What the report's labels say: which set a best epoch was chosen on, a structure's own keys
(a group's label itself: ``experiments.label_groups``)."""
from __future__ import annotations

from typing import Any, Mapping, Sequence, Tuple

import pandas as pd



def selected_on(experiments: Sequence[Any]) -> str:
    """What the runs' best epochs were chosen on (levels.csv ``best_selected_on``): "val", "test", or
    "val or test" when they differ.  A run written before the column existed chose on the test set."""
    seen = set()
    for e in experiments:
        column = e.levels["best_selected_on"] if "best_selected_on" in e.levels else pd.Series(["test"])
        seen |= set(column.fillna("test").astype(str))
    return "val or test" if len(seen) > 1 else (seen.pop() if seen else "test")


def best_label(on: str) -> str:
    """The name of the best-epoch accuracy, saying what its epoch was chosen on."""
    if on == "val":
        return "test acc at best val epoch"
    if on == "test":
        return "best test acc (epoch chosen on test)"
    return "best-epoch test acc (chosen on val or test)"


def structure_keys(config: Mapping[str, Any]) -> Tuple[str, ...]:
    """The config keys of the run's structure's own (``Structure.setting_keys``: N:M's prune.nm)."""
    from utils.pruning.structures import StructureRegistryError, get_structure
    try:
        return tuple(get_structure(str(config.get("prune.structure") or "unstructured")).setting_keys)
    except StructureRegistryError:
        return ()
