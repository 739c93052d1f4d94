import faulthandler
import os
import signal
import sys
import threading
import traceback
import uuid
import warnings
from pathlib import Path

import pytest

from tests.distributed.util import pids_with_env

REPO = Path(__file__).resolve().parents[1]
# Reproducible CPU numerics and no accidental network use in tests.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
os.environ.setdefault("TAMING_DIST_CACHE", str(REPO / ".cache" / "taming_dist"))

# ---- a hung test fails, it does not eat the CI budget (README, "Tests") ----
# Each phase (setup / call / teardown) of a test gets a deadline. At the deadline the stacks of all
# threads are printed and the phase raises TimeoutError (a failed test; the suite goes on). If the
# main thread is stuck in C code and cannot take the exception, pytest itself is ended 120 s later
# (TD_TEST_HARD_GRACE_S) with the stacks printed on the terminal, so CI shows where it hung instead
# of running into its own time limit.
TIMEOUT_ENV = "TD_TEST_TIMEOUT_S"
PHASE_LIMIT_S = {"setup": 1800, "call": 900, "teardown": 900}  # setup may apt-get SLURM on a fresh box
GRACE_ENV = "TD_TEST_HARD_GRACE_S"


def _limit(phase: str) -> int:
    return int(os.environ.get(TIMEOUT_ENV, PHASE_LIMIT_S[phase]))


_config = None


def pytest_configure(config):
    global _config
    _config = config


def _hard_stop(nodeid: str, phase: str, after: int) -> None:
    """From a timer thread: the main thread never took the TimeoutError. Give the terminal back from
    pytest's output capture (else the stacks would go to a capture file that dies with us), print
    where every thread is, and end the run."""
    capman = _config.pluginmanager.getplugin("capturemanager") if _config else None
    if capman is not None:
        capman.suspend_global_capture(in_=False)
    sys.stderr.write(f"\n{nodeid}: {phase} still running {after} s after its deadline could not "
                     f"interrupt it; ending pytest. Stacks of all threads:\n")
    sys.stderr.flush()
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    sys.stderr.flush()
    os._exit(3)


def _deadline(phase: str, item):
    limit = _limit(phase)
    grace = int(os.environ.get(GRACE_ENV, 120))

    def on_alarm(signum, frame):
        faulthandler.dump_traceback(all_threads=True)
        raise TimeoutError(f"{item.nodeid}: {phase} ran past {limit} s ({TIMEOUT_ENV}); the stacks of all "
                           "threads are printed above")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(limit)
    hard = threading.Timer(limit + grace, _hard_stop, (item.nodeid, phase, grace))
    hard.daemon = True
    hard.start()
    try:
        yield
    finally:
        signal.alarm(0)
        hard.cancel()
        signal.signal(signal.SIGALRM, old)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    yield from _deadline("setup", item)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    yield from _deadline("call", item)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item):
    yield from _deadline("teardown", item)


# Every process a test starts inherits TD_TEST_PROCESS_TAG (unique per test) unless the test builds
# its environment from nothing. After the test, any such process still alive is killed and named in
# a warning: a failed or hung test must not leave ranks burning the CPU for the tests after it.
# Session fixtures (the SLURM daemons) start before the tag is set and are not touched.
PROCESS_TAG_ENV = "TD_TEST_PROCESS_TAG"
# Python restarts these helpers on demand; killing them would only add warnings.
_MP_HELPERS = (b"multiprocessing.resource_tracker", b"multiprocessing.forkserver")


@pytest.fixture(autouse=True)
def _no_leftover_processes(request):
    tag = uuid.uuid4().hex
    os.environ[PROCESS_TAG_ENV] = tag
    yield
    os.environ.pop(PROCESS_TAG_ENV, None)
    left = pids_with_env(python_only=False, skip_cmdline=_MP_HELPERS, **{PROCESS_TAG_ENV: tag})
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    if left:
        warnings.warn(f"{request.node.nodeid} left {len(left)} process(es) running: killed {left}")


# ---- the suite cannot hang at exit (README, "Tests") ----
# When the last test has finished, every process this pytest started that is still alive (children,
# grandchildren, multiprocessing and DataLoader workers; found by parent pid, so a forked child that
# escapes the per-test tag above is found too) is named with its command line and Python stack,
# killed, and the run fails. Left alone, multiprocessing's exit handler would join such a child for
# ever. Python's own helpers (resource tracker, fork server) end with pytest and are left alone.
# Then, should pytest still not have exited TD_TEST_EXIT_GRACE_S (60) seconds later (a non-daemon
# thread, an exit handler stuck on a lock), the stacks of its threads are printed and it ends.
EXIT_GRACE_ENV = "TD_TEST_EXIT_GRACE_S"
_leftovers_at_exit: list[int] = []


def _write_terminal(text: str) -> None:
    capman = _config.pluginmanager.getplugin("capturemanager") if _config else None
    if capman is not None:
        capman.suspend_global_capture(in_=False)
    sys.stderr.write(text)
    sys.stderr.flush()


def _own_helper(pid: int) -> bool:
    import tests.process_guard as pg

    st = pg._stat(pid)
    return bool(st) and st[1] == os.getpid() and any(h.decode() in pg.cmdline(pid) for h in _MP_HELPERS)


# Nothing forks the pytest process without exec: it runs threads (tqdm's monitor, gloo, the deadline
# timers), and a fork copies a lock another thread holds into a child that then hangs on it. Pools
# and DataLoaders use spawn or a fork server. Each fork is recorded with where it came from, and the
# session fails if there was one. fork+exec (subprocess, even with preexec_fn) is fine: the child
# runs no Python but the exec.
_forks: list[str] = []


def _record_fork() -> None:
    where = "".join(traceback.format_stack(limit=14)[:-1])
    if "subprocess.py" not in where:
        _forks.append(where)


os.register_at_fork(after_in_parent=_record_fork)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    import tests.process_guard as pg

    if _forks:
        _write_terminal(f"\nthe pytest process was forked {len(_forks)} time(s) without exec (use the spawn or "
                        f"forkserver context); the first from:\n{_forks[0]}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    left = [pid for pid in pg.descendants(os.getpid()) if not _own_helper(pid)]
    if not left:
        return
    _leftovers_at_exit.extend(left)
    _write_terminal(f"\n{len(left)} process(es) started by this test session still running after the last test; "
                    f"their command lines and Python stacks:\n{pg.report(left)}\n")
    pg.kill(left)
    _write_terminal(f"killed {left}; the session fails (a test leaked them: end what a test starts)\n")
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _exit_watchdog(grace: int) -> None:
    import tests.process_guard as pg

    sys.stderr.write(f"\npytest has not exited {grace} s after its last hook ({EXIT_GRACE_ENV}); stacks of "
                     "its threads:\n")
    sys.stderr.flush()
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    left = pg.descendants(os.getpid())
    if left:
        sys.stderr.write(f"its child processes:\n{pg.report(left)}\n")
        pg.kill(left)
    sys.stderr.flush()
    os._exit(3)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    if _leftovers_at_exit:
        # Exit handlers may still wait on what the killed children held (a pool's queue lock):
        # the summary is printed and the status decided, so end here.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(int(pytest.ExitCode.TESTS_FAILED))
    timer = threading.Timer(int(os.environ.get(EXIT_GRACE_ENV, 60)), _exit_watchdog,
                            (int(os.environ.get(EXIT_GRACE_ENV, 60)),))
    timer.daemon = True
    timer.start()


# ---- two batches (Makefile `test`, README "Tests") ----
# The slow tests of these folders start ranks, launchers and SLURM jobs of their own and time them
# against collective timeouts: marked `serial`, they run one at a time after the rest, which runs in
# the pytest process and is spread over the cores (pytest-xdist, `-n auto -m "not serial"`).
# A slow test there marked `one_process` starts at most one process at a time (a one-process run,
# a converter, a browser) and times nothing against the clock: it stays in the parallel batch,
# where its process takes one core and another test the other. In the serial batch it would leave
# a core idle.
SERIAL_DIRS = ("e2e", "distributed", "slurm")


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
    tests = REPO / "tests"
    for item in items:
        path = Path(str(item.path)).resolve()  # the guard tests run this file as a plugin on files elsewhere
        if path.is_relative_to(tests) and path.relative_to(tests).parts[0] in SERIAL_DIRS \
                and item.get_closest_marker("slow") and not item.get_closest_marker("one_process"):
            item.add_marker(pytest.mark.serial)


@pytest.fixture
def repo() -> Path:
    return REPO


def python() -> str:
    return sys.executable
