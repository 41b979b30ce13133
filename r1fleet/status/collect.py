"""Reaching the fleet for `r1fleet status` and `r1fleet endpoints`: verify's own connection and planning
(r1fleet/verify/connect.py), so a host is reached and planned exactly as verify and the deploy do it.

One SSH round trip per host, every host in parallel: the probe (for the plan) and r1fleet/status/status.sh (for
the service) run in one command. Nothing generates a token or loads a model.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from r1fleet.errors import R1FleetError
from r1fleet.fleet.config import HostConfig
from r1fleet.fleet.file import Fleet
from r1fleet.lock.match import lock_path, read_lock, relock_fleet
from r1fleet.render.systemd_unit import LLAMA_UNIT, OLLAMA_UNIT
from r1fleet.roles.exposure.endpoint import Endpoint, endpoint_of
from r1fleet.roles.macos.decide import LABEL as MACOS_LABEL
from r1fleet.roles.ollama.decide import PRELOAD_RECORD, PRELOAD_UNIT
from r1fleet.roles.rpc_worker.decide import RPC_UNIT
from r1fleet.status.readings import parse_status
from r1fleet.status.report import HostStatus, host_status, unreachable
from r1fleet.verify.connect import ConnectOptions, connect_and_probe_all, plan_targets
from r1fleet.verify.target import Target

STATUS_SCRIPT = Path(__file__).with_name("status.sh")
SSH_TIMEOUT_S = 5  # a status is a glance: a host that has not answered SSH in 5 s is reported down


def status_arguments(ollama_api: str, llama_api: str, preload_record: str = PRELOAD_RECORD) -> list[str]:
    """status.sh's positional arguments, in its order: the two local APIs, the Mac's label, the preload's record,
    then the units it reports."""
    return [ollama_api, llama_api, MACOS_LABEL, preload_record, OLLAMA_UNIT, LLAMA_UNIT, RPC_UNIT, PRELOAD_UNIT]


def status_command(entry: HostConfig) -> str:
    """The shell command that prints the host's status sections, for its service's own addresses and units."""
    args = status_arguments(entry.local_api("ollama"), entry.local_api("llama.cpp"))
    script = STATUS_SCRIPT.read_text(encoding="utf-8")
    return f"sh -c {shlex.quote(script)} r1fleet-status " + " ".join(shlex.quote(a) for a in args)


def selected(fleet: Fleet, names: list[str] | tuple[str, ...]) -> list[HostConfig]:
    """The named hosts (all when none is named), in the fleet's order; R1FleetError for a name it lacks."""
    unknown = [name for name in names if name not in fleet.hosts]
    if unknown:
        raise R1FleetError(f"not in {fleet.source}", host=unknown[0], field="HOST",
                           fix=f"name one of: {', '.join(fleet.hosts)}")
    return [entry for name, entry in fleet.hosts.items() if not names or name in names]


@dataclass
class Reached:
    """Every selected host, connected, probed and planned (verify's Targets), with the fleet's lock."""

    targets: dict[str, Target]
    lock: object  # r1fleet.lock.file.Lock | None


def reach(fleet: Fleet, entries: list[HostConfig], *, live: bool, rehearsal: bool = False) -> Reached:
    """Connect to and probe every entry in parallel (with the status script when `live`), then plan each as the
    deploy serves it (the fleet lock's plan where it names the host)."""
    lock = read_lock(lock_path(fleet.source))
    options = ConnectOptions(ssh_timeout=SSH_TIMEOUT_S, rehearsal=rehearsal, lock=lock, fleet=relock_fleet(fleet.source))
    targets = {entry.name: Target(entry, command_timeout=60) for entry in entries}
    connect_and_probe_all(targets, options, status_command if live else None)
    plan_targets(fleet.pools, targets, options)
    return Reached(targets, lock)


def endpoint_for(target: Target) -> Endpoint | None:
    """The endpoint of a planned target (None for a pool worker or a host with no model)."""
    if target.plan is None:
        return None
    return endpoint_of(target.entry, target.plan, target.pool_role or "alone",
                       target.pool.pool if target.pool is not None else None)


def statuses(reached: Reached) -> list[HostStatus]:
    """Each host's status, in the order reached."""
    out = []
    for name, target in reached.targets.items():
        document = target.cache.get("document")
        if document is None:  # never reached: the reason is the connection's
            out.append(unreachable(name, target.error or "no answer"))
            continue
        endpoint, problems = None, []
        try:
            endpoint = endpoint_for(target)
        except R1FleetError as err:
            problems.append(str(err))
        plan_error = target.error if target.plan is None else None
        lock_entry = reached.lock.hosts.get(name) if reached.lock is not None else None
        status = host_status(name, parse_status(document, name), target.plan, plan_error=plan_error,
                             locked=target.locked or lock_entry is not None, lock=lock_entry, role=target.pool_role or "alone",
                             pool=target.pool.pool if target.pool is not None else None, hardware=target.hardware,
                             endpoint=endpoint)
        if target.error and target.plan is not None:  # planned, but nothing to serve (no model fits)
            problems.append(target.error)
        status.problems += problems
        out.append(status)
    return out
