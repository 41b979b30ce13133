"""Lab: hosts that need a GPU driver show the driver operations in `--dry` (and nothing is changed).

The real driver install needs the hardware, so this lab (inventory/lab-drivers.yml: a GPU seen by
lspci only, and an RTX 3090 on driver 535) is only taken through `--dry`. It replaces the default lab
for the length of this module and brings the default lab back afterwards.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import another_lab

ROOT = Path(__file__).resolve().parents[2]
PYINFRA = str(Path(sys.executable).with_name("pyinfra"))
DRIVER_LAB = ROOT / "inventory" / "lab-drivers.yml"


@pytest.fixture(scope="module")
def dry_run(lab_fixture_is_up):
    with another_lab(DRIVER_LAB):
        env = {**os.environ, "R1FLEET_FLEET": str(DRIVER_LAB)}
        run = subprocess.run([PYINFRA, "inventory.py", "deploy.py", "--dry"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
        installed = {
            host: subprocess.run(["ssh", "-F", "/run/r1fleet-lab/ssh_config", host,
                                  "dpkg-query -W -f='${Status}' nvidia-smi 2>/dev/null || true"],
                                 capture_output=True, text=True, timeout=60).stdout
            for host in ("lab-nodriver", "lab-driver535")
        }
        yield run, installed


@pytest.fixture(scope="module")
def lab_fixture_is_up(lab):
    return lab


def test_dry_run_shows_the_driver_each_host_needs(dry_run):
    run, _ = dry_run
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-4000:]
    assert "lab-nodriver: GPU driver install: no NVIDIA driver (1 GPU(s) seen by lspci)" in out
    assert "lab-driver535: GPU driver upgrade: driver 535 is below ollama's minimum 550" in out
    assert "nvidia-open-kernel-dkms" in out  # Ampere and Ada get the open kernel modules
    for op in ("GPU driver | Blacklist nouveau", "GPU driver | NVIDIA persistence daemon", "Reboot to load the new NVIDIA driver"):
        assert op in out, op


def test_dry_run_changes_nothing(dry_run):
    _, installed = dry_run
    assert all("install ok installed" not in status for status in installed.values()), installed
