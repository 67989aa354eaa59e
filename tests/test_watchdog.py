"""The suite's watchdog (tests/conftest.py): a test stuck past its pytest-timeout where
the timeout's signal cannot end it gets every thread's stack dumped and the run ended."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STUCK = '''
import time, pytest

@pytest.mark.timeout(1)
def test_stuck():  # swallows the timeout's exception and goes on waiting
    end = time.monotonic() + 60
    while time.monotonic() < end:
        try:
            time.sleep(0.1)
        except BaseException:
            pass

def test_never_reached():
    pass
'''


def test_a_test_stuck_past_its_timeout_is_dumped_and_ends_the_run(tmp_path):
    (tmp_path / "test_stuck.py").write_text(STUCK)
    env = {**os.environ, "OBDASK_TEST_WATCHDOG_GRACE": "2", "PYTHONPATH": ROOT}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "-p",
         "no:cacheprovider", "--rootdir", str(tmp_path), str(tmp_path / "test_stuck.py")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=50)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "Timeout (0:00:03)!" in out, out  # the timeout (1 s) plus the grace (2 s)
    assert 'test_stuck.py", line' in out, out  # where it was stuck
    assert "test_never_reached" not in out and "passed" not in out, out
