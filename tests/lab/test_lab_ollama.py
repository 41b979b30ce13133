"""Lab: the Ollama path as a real host meets it. A host that already has Ollama's own install (install.sh's, with
its store moved by a drop-in, or the manual one into /usr) is taken over and keeps its models; install.sh run again
cannot bring its server back onto the port, and status and verify name one started by hand; the planned model is
loaded again after every start of the service, a reboot included, by a unit that holds neither the start nor
boot; a load that fails is named by status and verify.

Root + lab only (tests/lab/conftest.py). The module leaves lab-4090 converged to inventory/lab.yml.
"""
from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from r1fleet.lab import mirror, state
from r1fleet.roles.ollama.official import parse_official
from r1fleet.roles.ollama.takeover import OfficialInstall
from conftest import lab_command
from test_deploy import changed_count, deploy

ROOT = Path(__file__).resolve().parents[2]
HOST = "lab-4090"  # Ollama, one simulated RTX 4090
UNIT = "r1fleet-ollama.service"
PRELOAD = "r1fleet-ollama-preload.service"
RECORD = "/var/lib/ollama/r1fleet-preload"
API = "http://127.0.0.1:11434"
OWN_MODEL = "mine:latest"
DROP_IN = "/etc/systemd/system/ollama.service.d/override.conf"
MOVED_STORE = "/srv/ollama models"  # a blank in it, as a user's path may have

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


def install_sh_state(mirror_url: str, prefix: str = "/usr/local", store: str | None = None) -> str:
    """Shell commands that leave lab-4090 as install.sh would (r1fleet's own install removed first), with a
    model of the user's own in the official store: `prefix` /usr is the manual install of docs/linux.mdx:22-25
    (its unit's ExecStart=/usr/bin/ollama, linux.mdx:66-83); `store` moves the store with an OLLAMA_MODELS drop-in
    (docs/faq.mdx:239-245, docs/linux.mdx:131-136)."""
    archive = f"{mirror_url}/{mirror.ollama_stand_in_dir()}/ollama-linux-amd64.tar.zst"
    gguf = f"{mirror_url}/models/{mirror.GGUF_NAME}"
    unit = INSTALL_SH_UNIT.replace("/usr/local/bin/ollama", f"{prefix}/bin/ollama")
    drop_in = [] if store is None else [
        f"mkdir -p {shlex.quote(store)} && chown ollama:ollama {shlex.quote(store)}",
        "mkdir -p /etc/systemd/system/ollama.service.d",
        f"printf '[Service]\\nEnvironment=\"OLLAMA_MODELS=%s\"\\n' {shlex.quote(store)} > {DROP_IN}",
    ]
    return "\n".join([
        "set -e",
        f"systemctl disable --now {UNIT}",
        f"rm -f /etc/systemd/system/{UNIT} /usr/local/bin/ollama",
        "systemctl unmask ollama.service",
        "rm -rf /opt/r1fleet/ollama /var/lib/r1fleet/models/ollama /var/lib/r1fleet/models/import",
        "command -v zstd >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq zstd; }",
        f"curl -fsS {archive} | zstd -dc | tar -xf - -C {prefix}",
        "id ollama >/dev/null 2>&1 || useradd -r -s /bin/false -U -m -d /usr/share/ollama ollama",
        "usermod -d /usr/share/ollama ollama && mkdir -p /usr/share/ollama && chown ollama:ollama /usr/share/ollama",
        f"cat > /etc/systemd/system/ollama.service <<'EOF'\n{unit}EOF",
        *drop_in,
        "systemctl daemon-reload && systemctl enable --now ollama.service",
        f"for i in $(seq 1 60); do curl -fsS {API}/api/version >/dev/null 2>&1 && break; sleep 1; done",
        f"curl -fsS {gguf} -o /tmp/own.gguf && printf 'FROM /tmp/own.gguf\\n' > /tmp/Modelfile",
        f"OLLAMA_HOST={API} {prefix}/bin/ollama create {OWN_MODEL} -f /tmp/Modelfile",
        "rm -f /tmp/own.gguf /tmp/Modelfile",
    ])


def install_sh_again(mirror_url: str) -> str:
    """What install.sh does when run again over a deployed host (Ollama's update path, docs/linux.mdx:138-144),
    step by step as scripts/install.sh:164-176 and :214-238 do it, under its `set -eu`: the release unpacked into
    /usr/local, its unit written with `tee`, `systemctl enable ollama`, then `systemctl restart ollama`."""
    archive = f"{mirror_url}/{mirror.ollama_stand_in_dir()}/ollama-linux-amd64.tar.zst"
    return "\n".join([
        "set -eu",
        "rm -rf /usr/local/lib/ollama",
        f"curl -fsS {archive} | zstd -dc | tar -xf - -C /usr/local",
        f"tee /etc/systemd/system/ollama.service >/dev/null <<'EOF'\n{INSTALL_SH_UNIT}EOF",
        "systemctl daemon-reload",
        "systemctl enable ollama",
        "systemctl restart ollama",
    ])


def official_gone(ssh, *paths: str, deployed: str = "") -> None:
    """Ollama's own unit masked (install.sh run again cannot start it) and its binaries and libraries gone;
    r1fleet's link on PATH and r1fleet's server on the port. `deployed`: the deploy's output, for a failure."""
    assert ssh(HOST, "systemctl is-enabled ollama.service").stdout.strip() == "masked"
    assert ssh(HOST, "systemctl is-active ollama.service").stdout.strip() != "active"
    for path in paths:
        assert ssh(HOST, f"test -e {path}").returncode != 0, f"{path} is still there\n{deployed[-6000:]}"
    assert ssh(HOST, "readlink /usr/local/bin/ollama").stdout.strip().startswith("/opt/r1fleet/ollama/")
    assert ssh(HOST, "systemctl show -p MainPID --value r1fleet-ollama.service").stdout.strip() != "0"


def forget_own_model(ssh) -> None:
    ssh(HOST, f"curl -fsS -X DELETE {API}/api/delete -d '{{\"model\": \"{OWN_MODEL}\"}}'")


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

    official_gone(ssh, "/usr/local/lib/ollama", "/etc/systemd/system/ollama.service.d")
    names = [m["name"] for m in api_json(ssh, "/api/tags")["models"]]
    assert OWN_MODEL in names, names  # the user's model moved into r1fleet's store, not lost
    verified = verify_lab_host()
    assert verified.returncode == 0, verified.stdout[-4000:] + verified.stderr[-2000:]
    again = deploy_lab_host()  # converged: nothing repeats
    assert again.returncode == 0 and changed_count(again.stdout + again.stderr) == 0, again.stderr[-3000:]
    forget_own_model(ssh)


def test_a_store_moved_by_a_drop_in_is_taken_and_install_sh_run_again_cannot_take_the_port(converged, ssh):
    """The store where the unit's OLLAMA_MODELS drop-in points; then install.sh run again (its unit masked: it
    writes into /dev/null and its `systemctl enable` fails), and the next deploy takes its binary over again."""
    laid = ssh(HOST, install_sh_state(state.mirror_url(), store=MOVED_STORE), timeout=300)
    assert laid.returncode == 0, laid.stdout + laid.stderr
    assert ssh(HOST, f"ls {shlex.quote(MOVED_STORE)}/manifests").returncode == 0  # the model is in the moved store
    seen = ssh(HOST, OfficialInstall().command()).stdout  # what the takeover reads
    assert parse_official(seen.splitlines()).store == MOVED_STORE, seen

    result = deploy_lab_host()
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    official_gone(ssh, "/usr/local/lib/ollama", f"{shlex.quote(MOVED_STORE)}/manifests",
                  deployed=result.stdout + result.stderr)
    assert ssh(HOST, f"test -f {DROP_IN}").returncode == 0  # the user's drop-in stays, inert while masked
    names = [m["name"] for m in api_json(ssh, "/api/tags")["models"]]
    assert OWN_MODEL in names, names

    rerun = ssh(HOST, install_sh_again(state.mirror_url()), timeout=300)
    assert rerun.returncode != 0 and "masked" in rerun.stderr, rerun.stdout + rerun.stderr
    assert ssh(HOST, "systemctl is-active ollama.service").stdout.strip() != "active"
    assert ssh(HOST, "systemctl is-enabled ollama.service").stdout.strip() == "masked"
    verified = verify_lab_host()  # r1fleet's server still holds the port
    assert verified.returncode == 0, verified.stdout[-4000:] + verified.stderr[-2000:]
    # install.sh put its binary back over r1fleet's link: the next deploy takes it over again, then is quiet
    assert ssh(HOST, "test -f /usr/local/bin/ollama && ! test -L /usr/local/bin/ollama").returncode == 0
    result = deploy_lab_host()
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    official_gone(ssh, "/usr/local/lib/ollama")
    again = deploy_lab_host()
    assert again.returncode == 0 and changed_count(again.stdout + again.stderr) == 0, again.stderr[-3000:]
    forget_own_model(ssh)
    ssh(HOST, f"rm -rf /etc/systemd/system/ollama.service.d {shlex.quote(MOVED_STORE)}")


def test_ollamas_own_server_on_the_port_is_named_by_status_and_verify(converged, ssh):
    """Ollama's own unit unmasked by hand and started while r1fleet's is down: the port is another server's."""
    laid = ssh(HOST, "\n".join([
        "set -e", "systemctl unmask ollama.service", "systemctl stop r1fleet-ollama.service",
        f"cat > /etc/systemd/system/ollama.service <<'EOF'\n{INSTALL_SH_UNIT}EOF",
        # the release r1fleet installed stands in for install.sh's copy of it
        "sed -i \"s#/usr/local/bin/ollama#$(readlink -f /usr/local/bin/ollama)#\" /etc/systemd/system/ollama.service",
        "systemctl daemon-reload && systemctl start ollama.service",
        f"for i in $(seq 1 60); do curl -fsS {API}/api/version >/dev/null 2>&1 && break; sleep 1; done",
    ]), timeout=120)
    try:
        assert laid.returncode == 0, laid.stdout + laid.stderr
        status = subprocess.run([sys.executable, "-m", "r1fleet", "status", "--fleet", "lab", "--json", HOST], cwd=ROOT,
                                capture_output=True, text=True, timeout=300)
        [host] = json.loads(status.stdout)["hosts"]
        assert host["state"] == "port taken" and "unit ollama.service" in host["reason"], host
        verified = verify_lab_host()
        assert verified.returncode != 0
        assert "is held by ollama" in verified.stdout and "ollama.service), not by the service" in verified.stdout, verified.stdout[-4000:]
    finally:
        ssh(HOST, "systemctl disable --now ollama.service; rm -f /etc/systemd/system/ollama.service; "
                  "systemctl daemon-reload")
    result = deploy_lab_host()  # masked again, r1fleet's server back on the port
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    official_gone(ssh)


def test_a_manual_install_into_usr_is_taken_over(converged, ssh):
    laid = ssh(HOST, install_sh_state(state.mirror_url(), prefix="/usr"), timeout=300)
    assert laid.returncode == 0, laid.stdout + laid.stderr
    assert ssh(HOST, "test -f /usr/bin/ollama && test -d /usr/lib/ollama").returncode == 0
    result = deploy_lab_host()
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    official_gone(ssh, "/usr/bin/ollama", "/usr/lib/ollama")
    names = [m["name"] for m in api_json(ssh, "/api/tags")["models"]]
    assert OWN_MODEL in names, names
    forget_own_model(ssh)


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


def test_a_registry_model_with_a_go_template_is_rendered_by_ollama_and_refuses_thinking(lab, ssh):
    """lab-3060 takes its model from the lab's registry with a Go template layer, as the library's tags carry one:
    the stand-in renders the prompt itself and starts its runner without the GGUF's template (`--no-jinja`, the
    prompt arrives at /completion); the template has no thinking field, so `think: true` is a 400 and a plain chat
    answers."""
    host = "lab-3060"
    converged = deploy("--limit", host)
    assert converged.returncode == 0, converged.stderr[-3000:]

    def api(path: str, body: dict) -> tuple[int, dict]:
        out = ssh(host, f"curl -sS -m 120 -w '\\n%{{http_code}}' {API}{path} -d {shlex.quote(json.dumps(body))}")
        text, _, code = out.stdout.rstrip("\n").rpartition("\n")
        return int(code), json.loads(text) if text.strip() else {}

    tags = json.loads(ssh(host, f"curl -sS {API}/api/tags").stdout)
    [model] = [m["name"] for m in tags["models"]]
    code, shown = api("/api/show", {"model": model})
    assert code == 200 and shown["capabilities"] == ["completion"] and "{{- range .Messages }}" in shown["template"], shown
    ask = {"model": model, "messages": [{"role": "user", "content": "Say hello."}], "stream": False,
           "options": {"num_predict": 8}}
    code, refused = api("/api/chat", {**ask, "think": True})
    assert code == 400 and "does not support thinking" in refused.get("error", ""), refused
    code, answered = api("/api/chat", ask)
    assert code == 200 and answered["message"]["role"] == "assistant" and answered["done"], answered
    runner = ssh(host, "ps -eo args | grep '[l]lama-server'").stdout
    assert "--no-jinja" in runner and "--chat-template chatml" in runner, runner
