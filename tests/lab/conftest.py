"""The lab fixture: bring the simulated fleet up once per session (as root), down at the end.

Set R1FLEET_KEEP_LAB=1 to leave it up after the session (faster re-runs while developing).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
from xdist.scheduler import LoadScopeScheduling

from r1fleet.lab import state

CONTROLLER_TOOLS = ("systemd-nspawn", "debootstrap", "apt-cacher-ng", "ssh", "ip")
LAST_TEST = "test_down_leaves_nothing_behind"
REBOOTS_THE_LAB = ("test_driver_profiles.py", "test_lab_pools.py", "test_lab_distros.py")


def skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "lab tests need root (network namespaces, mounts, systemd-nspawn); run as root"
    missing = [tool for tool in CONTROLLER_TOOLS
               if not shutil.which(tool) and not os.path.exists(f"/usr/sbin/{tool}")]
    if missing:
        return ("lab tests need controller packages: apt-get install debootstrap systemd-container "
                f"iproute2 apt-cacher-ng openssh-client (missing: {', '.join(missing)})")
    return None


class OneLab(LoadScopeScheduling):
    """pytest-xdist's scheduling by module, with every lab test in one scope: one worker runs them all, in
    collection order, on the one lab they share; the other worker runs the fast tests meanwhile. (xdist's own
    `loadgroup` renames node ids, which pytest 9 no longer reads.)"""

    def _split_scope(self, nodeid: str) -> str:
        return "tests/lab" if nodeid.startswith("tests/lab/") else super()._split_scope(nodeid)


def pytest_xdist_make_scheduler(config, log):
    return OneLab(config, log)


def pytest_collection_modifyitems(config, items):
    reason = skip_reason()
    lab_dir = os.path.dirname(__file__)
    lab_items = [item for item in items if str(item.fspath).startswith(lab_dir)]
    for item in lab_items:
        item.add_marker(pytest.mark.lab)
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))
    # The modules that boot another lab file (another_lab) run after the others: the default lab they bring back
    # is fresh, and every module after them would deploy it again from nothing. `lab down` runs last of all.
    last = [item for item in items if item.name == LAST_TEST]
    rebooting = [item for item in items if os.path.basename(str(item.fspath)) in REBOOTS_THE_LAB and item not in last]
    others = [item for item in items if item not in last and item not in rebooting]
    # The lab goes first: under pytest-xdist its worker starts it at once, and the fast tests fill the other.
    lab = [item for item in others if item in lab_items] + rebooting + last
    items[:] = lab + [item for item in others if item not in lab_items]


def lab_command(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "r1fleet.lab", *args],
                          capture_output=True, text=True, timeout=timeout)


@contextmanager
def another_lab(fleet_file: Path) -> Iterator[None]:
    """For one module: the lab rebooted as another lab file's hosts, then the default lab back for the others."""
    lab_command("down")
    try:
        up = lab_command("up", "--fleet", str(fleet_file))
        assert up.returncode == 0, up.stdout + up.stderr
        yield
    finally:
        lab_command("down")
        lab_command("up")


@pytest.fixture(scope="session")
def lab(tmp_path_factory):
    """The lab hosts (state.lab_hosts() after `lab up`), by name. The session's deploys share a controller
    artifact cache of their own (r1fleet/operations/fleet_cache.py), empty at the start, so the first deploy
    fetches every artifact from the lab mirror once."""
    os.environ.setdefault("R1FLEET_CACHE_DIR", str(tmp_path_factory.mktemp("controller-cache")))
    result = lab_command("up")
    if result.returncode != 0:
        pytest.fail(f"r1fleet lab up failed (exit {result.returncode}):\n{result.stdout}\n{result.stderr}")
    yield {host["name"]: host for host in state.lab_hosts()}
    if os.environ.get("R1FLEET_KEEP_LAB") != "1":
        lab_command("down")  # harmless when a test already took the lab down


@pytest.fixture
def ssh(lab):
    """Run a command on a lab host over real SSH; returns the CompletedProcess."""
    def run(host: str, command: str, timeout: int = 120, stdin: str | None = None) -> subprocess.CompletedProcess:
        argv = ["ssh", "-F", str(state.ssh_config_path()), "-o", "BatchMode=yes", host, command]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=stdin)
    return run
