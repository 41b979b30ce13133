"""Integration tests of the lab: real systemd hosts over SSH, apt through the proxy, simulated GPUs,
the probe -> plan path for every profile, and a clean `lab down`. Root only (see conftest)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from r1fleet.lab import network, paths, procs, profiles, state
from r1fleet.probe.facts import PROBE_SCRIPT as PROBE_SH

REPO = Path(__file__).resolve().parents[2]
LAB_HOSTS = state.read_lab_layout().hosts  # name -> profile, from inventory/lab.yml


def lab_command(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "r1fleet.lab", *args], capture_output=True, text=True, timeout=600)


# What the planner must choose for each profile (issue 3).
EXPECTED_SIZE = {"dual-rtx3090": "70b", "rtx4090": "32b", "rtx3060-12g": "14b", "cpu-16g": "1.5b"}


@pytest.mark.parametrize("host", LAB_HOSTS)
def test_host_boots_to_running_over_ssh(ssh, host):
    result = ssh(host, "systemctl is-system-running; hostname")
    assert result.stdout.split() == ["running", host], result.stderr


def test_status_json_lists_every_host_up(lab):
    result = lab_command("status", "--json")
    hosts = json.loads(result.stdout)["hosts"]
    assert [h["name"] for h in hosts] == list(LAB_HOSTS)
    for host in hosts:
        assert {"name", "address", "ssh_user", "ssh_key", "profile", "state"} <= set(host)
        assert host["state"] == "up" and host["ssh_user"] == "root"
        assert host["profile"] == LAB_HOSTS[host["name"]]
        assert Path(host["ssh_key"]).stat().st_mode & 0o777 == 0o600


def test_up_again_leaves_running_hosts_alone(lab):
    before = {name: rec["pid"] for name, rec in state.load_state()["hosts"].items()}
    result = lab_command("up")
    assert result.returncode == 0, result.stderr
    after = {name: rec["pid"] for name, rec in state.load_state()["hosts"].items()}
    assert after == before
    assert "already up" in result.stdout


def test_apt_installs_a_package_through_the_proxy(ssh):
    host = next(iter(LAB_HOSTS))
    result = ssh(host, "apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q hello && hello",
                 timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Hello, world!" in result.stdout
    proxy_log = (paths.PROXY_DIR / "log" / "apt-cacher.log").read_text()
    assert "hello_" in proxy_log  # the .deb came through the lab's apt-cacher-ng


def test_hosts_have_no_route_out_of_the_lab(ssh):
    host = next(iter(LAB_HOSTS))
    result = ssh(host, "curl -sS --max-time 3 --noproxy '*' -o /dev/null http://1.1.1.1/")
    assert result.returncode != 0


def test_mirror_serves_the_gguf_with_its_sha256(ssh):
    host = next(iter(LAB_HOSTS))
    url = state.mirror_url()
    result = ssh(host, f"cd /tmp && curl -fsS -O {url}/SHA256SUMS && curl -fsS --create-dirs -o models/m.gguf "
                       f"{url}/models/SmolLM2-135M-Instruct.Q4_1.gguf && stat -c %s models/m.gguf && "
                       "grep SmolLM2 SHA256SUMS | cut -d' ' -f1 && sha256sum models/m.gguf | cut -d' ' -f1",
                 timeout=120)
    size, listed, actual = result.stdout.split()
    assert int(size) == 98_362_432
    assert listed == actual


@pytest.mark.parametrize("host", LAB_HOSTS)
def test_simulated_hardware_matches_profile(ssh, host):
    profile = profiles.load(LAB_HOSTS[host])
    gpus = profile["gpus"]
    meminfo = ssh(host, "grep MemTotal /proc/meminfo").stdout.split()
    assert int(meminfo[1]) // 1024 == profile["ram_mib"] * 98 // 100
    vga = ssh(host, "lspci -nn | grep -c 'VGA compatible controller'").stdout.strip()
    assert int(vga) == len(gpus)
    query = ssh(host, "nvidia-smi --query-gpu=index,name,memory.total,uuid,pci.bus_id,compute_cap "
                      "--format=csv,noheader,nounits")
    if not profiles.has_driver(profile):
        assert query.returncode != 0 and "not found" in query.stderr
        return
    rows = [line.split(", ") for line in query.stdout.strip().splitlines()]
    assert rows == [[str(i), g["name"], str(g["memory_mib"]), g["uuid"], g["bus_id"], g["compute_cap"]]
                    for i, g in enumerate(gpus)]
    listing = ssh(host, "nvidia-smi -L").stdout.splitlines()
    assert listing == [f"GPU {i}: {g['name']} (UUID: {g['uuid']})" for i, g in enumerate(gpus)]
    table = ssh(host, "nvidia-smi").stdout
    assert f"Driver Version: {profile['driver']['version']}" in table
    assert table.count(f"/  {gpus[0]['memory_mib']}MiB |") == len(gpus)


def test_compute_apps_on_the_gpu_stand_ins(ssh):
    """Each simulated GPU is a running ggml-rpc-server; a llama-server using them (--rpc) is shown on each
    GPU with the memory that GPU's rpc-server holds, as nvidia-smi shows a CUDA process per GPU."""
    host = next(n for n, p in LAB_HOSTS.items() if p == "dual-rtx3090")
    ports = [paths.GPU_RPC_BASE_PORT, paths.GPU_RPC_BASE_PORT + 1]
    listening = ssh(host, "ss -ltnH").stdout
    assert all(f"127.0.0.1:{port}" in listening for port in ports), listening
    # A process named llama-server (python3 under that name) carrying llama-server's --rpc flag.
    rpc = ",".join(f"127.0.0.1:{port}" for port in ports)
    script = ("mkdir -p /tmp/ts && cp /usr/bin/python3 /tmp/ts/llama-server && "
              f"(/tmp/ts/llama-server -c 'import time; time.sleep(30)' --rpc {rpc} & echo $! > /tmp/ts/pid) && sleep 1 && "
              "nvidia-smi --query-compute-apps=gpu_uuid,pid,process_name,used_memory --format=csv,noheader,nounits; "
              "kill $(cat /tmp/ts/pid); "
              f"for p in {' '.join(map(str, ports))}; do ps -o rss= -p $(pgrep -f \"ggml-rpc-server .*-p $p\"); done")
    out = ssh(host, script).stdout.strip().splitlines()
    rows = [line.split(", ") for line in out if "/tmp/ts/llama-server" in line]
    uuids = [g["uuid"] for g in profiles.load("dual-rtx3090")["gpus"]]
    assert [r[0] for r in rows] == uuids
    rss_mib = [int(line) // 1024 for line in out[-2:]]
    assert [int(r[3]) for r in rows] == pytest.approx(rss_mib, abs=2)


@pytest.mark.parametrize("host", LAB_HOSTS)
def test_probe_sh_over_ssh_reports_the_profile(ssh, host):
    document = ssh(host, "sh -s", stdin=PROBE_SH.read_text()).stdout
    sections = {}
    current = None
    for line in document.splitlines():
        if line.startswith("#### r1fleet:"):
            current = line.split(":", 1)[1].strip()
            sections[current] = []
        elif current:
            sections[current].append(line)
    gpus = profiles.load(LAB_HOSTS[host])["gpus"]
    query_rows = [line for line in sections.get("nvidia-smi-query", []) if line.strip()]
    assert len(query_rows) == (len(gpus) if profiles.has_driver(profiles.load(LAB_HOSTS[host])) else 0)
    assert any(line.startswith("MemTotal:") for line in sections["meminfo"])


@pytest.mark.parametrize("host", LAB_HOSTS)
def test_probe_then_plan_matches_profile(lab, host, tmp_path):
    profile = LAB_HOSTS[host]
    if profile not in EXPECTED_SIZE:
        pytest.skip(f"no expected plan for profile {profile}")
    probe = subprocess.run([sys.executable, "-m", "r1fleet", "probe", host, "--fleet", "lab"],
                           capture_output=True, text=True, timeout=120, cwd=REPO)
    assert probe.returncode == 0, probe.stderr[-2000:]
    probe_file = tmp_path / f"{host}.probe"
    probe_file.write_text(probe.stdout)
    plan = subprocess.run([sys.executable, "-m", "r1fleet", "plan", str(probe_file), "--json"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert plan.returncode == 0, plan.stderr[-2000:]
    [entry] = json.loads(plan.stdout)["hosts"]
    assert entry["host"] == host
    assert entry["model"] and entry["model"].endswith("-" + EXPECTED_SIZE[profile]), entry
    if profile == "dual-rtx3090":
        assert entry["backend"] == "llama.cpp"
        assert len(entry["tensor_split"]) == 2 and all(share > 0 for share in entry["tensor_split"])


def test_down_leaves_nothing_behind(lab):
    """Runs last (see conftest): `lab down` removes every process, mount, netns and link it made."""
    pids = [rec["pid"] for rec in state.load_state()["hosts"].values()]
    result = lab_command("down")
    assert result.returncode == 0, result.stderr
    assert network.lab_netns() == []
    assert network.lab_links() == []
    mounts = Path("/proc/self/mounts").read_text()
    assert str(paths.RUN_DIR) not in mounts and "r1lab-" not in mounts
    assert not any(procs.is_ours(pid, str(paths.ROOTS_DIR)) for pid in pids)
    assert procs.find(str(paths.ROOTS_DIR), "systemd-nspawn") == []
    assert procs.find(str(paths.PROXY_DIR), "apt-cacher-ng") == []
    assert procs.find(str(paths.MIRROR_DIR), "python3") == []
    assert not paths.RUN_DIR.exists()
    assert all(h["state"] == "down" for h in state.lab_hosts())
    assert yaml.safe_load(paths.LAB_FLEET_FILE.read_text())["hosts"]  # the fleet file is left alone
