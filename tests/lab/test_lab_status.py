"""Lab: `r1fleet status` and `r1fleet endpoints` on the deployed lab, a stopped service, an unreachable host, and the
deploy's summary ending with each host's endpoint.

Needs root and the lab (tests/lab/conftest.py). The module converges the lab once with the real deploy
(idempotent); every fault it makes is undone before the test ends.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
OLLAMA_HOST, OLLAMA_UNIT = "lab-4090", "r1fleet-ollama.service"
LLAMA_HOST = "lab-dual3090"
STAND_IN = "r1fleet/smollm2:135m-instruct-q4_1"


def r1fleet(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "r1fleet", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def deployed(lab):
    """The lab after the real deploy, and that run's output (its summary ends with the endpoints)."""
    argv = [sys.executable, "-m", "pyinfra", "-y", "inventory.py", "deploy.py"]
    result = subprocess.run(argv, cwd=REPO, env={**os.environ, "R1FLEET_FLEET": "lab"}, capture_output=True,
                            text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    return lab, result.stderr


def test_the_deploy_summary_ends_with_each_hosts_endpoint(deployed):
    lab, summary = deployed
    tail = summary[summary.index("r1fleet: endpoints"):].splitlines()[1:]
    assert sorted(line.split(":", 1)[0].strip() for line in tail) == sorted(lab)
    row = next(line for line in tail if line.strip().startswith(LLAMA_HOST))
    assert f"http://127.0.0.1:8080/v1  model {STAND_IN} (rehearsal for deepseek-r1-distill-llama-70b)" in row


def test_status_reports_what_each_host_serves(deployed):
    lab, _ = deployed
    started = time.monotonic()
    result = r1fleet("status", "--fleet", "lab", "--json")
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stdout + result.stderr
    hosts = {h["host"]: h for h in json.loads(result.stdout)["hosts"]}
    assert set(hosts) == set(lab)
    for name, host in hosts.items():
        assert host["state"] == "serving" and host["loaded"] and host["healthy"], host
        assert host["backend"] == ("llama.cpp" if name == LLAMA_HOST else "ollama"), host
        assert host["model"] == STAND_IN and host["stands_for"].startswith("deepseek-r1-distill-"), host
        assert host["unit"]["state"] == "active (running)" and host["lock"] == "not locked" and not host["drift"]
        port = 8080 if name == LLAMA_HOST else 11434
        assert host["endpoint"]["url"] == f"http://127.0.0.1:{port}/v1" and host["endpoint"]["reach"] == "host"
    # the GPUs the profiles simulate hold the model (the lab's nvidia-smi reports what llama.cpp allocated there)
    assert [d["device"][:4] for d in hosts[LLAMA_HOST]["devices"]] == ["GPU0", "GPU1"]
    assert all(d["used_mib"] > 0 for name in ("lab-3060", OLLAMA_HOST, LLAMA_HOST) for d in hosts[name]["devices"])
    assert hosts["lab-cpu"]["devices"][0]["device"] == "RAM"
    assert elapsed < 10, f"status of the lab took {elapsed:.1f} s (bench/status.py measures it)"


def test_a_stopped_service_is_one_line_and_the_others_still_report(deployed, ssh):
    assert ssh(OLLAMA_HOST, f"systemctl stop {OLLAMA_UNIT}").returncode == 0
    try:
        result = r1fleet("status", "--fleet", "lab", OLLAMA_HOST, LLAMA_HOST)
    finally:
        ssh(OLLAMA_HOST, f"systemctl reset-failed {OLLAMA_UNIT}; systemctl start {OLLAMA_UNIT}")
    assert result.returncode == 1, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith(OLLAMA_HOST)]
    assert lines == [f"{OLLAMA_HOST}      stopped: {OLLAMA_UNIT} is inactive (fix: systemctl start {OLLAMA_UNIT} on "
                     f"{OLLAMA_HOST}, or redeploy)"], result.stdout
    assert any(line.startswith(LLAMA_HOST) and " serving " in line for line in result.stdout.splitlines())
    back = r1fleet("status", "--fleet", "lab", OLLAMA_HOST, "--json")
    assert json.loads(back.stdout)["hosts"][0]["state"] in ("serving", "idle", "loading"), back.stdout


def test_an_unreachable_host_is_one_line_reason_first_in_status_and_verify(deployed, tmp_path):
    fleet = tmp_path / "dead.yml"
    # 10.77.0.254 is inside the lab subnet but no lab host has it: a host of one's own that is down, so a fleet file
    # without `lab:` (a lab fleet serves the lab's hosts at the lab's addresses only, fleet-file.md)
    fleet.write_text("hosts:\n  dead-box: {address: 10.77.0.254, ssh_user: root}\n")
    started = time.monotonic()
    result = r1fleet("status", "--fleet", str(fleet))
    assert time.monotonic() - started < 30
    assert result.returncode == 1 and "Traceback" not in result.stdout + result.stderr
    [line] = [line for line in result.stdout.splitlines() if "dead-box" in line]
    # the reason first (the socket's own words), then where, then the fix
    assert re.match(r"dead-box  unreachable: (No route to host|timed out) connecting over SSH to root@10\.77\.0\.254:22 "
                    r"\(fix: check that the host is up", line), line

    verify = r1fleet("verify", "--fleet", str(fleet), "-k", "service_active or service_enabled or listens_only_on_plan")
    output = verify.stdout + verify.stderr
    assert verify.returncode == 1, output
    # its first check fails with the reason, the others point at it: one failure, not one per check
    failed = [line for line in output.splitlines() if line.startswith(("FAILED", "ERROR")) and "dead-box" in line]
    assert len(failed) == 1 and "2 skipped" in output, output
    assert re.search(r"^dead-box: (No route to host|timed out) connecting over SSH to root@10\.77\.0\.254:22", output,
                     re.MULTILINE), output


def test_endpoints_of_the_lab_answer_with_the_model_they_name(deployed, ssh):
    lab, _ = deployed
    result = r1fleet("endpoints", "--fleet", "lab", "--format", "json")
    assert result.returncode == 0, result.stderr
    endpoints = {e["host"]: e for e in json.loads(result.stdout)["endpoints"]}
    assert set(endpoints) == set(lab)
    for name, endpoint in endpoints.items():  # host-only endpoints: asked on the host itself
        models = ssh(name, f"curl -sS -m 10 {shlex.quote(endpoint['url'] + '/models')}")
        assert models.returncode == 0 and endpoint["model"] in models.stdout, (name, models.stdout, models.stderr)
    env = r1fleet("endpoints", "--fleet", "lab", "--format", "env", LLAMA_HOST)
    assert "OPENAI_BASE_URL=http://127.0.0.1:8080/v1" in env.stdout and "R1FLEET_LAB_DUAL3090_MODEL=" in env.stdout
