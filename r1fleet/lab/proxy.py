"""apt-cacher-ng on the lab bridge: the only way lab hosts reach Debian packages.

PID 1 on the controller is not systemd, so the lab runs its own apt-cacher-ng process
(with a config dir of its own, not /etc/apt-cacher-ng) and stops exactly that PID.
The package cache persists across `lab down` so repeated runs do not re-download.
"""
from __future__ import annotations

import shutil
import socket
import time

from r1fleet.lab import paths, procs

BINARY = "/usr/sbin/apt-cacher-ng"
CACHE = paths.CACHE_DIR / "apt-cacher-ng"
SERVICE_USER = "apt-cacher-ng"


class ProxyError(RuntimeError):
    pass


def url(controller: str) -> str:
    return f"http://{controller}:{paths.PROXY_PORT}"


def write_config(controller: str, debian_mirror: str) -> None:
    conf = paths.PROXY_DIR / "conf"
    conf.mkdir(parents=True, exist_ok=True)
    (paths.PROXY_DIR / "log").mkdir(exist_ok=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    # apt-cacher-ng otherwise remaps deb.debian.org to mirror lists it cannot reach (docs/research/lab-notes.md).
    (conf / "backends_debian").write_text(debian_mirror.rstrip("/") + "/\n")
    (conf / "acng.conf").write_text(
        "# r1fleet lab: apt-cacher-ng for the lab hosts, bound to the lab bridge only.\n"
        f"CacheDir: {CACHE}\n"
        f"LogDir: {paths.PROXY_DIR / 'log'}\n"
        "SupportDir: /usr/lib/apt-cacher-ng\n"
        f"BindAddress: {controller}\n"
        f"Port: {paths.PROXY_PORT}\n"
        "Remap-debrep: file:deb_mirror*.gz /debian ; file:backends_debian\n"
        "ExThreshold: 4\n"
        "ForeGround: 1\n"
    )
    for path in (CACHE, paths.PROXY_DIR / "log"):
        shutil.chown(path, SERVICE_USER, SERVICE_USER)


def marker() -> str:
    return str(paths.PROXY_DIR / "conf")


def start(controller: str, debian_mirror: str) -> int:
    write_config(controller, debian_mirror)
    argv = ["setpriv", f"--reuid={SERVICE_USER}", f"--regid={SERVICE_USER}", "--init-groups",
            BINARY, "-c", marker()]
    pid = procs.start(argv, paths.LOG_DIR / "apt-cacher-ng.log")
    wait_listening(controller, paths.PROXY_PORT, pid, "apt-cacher-ng")
    return pid


def wait_listening(address: str, port: int, pid: int, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((address, port), timeout=0.5):
                return
        except OSError:
            if procs.exited(pid):
                break
            time.sleep(0.1)
    raise ProxyError(f"{what} did not listen on {address}:{port}; see {paths.LOG_DIR}/{what}.log")
