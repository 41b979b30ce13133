"""Processes the lab starts: launched in their own session, tracked and stopped by PID."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def is_ours(pid: int | None, marker: str) -> bool:
    """True when PID is alive and its command line contains MARKER (guards against PID reuse)."""
    if not pid:
        return False
    return any(marker in arg for arg in cmdline(pid))


def find(marker: str, program: str) -> list[int]:
    """PIDs whose argv[0] ends with PROGRAM and whose command line contains MARKER."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        argv = cmdline(int(entry.name))
        if argv and argv[0].endswith(program) and any(marker in arg for arg in argv):
            found.append(int(entry.name))
    return found


def start(argv: list[str], log_file: Path, env: dict | None = None) -> int:
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("ab") as log:
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env=env, start_new_session=True,  # Ctrl-C in the terminal reaches us, not it
        )
    return process.pid


def stop(pid: int, marker: str, timeout: float = 20.0) -> None:
    """SIGTERM the process if it is still ours; SIGKILL after TIMEOUT seconds."""
    if not is_ours(pid, marker):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _reap(pid)
        if not is_ours(pid, marker):
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    for _ in range(50):
        _reap(pid)
        if not is_ours(pid, marker):
            return
        time.sleep(0.1)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def exited(pid: int) -> bool:
    _reap(pid)
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z"
