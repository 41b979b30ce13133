"""Lab: the Ollama path as a real host meets it. A host that already has Ollama's own install (install.sh)
is taken over and keeps its models; the planned model is loaded again after every start of the service, a
reboot included, by a unit that holds neither the start nor boot; a load that fails is named by status and
verify.

Root + lab only (tests/lab/conftest.py). The module leaves lab-4090 converged to inventory/lab.yml.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from r1fleet.lab import mirror, state
from conftest import lab_command
from test_deploy import changed_count, deploy

ROOT = Path(__file__).resolve().parents[2]
HOST = "lab-4090"  # Ollama, one simulated RTX 4090
UNIT = "r1fleet-ollama.service"
PRELOAD = "r1fleet-ollama-preload.service"
RECORD = "/var/lib/ollama/r1fleet-preload"
API = "http://127.0.0.1:11434"
OWN_MODEL = "mine:latest"

# What Ollama's scripts/install.sh (v0.32.9) writes: the archive unpacked into /usr/local (so bin/ollama is a
# regular file), a system user `ollama` with home /usr/share/ollama, and this unit, enabled and started.
INSTALL_SH_UNIT = """[Unit]
Description=Ollama Service
After=network-online.target

[Service]
ExecStart=/usr/local/bin/ollama serve
User=ollama
Group=ollama
Restart=always
RestartSec=3
Environment="PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

[Install]
WantedBy=default.target
"""


def deploy_lab_host() -> subprocess.CompletedProcess:
    return deploy("--limit", HOST)


def verify_lab_host() -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "r1fleet", "verify", "--fleet", "lab", "-k", HOST], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)


def api_json(ssh, path: str) -> dict:
    result = ssh(HOST, f"curl -fsS {API}{path}")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def install_sh_state(mirror_url: str) -> str:
    """Shell commands that leave lab-4090 as install.sh would (r1fleet's own install removed first), with a
    model of the user's own in the official store."""
    archive = f"{mirror_url}/{mirror.ollama_stand_in_dir()}/ollama-linux-amd64.tar.zst"
    gguf = f"{mirror_url}/models/{mirror.GGUF_NAME}"
    return "\n".join([
        "set -e",
        f"systemctl disable --now {UNIT}",
        f"rm -f /etc/systemd/system/{UNIT} /usr/local/bin/ollama",
        "rm -rf /opt/r1fleet/ollama /var/lib/r1fleet/models/ollama /var/lib/r1fleet/models/import",
        "command -v zstd >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq zstd; }",
        f"curl -fsS {archive} | zstd -dc | tar -xf - -C /usr/local",
        "id ollama >/dev/null 2>&1 || useradd -r -s /bin/false -U -m -d /usr/share/ollama ollama",
        "usermod -d /usr/share/ollama ollama && mkdir -p /usr/share/ollama && chown ollama:ollama /usr/share/ollama",
        f"cat > /etc/systemd/system/ollama.service <<'EOF'\n{INSTALL_SH_UNIT}EOF",
        "systemctl daemon-reload && systemctl enable --now ollama.service",
        f"for i in $(seq 1 60); do curl -fsS {API}/api/version >/dev/null 2>&1 && break; sleep 1; done",
        f"curl -fsS {gguf} -o /tmp/own.gguf && printf 'FROM /tmp/own.gguf\\n' > /tmp/Modelfile",
        f"OLLAMA_HOST={API} /usr/local/bin/ollama create {OWN_MODEL} -f /tmp/Modelfile",
        "rm -f /tmp/own.gguf /tmp/Modelfile",
    ])


@pytest.fixture(scope="module")
def converged(lab):
    result = deploy_lab_host()
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    yield lab
    deploy_lab_host()


def test_an_install_sh_host_is_taken_over_and_keeps_its_model(converged, ssh):
    laid = ssh(HOST, install_sh_state(state.mirror_url()), timeout=300)
    assert laid.returncode == 0, laid.stdout + laid.stderr
    assert OWN_MODEL in [m["name"] for m in api_json(ssh, "/api/tags")["models"]]
    assert ssh(HOST, "test -f /usr/local/bin/ollama && ! test -L /usr/local/bin/ollama").returncode == 0

    result = deploy_lab_host()
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]

    assert ssh(HOST, "readlink /usr/local/bin/ollama").stdout.strip().startswith("/opt/r1fleet/ollama/")
    assert ssh(HOST, "systemctl is-enabled ollama.service").stdout.strip() == "disabled"
    assert ssh(HOST, "systemctl is-active ollama.service").stdout.strip() != "active"
    assert ssh(HOST, "systemctl show -p MainPID --value r1fleet-ollama.service").stdout.strip() != "0"
    names = [m["name"] for m in api_json(ssh, "/api/tags")["models"]]
    assert OWN_MODEL in names, names  # the user's model moved into r1fleet's store, not lost
    verified = verify_lab_host()
    assert verified.returncode == 0, verified.stdout[-4000:] + verified.stderr[-2000:]
    again = deploy_lab_host()  # converged: nothing repeats
    assert again.returncode == 0 and changed_count(again.stdout + again.stderr) == 0, again.stderr[-3000:]
    ssh(HOST, f"curl -fsS -X DELETE {API}/api/delete -d '{{\"model\": \"{OWN_MODEL}\"}}'; "
              "rm -f /etc/systemd/system/ollama.service; systemctl daemon-reload")


def test_the_model_is_loaded_again_after_every_restart(converged, ssh):
    """No request after the restart: the unit itself loads the planned model (Ollama loads nothing at start)."""
    tag = ssh(HOST, f"curl -fsS {API}/api/ps").stdout
    planned = [m["name"] for m in json.loads(tag)["models"]]
    assert len(planned) == 1, tag
    ssh(HOST, f"systemctl restart {UNIT}", timeout=300)
    started = time.monotonic()
    while time.monotonic() - started < 120:  # the deploy's health timeout for the stand-in model
        loaded = [m["name"] for m in api_json(ssh, "/api/ps")["models"]]
        if loaded == planned:
            break
        time.sleep(1)
    assert loaded == planned, loaded
    verified = verify_lab_host()
    assert verified.returncode == 0, verified.stdout[-4000:] + verified.stderr[-2000:]


def loaded_models(ssh) -> list[str]:
    return [m["name"] for m in api_json(ssh, "/api/ps")["models"]]


def test_a_rebooted_host_is_active_at_once_and_loaded_soon_after(converged, ssh):
    """`systemctl reboot` inside the host: boot finishes without waiting for the model (the lab waits for a
    finished boot, `is-system-running --wait`), the server is active within seconds of boot, the preload unit
    loads the model with no request from anyone, and verify passes (its test_model_loaded runs before its chat)."""
    planned = loaded_models(ssh)
    assert len(planned) == 1, planned
    boot_id = ssh(HOST, "cat /proc/sys/kernel/random/boot_id").stdout
    rebooted = lab_command("reboot", HOST)
    assert rebooted.returncode == 0, rebooted.stdout + rebooted.stderr
    assert ssh(HOST, "cat /proc/sys/kernel/random/boot_id").stdout != boot_id  # a new boot, not a survivor
    assert ssh(HOST, f"systemctl is-active {UNIT}").stdout.strip() == "active"
    # active within seconds of boot: from the container's systemd starting to the unit entering `active` (the
    # monotonic clock is the machine's, shared by its containers)
    boot_us = int(ssh(HOST, "systemctl show -p UserspaceTimestampMonotonic --value").stdout)
    active_us = int(ssh(HOST, f"systemctl show -p ActiveEnterTimestampMonotonic --value {UNIT}").stdout)
    assert 0 < active_us - boot_us < 30_000_000, (boot_us, active_us)
    started = time.monotonic()
    while loaded_models(ssh) != planned and time.monotonic() - started < 120:
        time.sleep(1)
    assert loaded_models(ssh) == planned
    assert ssh(HOST, f"cat {RECORD}").stdout.startswith("result=loaded\n")
    verified = verify_lab_host()
    assert verified.returncode == 0, verified.stdout[-4000:] + verified.stderr[-2000:]


def test_a_failed_load_is_named_by_status_and_verify(converged, ssh):
    """The model gone from the store (`ollama rm`): the preload after a restart fails, its unit is failed, status
    says "not loaded, last attempt failed" with Ollama's error, verify fails test_model_loaded with it; the next
    deploy places the model again and loads it through the same unit."""
    [tag] = loaded_models(ssh)
    removed = ssh(HOST, f"OLLAMA_HOST={API} /usr/local/bin/ollama rm {tag} && systemctl restart {UNIT}")
    assert removed.returncode == 0, removed.stderr
    started = time.monotonic()
    while ssh(HOST, f"systemctl is-active {PRELOAD}").stdout.strip() != "failed" and time.monotonic() - started < 60:
        time.sleep(1)
    assert ssh(HOST, f"systemctl is-active {PRELOAD}").stdout.strip() == "failed"
    assert ssh(HOST, f"cat {RECORD}").stdout.startswith("result=failed\n")
    status = subprocess.run([sys.executable, "-m", "r1fleet", "status", "--fleet", "lab", HOST], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert f"{HOST}: {tag} is not loaded, last attempt failed: HTTP 404: " in status.stdout, status.stdout
    verified = subprocess.run([sys.executable, "-m", "r1fleet", "verify", "--fleet", "lab", "-k",
                               f"test_model_loaded and {HOST}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert verified.returncode != 0 and "last attempt failed: HTTP 404" in verified.stdout, verified.stdout[-3000:]
    again = deploy_lab_host()
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-2000:]
    assert loaded_models(ssh) == [tag] and ssh(HOST, f"cat {RECORD}").stdout.startswith("result=loaded\n")


def test_every_host_answers_the_official_openai_client(lab, ssh):
    """Ollama and llama.cpp hosts alike: the official `openai` client lists the model under the same name
    (the plan's Ollama tag), chats, and streams, through an SSH tunnel to the service's own address."""
    import socket

    import openai

    from r1fleet.fleet.config import DEFAULT_PORTS
    from r1fleet.fleet.file import load_fleet

    converge_all = deploy()
    assert converge_all.returncode == 0, converge_all.stderr[-3000:]
    names = set()
    for name, entry in load_fleet("lab").hosts.items():
        backend = "ollama" if ssh(name, "test -f /etc/systemd/system/r1fleet-ollama.service").returncode == 0 else "llama.cpp"
        key = ssh(name, "cat /etc/r1fleet/api-key 2>/dev/null").stdout.strip() if backend == "llama.cpp" else ""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            local = s.getsockname()[1]
        remote = f"{entry.bind_address}:{entry.port or DEFAULT_PORTS[backend]}"
        tunnel = subprocess.Popen(["ssh", "-F", str(state.ssh_config_path()), "-N", "-o", "ExitOnForwardFailure=yes",
                                   "-L", f"127.0.0.1:{local}:{remote}", name])
        try:
            for _ in range(100):
                with socket.socket() as probe:
                    if probe.connect_ex(("127.0.0.1", local)) == 0:
                        break
                time.sleep(0.1)
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{local}/v1", api_key=key or "none", max_retries=0)
            [model] = [m.id for m in client.models.list().data]
            names.add(model)
            messages = [{"role": "user", "content": "Say hello."}]
            reply = client.chat.completions.create(model=model, messages=messages, max_tokens=16, temperature=0)
            assert reply.choices[0].message is not None and reply.choices[0].finish_reason in ("stop", "length"), name
            streamed = list(client.chat.completions.create(model=model, messages=messages, max_tokens=16, stream=True))
            assert streamed and any(c.choices and c.choices[0].finish_reason for c in streamed), name
        finally:
            tunnel.terminate()
            tunnel.wait(10)
    assert len(names) == 1, names  # one naming across backends: the plan's Ollama tag
