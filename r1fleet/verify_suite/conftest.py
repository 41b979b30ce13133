"""testinfra suite that proves each fleet host serves its planned model (`r1fleet verify`).

    pytest r1fleet/verify_suite --fleet inventory/fleet.yml    # or R1FLEET_FLEET=lab pytest r1fleet/verify_suite
    pytest r1fleet/verify_suite --ansible-inventory hosts.yml  # connect through testinfra's Ansible backend
    pytest r1fleet/verify_suite --fleet lab -k lab-4090        # one host

Every test is parametrized by host (`test_service_active[lab-4090]`), so a failure names the host and
the check. Each host's plan is computed live, exactly as deploy.py does: probe over the same SSH
connection -> parse_probe -> plan_host(policy) -> rehearse() for rehearsal hosts. The probes run once
per session, in parallel. HTTP requests are made on the host itself (curl over SSH), so services bound
to 127.0.0.1 are reachable. Everything is bounded: SSH connect timeout, `timeout` around each remote
command, curl --max-time, and a per-test alarm, so a dead host fails fast.

After the run a per-host table is printed (and written to --verify-report FILE).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import testinfra

from r1fleet.roles.systemd_unit import OLLAMA_UNIT, LLAMA_UNIT
from r1fleet.config import HostConfig
from r1fleet.net import is_loopback
from r1fleet.catalog import load_catalog
from r1fleet.errors import R1FleetError
from r1fleet.facts import probe_script
from r1fleet.fleet import Fleet, load_fleet
from r1fleet.hardware import parse_probe
from r1fleet.models import HostPlan
from r1fleet.planner import plan_host, rehearse
from r1fleet.service_readings import (
    launchd_disabled,
    parse_launchctl_print,
    parse_lsof_listeners,
    parse_ss_listeners,
    systemd_environment,
)
from r1fleet.verify_table import HostResult, planned_gpu_mib, results_table
from r1fleet.roles.llama_cpp import USER as LLAMA_USER
from r1fleet.roles.macos import LABEL as MACOS_LABEL, PLIST as MACOS_PLIST, USER as MACOS_USER
from r1fleet.roles.ollama import USER as OLLAMA_USER

SERVICES = {"ollama": (OLLAMA_UNIT, OLLAMA_USER), "llama.cpp": (LLAMA_UNIT, LLAMA_USER)}
PROBE_TIMEOUT_S = 120


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("r1fleet verify")
    group.addoption("--fleet", default=None, help="fleet file, `lab`, or an Ansible inventory (default: $R1FLEET_FLEET, else inventory/fleet.yml)")
    group.addoption("--rehearsal", action="store_true", help="expect the rehearsal stand-in on every host (as deploy --data rehearsal=true)")
    group.addoption("--min-speed-fraction", type=float, default=None,
                    help="fail when decode tokens/s < this x the plan's estimate (default 0.5; 0.0 for rehearsal hosts)")
    group.addoption("--hash-models", action="store_true", help="sha256 the served model file even when large (always done in rehearsal)")
    group.addoption("--ssh-timeout", type=int, default=10, help="SSH connect timeout in seconds (default 10)")
    group.addoption("--command-timeout", type=int, default=60, help="limit for each remote command in seconds (default 60)")
    group.addoption("--chat-timeout", type=int, default=300, help="limit for the chat request in seconds (default 300)")
    group.addoption("--check-timeout", type=int, default=600, help="limit for each check as a whole in seconds (default 600)")
    group.addoption("--verify-report", default=None, metavar="FILE", help="also write the per-host table to FILE")


# ---------------------------------------------------------------- the fleet and its hosts


def _fleet_ref(config: pytest.Config) -> str | None:
    return config.getoption("--fleet") or config.getoption("ansible_inventory", None) or None


def fleet_of(config: pytest.Config) -> Fleet:
    """The fleet, loaded once per session; an invalid fleet stops the run with its message."""
    cached = getattr(config, "_r1fleet_fleet", None)
    if cached is None:
        try:
            cached = load_fleet(_fleet_ref(config))
        except R1FleetError as err:
            raise pytest.UsageError(f"r1fleet verify: {err}") from None
        config._r1fleet_fleet = cached
    return cached


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "node" in metafunc.fixturenames:
        names = list(fleet_of(metafunc.config).hosts)
        # Session scope groups the run host by host.
        metafunc.parametrize("node", names, ids=names, scope="session")


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
        return MACOS_LABEL if self.darwin else SERVICES[self.backend][0]

    @property
    def user(self) -> str:
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

    @property
    def port(self) -> int:
        return self.entry.port_for(self.backend)

    @property
    def bind(self) -> str:
        return self.entry.bind_address

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
            return json.loads(text)
        except ValueError:
            pytest.fail(f"{self.name}: {method} {self.api}{path} answered with something that is not JSON: {text[:200]!r}", pytrace=False)

    def api_key_file(self) -> str | None:
        """The key file systemd loads for the service (LoadCredential=api-key:/path), if any."""
        if "key_file" not in self.cache:
            text = self.run(f"systemctl show -p LoadCredential --value {self.unit}").stdout
            path = None
            for word in text.replace(";", " ").split():
                name, sep, value = word.partition(":")
                if sep and value.startswith("/"):
                    path = value
            self.cache["key_file"] = path
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


def _ssh_config_without_host_keys() -> str:
    """Lab hosts are rebuilt often: an ssh_config that makes testinfra's paramiko skip host keys."""
    handle, path = tempfile.mkstemp(prefix="r1fleet-verify-", suffix=".ssh_config")
    with os.fdopen(handle, "w") as out:
        out.write("Host *\n  StrictHostKeyChecking no\n")
    return path


SSH_VERIFY_ARGS = "-o BatchMode=yes -o StrictHostKeyChecking=accept-new"


def connect(entry: HostConfig, config: pytest.Config, lab_ssh_config: str) -> Any:
    """The testinfra host for a fleet entry: paramiko from the fleet's SSH settings, or testinfra's Ansible backend."""
    timeout = config.getoption("--ssh-timeout")
    inventory = config.getoption("ansible_inventory", None)
    if inventory and not config.getoption("--fleet"):
        # testinfra runs `ansible-inventory`: find it beside this Python (a venv not on PATH).
        bindir = str(Path(sys.executable).parent)
        if bindir not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
        return testinfra.get_host(f"ansible://{entry.name}", ansible_inventory=inventory)
    address = f"[{entry.address}]" if ":" in entry.address else entry.address
    kwargs: dict[str, Any] = {"timeout": timeout}
    if entry.ssh_key:
        kwargs["ssh_identity_file"] = entry.ssh_key
    if entry.ssh_user != "root":
        kwargs["sudo"] = True
    if entry.profile:  # lab hosts are rebuilt often: their keys are not pinned
        kwargs["ssh_config"] = lab_ssh_config
        return testinfra.get_host(f"paramiko://{entry.ssh_user}@{address}:{entry.ssh_port}", **kwargs)
    # Real hosts through the system ssh client: host keys checked against ~/.ssh/known_hosts (testinfra's
    # paramiko backend accepts any key); a new host is recorded on first contact, as pyinfra's deploy does,
    # and a changed key stops the run.
    kwargs["ssh_extra_args"] = SSH_VERIFY_ARGS
    return testinfra.get_host(f"ssh://{entry.ssh_user}@{address}:{entry.ssh_port}", **kwargs)


def prepare(target: Target, config: pytest.Config, lab_ssh_config: str) -> None:
    """Connect, probe, plan (as deploy.py does). Records an error instead of raising."""
    entry = target.entry
    where = f"{entry.ssh_user}@{entry.address}:{entry.ssh_port}"
    try:
        target.host = connect(entry, config, lab_ssh_config)
        result = target.run(f"sh -c {shlex.quote(probe_script())} r1fleet-probe {shlex.quote(entry.model_dir)}", PROBE_TIMEOUT_S)
    except (OSError, EOFError) as err:
        target.error = f"cannot connect over SSH to {where}: {err or type(err).__name__} (fix: check the address, key and that sshd runs)"
        return
    except Exception as err:  # paramiko's SSHException family and testinfra's RuntimeError
        target.error = f"cannot connect over SSH to {where}: {type(err).__name__}: {err} (fix: check the address, user and key)"
        return
    if result.rc != 0 or "#### r1fleet:" not in result.stdout:
        target.error = f"the probe failed on {where} (exit {result.rc}): {result.stderr.strip()[-300:] or 'no probe document'}"
        return
    try:
        plan = plan_host(parse_probe(result.stdout, entry.name), entry.policy)
    except R1FleetError as err:
        target.error = f"cannot plan: {err}"
        return
    if (entry.rehearsal or config.getoption("--rehearsal")) and plan.fits:
        plan = rehearse(plan)
    target.plan = plan
    if not plan.fits or not plan.backend:
        target.error = f"no model fits this host, so nothing is served: {'; '.join(plan.reasons)}"


def _selected_hosts(session: pytest.Session) -> list[str]:
    names = []
    for item in session.items:
        callspec = getattr(item, "callspec", None)
        node = callspec.params.get("node") if callspec else None
        if node and node not in names:
            names.append(node)
    return names


@pytest.fixture(scope="session")
def targets(request: pytest.FixtureRequest) -> dict[str, Target]:
    """Every selected host, connected, probed and planned in parallel (once per session)."""
    config = request.config
    fleet = fleet_of(config)
    lab_ssh_config = _ssh_config_without_host_keys()
    request.addfinalizer(lambda: os.unlink(lab_ssh_config))
    chosen = {
        name: Target(
            fleet.hosts[name],
            command_timeout=config.getoption("--command-timeout"),
            chat_timeout=config.getoption("--chat-timeout"),
        )
        for name in _selected_hosts(request.session)
    }
    threads = {name: threading.Thread(target=prepare, args=(t, config, lab_ssh_config), daemon=True) for name, t in chosen.items()}
    for thread in threads.values():
        thread.start()
    deadline = time.monotonic() + PROBE_TIMEOUT_S + config.getoption("--ssh-timeout") * 4 + 10
    for name, thread in threads.items():
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            chosen[name].error = f"connecting and probing took longer than {int(deadline - time.monotonic() + 1)} s; the host hangs"
    reporter = config.pluginmanager.get_plugin(REPORTER_NAME)
    if reporter is not None:
        reporter.targets = chosen
    return chosen


@pytest.fixture
def target(node: str, targets: dict[str, Target]) -> Target:
    t = targets[node]
    if t.error:
        pytest.fail(f"{node}: {t.error}", pytrace=False)
    return t


@pytest.fixture
def host(target: Target) -> Any:
    """The testinfra host (overrides testinfra's own fixture: hosts come from the fleet)."""
    return target.host


@pytest.fixture
def plan(target: Target) -> HostPlan:
    return target.plan


# ---------------------------------------------------------------- bounded checks


class CheckTimeout(Exception):
    pass


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item):
    """A per-check alarm: the last line of defence against a hung connection (POSIX main thread only)."""
    limit = item.config.getoption("--check-timeout")
    usable = limit and hasattr(signal, "SIGALRM") and threading.current_thread() is threading.main_thread()
    if usable:
        def expire(signum, frame):
            raise CheckTimeout(f"the check did not finish within {limit} s (--check-timeout)")

        previous = signal.signal(signal.SIGALRM, expire)
        signal.alarm(limit)
    try:
        yield
    finally:
        if usable:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)


# ---------------------------------------------------------------- the report


REPORTER_NAME = "r1fleet-verify-report"


class VerifyReporter:
    """Collects each host's check outcomes and prints the per-host table at the end of the session."""

    def __init__(self, config: pytest.Config):
        self.config = config
        self.targets: dict[str, Target] = {}
        self.outcomes: dict[str, dict[str, str]] = {}

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call):
        outcome = yield
        report = outcome.get_result()
        callspec = getattr(item, "callspec", None)
        if callspec and "node" in callspec.params:
            report.r1fleet_host = callspec.params["node"]
            report.r1fleet_check = item.originalname.removeprefix("test_")

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        host = getattr(report, "r1fleet_host", None)
        if host is None:
            return
        checks = self.outcomes.setdefault(host, {})
        check = report.r1fleet_check
        if report.failed:
            checks[check] = "failed"
        elif report.skipped and checks.get(check) != "failed":
            checks[check] = "skipped"
        elif report.when == "call" and report.passed and check not in checks:
            checks[check] = "passed"

    def results(self) -> list[HostResult]:
        results = []
        for name, checks in self.outcomes.items():
            target = self.targets.get(name)
            plan = target.plan if target else None
            result = HostResult(host=name)
            if plan is not None:
                result.model, result.backend, result.context = plan.model, plan.backend, plan.context_length or None
                result.rehearsal, result.target_model = plan.rehearsal, plan.target_model
                result.est_tps, result.gpu_planned_mib = plan.est_tokens_per_second, planned_gpu_mib(plan)
            if target is not None:
                result.measured_tps = target.measured.get("tokens_per_second")
                result.gpu_used_mib = target.measured.get("gpu_used_mib")
                result.error = target.error
            for check, outcome in checks.items():
                getattr(result, outcome).append(check)
            if result.error:  # every check failed for the same reason; name it once
                result.failed = []
            results.append(result)
        return results

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if not self.outcomes:
            return
        table = results_table(self.results())
        terminalreporter.write_sep("=", "r1fleet verify: per host")
        terminalreporter.write_line(table)
        path = self.config.getoption("--verify-report")
        if path:
            with open(path, "w", encoding="utf-8") as out:
                out.write(table + "\n")
            terminalreporter.write_line(f"(table written to {path})")


def pytest_configure(config: pytest.Config) -> None:
    if not config.getoption("help", False):
        fleet_of(config)  # an invalid fleet is a usage error (exit 4), reported before any collection
    if not config.pluginmanager.has_plugin(REPORTER_NAME):
        config.pluginmanager.register(VerifyReporter(config), REPORTER_NAME)
