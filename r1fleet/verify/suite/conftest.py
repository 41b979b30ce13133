"""testinfra suite that proves each fleet host serves its planned model (`r1fleet verify`).

    pytest r1fleet/verify/suite --fleet inventory/fleet.yml    # or R1FLEET_FLEET=lab pytest r1fleet/verify/suite
    pytest r1fleet/verify/suite --ansible-inventory hosts.yml  # connect through testinfra's Ansible backend
    pytest r1fleet/verify/suite --fleet lab -k lab-4090        # one host

Every test is parametrized by host (`test_service_active[lab-4090]`), so a failure names the host and
the check. Each host's plan is computed live, exactly as deploy.py does: probe over the same SSH
connection -> parse_probe -> plan_host(policy) -> rehearse() for rehearsal hosts. The probes run once
per session, in parallel. HTTP requests are made on the host itself (curl over SSH), so services bound
to 127.0.0.1 are reachable. Everything is bounded: SSH connect timeout, `timeout` around each remote
command, curl --max-time, and a per-test alarm, so a dead host fails fast.

After the run a per-host table is printed (and written to --verify-report FILE).

This file holds what is pytest's: the options, the fixtures, the per-check alarm and the report plugin. The host
under verification is r1fleet/verify/target.py, connecting and planning it r1fleet/verify/connect.py, the
table r1fleet/verify/table.py.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

import pytest

from r1fleet.errors import R1FleetError
from r1fleet.fleet.file import Fleet, load_fleet
from r1fleet.lock.match import lock_path, read_lock, relock_fleet
from r1fleet.records import HostPlan
from r1fleet.verify.connect import ConnectOptions, connect_and_probe_all, plan_targets
from r1fleet.verify.table import HostResult, host_result, results_table
from r1fleet.verify.target import Target


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


def _selected_hosts(session: pytest.Session) -> list[str]:
    names = []
    for item in session.items:
        callspec = getattr(item, "callspec", None)
        node = callspec.params.get("node") if callspec else None
        if node and node not in names:
            names.append(node)
    return names


def connect_options(config: pytest.Config) -> ConnectOptions:
    """How this run reaches its hosts: an Ansible inventory alone means testinfra's Ansible backend."""
    inventory = config.getoption("ansible_inventory", None)
    fleet = fleet_of(config)
    config._r1fleet_lock = read_lock(lock_path(fleet.source))  # test_api_key_is_the_locked_one reads it too
    return ConnectOptions(
        lock=config._r1fleet_lock,
        fleet=relock_fleet(fleet.source),
        ssh_timeout=config.getoption("--ssh-timeout"),
        ansible_inventory=inventory if inventory and not config.getoption("--fleet") else None,
        rehearsal=bool(config.getoption("--rehearsal")),
    )


@pytest.fixture(scope="session")
def targets(request: pytest.FixtureRequest) -> dict[str, Target]:
    """Every selected host, connected, probed and planned in parallel (once per session)."""
    config = request.config
    fleet = fleet_of(config)
    chosen = {
        name: Target(
            fleet.hosts[name],
            command_timeout=config.getoption("--command-timeout"),
            chat_timeout=config.getoption("--chat-timeout"),
        )
        for name in _selected_hosts(request.session)
    }
    options = connect_options(config)
    connect_and_probe_all(chosen, options)
    plan_targets(fleet.pools, chosen, options)
    reporter = config.pluginmanager.get_plugin(REPORTER_NAME)
    if reporter is not None:
        reporter.targets = chosen
    return chosen


@pytest.fixture
def target(node: str, targets: dict[str, Target]) -> Target:
    t = targets[node]
    if t.error:
        # One line per host: its first check fails with the reason, the others only point at it.
        if t.cache.get("error_reported"):
            pytest.skip(f"{node}: see its first failed check")
        t.cache["error_reported"] = True
        pytest.fail(f"{node}: {t.error}", pytrace=False)
    return t


@pytest.fixture(autouse=True)
def _check_applies(request: pytest.FixtureRequest) -> None:
    """A check runs on the hosts its `roles` marker names: "host" (serving alone), "head" (serving a pool),
    "worker" (a pool's rpc-server, which serves no API). Unmarked checks are for hosts and heads."""
    node = request.node.callspec.params.get("node") if hasattr(request.node, "callspec") else None
    if node is None:
        return
    target = request.getfixturevalue("targets").get(node)
    if target is None or target.error:
        return
    marker = request.node.get_closest_marker("roles")
    role = target.pool_role or "host"
    if role not in (marker.args if marker else ("host", "head")):
        pytest.skip(f"not a check for a pool {role}" if target.pool_role else "a check for pool members only")


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
            if target is None:
                results.append(host_result(name, checks))
            else:
                result = host_result(name, checks, target.plan, target.measured, target.error)
                if target.worker:  # its devices serve the head's model; it answers no request itself
                    result.backend, result.context, result.est_tps = f"rpc-server for {target.pool.head}", None, None
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
    config.addinivalue_line("markers", "roles(*roles): the host roles a check applies to (host, head, worker)")
    if not config.getoption("help", False):
        fleet_of(config)  # an invalid fleet is a usage error (exit 4), reported before any collection
    if not config.pluginmanager.has_plugin(REPORTER_NAME):
        config.pluginmanager.register(VerifyReporter(config), REPORTER_NAME)
