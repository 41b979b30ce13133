"""Lab: LAN exposure really admits the allow-list and nobody else, and llama-server wants its key.

Deploys lab-dual3090 (llama.cpp, rehearsal) from a copy of inventory/lab.yml that opens it:
listen on its lab address, allow the controller (10.77.0.1/32) -> the controller reaches the
port; allow only another address -> the controller is dropped; a request without the API key is
refused with 401. Root + lab only (tests/lab/conftest.py).
"""
from __future__ import annotations

import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from r1fleet.lab import paths, state

ROOT = Path(__file__).resolve().parents[2]
PYINFRA = str(Path(sys.executable).with_name("pyinfra"))
HOST = "lab-dual3090"
PORT = 8080


def deploy_opened(tmp_path: Path, allow: list[str], address: str) -> subprocess.CompletedProcess:
    fleet = yaml.safe_load(paths.LAB_FLEET_FILE.read_text())
    fleet["hosts"][HOST] = {**fleet["hosts"][HOST], "listen": address, "allow": allow}
    fleet_file = tmp_path / "lab-exposed.yml"
    fleet_file.write_text(yaml.safe_dump(fleet, sort_keys=False))  # host order gives the lab addresses
    env = {**os.environ, "R1FLEET_FLEET": str(fleet_file)}
    return subprocess.run([PYINFRA, "-y", "inventory.py", "deploy.py", "--limit", HOST], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1800)


def http_status(url: str, key: str | None = None) -> int | None:
    """HTTP status, or None when the connection is dropped/refused (the firewall's answer)."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except (urllib.error.URLError, TimeoutError, ConnectionError):
        return None


@pytest.fixture(scope="module")
def address(lab):
    return lab[HOST]["address"]


def test_allowed_controller_reaches_the_port_and_needs_the_key(lab, ssh, address, tmp_path_factory):
    controller = state.controller_address()
    result = deploy_opened(tmp_path_factory.mktemp("open"), [f"{controller}/32"], address)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert http_status(f"http://{address}:{PORT}/health") == 200
    assert http_status(f"http://{address}:{PORT}/props") == 401                # no key -> refused (/props: protected in every build)
    key = ssh(HOST, "cat /etc/r1fleet/api-key").stdout.strip()
    assert key and http_status(f"http://{address}:{PORT}/props", key) == 200
    assert ssh(HOST, "stat -c %a:%U /etc/r1fleet/api-key").stdout.strip() == "600:root"
    # the key is in no unit file, no process command line and no journal line
    # The pattern comes from the key file (-f), so the search itself carries no key in its argv.
    leaks = ssh(HOST, "grep -rlF -f /etc/r1fleet/api-key /etc/systemd /proc/[0-9]*/cmdline 2>/dev/null; "
                      "journalctl -o cat --no-pager | grep -cF -f /etc/r1fleet/api-key")
    assert leaks.stdout.strip().splitlines() == ["0"], leaks.stdout


def test_controller_outside_the_allow_list_is_dropped(lab, ssh, address, tmp_path_factory):
    result = deploy_opened(tmp_path_factory.mktemp("closed"), ["10.77.0.250/32"], address)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert http_status(f"http://{address}:{PORT}/health") is None
    # the service itself is up: the host still answers on loopback
    assert "ok" in ssh(HOST, f"curl -s http://127.0.0.1:{PORT}/health || curl -s http://{address}:{PORT}/health").stdout
