"""inventory.py (and the installed package's r1fleet.deploy.inventory:fleet) validates the fleet file before pyinfra
connects to anything."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PYINFRA = Path(sys.executable).with_name("pyinfra")


def run_pyinfra(fleet: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "R1FLEET_FLEET": str(fleet)}
    return subprocess.run([str(PYINFRA), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


INVENTORIES = ["inventory.py", "r1fleet.deploy.inventory:fleet"]


@pytest.mark.parametrize("inventory", INVENTORIES)
def test_invalid_fleet_stops_before_any_connection(tmp_path, inventory):
    fleet = tmp_path / "fleet.yml"
    # 203.0.113.0/24 is TEST-NET-3: were pyinfra to try it, the run would hang or time out.
    fleet.write_text("hosts:\n  gpu-1: {address: 203.0.113.7, port: 99999}\n")
    result = run_pyinfra(fleet, "-y", inventory, "deploy.py")
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "the fleet file is invalid, nothing was deployed" in output
    assert "gpu-1" in output and "port" in output
    assert "Connecting" not in output and "Traceback" not in output


@pytest.mark.parametrize("inventory", INVENTORIES)
def test_valid_fleet_becomes_groups_with_host_data(tmp_path, inventory):
    fleet = tmp_path / "fleet.yml"
    fleet.write_text("defaults: {rehearsal: true, mirror: 'http://203.0.113.1:8088'}\nhosts:\n  gpu-1: {address: 203.0.113.7, groups: [attic]}\n")
    result = run_pyinfra(fleet, inventory, "debug-inventory")
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr  # pyinfra logs to stderr
    assert "gpu-1" in output and "attic" in output and "203.0.113.7" in output



@pytest.mark.parametrize("job, missing", [("deploy/remove.py", "deploy/no-such-job.py"),
                                          ("r1fleet.deploy.remove.remove_r1", "r1fleet.deploy.remove.no_such_job"),
                                          ("r1fleet.deploy.remove:remove_r1", "r1fleet.deploy.remove:no_such_job")])
def test_pyinfra_takes_the_removal_as_a_file_or_from_the_installed_package(tmp_path, job, missing):
    """pyinfra resolves the job before it reads the inventory: one it cannot find stops the run with pyinfra's own
    error first, so reaching the fleet file's validation proves the name resolved."""
    fleet = tmp_path / "fleet.yml"
    fleet.write_text("hosts:\n  gpu-1: {address: 203.0.113.7, port: 99999}\n")
    found = run_pyinfra(fleet, "-y", "r1fleet.deploy.inventory:fleet", job)
    assert "the fleet file is invalid" in found.stdout + found.stderr and "Connecting" not in found.stdout
    unknown = run_pyinfra(fleet, "-y", "r1fleet.deploy.inventory:fleet", missing)
    assert unknown.returncode != 0 and "the fleet file is invalid" not in unknown.stdout + unknown.stderr
