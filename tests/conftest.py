import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the minimal_*.py files and toy_tasks.py live at the top level


def run_script(script, *args):
    """Run a file as a user would (same interpreter, repo root as cwd); return the CompletedProcess."""
    return subprocess.run([sys.executable, script, *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=900)


@pytest.fixture
def run():
    return run_script
