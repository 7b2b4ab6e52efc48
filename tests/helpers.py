"""Shared helpers for the end-to-end tests: a tiny digits experiment and ways to run it."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import yaml

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))


def digits_config(data_dir: Path, base_dir: Path, name: str = "exp", **overrides) -> Dict:
    """A small but real experiment: LeNet-300-100 on digits, torch loader (no numba JIT)."""
    tree = {
        "model": {"name": "lenet_300_100"},
        "dataset": {"name": "digits", "train_path": str(data_dir / "digits_train.beton"),
                    "test_path": str(data_dir / "digits_test.beton"), "batch_size": 64,
                    "num_workers": 1, "loader": "torch"},
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4},
        "schedule": {"name": "cosine"},
        "training": {"epochs": 2, "progress": False, "device": "cpu"},
        "prune": {"criterion": "magnitude", "allocation": "global", "training_type": "imp", "rate": 0.2, "levels": 3},
        "experiment": {"name": name, "base_dir": str(base_dir), "seed": 0},
    }
    for dotted, value in overrides.items():
        section, key = dotted.split("__") if "__" in dotted else dotted.split(".")
        tree.setdefault(section, {})[key] = value
    return tree


def write_config(path: Path, tree: Dict) -> Path:
    path.write_text(yaml.safe_dump(tree))
    return path


def run_harness(config: Path, *args: str, nproc: int = 0, env: Dict[str, str] | None = None,
                timeout: int = 300, extra_torchrun: List[str] | None = None) -> subprocess.CompletedProcess:
    """python harness.py (nproc=0) or torchrun --nproc_per_node=nproc harness.py."""
    if nproc:
        command = [TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", *(extra_torchrun or []),
                   "harness.py", "--config", str(config), *args]
    else:
        command = [PYTHON, "harness.py", "--config", str(config), *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=full_env)


def readme_commands(marker: str = "readme-test") -> List[str]:
    """The command lines of the README's ```bash block between <!-- MARKER:begin --> and
    <!-- MARKER:end --> (comment lines left out)."""
    import re
    readme = (ROOT / "README.md").read_text()
    block = readme.split(f"<!-- {marker}:begin -->", 1)[1].split(f"<!-- {marker}:end -->", 1)[0]
    body = re.search(r"```bash\n(.*?)```", block, re.S).group(1)
    return [line for line in body.splitlines() if line.strip() and not line.startswith("#")]


def run_in_repository_copy(commands: List[str], tmp_path: Path) -> Path:
    """Run ``commands`` (shell lines) in order in a scratch copy of the repository, so nothing lands
    in the checkout; each must exit 0.  -> the copy."""
    import shutil
    copy = tmp_path / "repo"
    anywhere = shutil.ignore_patterns(".venv", ".git", "__pycache__", ".pytest_cache", "*.beton")

    def ignore(directory, names):  # runs/ and data/ of the checkout itself (utils/runs, utils/data are code)
        top = {"runs", "data"} & set(names) if Path(directory) == ROOT else set()
        return set(anywhere(directory, names)) | top

    shutil.copytree(ROOT, copy, ignore=ignore)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "OMP_NUM_THREADS": "1"}
    for command in commands:
        result = subprocess.run(command, shell=True, cwd=copy, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return copy
