"""The README's commands run as written: the marked block, line by line, in a scratch copy of
the repository (so nothing lands in the checkout), and its pruning-API Python snippet."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.helpers import readme_commands, run_in_repository_copy

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def marked_commands():
    return readme_commands("readme-test")


def test_readme_shows_setup_commands_first():
    first_block = re.search(r"```bash\n(.*?)```", README, re.S).group(1)
    assert "make demo" in first_block and "make test" in first_block


def test_marked_readme_commands_run(tmp_path):
    commands = marked_commands()
    assert len(commands) >= 6
    copy = run_in_repository_copy(commands, tmp_path)
    assert (copy / "runs" / "try.png").stat().st_size > 10_000
    assert (copy / "runs" / "try_masks.pt").exists()
    assert (copy / "runs" / "try" / "tickets" / "level_1.safetensors").exists()
    assert (copy / "runs" / "try_plain.pt").exists()
    for name in ("try", "try_ddp", "try_debug"):
        assert (copy / "runs" / name / "levels.csv").read_text().count("\n") == 3  # header + 2 levels


def test_readme_pruning_snippet_runs():
    snippet = next(block for block in re.findall(r"```python\n(.*?)```", README, re.S) if "prune_model" in block)
    result = subprocess.run([sys.executable, "-c", snippet], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "'density'" in result.stdout
