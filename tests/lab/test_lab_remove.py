"""Lab: `pyinfra inventory.py deploy/remove.py` takes off a host everything r1fleet put there (issue 22 item 4).

Two hosts reinstalled from the clean image: lab-cpu (Ollama, the stand-in imported) and lab-dual3090 (llama.cpp,
open to the controller: nftables table, the services' firewall drop-in, a generated API key). Each is compared,
before the deploy and after the removal, by its files (type, owner, mode and path of everything but the kernel's
and the logs' folders), its systemd units, users, groups, nftables tables and listening TCP ports:

  - removed with `remove_models=true`, a host is the fresh host again, exactly, and a second removal changes nothing;
  - removed keeping the models, only the model files differ (root's, without r1fleet's stamps and records), and a
    deploy converges on them without downloading them again.

The lab's image is Debian's minimal one; a Debian host has nftables (Priority: important), so the hosts get it
before the first look, as the package the exposure role would otherwise install and a removal keeps. Ends with
both hosts deployed from the lab's own fleet file. Root + lab only (tests/lab/conftest.py).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_deploy import changed_count, deploy

from r1fleet.lab import paths, state

ROOT = Path(__file__).resolve().parents[2]
PYINFRA = str(Path(sys.executable).with_name("pyinfra"))
R1FLEET = str(Path(sys.executable).with_name("r1fleet"))
HOSTS = ("lab-cpu", "lab-dual3090")
EXPOSED = "lab-dual3090"
LIMIT = [arg for host in HOSTS for arg in ("--limit", host)]
# What changes on any running host whatever r1fleet does: kernel and runtime file systems, logs, caches, apt's
# package lists (a llama.cpp host's plan asks apt what it offers), systemd's own state.
VOLATILE = ("/proc", "/sys", "/dev", "/run", "/tmp", "/var/tmp", "/var/log", "/var/cache", "/var/lib/apt/lists",
            "/var/lib/systemd")
MODELS = "/var/lib/r1fleet"  # the lab's model_dir is the default, /var/lib/r1fleet/models


def on(host: str, command: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """A command on a lab host over real SSH (the `ssh` fixture's, for the module's fixtures too)."""
    argv = ["ssh", "-F", str(state.ssh_config_path()), "-o", "BatchMode=yes", host, command]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


def remove(*extra: str, fleet: str | Path = "lab") -> subprocess.CompletedProcess:
    """`pyinfra -y inventory.py deploy/remove.py` on the two hosts."""
    env = {**os.environ, "R1FLEET_FLEET": str(fleet)}
    return subprocess.run([PYINFRA, "-y", "inventory.py", "deploy/remove.py", *LIMIT, *extra], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)


def snapshot(host: str) -> dict[str, set[str]]:
    """What a host holds, as sets of lines: files, units, users, groups, nftables tables, listening TCP ports."""
    prune = " -o ".join(f"-path {path}" for path in VOLATILE)
    parts = {
        "files": f"find / -xdev \\( {prune} \\) -prune -o -printf '%y %u:%g %m %p\\n'",
        # A unit systemd merely remembers by name (not-found: no file; inactive, dead: nothing runs) is left out: the
        # lab's hosts share one cgroup tree, so on lab-cpu a removed r1fleet-ollama.service stays listed while its
        # cgroup holds another lab host's Ollama (a host of its own has the cgroup to itself, and forgets the unit).
        "units": "systemctl list-units --all --plain --no-legend 'r1fleet*' | grep -v ' not-found inactive dead '; "
                 "systemctl list-unit-files --no-legend 'r1fleet*'; true",
        "users": "getent passwd | cut -d: -f1,3,5,6,7",
        "groups": "getent group | cut -d: -f1,3,4",
        "tables": "nft list tables",
        "ports": "ss -Hltn | awk '{print $4}'",
    }
    found = {}
    for part, command in parts.items():
        result = on(host, command)
        assert result.returncode == 0, (host, part, result.stderr)
        found[part] = {line.strip() for line in result.stdout.splitlines() if line.strip()}
    return found


def differences(before: dict[str, set[str]], after: dict[str, set[str]]) -> dict[str, tuple[list[str], list[str]]]:
    """Per part: (what is there only before, what is there only after)."""
    return {part: (sorted(before[part] - after[part]), sorted(after[part] - before[part]))
            for part in before if before[part] != after[part]}


def succeeded(result: subprocess.CompletedProcess, what: str) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"{what}:\n{result.stdout[-4000:]}\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stdout + result.stderr, what
    return result


@pytest.fixture(scope="module")
def exposed_fleet(lab, tmp_path_factory) -> Path:
    """The lab fleet with lab-dual3090 open to the controller (its key generated on the host)."""
    document = yaml.safe_load(paths.LAB_FLEET_FILE.read_text())
    document["hosts"][EXPOSED].update(listen=lab[EXPOSED]["address"], allow=[f"{state.controller_address()}/32"])
    path = tmp_path_factory.mktemp("remove") / "lab-exposed.yml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))  # host order gives the lab addresses
    return path


@pytest.fixture(scope="module")
def fresh(lab) -> dict[str, dict[str, set[str]]]:
    """The two hosts as the clean image boots them, with nftables, looked at before any deploy."""
    reset = subprocess.run([R1FLEET, "lab", "reset", *HOSTS], capture_output=True, text=True, timeout=900)
    assert reset.returncode == 0, reset.stdout + reset.stderr
    for host in HOSTS:
        installed = on(host, "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nftables",
                        timeout=600)
        assert installed.returncode == 0, (host, installed.stdout[-2000:], installed.stderr[-2000:])
    return {host: snapshot(host) for host in HOSTS}


def test_a_host_removed_with_its_models_is_the_fresh_host_again(fresh, exposed_fleet):
    succeeded(deploy(*LIMIT, fleet=exposed_fleet), "deploy")
    deployed = {host: snapshot(host) for host in HOSTS}
    # the deploy did put something in every part the comparison covers
    assert any("r1fleet-ollama.service" in line for line in deployed["lab-cpu"]["units"])
    assert any(line.startswith("ollama:") for line in deployed["lab-cpu"]["users"])
    assert "table inet r1fleet" in deployed[EXPOSED]["tables"]
    assert any(port.endswith(":8080") for port in deployed[EXPOSED]["ports"] - fresh[EXPOSED]["ports"])
    assert any(line.endswith(" /etc/r1fleet/api-key") for line in deployed[EXPOSED]["files"])

    removed = succeeded(remove("--data", "remove_models=true", fleet=exposed_fleet), "removal")
    assert changed_count(removed.stdout + removed.stderr) > 0
    for host in HOSTS:
        assert differences(fresh[host], snapshot(host)) == {}, host

    again = succeeded(remove("--data", "remove_models=true", fleet=exposed_fleet), "second removal")
    assert changed_count(again.stdout + again.stderr) == 0, again.stdout[-3000:]


def test_kept_models_are_all_that_is_left_and_a_deploy_converges_on_them(fresh):
    """Deployed from the lab's own fleet, removed keeping the models, deployed again: the hosts end as the lab's."""
    succeeded(deploy(*LIMIT), "deploy")
    succeeded(remove(), "removal")
    gguf = f"{MODELS}/models/llama.cpp/SmolLM2-135M-Instruct.Q4_1.gguf"
    inode = on(EXPOSED, f"stat -c %i {gguf}").stdout.strip()
    for host in HOSTS:
        diff = differences(fresh[host], snapshot(host))
        assert set(diff) == {"files"}, (host, diff)
        gone, left = diff["files"]
        assert gone == [], (host, gone)  # nothing of the host's own was removed or changed
        assert all(line.split(" ", 3)[3].startswith(MODELS) for line in left), (host, left)
        assert all(" root:root " in line for line in left), (host, left)  # no deleted account's id owns them
        written = [line for line in left if line.endswith((".r1fleet-sha256", ".part", "/Modelfile", "/imported.json"))]
        assert written == [], (host, written)
    left_cpu = {line.split(" ", 3)[3] for line in differences(fresh["lab-cpu"], snapshot("lab-cpu"))["files"][1]}
    assert f"{MODELS}/models/import/SmolLM2-135M-Instruct.Q4_1.gguf" in left_cpu
    assert any(path.startswith(f"{MODELS}/models/ollama/blobs/sha256-") for path in left_cpu)
    assert any(path.startswith(f"{MODELS}/models/ollama/manifests/") for path in left_cpu)
    assert inode and f"{MODELS}/models/llama.cpp/SmolLM2-135M-Instruct.Q4_1.gguf" in {
        line.split(" ", 3)[3] for line in differences(fresh[EXPOSED], snapshot(EXPOSED))["files"][1]}

    succeeded(deploy(*LIMIT), "deploy on the kept models")
    assert on(EXPOSED, f"stat -c %i {gguf}").stdout.strip() == inode  # the kept file, not a new download
    assert on(EXPOSED, f"stat -c %U {gguf}").stdout.strip() == "llama"
    assert on("lab-cpu", "systemctl is-active r1fleet-ollama.service").stdout.strip() == "active"
    assert on(EXPOSED, "systemctl is-active r1fleet-llama-server.service").stdout.strip() == "active"
    settled = succeeded(deploy(*LIMIT), "a second deploy")
    assert changed_count(settled.stdout + settled.stderr) == 0, settled.stdout[-3000:]
