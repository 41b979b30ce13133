"""Lab: llama-server's own memory account at each start (issue 23 item 11), and its prompt cache sized by the plan
(item 9), on the lab's llama.cpp host: Debian's real llama-server over two ggml RPC devices standing in for GPUs.

`r1fleet verify` and `r1fleet status` show llama.cpp's breakdown of each device against the plan; a copy of the lab
fleet whose lock understates the plan's device figures (the deployed unit unchanged) fails verify's
memory_as_planned and is a problem in status. Root + lab only (tests/lab/conftest.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

from r1fleet.lab import paths

REPO = Path(__file__).resolve().parents[2]
LLAMA_HOST = "lab-dual3090"
LLAMA_UNIT = "r1fleet-llama-server.service"
R1FLEET = str(Path(sys.executable).with_name("r1fleet"))


def r1fleet(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([R1FLEET, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def deployed(lab):
    """The lab's llama.cpp host after the real deploy (idempotent, so safe to repeat)."""
    argv = [sys.executable, "-m", "pyinfra", "-y", "inventory.py", "deploy.py", "--limit", LLAMA_HOST]
    result = subprocess.run(argv, cwd=REPO, env={**os.environ, "R1FLEET_FLEET": "lab"}, capture_output=True,
                            text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    return lab


def memory_line(output: str, host: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith(f"{host}: llama.cpp's own account at this start")]
    assert lines, output[-4000:]
    return lines[-1]


def test_the_unit_passes_the_plans_prompt_cache_and_llama_server_takes_it(deployed, ssh):
    plan = json.loads(r1fleet("plan", "--fleet", "lab", "--json").stdout)
    cache = next(h for h in plan["hosts"] if h["host"] == LLAMA_HOST)["cache_ram_mib"]
    assert cache == 8192  # the profile's 64 GB hold llama.cpp's default beside the server and the system
    shown = ssh(LLAMA_HOST, f"systemctl show -p ExecStart --value {LLAMA_UNIT}").stdout
    assert f"--cache-ram {cache} " in shown, shown
    invocation = ssh(LLAMA_HOST, f"systemctl show -p InvocationID --value {LLAMA_UNIT}").stdout.strip()
    log = ssh(LLAMA_HOST, f"journalctl -o cat --no-pager _SYSTEMD_INVOCATION_ID={invocation}").stdout
    assert f"prompt cache is enabled, size limit: {cache} MiB" in log, log[-3000:]


def test_verify_and_status_show_llama_cpps_account_of_each_device(deployed):
    verified = r1fleet("verify", "--fleet", "lab", "-k", LLAMA_HOST)
    assert verified.returncode == 0, verified.stdout[-4000:] + verified.stderr[-2000:]
    line = memory_line(verified.stdout, LLAMA_HOST)
    # the stand-in's two RPC devices in llama.cpp's order, each within the plan's figures for its GPU
    assert "RPC0 (127.0.0.1:" in line and "RPC1 (127.0.0.1:" in line and "host " in line, line
    status = r1fleet("status", "--fleet", "lab", LLAMA_HOST)
    assert status.returncode == 0, status.stdout + status.stderr
    assert memory_line(status.stdout, LLAMA_HOST).split(": ", 2)[2] == line.split(": ", 2)[2]
    document = json.loads(r1fleet("status", "--fleet", "lab", "--json", LLAMA_HOST).stdout)["hosts"][0]
    assert document["llama_memory"] == line.split(": ", 2)[2] and document["healthy"], document


@pytest.fixture
def understated(deployed, tmp_path) -> Path:
    """A copy of the lab fleet whose lock gives lab-dual3090's devices less than llama.cpp holds there; the lock's
    plan is otherwise the one deployed, so nothing on the host changes."""
    fleet = tmp_path / "lab-understated.yml"
    fleet.write_text(paths.LAB_FLEET_FILE.read_text())
    locked = r1fleet("lock", "--fleet", str(fleet), LLAMA_HOST)
    assert locked.returncode == 0, locked.stdout + locked.stderr
    lock_file = fleet.with_name(fleet.name + ".lock")
    text = lock_file.read_text()
    header = "".join(line for line in text.splitlines(keepends=True) if line.startswith("#"))
    document = yaml.safe_load(text)
    for device in document["hosts"][LLAMA_HOST]["plan"]["devices"]:
        device.update(weights_mib=20, kv_cache_mib=20, compute_mib=20, headroom_mib=0)
        device["planned_mib"] = 60 + device["overhead_mib"]
    lock_file.write_text(header + yaml.safe_dump(document, sort_keys=False))
    return fleet


def test_an_understated_plan_fails_verify_and_shows_in_status(understated, tmp_path):
    junit = tmp_path / "junit.xml"
    verified = r1fleet("verify", "--fleet", str(understated), "-k", LLAMA_HOST, "--junit", str(junit))
    output = verified.stdout + verified.stderr
    assert verified.returncode == 1, output[-4000:]
    failed = {case.get("name") for case in ET.parse(junit).getroot().iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None}
    assert failed == {f"test_memory_as_planned[{LLAMA_HOST}]"}, output[-4000:]
    assert "RPC0 (127.0.0.1:" in output and "by llama.cpp's own account" in output and "over the 60 the plan gives GPU0" in output
    status = r1fleet("status", "--fleet", str(understated), "--json", LLAMA_HOST)
    host = json.loads(status.stdout)["hosts"][0]
    assert not host["healthy"] and any("over the 60 the plan gives GPU1" in p for p in host["problems"]), host
