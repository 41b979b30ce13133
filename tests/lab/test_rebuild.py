"""Lab: reproducible rebuilds (issue 13). Lock the lab, reinstall two hosts from the clean image, deploy with
the lock: the rebuilt hosts' r1fleet-written files come back byte-identical, served from the controller's
cache (nothing new from the mirror but the one artifact whose cache entry was corrupted), with the same model
digest and API key; a policy change does not move a locked host; a host whose hardware changed is stopped
with the difference while the others converge.

Works on a copy of the lab fleet file (its lock beside it) in which lab-dual3090 (llama.cpp) is exposed to the
controller with an API key kept on the controller (api_key_source). Root + lab only (tests/lab/conftest.py).
"""
from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_deploy import deploy

from r1fleet.lab import mirror, paths, state
from r1fleet.lock.match import key_fingerprint, read_lock

ROOT = Path(__file__).resolve().parents[2]
R1FLEET = str(Path(sys.executable).with_name("r1fleet"))
# llama.cpp exposed with a key; Ollama importing the stand-in; Ollama taking it from the lab's registry
REBUILT = ("lab-dual3090", "lab-cpu", "lab-3060")
CHANGED = "lab-4090"
# What r1fleet writes on a host, and the Ollama store's manifests (their sha256 is the digest Ollama serves).
# Left out: the download stamps (*.r1fleet-sha256), which record the file's inode and mtime on this host
# (that is their job).
WRITTEN = ("/etc/systemd/system/r1fleet-*.service /etc/systemd/system/r1fleet-*.service.d/*.conf /etc/r1fleet/* "
           "/var/lib/r1fleet/models/import/* /var/lib/r1fleet/models/llama.cpp/* /opt/r1fleet/ollama/*/bin/ollama "
           "/var/lib/r1fleet/models/ollama/manifests/*/*/*/*")


def run(argv: list[str], fleet: Path, timeout: int = 1800) -> subprocess.CompletedProcess:
    env = {**os.environ, "R1FLEET_FLEET": str(fleet)}
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def written_files(ssh, host: str) -> dict[str, str]:
    script = (f"for f in {WRITTEN}; do case $f in *.r1fleet-sha256|*.part|*.tmp) continue;; esac; "
              "[ -f \"$f\" ] && sha256sum \"$f\"; done; true")
    out = ssh(host, script).stdout
    return {path: digest for digest, path in (line.split(None, 1) for line in out.splitlines() if line.strip())}


def is_artifact(path: str) -> bool:
    """A mirror path that is an artifact (the mirror's version and checksum lists are read on every run)."""
    return path.startswith(("/models/", "/registry/")) or path.endswith((".tar.zst", ".tgz"))


def mirror_served() -> dict[str, int]:
    status = subprocess.run([R1FLEET, "lab", "status", "--json"], capture_output=True, text=True, check=True)
    return json.loads(status.stdout)["mirror"]["served"]


def reset(*hosts: str) -> None:
    result = subprocess.run([R1FLEET, "lab", "reset", *hosts], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr


def lab_up(fleet: Path | None = None) -> None:
    argv = [sys.executable, "-m", "r1fleet.lab", "up", *(["--fleet", str(fleet)] if fleet else [])]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def fleet(lab, tmp_path_factory) -> Path:
    """The lab fleet with lab-dual3090 open to the controller and its key on the controller; locked."""
    directory = tmp_path_factory.mktemp("rebuild")
    key = directory / "dual3090.key"
    key.write_text("r1fleet-lab-rebuild-key-0123456789abcdef\n")
    key.chmod(0o600)
    document = yaml.safe_load(paths.LAB_FLEET_FILE.read_text())
    controller = state.controller_address()
    document["hosts"]["lab-dual3090"].update(listen=lab["lab-dual3090"]["address"], allow=[f"{controller}/32"],
                                             api_key_source=str(key))
    path = directory / "lab-rebuild.yml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))  # host order gives the lab addresses
    # The hosts as the modules before this one left them (the session's first deploy filled the controller's
    # cache): converged to this fleet, they must equal the same hosts rebuilt from the clean image below.
    first = deploy(fleet=path)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-3000:]
    locked = run([R1FLEET, "lock", "--fleet", str(path)], path)
    assert locked.returncode == 0, locked.stdout + locked.stderr
    yield path
    lab_up()  # the lab's own fleet file and profiles again, for the modules after this one


def test_a_rebuilt_host_comes_back_identical_from_the_cache(fleet, ssh):
    lock = read_lock(fleet.with_name(fleet.name + ".lock"))
    assert lock is not None and set(lock.hosts) == {"lab-3060", "lab-4090", "lab-dual3090", "lab-cpu"}
    key = (fleet.parent / "dual3090.key").read_bytes()
    assert lock.hosts["lab-dual3090"].api_key_fingerprint == key_fingerprint(key)
    assert key.strip().decode() not in fleet.with_name(fleet.name + ".lock").read_text()  # never the key itself
    before = {host: written_files(ssh, host) for host in REBUILT}
    assert all(before.values())

    cache = Path(os.environ["R1FLEET_CACHE_DIR"]) / "sha256"
    tarball = next(p.with_suffix("") for p in cache.glob("*.json")
                   if json.loads(p.read_text())["name"] == "ollama-linux-amd64.tar.zst")
    with tarball.open("r+b") as entry:  # a corrupted cache entry: detected by its sha256, fetched again
        entry.write(b"X")
    served = mirror_served()

    reset(*REBUILT)
    assert all(not written_files(ssh, host) for host in REBUILT)  # really reinstalled
    again = deploy(fleet=fleet)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-3000:]

    assert {host: written_files(ssh, host) for host in REBUILT} == before
    fetched = {path: sent - served.get(path, 0) for path, sent in mirror_served().items()
               if sent != served.get(path, 0) and is_artifact(path)}
    # the GGUF and the registry's manifest and blobs came from the controller's cache
    archive = f"/{mirror.ollama_stand_in_dir()}/ollama-linux-amd64.tar.zst"
    assert set(fetched) <= {archive}, fetched
    assert fetched.get(archive) == tarball.stat().st_size  # refetched once, whole

    report = fleet.parent / "verify.xml"
    verify = run([R1FLEET, "verify", "--fleet", str(fleet), "--junit", str(report), "-k", " or ".join(REBUILT)], fleet)
    assert verify.returncode == 0, verify.stdout[-4000:] + verify.stderr[-2000:]
    cases = {case.get("name"): [child.tag for child in case] for case in ET.parse(report).iter("testcase")}
    assert cases["test_api_key_is_the_locked_one[lab-dual3090]"] == []  # ran and passed: the locked key
    assert cases["test_model_present[lab-cpu]"] == []  # the imported model's digest as recorded
    assert cases["test_model_present[lab-3060]"] == []  # the registry's weights, placed from the cache
    manifest = lock.hosts["lab-3060"].artifacts.model.ollama_manifest  # locked after the first deploy cached it
    assert manifest is not None and manifest.tag == "r1fleet/smollm2:135m-instruct-q4_1"
    assert cases["test_model_is_the_locked_manifest[lab-3060]"] == []  # ran and passed: the locked digest


def test_a_policy_change_waits_for_a_relock(fleet, ssh):
    unit = "/etc/systemd/system/r1fleet-ollama.service"
    before = ssh("lab-cpu", f"sha256sum {unit}").stdout
    document = yaml.safe_load(fleet.read_text())
    document["hosts"]["lab-cpu"]["backend"] = "llama.cpp"
    fleet.write_text(yaml.safe_dump(document, sort_keys=False))
    diff = run([R1FLEET, "plan", "--fleet", str(fleet), "--diff"], fleet)
    assert diff.returncode == 1 and "backend: ollama -> llama.cpp" in diff.stdout, diff.stdout + diff.stderr
    again = deploy(fleet=fleet)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-3000:]
    assert ssh("lab-cpu", f"sha256sum {unit}").stdout == before  # still the locked plan


def test_a_host_that_cannot_reach_the_controller_downloads_upstream(fleet, ssh):
    """A firewall on the controller drops the cache server's port: the host falls back to upstream (here the
    lab mirror) after a few seconds, and still verifies what it got. The host lost its model file (a disk
    replaced under the model directory): only that download is needed again."""
    from r1fleet.operations.fleet_cache import CACHE_PORT

    table = "inet r1fleet-test-drop"
    subprocess.run(["nft", "add", "table", *table.split()], check=True)
    try:
        subprocess.run(["nft", "add", "chain", *table.split(), "input",
                        "{ type filter hook input priority -10; policy accept; }"], check=True)
        subprocess.run(["nft", "add", "rule", *table.split(), "input", "tcp", "dport", str(CACHE_PORT), "drop"],
                       check=True)
        gguf = "/models/SmolLM2-135M-Instruct.Q4_1.gguf"
        lost = ssh("lab-cpu", "rm -v /var/lib/r1fleet/models/import/SmolLM2-135M-Instruct.Q4_1.gguf*")
        assert lost.returncode == 0 and ".gguf" in lost.stdout, lost.stdout + lost.stderr
        served = mirror_served()
        again = deploy("--limit", "lab-cpu", fleet=fleet)
        assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-3000:]
        assert mirror_served()[gguf] - served.get(gguf, 0) == (paths.MIRROR_DIR / gguf.lstrip("/")).stat().st_size
        assert ssh("lab-cpu", "systemctl is-active r1fleet-ollama.service").stdout.strip() == "active"
    finally:
        subprocess.run(["nft", "delete", "table", *table.split()], check=False)


def test_changed_hardware_stops_that_host_alone(fleet, ssh):
    changed = yaml.safe_load(fleet.read_text())
    changed["hosts"][CHANGED]["profile"] = "rtx3060-12g"  # as if its GPU had been swapped
    changed_file = fleet.with_name("lab-swapped.yml")
    changed_file.write_text(yaml.safe_dump(changed, sort_keys=False))
    lab_up(changed_file)
    result = deploy(fleet=fleet)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert f"[{CHANGED}] plan failed: " in output and "the hardware differs from the lock" in output, output[-3000:]
    assert f"r1fleet lock --fleet {fleet} {CHANGED}" in output
    assert "Traceback" not in output and "r1fleet: 1 of 4 host(s) failed:" in output, output[-3000:]
    for host in ("lab-3060", "lab-dual3090", "lab-cpu"):  # the others converged
        assert ssh(host, "systemctl is-active --quiet r1fleet-ollama.service || "
                         "systemctl is-active --quiet r1fleet-llama-server.service").returncode == 0, host
    assert ssh(CHANGED, "test -e /etc/systemd/system/r1fleet-ollama.service").returncode != 0  # nothing deployed there

