"""One host under `r1fleet verify`: its testinfra connection, its live plan, and what the checks measured.

`Target` runs every command on the host bounded in time (coreutils' `timeout`, or perl's alarm on macOS),
reads the service manager (systemd, or launchd for a Mac's LaunchDaemon) and makes HTTP requests with curl
on the host itself, so services bound to 127.0.0.1 are reachable. A command or request that fails ends the
check with `pytest.fail`, naming the host. The suite (r1fleet/verify/suite) builds one per host
(r1fleet/verify/connect.py connects and plans it); judgements on what it reads are r1fleet/verify/judge.py
and r1fleet/verify/readings.py.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from typing import Any

import pytest

from r1fleet.plan.catalog import load_catalog
from r1fleet.fleet.config import HostConfig
from r1fleet.records import HostPlan
from r1fleet.net import is_loopback, parse_json
from r1fleet.roles.llama_cpp.decide import USER as LLAMA_USER
from r1fleet.roles.macos.decide import LABEL as MACOS_LABEL, PLIST as MACOS_PLIST, USER as MACOS_USER
from r1fleet.roles.ollama.decide import USER as OLLAMA_USER
from r1fleet.roles.rpc_worker.decide import RPC_UNIT, USER as RPC_USER
from r1fleet.render.systemd_unit import LLAMA_UNIT, OLLAMA_UNIT, systemd_environment
from r1fleet.verify.readings import (
    launchd_disabled,
    parse_launchctl_print,
    cgroup_unit,
    parse_lsof_listeners,
    parse_ss_listeners,
)

# The systemd unit and service account of each backend (a Mac's are the LaunchDaemon's: roles/macos.py).
SERVICES = {"ollama": (OLLAMA_UNIT, OLLAMA_USER), "llama.cpp": (LLAMA_UNIT, LLAMA_USER)}


def fail(target: "Target", message: str) -> None:
    """Fail the current check, naming the host first (the message is the fix's context)."""
    pytest.fail(f"{target.name}: {message}", pytrace=False)


def credential_path(unit_text: str) -> str | None:
    """The file of the last `LoadCredential=NAME:PATH` in `systemctl cat` output (a later line wins, as in systemd).

    >>> credential_path("[Service]\\nLoadCredential=api-key:/etc/r1fleet/api-key\\n")
    '/etc/r1fleet/api-key'
    """
    path = None
    for line in unit_text.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and key == "LoadCredential":
            _, colon, file = value.partition(":")
            path = file if colon and file.startswith("/") else path
    return path


@dataclass
class Target:
    """One host under verification: its connection, its live plan, and what the checks measured."""

    entry: HostConfig
    host: Any = None  # testinfra.host.Host
    plan: HostPlan | None = None
    error: str | None = None
    command_timeout: int = 60
    chat_timeout: int = 300
    measured: dict[str, Any] = field(default_factory=dict)
    cache: dict[str, Any] = field(default_factory=dict)
    hardware: Any = None  # r1fleet.records.Hardware from the probe
    pool: Any = None  # r1fleet.records.PoolPlan when the host serves in a pooled pool
    pool_role: str | None = None  # "head" (llama-server over the pool) or "worker" (rpc-server, no API)
    locked: bool = False  # the plan (or its pool's) comes from the fleet lock

    @property
    def worker(self) -> bool:
        return self.pool_role == "worker"

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def backend(self) -> str:
        return self.plan.backend if self.plan and self.plan.backend else "ollama"

    @property
    def darwin(self) -> bool:
        """A Mac: r1fleet serves Ollama there as a LaunchDaemon (roles/macos.py), not a systemd unit."""
        return bool(self.plan and self.plan.vendor == "apple")

    @property
    def unit(self) -> str:
        if self.worker:
            return RPC_UNIT
        return MACOS_LABEL if self.darwin else SERVICES[self.backend][0]

    @property
    def user(self) -> str:
        if self.worker:
            return RPC_USER
        return MACOS_USER if self.darwin else SERVICES[self.backend][1]

    def launchd_job(self) -> dict[str, Any]:
        """launchd's description of the LaunchDaemon (readable without root: launchctl(1), system domain)."""
        if "launchd" not in self.cache:
            self.cache["launchd"] = parse_launchctl_print(self.run(f"launchctl print system/{MACOS_LABEL}").stdout)
        return self.cache["launchd"]

    def service_running(self) -> bool:
        if self.darwin:
            job = self.launchd_job()
            return job["state"] == "running" and job["pid"] is not None
        return self.host.service(self.unit).is_running

    def enabled_state(self) -> str:
        """"enabled" when the service starts at boot; otherwise what stands in the way."""
        if self.darwin:
            if self.run(f"test -f {MACOS_PLIST}").rc != 0:
                return f"not installed ({MACOS_PLIST} is missing)"
            disabled = launchd_disabled(self.run("launchctl print-disabled system").stdout, MACOS_LABEL)
            return "disabled in launchd" if disabled else "enabled"
        # Not testinfra's is_enabled: it raises on `not-found` (exit 4) instead of saying so.
        return self.run(f"systemctl is-enabled {self.unit}").stdout.strip() or "unknown"

    def configured_user(self) -> str:
        if self.darwin:
            return self.run(f"/usr/libexec/PlistBuddy -c 'Print :UserName' {MACOS_PLIST}").stdout.strip()
        return self.output(f"systemctl show -p User --value {self.unit}").strip()

    def service_environment(self) -> dict[str, str]:
        if self.darwin:
            return dict(self.launchd_job()["environment"])
        return systemd_environment(self.output(f"systemctl show -p Environment --value {self.unit}"))

    def listeners(self) -> list:
        if self.darwin:  # no ss on macOS; sudo: another user's sockets are not listed otherwise
            return parse_lsof_listeners(self.output("sudo -n lsof -nP -iTCP -sTCP:LISTEN -Fpcn"))
        return parse_ss_listeners(self.output("ss -ltnpH"))

    def unit_of(self, pid: int) -> str | None:
        """The systemd unit a process runs in (None on a Mac, or where it is in none)."""
        return None if self.darwin else cgroup_unit(self.run(f"cat /proc/{int(pid)}/cgroup").stdout)  # gone since: None

    @property
    def port(self) -> int:
        return self.pool.rpc_port if self.worker else self.entry.port_for(self.backend)

    @property
    def bind(self) -> str:
        return self.entry.address if self.worker else self.entry.bind_address  # a worker: its pool address

    @property
    def exposed(self) -> bool:
        return not is_loopback(self.bind)

    @property
    def api(self) -> str:
        """Where the service answers on the host itself: the URL the deploy used."""
        return self.entry.local_api(self.backend)

    @property
    def reasoning(self) -> bool:
        return bool(self.plan and self.plan.model and load_catalog().find(self.plan.model).reasoning)

    def run(self, command: str, timeout: int | None = None):
        """Run a shell command on the host, bounded by `timeout` there; returns testinfra's CommandResult."""
        limit = int(timeout or self.command_timeout)
        inner = f"sh -c {shlex.quote(command)}"
        # coreutils' timeout (exit 124); macOS has none, so perl's alarm bounds it there (SIGALRM: exit 142)
        return self.host.run(f"if command -v timeout >/dev/null 2>&1; then exec timeout {limit} {inner}; "
                             f"else perl -e 'alarm shift @ARGV; exec @ARGV' {limit} {inner}; fi")

    def output(self, command: str, timeout: int | None = None) -> str:
        result = self.run(command, timeout)
        if result.rc in (124, 142):
            pytest.fail(f"{self.name}: `{command}` did not finish within {timeout or self.command_timeout} s", pytrace=False)
        if result.rc != 0:
            pytest.fail(f"{self.name}: `{command}` failed (exit {result.rc}): {result.stderr.strip() or result.stdout.strip()}", pytrace=False)
        return result.stdout

    def http(self, method: str, path: str, body: Any = None, timeout: int = 30, key_file: str | None = None,
             base: str | None = None) -> tuple[int, str]:
        """An HTTP request made with curl ON the host; returns (status, body). Status 0: no answer."""
        url = (base or self.api) + path
        curl = ["curl", "-sS", "--connect-timeout", "5", "--max-time", str(int(timeout)), "-X", method, "-w", r"\n%{http_code}"]
        if body is not None:
            curl += ["-H", "Content-Type: application/json", "--data-binary", json.dumps(body)]
        command = " ".join(shlex.quote(word) for word in curl + [url])
        if key_file:
            # The key goes through a pipe only (printf is a builtin), never into a process's argv.
            key = shlex.quote(key_file)
            command = (f"printf 'Authorization: Bearer %s\\n' \"$(grep -v '^#' {key} | head -n1)\" | "
                       + command.replace("curl ", "curl -H @- ", 1))
        result = self.run(command, timeout + 10)
        text, _, status = result.stdout.rpartition("\n")
        try:
            return int(status.strip()), text
        except ValueError:
            return 0, (result.stderr.strip() or result.stdout.strip())

    def get_json(self, path: str, method: str = "GET", body: Any = None, timeout: int = 30, key_file: str | None = None) -> Any:
        status, text = self.http(method, path, body, timeout, key_file)
        if status != 200:
            detail = text.strip()[:300] or "no answer"
            pytest.fail(f"{self.name}: {method} {self.api}{path} -> {status or 'no answer'}: {detail}", pytrace=False)
        try:
            return parse_json(text)  # bounded: a host's answer nested without end is no answer, not a RecursionError
        except ValueError:
            pytest.fail(f"{self.name}: {method} {self.api}{path} answered with something that is not JSON: {text[:200]!r}", pytrace=False)

    def api_key_file(self) -> str | None:
        """The key file systemd loads for the service (LoadCredential=api-key:/path), if any."""
        if "key_file" not in self.cache:
            # The unit's own lines (drop-ins included): systemd 262 prints this property as "[unprintable]".
            text = self.run(f"systemctl cat {self.unit}").stdout
            self.cache["key_file"] = credential_path(text)
        return self.cache["key_file"]

    def service_pids(self) -> set[int]:
        """Every process in the service's cgroup (the server and its runners); on a Mac the job's
        process and its children."""
        if self.darwin:
            pid = self.launchd_job()["pid"]
            if pid is None:
                return set()
            children = self.run(f"pgrep -P {pid}").stdout.split()
            return {pid, *(int(p) for p in children if p.isdigit())}
        script = (
            f"cg=$(systemctl show -p ControlGroup --value {self.unit}); [ -n \"$cg\" ] || exit 0; "
            "for f in /sys/fs/cgroup$cg/cgroup.procs /sys/fs/cgroup/systemd$cg/cgroup.procs; do "
            "[ -r \"$f\" ] && { cat \"$f\"; exit 0; }; done"
        )
        # A process of another PID namespace is listed as 0; it cannot be inspected from here.
        return {int(p) for p in self.run(script).stdout.split() if p.isdigit() and int(p) > 0}
