"""`r1fleet status` and `r1fleet endpoints` end to end, with the SSH round trip replaced by documents captured from
the lab (tests/fixtures/status/): planning, the table, --json, --watch, exit statuses and bad input."""

from __future__ import annotations

import json
from pathlib import Path

from types import SimpleNamespace

import pytest

from r1fleet.cli.main import main
from r1fleet.hardware import parse_probe
from r1fleet.status import collect
from r1fleet.verify.connect import ssh_failure

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "status"
CAPTURED = {"lab-4090": "ollama-serving__lab-4090.txt", "lab-dual3090": "llama-serving__lab-dual3090.txt"}
FLEET = """\
defaults:
  rehearsal: true
  mirror: http://10.77.0.1:8088
  policy: {min_context: 8192, min_tokens_per_second: 5}
hosts:
  lab-4090: {address: 10.77.0.12}
  lab-dual3090: {address: 10.77.0.13}
  gone: {address: 10.77.0.254}
"""


@pytest.fixture
def fleet_file(tmp_path, monkeypatch):
    """A fleet whose hosts answer with captured documents, and one host that never answers SSH."""
    commands = {}

    def fake_connect_and_probe_all(targets, options, then=None):
        for name, target in targets.items():
            commands[name] = then(target.entry) if then else None
            if name not in CAPTURED:
                target.error = ssh_failure("root@10.77.0.254:22", TimeoutError("timed out"))
                continue
            text = (FIXTURES / CAPTURED[name]).read_text()
            target.cache["document"], target.hardware = text, parse_probe(text, name)

    monkeypatch.setattr(collect, "connect_and_probe_all", fake_connect_and_probe_all)
    path = tmp_path / "fleet.yml"
    path.write_text(FLEET)
    return SimpleNamespace(path=str(path), commands=commands)


def test_status_table_with_a_host_down(fleet_file, capsys):
    assert main(["status", "--fleet", fleet_file.path]) == 1  # one host is not serving
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith(("lab-", "gone"))}
    assert rows["lab-4090"].split()[1:4] == ["serving", "ollama", "0.32.15-standin"]
    assert rows["lab-dual3090"].split()[1:4] == ["serving", "llama.cpp", "b11669-Debian"]
    assert "http://127.0.0.1:8080/v1 (host only)" in rows["lab-dual3090"]
    assert rows["gone"] == ("gone          unreachable: timed out connecting over SSH to root@10.77.0.254:22 "
                            "(fix: check that the host is up, its address, and that sshd runs)")
    assert "2/3 hosts serving as planned" in out and "Traceback" not in out
    assert "r1fleet-status" in fleet_file.commands["lab-4090"]  # the status sections ride on the probe's round trip


def test_status_json_of_the_named_hosts(fleet_file, capsys):
    assert main(["status", "--fleet", fleet_file.path, "--json", "lab-4090", "lab-dual3090"]) == 0
    hosts = json.loads(capsys.readouterr().out)["hosts"]
    assert [(h["host"], h["state"], h["healthy"]) for h in hosts] == [("lab-4090", "serving", True),
                                                                      ("lab-dual3090", "serving", True)]
    assert hosts[1]["devices"][1]["used_mib"] == 186 and hosts[0]["stands_for"] == "deepseek-r1-distill-qwen-32b"


def test_watch_refreshes_until_ctrl_c_and_exits_cleanly(fleet_file, capsys, monkeypatch):
    ticks = []

    def sleep(seconds):
        ticks.append(seconds)
        if len(ticks) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr("r1fleet.cli.status.time.sleep", sleep)
    assert main(["status", "--fleet", fleet_file.path, "--watch", "--json", "lab-4090"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all(json.loads(line)["hosts"][0]["host"] == "lab-4090" for line in lines)
    assert all(0 <= t <= 2 for t in ticks)


def test_an_unknown_host_is_a_clear_error(fleet_file, capsys):
    assert main(["status", "--fleet", fleet_file.path, "nope"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (f"r1fleet: host nope: field HOST: not in {fleet_file.path} "
                           "(fix: name one of: lab-4090, lab-dual3090, gone)")


def test_endpoints_of_the_reachable_hosts_and_the_reason_for_the_other(fleet_file, capsys):
    assert main(["endpoints", "--fleet", fleet_file.path, "--format", "env"]) == 1
    captured = capsys.readouterr()
    assert "R1FLEET_LAB_DUAL3090_BASE_URL=http://127.0.0.1:8080/v1" in captured.out
    assert "R1FLEET_LAB_4090_MODEL=r1fleet/smollm2:135m-instruct-q4_1" in captured.out
    assert captured.err.startswith("r1fleet: gone: timed out connecting over SSH to root@10.77.0.254:22")
    assert fleet_file.commands["lab-4090"] is None  # the probe alone: endpoints need the plan, not the service


def test_a_bad_format_is_refused_by_the_parser(fleet_file, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["endpoints", "--fleet", fleet_file.path, "--format", "xml"])
    assert exit_.value.code == 2 and "invalid choice: 'xml'" in capsys.readouterr().err
