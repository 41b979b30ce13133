"""Lab: hosts on Debian 12 and 13 (issue 24, item 1). inventory/lab-distros.yml boots lab-bookworm (systemd 252,
nftables 1.0.6, CPU only) and lab-trixie (systemd 257, nftables 1.1.3, one simulated RTX 3060), each on Ollama and
opened to the controller alone. On each release the deploy converges, a second run changes nothing, verify passes, the hardened unit keeps
every directive (none ignored by the older systemd; `systemd-analyze security` within the template's target) and
the firewall table is loaded and drops a host outside the allow-list. Root + lab only (tests/lab/conftest.py); the
default lab comes back afterwards.
"""
from __future__ import annotations

import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from conftest import another_lab

from test_deploy import changed_count, deploy

ROOT = Path(__file__).resolve().parents[2]
DISTROS_LAB = ROOT / "inventory/lab-distros.yml"
R1FLEET = str(Path(sys.executable).with_name("r1fleet"))
RELEASES = {"lab-bookworm": ("12", 252), "lab-trixie": ("13", 257)}  # VERSION_ID, systemd's version
GPU_HOST = "lab-trixie"
UNIT = "r1fleet-ollama.service"
PORT = 11434
EXPOSURE_TARGET = 2.5  # r1fleet/operations/templates/r1fleet-service.j2


@pytest.fixture(scope="module")
def lab_is_up(lab):
    return lab


@pytest.fixture(scope="module")
def distros_lab(lab_is_up):
    with another_lab(DISTROS_LAB):
        first = deploy(fleet=DISTROS_LAB)
        assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-3000:]
        yield first


def test_each_host_runs_its_release(distros_lab, ssh):
    for host, (version, systemd) in RELEASES.items():
        release = ssh(host, ". /etc/os-release && echo $VERSION_ID; systemctl --version").stdout.split()
        assert release[0] == version and release[2] == str(systemd), (host, release[:3])


def test_a_second_run_changes_nothing_and_verify_passes(distros_lab, tmp_path):
    again = deploy(fleet=DISTROS_LAB)
    assert again.returncode == 0 and changed_count(again.stdout + again.stderr) == 0, again.stdout[-3000:]
    report = tmp_path / "verify.xml"
    run = subprocess.run([R1FLEET, "verify", "--fleet", str(DISTROS_LAB), "--junit", str(report)], cwd=ROOT,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0 and "2/2 hosts pass" in run.stdout, run.stdout[-4000:]
    cases = {case.get("name"): [child.tag for child in case] for case in ET.parse(report).iter("testcase")}
    for host in RELEASES:  # each really answered through its runner, behind its firewall
        for check in ("test_chat_answers", "test_firewall_in_place", "test_outside_allow_list_refused"):
            assert cases[f"{check}[{host}]"] == [], (host, check, cases.get(f"{check}[{host}]"))
    assert cases[f"test_model_on_gpu[{GPU_HOST}]"] == []  # the simulated GPU, a ggml-rpc-server, holds the model


def test_the_unit_is_hardened_on_each_release(distros_lab, ssh):
    for host in RELEASES:
        # systemd logs every directive it does not know or cannot apply, naming the unit: none may be dropped.
        ignored = ssh(host, f"journalctl -b --no-pager -o cat _PID=1 | grep -F '{UNIT}:' || true").stdout
        assert not re.search(r"unknown|ignoring|not supported|unsupported", ignored, re.I), (host, ignored)
        applied = ssh(host, f"systemctl show -p ProtectProc -p NoNewPrivileges -p ProtectSystem {UNIT}")
        assert set(applied.stdout.split()) == {"NoNewPrivileges=yes", "ProtectProc=invisible", "ProtectSystem=strict"}, (
            host, applied.stdout)
        security = ssh(host, f"systemd-analyze security --no-pager {UNIT}").stdout
        level = re.search(rf"Overall exposure level for {re.escape(UNIT)}: ([\d.]+)", security)
        assert level and float(level.group(1)) <= EXPOSURE_TARGET, (host, security[-400:])


def test_the_firewall_is_loaded_and_drops_the_other_host(distros_lab, ssh):
    addresses = {host: distros_lab_address(ssh, host) for host in RELEASES}
    for host, other in (("lab-bookworm", "lab-trixie"), ("lab-trixie", "lab-bookworm")):
        rules = ssh(host, "nft list table inet r1fleet").stdout
        assert f"ip saddr @allow4 tcp dport {PORT} accept" in rules and f"tcp dport {PORT} counter" in rules, rules
        probe = ssh(other, f"timeout 3 bash -c 'exec 3<>/dev/tcp/{addresses[host]}/{PORT}' && echo open || echo closed")
        assert probe.stdout.strip().endswith("closed"), (other, host, probe.stdout)


def distros_lab_address(ssh, host: str) -> str:
    return ssh(host, "hostname -I").stdout.split()[0]
