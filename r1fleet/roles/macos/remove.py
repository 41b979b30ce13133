"""Removing what the macOS role wrote: its three LaunchDaemons (Ollama, the model loader, the GPU wired-memory
limit, which is set back to macOS's default), the pinned release under /usr/local/lib/r1fleet, the log folder, and
the hidden `_r1ollama` user and group when they carry r1fleet's name (REAL_NAME); the models stay unless the host
data says `remove_models`.

Homebrew's `ollama` (host data `macos_ollama: homebrew`) stays: brew cannot tell who installed a formula. An
Ollama.app or `brew services` server r1fleet stopped and disabled in launchd stays disabled.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from pyinfra import host
from pyinfra.api import FactBase, deploy, operation

from r1fleet.fleet.config import HostConfig
from r1fleet.operations.removal import ExistingPaths, Removal, remove_paths
from r1fleet.roles.macos.decide import (
    HOME,
    LABEL,
    LOAD_LABEL,
    LOAD_PLIST,
    LOG_FILE,
    PLIST,
    REAL_NAME,
    RELEASE_ROOT,
    USER,
    WIRED_LABEL,
    WIRED_PLIST,
)
from r1fleet.roles.ollama.remove import ollama_models

DAEMONS = ((LOAD_LABEL, LOAD_PLIST), (LABEL, PLIST), (WIRED_LABEL, WIRED_PLIST))  # the loader before its server


class LaunchdLoaded(FactBase):
    """Whether launchd has the system service `label` loaded."""

    default = bool

    def command(self, label: str) -> str:
        return f"launchctl print system/{shlex.quote(label)} >/dev/null 2>&1 && echo loaded || true"

    def process(self, output: list[str]) -> bool:
        return any(line.strip() == "loaded" for line in output)


def dscl_attributes(lines: list[str]) -> dict[str, str]:
    """`dscl . -read PATH KEY...` as {KEY: value}: a value follows its key on the line, or on the lines after it,
    indented (dscl's form for a value with a space).

    >>> dscl_attributes(["RealName:", " r1fleet Ollama", "NFSHomeDirectory: /usr/local/var/r1fleet"])
    {'RealName': 'r1fleet Ollama', 'NFSHomeDirectory': '/usr/local/var/r1fleet'}
    """
    found: dict[str, str] = {}
    key = None
    for line in lines:
        if line.startswith(" ") and key:
            found[key] = (found[key] + " " + line.strip()).strip()
        elif ":" in line:
            key, _, value = line.partition(":")
            found[key] = value.strip()
    return found


class DarwinAccount(FactBase):
    """A local macOS user and its group as a removal sees them: {"user": {RealName, NFSHomeDirectory}, "group":
    {RealName}}, each absent when there is none."""

    default = dict

    def command(self, account: str) -> str:
        u = shlex.quote(account)
        return (f"dscl . -read /Users/{u} RealName NFSHomeDirectory 2>/dev/null | sed 's/^/user:/'; "
                f"dscl . -read /Groups/{u} RealName 2>/dev/null | sed 's/^/group:/'; true")

    def process(self, output: list[str]) -> dict:
        found: dict[str, dict[str, str]] = {}
        for kind in ("user", "group"):
            lines = [line.split(":", 1)[1] for line in output if line.startswith(f"{kind}:")]
            if lines:
                found[kind] = dscl_attributes(lines)
        return found


@operation()
def bootout(label: str):
    """Unload an r1fleet LaunchDaemon from launchd's system domain (it stops, and does not start again)."""
    if not host.get_fact(LaunchdLoaded, label=label):
        host.noop(f"{label} not loaded")
        return
    yield f"launchctl bootout system/{shlex.quote(label)}"


@operation()
def default_wired_limit():
    """Set iogpu.wired_limit_mb back to macOS's own (0) where r1fleet's LaunchDaemon set it."""
    if WIRED_PLIST not in host.get_fact(ExistingPaths, paths=(WIRED_PLIST,)):
        host.noop("r1fleet set no GPU wired-memory limit")
        return
    yield "sysctl iogpu.wired_limit_mb=0"


@operation()
def remove_darwin_account(account: str, home: str):
    """Delete the hidden user and its group when r1fleet made them (both named REAL_NAME), and the user's home."""
    found = host.get_fact(DarwinAccount, account=account)
    user, group = found.get("user"), found.get("group")
    ours_user = user is not None and user.get("RealName") == REAL_NAME and user.get("NFSHomeDirectory") == home
    # its group goes with it (a group of that name that another user still has stays)
    ours_group = group is not None and group.get("RealName") == REAL_NAME and (user is None or ours_user)
    if not (ours_user or ours_group):
        host.noop(f"no account {account} of r1fleet's" + (" (one that is not r1fleet's is kept)" if found else ""))
        return
    u = shlex.quote(account)
    if ours_user:
        yield f"dscl . -delete /Users/{u}"
        yield f"rm -rf -- {shlex.quote(home)}"
    if ours_group:
        yield f"dseditgroup -o delete {u}"


class MacOllamaRemoval(Removal):
    """The macOS role's LaunchDaemons, release, logs and account off the Mac; its models kept or removed."""

    def stop(self) -> None:
        _stop()

    def remove(self) -> None:
        _remove(self.settings)


@deploy("Remove macOS Ollama")
def _stop() -> None:
    for label, _ in host.loop(DAEMONS):
        bootout(name=f"Unload {label}", label=label, _sudo=True)


@deploy("Remove macOS Ollama")
def _remove(settings: HostConfig) -> None:
    default_wired_limit(name="GPU wired-memory limit back to macOS's default", _sudo=True)
    remove_paths(name="Remove the LaunchDaemons", paths=tuple(plist for _, plist in DAEMONS), _sudo=True)
    remove_paths(name=f"Remove {RELEASE_ROOT} and the logs", paths=(RELEASE_ROOT, str(Path(LOG_FILE).parent)),
                 _sudo=True)
    ollama_models(settings, _sudo=True)
    remove_darwin_account(name=f"Remove the account {USER}", account=USER, home=HOME, _sudo=True)
