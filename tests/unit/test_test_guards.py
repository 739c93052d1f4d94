"""The suite's own guards (tests/conftest.py): a hung test fails after its deadline and the suite goes
on; a test stuck where the exception cannot reach ends pytest with the stacks printed; processes a test
leaves running are killed. Each runs a small pytest in a subprocess, with the guards as a plugin, and a
control run without them shows the same test passes (or hangs on) when they are off."""
import os
import subprocess
import sys
import time

from tests.conftest import REPO, SERIAL_DIRS

TESTS = '''
import os, signal, subprocess, sys, time

def test_sleeps():
    time.sleep(float(os.environ.get("SLEEP_S", "6")))

def test_after_it():
    pass

def test_leaves_a_process():
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    open(os.environ["PID_FILE"], "w").write(str(p.pid))

def sleeps_deaf_to_sigterm(pid_file):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # as train()'s stop flag once left every later fork
    open(pid_file, "w").write(str(os.getpid()))
    while True:
        time.sleep(1)

def test_leaks_a_deaf_child():
    import multiprocessing
    # A forked child does not show the per-test tag in /proc/PID/environ, so the per-test guard
    # cannot see it; dropping the tag makes this spawned child just as invisible to it.
    os.environ.pop("TD_TEST_PROCESS_TAG", None)
    child = multiprocessing.get_context("spawn").Process(target=sleeps_deaf_to_sigterm, args=(os.environ["PID_FILE"],))
    child.start()  # not a daemon: at exit, multiprocessing joins it (for ever, unless someone kills it)
    while not os.path.exists(os.environ["PID_FILE"]):
        time.sleep(0.05)

def test_forks():
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)

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


def test_a_leaked_child_deaf_to_sigterm_ends_the_session_with_its_stack(tmp_path):
    p, took = pytest_run(tmp_path, "-k", "leaks_a_deaf", TD_TEST_EXIT_GRACE_S="30")
    out = p.stdout + p.stderr
    pid = int((tmp_path / "pid").read_text())
    assert p.returncode == 1 and "1 passed" in out, out
    assert "still running after the last test" in out and f"pid {pid}" in out, out
    assert "sleeps_deaf_to_sigterm" in out, "the leaked child's Python stack is printed: " + out
    assert not alive(pid) and took < 60, took
    # Control: without the guards, pytest waits at exit for the child, for ever.
    (tmp_path / "pid").unlink()
    (tmp_path / "test_guarded.py").write_text(TESTS)
    log = open(tmp_path / "control.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_guarded.py",
                             "-k", "leaks_a_deaf"], cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": str(REPO), "PID_FILE": str(tmp_path / "pid")})
    try:
        deadline = time.time() + 60
        while "passed" not in (tmp_path / "control.log").read_text() and time.time() < deadline:
            time.sleep(0.5)
        time.sleep(10)
        assert "1 passed" in (tmp_path / "control.log").read_text()
        assert proc.poll() is None, "without the guards pytest should still be waiting for its child"
    finally:
        pid = int((tmp_path / "pid").read_text())
        os.kill(pid, 9)
        proc.wait(timeout=60)
        log.close()


def test_a_fork_of_the_pytest_process_fails_the_session(tmp_path):
    p, _ = pytest_run(tmp_path, "-k", "forks")
    out = p.stdout + p.stderr
    assert p.returncode == 1 and "1 passed" in out, out
    assert "the pytest process was forked 1 time(s) without exec" in out and "in test_forks" in out, out
    # Control: the same test passes and the session succeeds without the guards.
    p, _ = pytest_run(tmp_path, "-k", "forks", guards=False)
    assert p.returncode == 0, p.stdout + p.stderr


def test_the_ci_check_after_exit_waits_for_exiting_processes_and_fails_on_live_ones():
    """.ci/run's check once `make test` has exited (`process_guard.py --session SID --wait S --kill
    --fail`): a process of the session that ends within the wait passes; one that goes on living is
    listed, killed and fails. Sessions are made with setsid, as .ci/run makes its own."""
    guard = [sys.executable, str(REPO / "tests" / "process_guard.py")]
    ending = subprocess.Popen(["setsid", "bash", "-c", "sleep 1.5 & exit 0"])
    ending.wait()
    t0 = time.monotonic()
    p = subprocess.run([*guard, "--session", str(ending.pid), "--wait", "10", "--kill", "--fail"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "0 process(es)" in p.stdout and time.monotonic() - t0 < 8, p.stdout
    living = subprocess.Popen(["setsid", "bash", "-c", "sleep 300 & exit 0"])
    living.wait()
    p = subprocess.run([*guard, "--session", str(living.pid), "--wait", "1", "--kill", "--fail"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "1 process(es)" in p.stdout and "sleep 300" in p.stdout and "killed" in p.stdout
    # negative control: without --wait the ending session is still caught while its sleep runs
    ending = subprocess.Popen(["setsid", "bash", "-c", "sleep 3 & exit 0"])
    ending.wait()
    p = subprocess.run([*guard, "--session", str(ending.pid), "--kill", "--fail"], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 1 and "sleep 3" in p.stdout


def test_make_test_runs_the_multi_process_tests_one_at_a_time_and_the_rest_over_workers():
    """`make test`'s two batches: the slow tests of tests/e2e, tests/distributed and tests/slurm are
    marked `serial` at collection and run in a plain pytest; everything else runs over xdist workers.
    Checked on what pytest selects, not on the names: a slow unit test (in-process) is not serial, a
    fast e2e test is not, the engine-equivalence launches are."""
    files = ["tests/unit/test_gpu_suite.py", "tests/e2e/test_cli.py", "tests/distributed/test_engine_equivalence.py"]

    def selected(expr):
        p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--collect-only",
                            "-m", expr, *files], cwd=REPO, capture_output=True, text=True, timeout=120)
        return {line for line in p.stdout.splitlines() if "::" in line}

    serial, rest = selected("serial"), selected("not serial")
    assert serial and rest and not serial & rest
    assert any("test_engine_equivalence.py::" in t for t in serial)
    assert "tests/e2e/test_cli.py::test_demo_pipeline_sample_and_reconstruct" in serial
    assert "tests/e2e/test_cli.py::test_config_errors_are_one_clear_line" in rest  # not slow
    assert "tests/unit/test_gpu_suite.py::test_gpu_suite_dry_run_prints_every_row" in rest  # slow, in-process
    # slow, but one process at a time (one_process): in the parallel batch
    assert "tests/e2e/test_cli.py::test_transformer_trains_from_extracted_codes" in rest
    recipe = (REPO / "Makefile").read_text().split("\ntest:", 1)[1].split("\n\n", 1)[0]
    assert '-n $(TEST_WORKERS) --durations=15 -m "not serial" tests || rc=$$?' in recipe
    serial_dirs = " ".join(f"tests/{d}" for d in SERIAL_DIRS)  # the only folders where `serial` is set
    assert f"--durations=40 -m serial {serial_dirs} || rc=$$?" in recipe and recipe.rstrip().endswith("exit $$rc")


def test_one_process_tests_start_no_ranks_or_launchers():
    """A test marked `one_process` runs beside another test in the parallel batch, so it must not
    start ranks, launchers or SLURM jobs: its source names none of them. A test parametrized over
    engines (`engine_params`, tests/e2e/runs.py) is marked on its one-process entries only; its
    source is checked the same way, since the others take their process count from the table."""
    import ast

    launchers = ("torchrun", "torch.distributed.run", "sbatch", "srun", "Executor(", "nproc=2", "deepspeed.launcher")
    marked = 0
    for path in sorted((REPO / "tests").glob("*/test_*.py")):
        tree = ast.parse(path.read_text())
        for fn in tree.body:
            if not isinstance(fn, ast.FunctionDef):
                continue
            marks = [ast.unparse(d) for d in fn.decorator_list]
            if not any("one_process" in m or "engine_params(" in m for m in marks):
                continue
            marked += 1
            source = ast.get_source_segment(path.read_text(), fn)
            found = [w for w in launchers if w in source]
            assert not found, f"{path.name}::{fn.name} is marked one_process but starts {found}"
    assert marked >= 10
