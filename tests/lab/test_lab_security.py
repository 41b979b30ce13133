"""Lab: closed before open. Overlapping allow-lists load, a flushed ruleset is noticed and restored, and a
backend switch leaves exactly one r1fleet service.

Root + lab only (tests/lab/conftest.py). Each test deploys a copy of inventory/lab.yml with one host
changed, then the module converges the lab back to inventory/lab.yml.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from r1fleet.lab import paths, state

ROOT = Path(__file__).resolve().parents[2]
PYINFRA = str(Path(sys.executable).with_name("pyinfra"))
SPLIT_HOST = "lab-dual3090"  # llama.cpp, port 8080
OLLAMA_HOST = "lab-4090"     # Ollama, port 11434


def deploy_changed(tmp_path: Path, host: str, **changes) -> subprocess.CompletedProcess:
    fleet = yaml.safe_load(paths.LAB_FLEET_FILE.read_text())
    fleet["hosts"][host] = {**fleet["hosts"][host], **changes}
    fleet_file = tmp_path / "lab-changed.yml"
    fleet_file.write_text(yaml.safe_dump(fleet, sort_keys=False))
    return run_deploy(str(fleet_file), host)


def run_deploy(fleet: str, host: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "R1FLEET_FLEET": fleet}
    return subprocess.run([PYINFRA, "-y", "inventory.py", "deploy.py", "--limit", host], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1800)


def verify(fleet: str, expression: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "r1fleet", "verify", "--fleet", fleet, "-k", expression], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)


def reaches(ssh, source: str, address: str, port: int) -> bool:
    """Whether a TCP connection from lab host `source` to address:port gets through within 3 s."""
    probe = ssh(source, f"timeout 3 bash -c 'exec 3<>/dev/tcp/{address}/{port}' && echo open || echo closed")
    return probe.stdout.strip().endswith("open")


@pytest.fixture(scope="module")
def restore_lab(lab):
    yield lab
    for host in (SPLIT_HOST, OLLAMA_HOST):
        run_deploy("lab", host)


def test_overlapping_allow_entries_load_and_filter(restore_lab, ssh, tmp_path):
    """[controller/32, 10.77.0.0/30] overlap: the table loads, the controller is admitted, lab-4090 (.12) is not."""
    address = restore_lab[SPLIT_HOST]["address"]
    allow = [f"{state.controller_address()}/32", "10.77.0.0/30"]
    result = deploy_changed(tmp_path, SPLIT_HOST, listen=address, allow=allow)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    table = ssh(SPLIT_HOST, "nft list table inet r1fleet").stdout
    assert "10.77.0.0/30" in table and "drop" in table, table
    assert ssh(SPLIT_HOST, "systemctl show -p Requires --value r1fleet-llama-server").stdout.count("r1fleet-firewall.service")
    import urllib.request

    with urllib.request.urlopen(f"http://{address}:8080/health", timeout=5) as response:
        assert response.status == 200
    assert not reaches(ssh, OLLAMA_HOST, address, 8080)


def test_a_flushed_ruleset_is_noticed_and_restored(restore_lab, ssh, tmp_path):
    """Starting Debian's nftables.service (`flush ruleset`) removes r1fleet's table: verify fails naming the
    host and the check, the next deploy restores it, and a reload of nftables.service keeps it."""
    address = restore_lab[SPLIT_HOST]["address"]
    changed = {"listen": address, "allow": [f"{state.controller_address()}/32"]}
    assert deploy_changed(tmp_path, SPLIT_HOST, **changed).returncode == 0
    fleet = str(tmp_path / "lab-changed.yml")
    ssh(SPLIT_HOST, "systemctl start nftables")
    assert ssh(SPLIT_HOST, "nft list table inet r1fleet").returncode != 0  # the flush took it
    failed = verify(fleet, f"{SPLIT_HOST} and firewall")
    assert failed.returncode == 1 and f"{SPLIT_HOST}: nftables has no table inet r1fleet" in failed.stdout, failed.stdout[-3000:]
    assert run_deploy(fleet, SPLIT_HOST).returncode == 0
    assert ssh(SPLIT_HOST, "nft list table inet r1fleet").returncode == 0
    ssh(SPLIT_HOST, "systemctl reload nftables")
    assert ssh(SPLIT_HOST, "nft list table inet r1fleet").returncode == 0  # reloaded after nftables' own flush
    assert verify(fleet, f"{SPLIT_HOST} and firewall").returncode == 0
    ssh(SPLIT_HOST, "systemctl stop nftables; systemctl disable nftables")


def test_a_table_loaded_from_other_rules_is_replaced_though_nothing_changed(restore_lab, ssh, tmp_path):
    """Audit M9: the state a run cut between writing the rules and loading them leaves: the file is the planned
    one, nftables still holds the earlier, wider table. The next deploy changes no file, yet reloads the table."""
    address = restore_lab[SPLIT_HOST]["address"]
    wide = {"listen": address, "allow": [f"{state.controller_address()}/32", "10.77.0.0/24"]}
    assert deploy_changed(tmp_path, SPLIT_HOST, **wide).returncode == 0
    assert ssh(SPLIT_HOST, "cp /etc/r1fleet/nftables.conf /root/wide.nft").returncode == 0
    narrow = {"listen": address, "allow": [f"{state.controller_address()}/32"]}
    assert deploy_changed(tmp_path, SPLIT_HOST, **narrow).returncode == 0
    assert reaches(ssh, OLLAMA_HOST, address, 8080) is False
    assert ssh(SPLIT_HOST, "nft -f /root/wide.nft").returncode == 0  # the earlier table, under the planned file
    assert reaches(ssh, OLLAMA_HOST, address, 8080) is True
    again = run_deploy(str(tmp_path / "lab-changed.yml"), SPLIT_HOST)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-2000:]
    assert "10.77.0.0/24" not in ssh(SPLIT_HOST, "nft list table inet r1fleet").stdout
    assert reaches(ssh, OLLAMA_HOST, address, 8080) is False


def test_a_port_change_and_the_end_of_exposure_never_leave_the_service_unfiltered(restore_lab, ssh, tmp_path):
    """Audit M9: the service is stopped before the table stops filtering its old port (here 8080 -> 8181), and
    before the table goes when nothing is exposed any more; each time it comes back on the planned address."""
    address = restore_lab[SPLIT_HOST]["address"]
    exposed = {"listen": address, "allow": [f"{state.controller_address()}/32"]}
    assert deploy_changed(tmp_path, SPLIT_HOST, **exposed).returncode == 0
    moved = deploy_changed(tmp_path, SPLIT_HOST, port=8181, **exposed)
    assert moved.returncode == 0, moved.stdout[-4000:] + moved.stderr[-2000:]
    assert "Stop r1fleet-llama-server.service while its filter changes" in moved.stdout + moved.stderr
    assert not reaches(ssh, OLLAMA_HOST, address, 8181) and not reaches(ssh, OLLAMA_HOST, address, 8080)
    closed = run_deploy("lab", SPLIT_HOST)
    assert closed.returncode == 0, closed.stdout[-4000:] + closed.stderr[-2000:]
    assert "Stop r1fleet-llama-server.service while its filter changes (no longer exposed)" in closed.stdout + closed.stderr
    listening = ssh(SPLIT_HOST, "ss -ltnH").stdout
    assert f"{address}:" not in listening and "127.0.0.1:8080 " in listening, listening


def test_switching_backend_leaves_one_service_and_one_port(restore_lab, ssh, tmp_path):
    result = deploy_changed(tmp_path, OLLAMA_HOST, backend="llama.cpp")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    units = ssh(OLLAMA_HOST, "ls /etc/systemd/system | grep '^r1fleet-.*\\.service$' | grep -v firewall").stdout.split()
    assert units == ["r1fleet-llama-server.service"], units
    listening = ssh(OLLAMA_HOST, "ss -ltnH").stdout
    assert ":8080 " in listening and ":11434 " not in listening, listening
    back = run_deploy("lab", OLLAMA_HOST)
    assert back.returncode == 0, back.stdout[-4000:]
    units = ssh(OLLAMA_HOST, "ls /etc/systemd/system | grep '^r1fleet-.*\\.service$' | grep -v firewall").stdout.split()
    assert units == ["r1fleet-ollama-preload.service", "r1fleet-ollama.service"], units


def test_a_deploy_stopped_before_the_restart_is_completed_by_the_next_run(restore_lab, ssh):
    """The state a deploy killed between writing the unit and restarting the service leaves behind: the unit
    file is the planned one, the service still runs an older one. Nothing changes in the next run, yet it
    restarts the service, because the host shows the service predates its unit (audit M9)."""
    assert run_deploy("lab", SPLIT_HOST).returncode == 0
    unit = "/etc/systemd/system/r1fleet-llama-server.service"
    older = (f"cp {unit} /root/planned.service && sed -i 's/ -c 8192 / -c 4096 /' {unit} && systemctl daemon-reload "
             f"&& systemctl restart r1fleet-llama-server && sleep 1.1 && cp /root/planned.service {unit}")
    assert ssh(SPLIT_HOST, older).returncode == 0
    running = "tr '\\0' ' ' < /proc/$(systemctl show -p MainPID --value r1fleet-llama-server)/cmdline"
    assert " -c 4096 " in ssh(SPLIT_HOST, running).stdout  # the interrupted state: older service, planned file
    again = run_deploy("lab", SPLIT_HOST)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-2000:]
    assert " -c 8192 " in ssh(SPLIT_HOST, running).stdout
    assert ssh(SPLIT_HOST, "systemctl show -p NeedDaemonReload --value r1fleet-llama-server").stdout.strip() == "no"


def test_systemd_reads_escaped_values_back_as_written(lab, ssh):
    """Real systemd hands the service what r1fleet escapes as one assignment and one word (audit L3)."""
    from r1fleet.render.systemd_unit import environment_assignment, systemd_word

    hostile = 'GPU-a" "LD_PRELOAD=/tmp/evil.so %n$HOME\\'
    out = "/run/r1fleet-escape-check.out"
    unit = ("[Service]\nType=oneshot\n"
            f'Environment="{environment_assignment("CUDA_VISIBLE_DEVICES", hostile)}"\n'
            f"StandardOutput=append:{out}\n"
            f"ExecStart=/usr/bin/printf {systemd_word('<%s>')} {systemd_word(hostile)}\n"
            "ExecStart=/usr/bin/env\n")
    path = "/run/systemd/system/r1fleet-escape-check.service"
    ssh("lab-cpu", f"rm -f {out}; cat > {path} <<'EOF'\n{unit}EOF\nsystemctl daemon-reload")
    try:
        ssh("lab-cpu", "systemctl start r1fleet-escape-check")
        seen = ssh("lab-cpu", f"cat {out}").stdout
    finally:
        ssh("lab-cpu", f"rm -f {path} {out}; systemctl daemon-reload")
    # unescaped, systemd would read two assignments, split the word, and `%n`/`$HOME` would be replaced
    assert seen.startswith(f"<{hostile}>"), seen
    assert f"\nCUDA_VISIBLE_DEVICES={hostile}\n" in seen and "\nLD_PRELOAD" not in seen, seen
