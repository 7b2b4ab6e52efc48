"""What a run directory says beyond its CSV files, for the report: the processes its BatchNorm
statistics came from, its classes, the levels a control took from its source."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

import pandas as pd

from utils.runs import rundir


def bn_processes_of(root: Path, config: Dict[str, Any]) -> int:
    """run_facts.batchnorm_processes of the run in ``root`` (1 when its checkpoints do not say)."""
    from utils.runs import run_facts
    execution = run_facts.recorded_execution(root, config.get("training.device"))
    if execution is None or execution.world_size <= 1:
        return 1
    return run_facts.batchnorm_processes(world_size=execution.world_size, device_type=execution.device_type,
                                         sync_bn=config.get("distributed.sync_bn", "auto"),
                                         has_batchnorm=bool(run_facts.initial_weights_have_batchnorm(root)))


def number_of_classes(config: Dict[str, Any]) -> Optional[int]:
    """Classes of the run's data: the test set's write record, else the dataset registry."""
    from utils.data import records
    from utils.data import specs as data_specs
    try:
        record = records.read_record(str(config.get("dataset.test_path")))
    except Exception:  # noqa: BLE001 -- an unreadable record: fall back on the registry
        record = None
    if isinstance(record, dict):
        count = record.get("num_classes") or len(record.get("classes") or [])
        if isinstance(count, int) and count > 0:
            return count
    try:
        return int(data_specs.get_dataset_spec(str(config.get("dataset.name"))).num_classes)
    except Exception:  # noqa: BLE001 -- a dataset this version does not know
        return None


def reused_levels(root: Path) -> List[str]:
    """What a control took from its source instead of training (utils/lottery/controls.py writes it)."""
    path = rundir.RunFiles(root).reused.path
    if not path.is_file():
        return []
    try:
        frame = pd.read_csv(path)
        return [f"level {int(row.level)} taken from `{row.source}` (identical: not retrained)"
                for row in frame.itertuples()]
    except Exception:  # noqa: BLE001 -- a note only: never stops the report
        return [f"{path.name} unreadable"]
