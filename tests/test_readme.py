"""The README's commands run as written: the marked block, line by line, in a scratch copy of
the repository (so nothing lands in the checkout), and its pruning-API Python snippet."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def marked_commands():
    block = README.split("<!-- readme-test:begin -->", 1)[1].split("<!-- readme-test:end -->", 1)[0]
    body = re.search(r"```bash\n(.*?)```", block, re.S).group(1)
    return [line for line in body.splitlines() if line.strip() and not line.startswith("#")]


def test_readme_shows_setup_commands_first():
    first_block = re.search(r"```bash\n(.*?)```", README, re.S).group(1)
    assert "make demo" in first_block and "make test" in first_block


def test_marked_readme_commands_run(tmp_path):
    copy = tmp_path / "repo"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "data", "__pycache__",
                                                              ".pytest_cache", "*.beton"))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "OMP_NUM_THREADS": "1"}
    commands = marked_commands()
    assert len(commands) >= 6
    for command in commands:
        result = subprocess.run(command, shell=True, cwd=copy, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    assert (copy / "runs" / "try.png").stat().st_size > 10_000
    assert (copy / "runs" / "try_masks.pt").exists()
    for name in ("try", "try_ddp", "try_debug"):
        assert (copy / "runs" / name / "levels.csv").read_text().count("\n") == 3  # header + 2 levels


def test_readme_pruning_snippet_runs():
    snippet = next(block for block in re.findall(r"```python\n(.*?)```", README, re.S) if "prune_model" in block)
    result = subprocess.run([sys.executable, "-c", snippet], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "'density'" in result.stdout
