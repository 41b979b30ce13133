"""How `r1fleet verify` reaches a host: real hosts through ssh with their host keys checked (audit L2)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from r1fleet.fleet.config import HostConfig
from r1fleet.verify.connect import ConnectOptions, connect, plan_targets
from r1fleet.verify.target import Target


def test_every_host_is_reached_with_its_host_key_checked_a_lab_hosts_against_the_labs_known_hosts():
    options = ConnectOptions(ssh_timeout=5)
    real = connect(HostConfig(name="box", address="192.168.1.21", ssh_user="admin", ssh_key="/k"), options)
    assert real.backend.NAME == "ssh" and "StrictHostKeyChecking=accept-new" in real.backend.ssh_extra_args
    assert "BatchMode=yes" in real.backend.ssh_extra_args and real.backend.ssh_identity_file == "/k"
    lab = connect(HostConfig(name="lab-4090", address="10.77.0.12", profile="rtx4090",
                             ssh_known_hosts="/run/r1fleet-lab/known_hosts"), options)
    assert lab.backend.NAME == "ssh" and "StrictHostKeyChecking=yes" in lab.backend.ssh_extra_args
    assert "UserKnownHostsFile=/run/r1fleet-lab/known_hosts" in lab.backend.ssh_extra_args
    # a profile alone (a lab: section in someone's own fleet file) relaxes nothing
    copied = connect(HostConfig(name="lab-4090", address="192.168.1.9", profile="rtx4090"), options)
    assert copied.backend.NAME == "ssh" and copied.backend.ssh_extra_args == real.backend.ssh_extra_args
    v6 = connect(HostConfig(name="v6", address="fd00::21", ssh_port=2222), options)
    assert (v6.backend.host.name, v6.backend.host.port) == ("fd00::21", "2222")


class FakeMac:
    """testinfra's host, answering a Mac's commands (launchd, PlistBuddy, lsof) with canned text."""

    def __init__(self, answers: dict[str, str]):
        self.answers, self.commands = answers, []

    def run(self, command: str):
        self.commands.append(command)
        for text, out in self.answers.items():
            if text in command:
                return SimpleNamespace(rc=0, stdout=out, stderr="")
        return SimpleNamespace(rc=1, stdout="", stderr="")


def test_a_mac_is_verified_through_launchd():
    """audit-ollama row 40: the service checks read launchd, PlistBuddy and lsof on a Mac, not systemd."""
    from r1fleet.records import HostPlan
    from test_verify_report import LAUNCHCTL_PRINT

    plan = HostPlan(host="studio", model="deepseek-r1-distill-qwen-14b", backend="ollama", placement="unified",
                    vendor="apple", ollama_tag="deepseek-r1:14b-qwen-distill-q4_K_M")
    mac = FakeMac({"launchctl print system/com.r1fleet.ollama": LAUNCHCTL_PRINT,
                   "launchctl print-disabled system": '\t"com.r1fleet.ollama" => enabled\n',
                   "test -f /Library/LaunchDaemons/com.r1fleet.ollama.plist": "",
                   "Print :UserName": "_r1ollama\n", "pgrep -P 812": "900\n",
                   "lsof -nP -iTCP -sTCP:LISTEN": "p812\ncollama\nn127.0.0.1:11434\n"})
    target = Target(entry=HostConfig(name="studio", address="192.168.1.30"), host=mac, plan=plan)
    assert target.darwin and target.unit == "com.r1fleet.ollama" and target.user == "_r1ollama"
    assert target.service_running() and target.enabled_state() == "enabled"
    assert target.configured_user() == "_r1ollama" and target.service_pids() == {812, 900}
    assert target.service_environment()["OLLAMA_MODELS"] == "/var/lib/r1fleet/models/ollama"
    assert [(l.address, l.port) for l in target.listeners()] == [("127.0.0.1", 11434)]
    assert not any("systemctl" in c or "ss -l" in c for c in mac.commands)


def test_commands_are_bounded_where_there_is_no_timeout_command(tmp_path):
    """macOS has no coreutils `timeout`: the bound falls back to perl's alarm (exit 142)."""
    import os
    import shutil
    import subprocess

    bare = tmp_path / "bin"
    bare.mkdir()
    for tool in ("sh", "perl", "sleep"):
        (bare / tool).symlink_to(shutil.which(tool))
    target = Target(entry=HostConfig(name="m", address="10.0.0.1"),
                    host=SimpleNamespace(run=lambda c: subprocess.run(
                        ["/bin/sh", "-c", c], env={**os.environ, "PATH": str(bare)}, capture_output=True)))
    assert target.run("sleep 3", timeout=1).returncode == 142  # unbounded, sleep would exit 0
    assert target.run("echo fine", timeout=5).returncode == 0


def test_verify_plans_each_probed_host_as_the_deploy_serves_it():
    """Pool members against their part of the pool, the others alone; a host nothing fits fails by name, and a host
    that could not be probed keeps its own error (r1fleet/lock/served.py decides for all of them)."""
    from test_pools import BOX_A, BOX_B, on_sid

    from r1fleet.hardware import parse_probe
    from r1fleet.plan.pool_settings import PoolSettings

    probes = Path(__file__).resolve().parents[1] / "fixtures" / "probes"
    hosts = {"box-a": "192.168.1.31", "box-b": "192.168.1.32", "gpu-4090": "192.168.1.22", "tiny": "192.168.1.40",
             "down": "192.168.1.50"}
    targets = {name: Target(HostConfig(name=name, address=address)) for name, address in hosts.items()}
    for name, text in (("box-a", on_sid(BOX_A)), ("box-b", on_sid(BOX_B)), ("gpu-4090", (probes / "rtx4090.probe").read_text()),
                       ("tiny", (probes / "cpu-16g.probe").read_text())):
        targets[name].hardware = parse_probe(text, name)
    targets["tiny"].entry = targets["tiny"].entry.model_copy(update={"policy": targets["tiny"].entry.policy.model_copy(
        update={"min_tokens_per_second": 1000})})
    targets["down"].error = "cannot connect over SSH to root@192.168.1.50:22: refused"
    plan_targets({"big": PoolSettings(hosts=["box-a", "box-b"], head="box-a")}, targets, ConnectOptions())
    head, worker = targets["box-a"], targets["box-b"]
    assert (head.pool_role, worker.pool_role) == ("head", "worker") and head.pool is worker.pool and head.pool.pooled
    assert head.plan.tensor_split and worker.plan.gguf is None and head.error is None and worker.error is None
    assert targets["gpu-4090"].pool_role is None and targets["gpu-4090"].plan.fits and targets["gpu-4090"].error is None
    assert targets["tiny"].error.startswith("no model fits this host, so nothing is served: ")
    assert targets["down"].error.startswith("cannot connect") and targets["down"].plan is None


def test_an_unreachable_host_is_named_in_one_line_with_the_reason_first(monkeypatch):
    """verify and status share it: `timed out connecting over SSH to ...`, then the fix."""
    import paramiko

    from r1fleet.verify import connect as connect_module
    from r1fleet.verify.connect import connect_and_probe, ssh_failure

    def refuse(entry, options):
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(connect_module, "connect", refuse)
    target = Target(entry=HostConfig(name="down", address="192.168.1.50"))
    connect_and_probe(target, ConnectOptions())
    assert target.error == ("Connection refused connecting over SSH to root@192.168.1.50:22 "
                            "(fix: check that the host is up, its address, and that sshd runs)")
    assert ssh_failure("me@[fd00::5]:22", TimeoutError("timed out")).startswith("timed out connecting over SSH to me@[fd00::5]:22")
    auth = ssh_failure("root@h:22", paramiko.AuthenticationException("Authentication failed."))
    assert auth == "AuthenticationException: Authentication failed. connecting over SSH to root@h:22 (fix: check the address, user and key)"
    assert "\n" not in auth


def test_the_status_script_rides_on_the_probes_round_trip(monkeypatch):
    """One command per host: the probe, then whatever `then` adds; the whole output is kept for its reader."""
    from r1fleet.verify import connect as connect_module
    from r1fleet.verify.connect import connect_and_probe

    host = FakeMac({"r1fleet-probe": "#### r1fleet:uname\nLinux 6.1 x86_64\n#### r1fleet:meminfo\nMemTotal: 16384000 kB\n"
                                      "#### r1fleet:status-now\n1\n"})
    monkeypatch.setattr(connect_module, "connect", lambda entry, options: host)
    target = Target(entry=HostConfig(name="box", address="192.168.1.5"))
    connect_and_probe(target, ConnectOptions(), then="echo status-part")
    assert len(host.commands) == 1 and "r1fleet-probe" in host.commands[0] and "; echo status-part" in host.commands[0]
    assert target.error is None and target.hardware is not None and "status-now" in target.cache["document"]


def test_paramikos_unable_to_connect_gives_the_sockets_reason():
    from paramiko.ssh_exception import NoValidConnectionsError

    from r1fleet.verify.connect import ssh_failure

    err = NoValidConnectionsError({("10.77.0.254", 22): OSError(113, "No route to host")})
    assert ssh_failure("root@10.77.0.254:22", err).startswith("No route to host connecting over SSH to root@10.77.0.254:22")


def test_the_ssh_clients_own_failure_gives_its_reason_not_the_command():
    """testinfra's ssh backend (every host since the lab's are pinned to their keys too) raises its CommandResult
    when ssh exits 255; the reason is ssh's last line, never the probe script it carried."""
    import testinfra
    from testinfra.backend.base import CommandResult

    from r1fleet.verify.connect import ssh_failure

    ssh = testinfra.get_host("ssh://root@10.77.0.254").backend  # connects to nothing until it runs a command
    err = RuntimeError(CommandResult(backend=ssh, exit_status=255, command=b"sh -c '#!/bin/sh ...'", _stdout=b"",
                                     _stderr=b"ssh: connect to host 10.77.0.254 port 22: No route to host\r\n"))
    assert ssh_failure("root@10.77.0.254:22", err) == ("No route to host connecting over SSH to root@10.77.0.254:22 "
                                                       "(fix: check that the host is up, its address, and that sshd runs)")
    keys = RuntimeError(CommandResult(backend=ssh, exit_status=255, command=b"x", _stdout=b"",
                                      _stderr=b"Host key verification failed.\r\n"))
    assert ssh_failure("root@h:22", keys).startswith("Host key verification failed. connecting over SSH to root@h:22")


def test_a_host_answer_nested_without_end_fails_the_check_not_the_run(monkeypatch):
    """A host's API that answers `[[[[...` is a failed check naming the host, never a RecursionError (audit M3)."""
    target = Target(HostConfig(name="m", address="10.0.0.1"))
    monkeypatch.setattr(Target, "http", lambda self, *args, **kwargs: (200, "[" * 200_000))
    with pytest.raises(pytest.fail.Exception, match="m: GET .* not JSON"):
        target.get_json("/api/tags")
