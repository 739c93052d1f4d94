"""Find the processes a test run started that are still alive, say what each one is doing (command
line and Python stack), and end them. Used by the suite's session-end guard (tests/conftest.py) and
by CI's deadline (.ci/run: `python3 tests/process_guard.py --session SID --kill`).

Standard library only (CI calls it with the system Python); the Python stacks come from py-spy
(the `test` extra), which reads another process's stack without its cooperation, so it works on a
process that ignores every signal or is stuck in C code.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, session id) from /proc/PID/stat, or None if the process is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()  # the command name in parentheses may hold spaces
    return fields[0], int(fields[1]), int(fields[3])


def _pids() -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit()]


def cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    return raw.rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace") or "?"


def descendants(root: int) -> list[int]:
    """Live (not zombie) processes below `root`, parents before children."""
    children: dict[int, list[int]] = {}
    state: dict[int, str] = {}
    for pid in _pids():
        st = _stat(pid)
        if st:
            state[pid] = st[0]
            children.setdefault(st[1], []).append(pid)
    out, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop(0)
        if state.get(pid) != "Z":
            out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def in_session(sid: int) -> list[int]:
    """Live processes of session `sid` (a job started with setsid), other than this one."""
    return [pid for pid in _pids() if pid != os.getpid() and (st := _stat(pid)) and st[2] == sid and st[0] != "Z"]


def _py_spy() -> str | None:
    here = Path(sys.executable).parent / "py-spy"
    venv = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "py-spy"
    for p in (here, venv):
        if p.exists():
            return str(p)
    return shutil.which("py-spy")


def python_stack(pid: int, timeout: float = 20) -> str:
    tool = _py_spy()
    if tool is None:
        return "    (no Python stack: py-spy is not installed; `pip install py-spy`)"
    try:
        p = subprocess.run([tool, "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"    (py-spy did not answer within {timeout:.0f} s)"
    if p.returncode != 0:
        return "    (no Python stack: " + (p.stderr.strip().splitlines() or ["not a Python process"])[-1] + ")"
    return "\n".join("    " + line for line in p.stdout.rstrip().splitlines())


def report(pids: list[int]) -> str:
    lines = []
    for pid in pids:
        st = _stat(pid)
        lines.append(f"--- pid {pid} (parent {st[1] if st else '?'}): {cmdline(pid)}")
        lines.append(python_stack(pid))
    return "\n".join(lines)


def kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--session", type=int, required=True, help="session id (the pid of the setsid'd job)")
    ap.add_argument("--kill", action="store_true", help="SIGKILL them after the report")
    ap.add_argument("--wait", type=float, default=0.0,
                    help="first give them this many seconds to end by themselves (processes that are exiting)")
    ap.add_argument("--fail", action="store_true", help="exit 1 when any is still running")
    a = ap.parse_args(argv)
    pids = wait_for_session(a.session, a.wait)
    print(f"{len(pids)} process(es) of session {a.session} still running" + (":" if pids else "."), flush=True)
    if pids:
        print(report(pids), flush=True)
        if a.kill:
            kill(pids)
            print(f"killed {pids}", flush=True)
    return 1 if pids and a.fail else 0


def wait_for_session(sid: int, seconds: float, poll: float = 0.5) -> list[int]:
    """The live processes of session `sid` once it has emptied or `seconds` have passed. Zombies do
    not count: they have ended and only wait to be reaped, which in a container whose PID 1 does
    not reap orphans can take minutes (`ps -s SID` lists them; a check based on it fails a run in
    which nothing is running)."""
    deadline = time.monotonic() + seconds
    while (pids := in_session(sid)) and time.monotonic() < deadline:
        time.sleep(poll)
    return pids


if __name__ == "__main__":
    sys.exit(main())
