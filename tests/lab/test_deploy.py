"""Lab integration: `R1FLEET_FLEET=lab pyinfra -y inventory.py deploy.py` converges every lab host.

Real SSH, real systemd, real units and the real llama-server from the distro package; only the GPUs
(profiles) and the Ollama binary (tests/standins/ollama) are stand-ins. The lab is always rehearsal.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from r1fleet.lab import state

ROOT = Path(__file__).resolve().parents[2]
PYINFRA = str(Path(sys.executable).with_name("pyinfra"))
UNITS = ("r1fleet-ollama.service", "r1fleet-llama-server.service")
MAX_EXPOSURE = 2.5


def deploy(*extra: str, timeout: int = 1800) -> subprocess.CompletedProcess:
    env = {**os.environ, "R1FLEET_FLEET": "lab"}
    return subprocess.run([PYINFRA, "-y", "inventory.py", "deploy.py", *extra], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def changed_count(output: str) -> int:
    """The 'Success' (= changed) column of pyinfra's Grand total row; '-' means none."""
    row = next(line for line in output.splitlines() if line.strip().startswith("Grand total"))
    cells = row.split()[2:]  # hosts, success (changed), error, no change
    return 0 if cells[1] == "-" else int(cells[1])


def unit_of(ssh, host: str) -> str:
    for unit in UNITS:
        if ssh(host, f"test -f /etc/systemd/system/{unit}").returncode == 0:
            return unit
    pytest.fail(f"{host}: no r1fleet unit written")


def unit_state(ssh, host: str, unit: str) -> dict[str, str]:
    out = ssh(host, f"systemctl show -p ActiveState -p UnitFileState -p ExecMainStartTimestampMonotonic {unit}; "
                    f"stat -c 'Mtime=%Y' /etc/systemd/system/{unit}").stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


@pytest.fixture(scope="module")
def converged(lab):
    first = deploy()
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    return first


def test_every_lab_host_serves_its_plan(converged, lab, ssh):
    for host in lab:
        unit = unit_of(ssh, host)
        status = unit_state(ssh, host, unit)
        assert status["ActiveState"] == "active" and status["UnitFileState"] == "enabled", (host, status)
        port = 11434 if unit == UNITS[0] else 8080
        listening = ssh(host, "ss -Hltn").stdout.split("\n")
        ours = [line.split()[3] for line in listening if line.split() and line.split()[3].endswith(f":{port}")]
        assert ours == [f"127.0.0.1:{port}"], (host, ours)
        if unit == UNITS[0]:
            body = json.dumps({"model": "r1fleet/smollm2:135m-instruct-q4_1", "stream": False,
                               "messages": [{"role": "user", "content": "Say hello."}]})
            url = f"http://127.0.0.1:{port}/api/chat"
        else:
            body = json.dumps({"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 16})
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
        answer = ssh(host, f"curl -fsS --max-time 120 -H 'Content-Type: application/json' -d @- {url}", stdin=body)
        assert answer.returncode == 0, (host, answer.stderr)
        reply = json.loads(answer.stdout)
        text = reply["message"]["content"] if "message" in reply else reply["choices"][0]["message"]["content"]
        assert text.strip(), (host, reply)


def test_units_score_at_most_2_5(converged, lab, ssh):
    for host in lab:
        unit = unit_of(ssh, host)
        out = ssh(host, f"systemd-analyze security --no-pager {unit}").stdout
        score = float(re.search(r"Overall exposure level for \S+: ([0-9.]+)", out).group(1))
        assert score <= MAX_EXPOSURE, (host, unit, score)


def test_tensor_split_host_runs_llama_server_with_the_split(converged, lab, ssh):
    split_hosts = [h for h in lab if unit_of(ssh, h) == UNITS[1]]
    assert split_hosts, "the lab has a multi-GPU profile planned onto llama.cpp"
    for host in split_hosts:
        argv = ssh(host, "tr '\\0' ' ' < /proc/$(systemctl show -p MainPID --value r1fleet-llama-server)/cmdline").stdout
        assert "--tensor-split" in argv and "--split-mode layer" in argv, argv


def test_second_run_changes_nothing(converged, lab, ssh):
    before = {h: unit_state(ssh, h, unit_of(ssh, h)) for h in lab}
    again = deploy()
    assert again.returncode == 0, again.stderr[-4000:]
    assert changed_count(again.stdout + again.stderr) == 0
    after = {h: unit_state(ssh, h, unit_of(ssh, h)) for h in lab}
    assert after == before  # same unit mtime (not rewritten), same start time (not restarted)


def test_the_ansible_inventory_of_the_lab_deploys_it_too(converged, lab, ssh):
    """An Ansible user's inventory (inventory/ansible/lab-hosts.yml) reaches the same hosts with the
    same plans: on the converged lab it changes nothing."""
    env = {**os.environ, "R1FLEET_FLEET": str(ROOT / "inventory/ansible/lab-hosts.yml")}
    run = subprocess.run([PYINFRA, "-y", "inventory.py", "deploy.py"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert changed_count(run.stdout + run.stderr) == 0
    assert "all 4 host(s) converged" in run.stderr


def test_a_host_stopped_mid_run_fails_alone(converged, lab, ssh):
    victim = sorted(lab)[0]
    # Force work on every host so the run is still going when the victim disappears.
    for host in lab:
        ssh(host, f"rm -f /etc/systemd/system/{unit_of(ssh, host)}")
    env = {**os.environ, "R1FLEET_FLEET": "lab"}
    run = subprocess.Popen([PYINFRA, "-y", "inventory.py", "deploy.py"], cwd=ROOT, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in run.stdout:
            lines.append(line)
            if "Starting operation" in line or "--> Beginning operation run" in line:
                break
        os.kill(state.load_state()["hosts"][victim]["pid"], signal.SIGTERM)
        lines.extend(run.stdout)
        run.wait(timeout=1800)
        output = "".join(lines)
        assert run.returncode != 0, output[-4000:]
        assert "r1fleet: 1 of" in output, output[-4000:]
        summary = output[output.index("r1fleet: 1 of"):]
        assert f"{victim}: failed at" in summary
        for other in set(lab) - {victim}:
            assert other not in summary, summary
            unit = unit_of(ssh, other)
            assert unit_state(ssh, other, unit)["ActiveState"] == "active", output[-4000:]
    finally:
        if run.poll() is None:
            run.kill()
        subprocess.run([sys.executable, "-m", "r1fleet.lab", "up"], capture_output=True, timeout=900)  # restore
        deploy("--limit", victim)
