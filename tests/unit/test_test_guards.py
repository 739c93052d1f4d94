"""The suite's own guards (tests/conftest.py): a hung test fails after its deadline and the suite goes
on; a test stuck where the exception cannot reach ends pytest with the stacks printed; processes a test
leaves running are killed. Each runs a small pytest in a subprocess, with the guards as a plugin, and a
control run without them shows the same test passes (or hangs on) when they are off."""
import os
import subprocess
import sys
import time

from tests.conftest import REPO

TESTS = '''
import os, signal, subprocess, sys, time

def test_sleeps():
    time.sleep(float(os.environ.get("SLEEP_S", "6")))

def test_after_it():
    pass

def test_leaves_a_process():
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    open(os.environ["PID_FILE"], "w").write(str(p.pid))

def test_blocks_the_alarm():
    if os.environ.get("BLOCK"):
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGALRM])  # the exception can never be raised
        time.sleep(60)
'''


def pytest_run(tmp_path, *args, guards=True, **env):
    (tmp_path / "test_guarded.py").write_text(TESTS)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA", "-W", "default",
           *(["-p", "tests.conftest"] if guards else []), "test_guarded.py", *args]
    t0 = time.time()
    p = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(REPO), "PID_FILE": str(tmp_path / "pid"), **env})
    return p, time.time() - t0


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "zombie" not in f.read()
    except OSError:
        return False


def test_a_hung_test_fails_at_its_deadline_and_the_suite_goes_on(tmp_path):
    p, took = pytest_run(tmp_path, "-k", "sleeps or after", TD_TEST_TIMEOUT_S="2", SLEEP_S="30")
    out = p.stdout + p.stderr
    assert p.returncode == 1 and "1 failed, 1 passed" in out, out
    assert "TimeoutError" in out and "test_sleeps: call ran past 2 s" in out, out
    assert "Most recent call first" in out or "Current thread" in out, "the stacks of all threads are printed"
    assert took < 25, took
    # Control: without the guards the same 6 s test simply passes.
    p, _ = pytest_run(tmp_path, "-k", "sleeps", guards=False, TD_TEST_TIMEOUT_S="2", SLEEP_S="6")
    assert p.returncode == 0, p.stdout + p.stderr


def test_a_test_the_alarm_cannot_reach_ends_pytest_with_the_stacks(tmp_path):
    p, took = pytest_run(tmp_path, "-k", "blocks or after", TD_TEST_TIMEOUT_S="2", TD_TEST_HARD_GRACE_S="2",
                         BLOCK="1")
    out = p.stdout + p.stderr
    assert p.returncode != 0 and "test_blocks_the_alarm: call still running 2 s after its deadline" in out and "in test_blocks_the_alarm" in out, out
    assert "passed" not in out, "pytest itself was ended: test_after_it never ran"
    assert took < 40, took


def test_a_process_left_running_is_killed_and_named(tmp_path):
    p, _ = pytest_run(tmp_path, "-k", "leaves")
    out = p.stdout + p.stderr
    pid = int((tmp_path / "pid").read_text())
    assert p.returncode == 0 and f"left 1 process(es) running: killed [{pid}]" in out, out
    assert not alive(pid)
    # Control: without the guards the process outlives the test run.
    p, _ = pytest_run(tmp_path, "-k", "leaves", guards=False)
    pid = int((tmp_path / "pid").read_text())
    try:
        assert p.returncode == 0 and alive(pid), p.stdout + p.stderr
    finally:
        os.kill(pid, 9)
