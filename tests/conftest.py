import contextlib
import os
import importlib
import io
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
if os.environ.get("PYTEST_XDIST_WORKER"):  # two workers on two cores: one thread each, and the same for
    os.environ["OMP_NUM_THREADS"] = "1"  # the processes they start (oversubscribed threads spin and crawl)
    import torch

    torch.set_num_threads(1)
sys.path.insert(0, str(ROOT))  # the minimal_*.py files and toy_tasks.py live at the top level


def run_script(script, *args):
    """Run a file as a user would (same interpreter, repo root as cwd); return the CompletedProcess.
    Each call pays for importing torch and transformers (10-20 s on a 2-core CPU): the tests that use
    it are the slow ones (`-m slow`)."""
    return subprocess.run([sys.executable, script, *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=900)


def run_main(script, *args):
    """Run a file's main() in this process, with sys.argv as the command line would set it: the same
    code path as `uv run SCRIPT ARGS` minus the interpreter start, so a two-step run takes a second or
    two instead of twenty. Returns what run_script returns: returncode, stdout, stderr."""
    module = importlib.import_module(Path(script).stem)
    out, err, code = io.StringIO(), io.StringIO(), 0
    argv = sys.argv
    sys.argv = [script, *map(str, args)]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            module.main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = argv
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


@pytest.fixture
def run():
    return run_script


@pytest.fixture
def run_fast():
    return run_main
