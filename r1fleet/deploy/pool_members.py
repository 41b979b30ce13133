"""A pool member's part in the deploy: the pool planned from every member's probe, then the member's roles.

Each member of a pool is deployed by the same run (its host data names the pool, r1fleet/fleet/file.py). The pool's
plan needs every member's hardware, so a member probes the others through pyinfra as well (once per run: the
probes are kept here, with a lock per host so that members planned at the same moment share one). Then:
  * the head: llama-server with --rpc to the workers and the split over every device (LlamaCppRole, pool=);
  * a worker: rpc-server bound to its pool address, admitting the head alone (RpcWorkerRole);
  * a pool kept separate (it serves nothing larger): each member's own plan, as a host outside a pool.
With a fleet lock that holds the pool (`r1fleet lock`), its locked plan is served while every member's hardware
matches; otherwise the pool is planned live.
"""

from __future__ import annotations

import threading
from typing import Any

from pyinfra import state
from pyinfra.api.facts import get_fact
from pyinfra.context import ctx_host

from r1fleet.fleet.config import HostConfig
from r1fleet.operations.common import AptVersions
from r1fleet.probe.facts import R1Probe
from r1fleet.hardware import parse_probe
from r1fleet.lock.match import fleet_lock
from r1fleet.lock.served import pool_served
from r1fleet.records import Hardware, PoolPlan
from r1fleet.plan.pool_settings import PoolSettings
from r1fleet.roles.rpc_worker.decide import version_packages

_hardware: dict[str, Hardware] = {}
_pools: dict[str, tuple[PoolPlan, bool]] = {}
_offers: dict[str, dict] = {}
_locks: dict[str, threading.Lock] = {}  # gevent-patched under pyinfra: members wait for one probe, one plan


def pool_of(data: Any) -> tuple[str, PoolSettings] | None:
    """(name, settings) of the pool this host's data names, or None."""
    raw = dict(data.get("r1fleet_pool") or {})
    if not raw:
        return None
    name = raw.pop("name")
    return name, PoolSettings.model_validate(raw)


def remember(hardware: Hardware) -> None:
    """The current host's own probe, so that the other members of its pool do not probe it again."""
    _hardware.setdefault(hardware.host, hardware)


def member_config(name: str) -> HostConfig:
    return HostConfig.from_host_data(name, state.inventory.get_host(name).data.dict())


def member_hardware(name: str) -> Hardware:
    with _locks.setdefault(f"host:{name}", threading.Lock()):
        if name not in _hardware:
            member = state.inventory.get_host(name)
            with ctx_host.use(member):
                text = get_fact(state, member, R1Probe, kwargs={"model_dir": member_config(name).model_dir})
            _hardware[name] = parse_probe(text, name)
        return _hardware[name]


def pool_plan(name: str, pool: PoolSettings, fleet: str | None = None) -> tuple[PoolPlan, bool]:
    """(the pool's plan, locked?), the same on every member: r1fleet/lock/served.py decides it from every member's
    probe (each probed once per run, by whichever member asks first)."""
    with _locks.setdefault(f"pool:{name}", threading.Lock()):
        if name not in _pools:
            hardware = {member: member_hardware(member) for member in pool.hosts}
            members = {member: member_config(member) for member in pool.hosts}
            _pools[name] = pool_served(name, pool, members, hardware, *fleet_lock(fleet))
        return _pools[name]


def member_offers(name: str) -> dict:
    """What the member's apt has of the packages whose versions a pool agrees on: {package: (installed, candidate)}
    (read on that host once per run, like its probe)."""
    with _locks.setdefault(f"apt:{name}", threading.Lock()):
        if name not in _offers:
            member = state.inventory.get_host(name)
            packages = tuple(dict.fromkeys([*version_packages("head").values(), *version_packages("worker").values()]))
            with ctx_host.use(member):
                _offers[name] = dict(get_fact(state, member, AptVersions, kwargs={"packages": packages}) or {})
        return _offers[name]
