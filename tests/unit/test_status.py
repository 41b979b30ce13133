"""`r1fleet status` from real documents: the probe and status sections captured from the deployed lab
(tests/fixtures/status/, see its README), read into each host's state, GPU memory, endpoint and drift."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from r1fleet.fleet.config import HostConfig
from r1fleet.hardware import parse_probe
from r1fleet.lock.match import lock_entry
from r1fleet.lock.served import served_alone
from r1fleet.plan.policy import Policy
from r1fleet.roles.exposure.endpoint import endpoint_of
from r1fleet.status.collect import status_command
from r1fleet.status.readings import parse_status
from r1fleet.status.report import host_status, unreachable
from r1fleet.status.table import age, status_table

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "status"
LAB_POLICY = Policy(min_context=8192, min_tokens_per_second=5)  # r1fleet/lab/lab.yml's defaults


def document(name: str) -> str:
    return (FIXTURES / name).read_text()


def lab_host(name: str, address: str, **settings) -> HostConfig:
    return HostConfig(name=name, address=address, rehearsal=True, policy=LAB_POLICY, **settings)


def status_of(fixture: str, entry: HostConfig, plan=None, **kwargs):
    """The host's status from a captured document, planned from that document's own probe as the deploy does."""
    return status_of_text(document(fixture), entry, plan, **kwargs)


def status_of_text(text: str, entry: HostConfig, plan=None, **kwargs):
    hardware = parse_probe(text, entry.name)
    plan = plan or served_alone(entry, hardware, None).plan
    return host_status(entry.name, parse_status(text, entry.name), plan, hardware=hardware,
                       endpoint=endpoint_of(entry, plan), **kwargs), plan


LAB_4090 = lab_host("lab-4090", "10.77.0.12")
LAB_DUAL = lab_host("lab-dual3090", "10.77.0.13")
TAG = "r1fleet/smollm2:135m-instruct-q4_1"


# ---------------------------------------------------------------- reading the sections


def test_the_sections_of_a_serving_ollama_host():
    live = parse_status(document("ollama-serving__lab-4090.txt"), "lab-4090")
    unit = live.units["r1fleet-ollama.service"]
    assert (unit.installed, unit.active, unit.sub, unit.restarts, unit.main_pid) == (True, "active", "running", 0, 6897)
    assert unit.since == 1796678043 and live.now is not None and live.now >= unit.since
    assert not live.units["r1fleet-llama-server.service"].installed
    assert [(p.pid, p.name) for p in live.processes] == [(6897, "ollama"), (6905, "llama-server")]
    assert live.ollama_version.body == {"version": "0.32.15-standin"} and live.ollama_ps.ok
    assert live.llama_health.status == 0 and not live.problems


def test_the_sections_of_a_serving_llama_server():
    live = parse_status(document("llama-serving__lab-dual3090.txt"), "lab-dual3090")
    assert live.llama_health.body == {"status": "ok"}
    assert live.llama_props.body["default_generation_settings"]["n_ctx"] == 8192
    assert live.ollama_version.status == 0  # nothing listens on Ollama's port there


def test_garbled_answers_are_named_problems_not_exceptions():
    text = document("ollama-serving__lab-4090.txt").replace('{"models": [{"name"', '<html>oops{"name"', 1)
    live = parse_status(text, "lab-4090")
    assert any("GET /api/ps answered 200 with something that is not JSON" in p for p in live.problems)
    deep = document("ollama-serving__lab-4090.txt").replace('{"version": "0.32.15-standin"}', "[" * 100000, 1)
    assert any("GET /api/version answered 200 with something that is not JSON" in p
               for p in parse_status(deep, "lab-4090").problems)
    cut = document("ollama-serving__lab-4090.txt").split("#### r1fleet:status-now")[0]
    assert "status sections are missing" in parse_status(cut, "lab-4090").problems[0]
    no_curl = document("ollama-serving__lab-4090.txt").replace('|{"version": "0.32.15-standin"}\n|200', "|\n|curl-missing")
    assert any("curl is not installed" in p for p in parse_status(no_curl, "lab-4090").problems)


def test_a_line_outside_the_frame_drops_its_section_and_says_so():
    """Security review N4: every line status.sh prints for a command is framed with `|`; a line without the frame
    did not come through it, so its section is not read (status.sh's real runs: tests/unit/test_status_sh.py)."""
    text = document("ollama-serving__lab-4090.txt").replace("|MainPID=6897", "MainPID=1", 1)
    live = parse_status(text, "lab-4090")
    assert "section status-units holds a line outside its frame: not read" in live.problems
    assert live.units == {} and live.ollama_ps.ok  # the other sections are read as before


def test_the_status_script_gets_the_hosts_own_addresses_and_the_roles_unit_names():
    command = status_command(HostConfig(name="box", address="192.168.1.5", listen="192.168.1.5",
                                        allow=["192.168.1.0/24"], port=9000))
    assert command.endswith("r1fleet-status http://192.168.1.5:9000 http://192.168.1.5:9000 com.r1fleet.ollama "
                            "/var/lib/ollama/r1fleet-preload r1fleet-ollama.service r1fleet-llama-server.service "
                            "r1fleet-rpc-server.service r1fleet-ollama-preload.service")
    for request in ("--data", "-X POST", "/api/generate", "/api/chat", "/chat/completions", "/completion"):
        assert request not in command  # only GETs: nothing loads a model or makes a token


# ---------------------------------------------------------------- the host's status


def test_a_serving_ollama_host():
    status, plan = status_of("ollama-serving__lab-4090.txt", LAB_4090)
    assert (status.state, status.backend, status.version) == ("serving", "ollama", "0.32.15-standin")
    assert status.model == TAG and status.stands_for == plan.target_model == "deepseek-r1-distill-qwen-32b"
    assert status.loaded and status.loaded_for_s == 30  # the runner's age: it started when the model loaded
    assert status.unit_for_s == 30 and status.restarts == 0 and status.context == 8192
    [gpu] = status.devices
    assert gpu.device.startswith("GPU0") and gpu.used_mib == 309 + 32 and gpu.planned_mib == plan.devices[0].planned_mib
    assert status.endpoint.url == "http://127.0.0.1:11434/v1" and not status.endpoint.lan
    assert status.healthy and not status.drift


def without_the_model(preload_state: str, record: str) -> str:
    """The serving lab-4090 document with nothing in /api/ps, its preload unit in `preload_state` and its record."""
    text = document("ollama-serving__lab-4090.txt")
    ps = text.split("#### r1fleet:status-ollama-ps\n", 1)[1].split("\n", 1)[0]
    text = text.replace(ps, '|{"models": []}', 1)
    unit = (f"\n|\n|Id=r1fleet-ollama-preload.service\n|LoadState=loaded\n|ActiveState={preload_state}\n|SubState=x\n"
            "|UnitFileState=static\n|MainPID=0\n|Result=exit-code\n|NRestarts=0\n#### r1fleet:status-procs")
    text = text.replace("\n#### r1fleet:status-procs", unit, 1)
    return text + "#### r1fleet:status-ollama-preload\n" + "".join(f"|{line}\n" for line in record.splitlines())


FAILED_LOAD = ('result=failed\nat=1796678070\ndetail=HTTP 500: {"error":"llama runner process has terminated: '
               'exit status 2"}\n')


def test_a_captured_failed_preload_is_read_with_ollamas_error():
    """Captured in the lab: the model removed (`ollama rm`), then the server restarted; its preload got a 404."""
    live = parse_status(document("ollama-preload-failed__lab-4090.txt"), "lab-4090")
    assert live.units["r1fleet-ollama-preload.service"].active == "failed"
    assert live.ollama_preload.result == "failed" and live.ollama_preload.at == 1796687958
    status, _ = status_of("ollama-preload-failed__lab-4090.txt", LAB_4090)
    assert status.state == "idle" and status.unit_state == "active (running)"
    assert (f"{TAG} is not loaded, last attempt failed: HTTP 404: model '{TAG}' not found (fix: journalctl -u "
            "r1fleet-ollama-preload.service -u r1fleet-ollama.service, then systemctl start "
            "r1fleet-ollama-preload.service)") in status.problems


def test_an_ollama_host_whose_preload_failed_says_why_it_is_not_loaded():
    status, _ = status_of_text(without_the_model("failed", FAILED_LOAD), LAB_4090)
    assert status.state == "idle" and not status.loaded and not status.healthy
    [problem] = status.problems
    assert problem.startswith(f"{TAG} is not loaded, last attempt failed: HTTP 500: llama runner process has "
                              "terminated: exit status 2 (fix: journalctl -u r1fleet-ollama-preload.service")


def test_an_ollama_host_whose_preload_runs_is_loading():
    for record in ("result=loading\nat=1796678070\ndetail=\n", ""):
        status, _ = status_of_text(without_the_model("active", record), LAB_4090)
        assert status.state == "loading" and not status.problems, record
    # its unit stopped while it loaded, or the model unloaded since: said so, not "loading"
    status, _ = status_of_text(without_the_model("inactive", "result=loading\nat=1\ndetail=\n"), LAB_4090)
    assert status.state == "idle" and "its last attempt was stopped before Ollama answered" in status.problems[0]
    status, _ = status_of_text(without_the_model("inactive", "result=loaded\nat=1\ndetail=\n"), LAB_4090)
    assert status.state == "idle" and "though r1fleet-ollama-preload.service loaded it" in status.problems[0]


def test_a_serving_llama_server_on_two_gpus():
    status, plan = status_of("llama-serving__lab-dual3090.txt", LAB_DUAL)
    assert (status.state, status.backend, status.version) == ("serving", "llama.cpp", "b11669-Debian")
    assert status.model == TAG and status.context == 8192
    assert status.loaded_for_s == 9 and status.unit_for_s == 9  # llama-server's age; the unit's from systemd
    assert [d.used_mib for d in status.devices] == [129, 186] and status.healthy


def test_a_cpu_host_counts_ollamas_own_account_of_ram():
    """The probe has no per-process reading of RAM: Ollama's /api/ps (size - size_vram) is the account. The lab's
    stand-in reports size 0 without GPU buffers; a real Ollama reports the model's size."""
    entry = lab_host("lab-cpu", "10.77.0.14")
    status, _ = status_of("ollama-cpu__lab-cpu.txt", entry)
    assert [(d.device, d.used_mib) for d in status.devices] == [("RAM", 0)] and status.state == "serving"
    text = document("ollama-cpu__lab-cpu.txt").replace('"size": 0,', '"size": 307872399,', 1)
    hardware = parse_probe(text, "lab-cpu")
    plan = served_alone(entry, hardware, None).plan
    real = host_status("lab-cpu", parse_status(text, "lab-cpu"), plan, hardware=hardware)
    assert [(d.device, d.used_mib) for d in real.devices] == [("RAM", 293)]


def test_a_stopped_service_is_one_line_with_the_reason_and_the_fix():
    status, _ = status_of("ollama-stopped__lab-4090.txt", LAB_4090)
    assert status.state == "stopped" and not status.healthy
    assert status.reason == ("r1fleet-ollama.service is inactive (fix: systemctl start r1fleet-ollama.service on "
                             "lab-4090, or redeploy)")
    line = [row for row in status_table([status]).splitlines() if row.startswith("lab-4090")]
    assert line == ["lab-4090  stopped: " + status.reason]


def test_another_ollama_on_the_port_is_named_whatever_r1fleets_unit_shows():
    """Ollama's own ollama.service started again (install.sh run after the deploy, its unit unmasked) holds the
    port: status.sh's `ollama-port` section names its pid and unit, and the host is `port taken`, not serving
    with another server's answers. The section is appended to captured documents (a serving and a stopped host)."""
    foreign = "#### r1fleet:status-ollama-port\n|4242 ollama.service ollama\n"
    for fixture in ("ollama-serving__lab-4090.txt", "ollama-stopped__lab-4090.txt"):
        status, _ = status_of_text(document(fixture) + foreign, LAB_4090)
        assert status.state == "port taken" and not status.healthy
        assert status.reason.startswith("another ollama (pid 4242, unit ollama.service) holds Ollama's port, "
                                        "not r1fleet-ollama.service")
        assert "systemctl disable --now ollama.service on lab-4090" in status.reason
    # the port held by r1fleet's own unit: serving as before
    own = "#### r1fleet:status-ollama-port\n|6897 r1fleet-ollama.service ollama\n"
    assert status_of_text(document("ollama-serving__lab-4090.txt") + own, LAB_4090)[0].state == "serving"
    assert parse_status(document("ollama-serving__lab-4090.txt"), "lab-4090").ollama_port is None  # not asked


def test_a_crashed_llama_server_that_systemd_restarts():
    crashed, _ = status_of("llama-auto-restart__lab-dual3090.txt", LAB_DUAL)
    assert crashed.state == "restarting" and "stopped (signal)" in crashed.problems[0]
    back, _ = status_of("llama-restarted__lab-dual3090.txt", LAB_DUAL)
    assert back.state == "serving" and back.restarts == 1 and back.healthy


def test_a_host_without_r1fleet_units_is_not_deployed():
    text = document("ollama-serving__lab-4090.txt").replace("LoadState=loaded", "LoadState=not-found")
    hardware = parse_probe(text, "lab-4090")
    plan = served_alone(LAB_4090, hardware, None).plan
    status = host_status("lab-4090", parse_status(text, "lab-4090"), plan, hardware=hardware)
    assert status.state == "not deployed"
    assert status.reason.startswith("no r1fleet service on this host; the plan serves " + TAG)
    assert "pyinfra inventory.py deploy.py --limit lab-4090" in status.reason


def test_an_unreachable_host_is_one_line_reason_first():
    down = unreachable("lab-cpu", "timed out connecting over SSH to root@10.77.0.14:22 (fix: check that the host is up)")
    table = status_table([down])
    assert "lab-cpu  unreachable: timed out connecting over SSH" in table and "Traceback" not in table
    assert table.count("lab-cpu") == 1 and "0/1 hosts serving as planned" in table


# ---------------------------------------------------------------- drift


def test_drift_names_what_differs_from_the_lock():
    text = document("ollama-serving__lab-4090.txt")
    hardware = parse_probe(text, "lab-4090")
    plan = served_alone(LAB_4090, hardware, None).plan
    entry = lock_entry("lab-4090", hardware, plan.model_copy(update={"ollama_tag": "deepseek-r1:32b"}), LAB_4090)
    entry.artifacts.ollama.version = "0.6.0"
    locked = plan.model_copy(update={"ollama_tag": "deepseek-r1:32b", "context_length": 16384})
    status = host_status("lab-4090", parse_status(text, "lab-4090"), locked, locked=True, lock=entry, hardware=hardware)
    assert status.drift == [f"model: serves {TAG}, the lock says deepseek-r1:32b",
                            "Ollama: version 0.32.15-standin, the lock says 0.6.0"]
    assert not status.healthy and "DRIFT" in status_table([status])


def test_drift_of_the_backend_and_the_context_against_todays_plan():
    text = document("ollama-serving__lab-4090.txt")
    hardware = parse_probe(text, "lab-4090")
    plan = served_alone(LAB_4090, hardware, None).plan
    live = parse_status(text, "lab-4090")
    other = host_status("lab-4090", live, plan.model_copy(update={"backend": "llama.cpp"}), hardware=hardware)
    assert other.drift == ["backend: runs ollama, the plan says llama.cpp"]
    shorter = host_status("lab-4090", live, plan.model_copy(update={"context_length": 4096}), hardware=hardware)
    assert shorter.drift == ["context: 8192, the plan says 4096"] and "not locked, differs" in status_table([shorter])


def test_a_hardware_change_since_the_lock_is_drift_with_the_relock_command():
    live = parse_status(document("ollama-serving__lab-4090.txt"), "lab-4090")
    why = "cannot plan: host lab-4090: the hardware differs from the lock: GPU 0: NVIDIA GeForce RTX 4090 -> absent"
    status = host_status("lab-4090", live, None, plan_error=why, locked=True)
    assert status.drift == [why] and status.state == "serving" and not status.healthy


def test_the_json_document():
    status, _ = status_of("ollama-serving__lab-4090.txt", LAB_4090)
    doc = json.loads(json.dumps(status.document()))
    assert doc["state"] == "serving" and doc["endpoint"]["url"] == "http://127.0.0.1:11434/v1"
    assert doc["unit"]["since"] == "2026-12-07T21:14:03Z" and doc["lock"] == "not locked" and doc["healthy"] is True
    assert doc["devices"][0]["used_mib"] == 341


def test_hostile_unit_values_are_read_as_unknown():
    text = document("ollama-serving__lab-4090.txt").replace("ActiveEnterTimestamp=@1796678043", "ActiveEnterTimestamp=@" + "9" * 40)
    text = text.replace("NRestarts=0", "NRestarts=inf", 1).replace("MainPID=6897", "MainPID=-1")
    status, _ = status_of_text(text, LAB_4090)
    doc = json.loads(json.dumps(status.document()))
    assert doc["unit"]["since"] is None and doc["unit"]["restarts"] is None and status.state == "serving"


def test_numbers_no_int_can_hold_and_json_no_parser_should_are_read_as_unknown():
    """A host's answer is a network input (audit M3): 5000 digits (past int()'s limit), another script's digits
    and NaN or Infinity in JSON read as unknown or as no answer, never as a ValueError that ends the command."""
    text = document("ollama-serving__lab-4090.txt").replace("MainPID=6897", "MainPID=" + "9" * 5000)
    text = text.replace("NRestarts=0", "NRestarts=\u0663", 1)
    text = text.replace('{"version": "0.32.15-standin"}', '{"version": NaN}', 1)
    live = parse_status(text, "lab-4090")
    unit = live.units["r1fleet-ollama.service"]
    assert unit.main_pid is None and unit.restarts is None
    assert live.ollama_version.body is None
    assert any("GET /api/version answered 200 with something that is not JSON" in p for p in live.problems)


@pytest.mark.parametrize("seconds, text", [(None, "?"), (5, "5s"), (61, "1m"), (7200, "2h"), (3 * 86400, "3d")])
def test_ages_at_a_glance(seconds, text):
    assert age(seconds) == text


def test_a_host_answer_never_commands_the_terminal():
    """JSON's \\u001b decodes to a real ESC: the table prints text, never a terminal command (security review N4)."""
    status, _ = status_of("ollama-stopped__lab-4090.txt", LAB_4090)
    status.reason = "inactive \x1b]0;owned\x07\x1b[2J(fix: ...)"
    table = status_table([status])
    assert "\x1b" not in table and "\x07" not in table and "inactive ]0;owned[2J(fix: ...)" in table
