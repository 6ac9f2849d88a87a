"""The fast tier holds itself to what it promises: a test that starts a process and is not marked
``spawns`` fails under ``conftest.py``'s audit hook. The check runs on this very conftest, in a
separate pytest session over a scratch test file."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.spawns  # it runs pytest in a child process

SCRATCH = '''
import subprocess, sys
import pytest

def test_unmarked_spawn():
    subprocess.run([sys.executable, "-c", "pass"], check=True)

@pytest.mark.spawns
def test_marked_spawn():
    subprocess.run([sys.executable, "-c", "pass"], check=True)

def test_in_process():
    assert sum(range(4)) == 6
'''


def test_an_unmarked_test_that_spawns_fails_and_a_marked_one_passes(tmp_path):
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_scratch.py").write_text(SCRATCH)
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    fast: x\n    slow: x\n    spawns: x\n")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf", str(tmp_path)],
                            capture_output=True, text=True, cwd=tmp_path, timeout=300)
    out = result.stdout
    assert result.returncode == 1, out
    assert "1 failed, 2 passed" in out, out
    assert "FAILED test_scratch.py::test_unmarked_spawn" in out, out
    assert "a fast test started a process" in out and "-c pass" in out, out
    # the fast tier, selected as `make test-fast` selects it, leaves the marked test out
    fast = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "fast",
                           str(tmp_path)], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert "1 failed, 1 passed, 1 deselected" in fast.stdout, fast.stdout
