"""What each host serves: the one answer the deploy, verify, `r1fleet lock` and status share.

    served = served_plans(fleet.hosts, fleet.pools, lock, hardware, fleet="lab")
    served["lab-4090"].plan          # the plan the host runs (locked, rehearsed, its part of a pool)
    served["lab-pool-b"].role        # "alone" | "head" | "worker"

The rules, in order:
  * a member of a pooled pool serves its part of the pool's plan: the fleet lock's pool plan while every
    member's hardware is as locked, else the pool planned live from the members' probes and policies;
  * any other host serves its locked plan when the lock names it (LockMismatch when its hardware changed),
    else today's plan from its probe and policy;
  * in rehearsal (the host's `rehearsal`, or the run's) the stand-in model takes the planned slot: on a host
    alone and on a pool head (a worker serves devices, not a model).
A host whose answer is an error (its hardware no longer matches the lock) gets that error in place of a plan, so
it fails alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping

from r1fleet.artifacts.llama_cpp_install import pool_source_problems
from r1fleet.errors import R1FleetError
from r1fleet.fleet.config import HostConfig
from r1fleet.lock.file import Lock
from r1fleet.lock.match import effective_plan, locked_pool, plan_diff, pool_diff, relock_command
from r1fleet.plan.planner import plan_host, rehearse
from r1fleet.plan.pool_settings import PoolSettings
from r1fleet.plan.pools import member_plan, plan_members
from r1fleet.records import Hardware, HostPlan, PoolPlan

Role = Literal["alone", "head", "worker"]


@dataclass(frozen=True)
class Served:
    host: str
    plan: HostPlan
    role: Role = "alone"
    pool: PoolPlan | None = None
    locked: bool = False  # the plan (or the pool's) comes from the fleet lock, not from today's plan
    relock_changes: tuple[str, ...] = ()  # a locked host alone: what today's plan would change (`context: a -> b`)


def rehearsed(plan: HostPlan, settings: HostConfig, rehearsal: bool = False) -> HostPlan:
    """In rehearsal, the stand-in in the planned slot; otherwise the plan as it is."""
    return rehearse(plan) if (settings.rehearsal or rehearsal) and plan.fits else plan


def pool_served(name: str, pool: PoolSettings, members: Mapping[str, HostConfig], hardware: Mapping[str, Hardware],
                lock: Lock | None, fleet: str | None = None) -> tuple[PoolPlan, bool]:
    """(the pool's plan, locked?): the lock's while every member matches it (LockMismatch otherwise), else planned
    live from every member's hardware and policy."""
    locked = locked_pool(lock, name, {m: hardware[m] for m in pool.hosts}, fleet)
    if locked is not None:
        return locked, True
    unpoolable = pool_source_problems(name, pool.head, {m: (hardware[m], members[m]) for m in pool.hosts})
    return plan_members(name, pool, [hardware[m] for m in pool.hosts], [members[m].policy for m in pool.hosts],
                        unpoolable), False


def pool_lock_note(locked: PoolPlan, today: PoolPlan, fleet: str | None = None) -> str | None:
    """As lock_note, for a pool the deploy serves from the lock while today's plan of it differs."""
    changes = pool_diff(locked, today)
    if not changes:
        return None
    members = " ".join((locked.head, *locked.workers))
    command = f"r1fleet lock --fleet {fleet} {members}" if fleet else f"r1fleet lock {members}"
    return (f"served from the fleet lock, not today's plan, which would change {'; '.join(changes)} "
            f"(to serve today's plan: `{command}`)")


def served_alone(settings: HostConfig, hardware: Hardware, lock: Lock | None, fleet: str | None = None,
                 rehearsal: bool = False) -> Served:
    """A host outside a pooled pool: its locked plan, else today's."""
    plan = effective_plan(hardware, settings.policy, lock, fleet)
    locked = lock is not None and hardware.host in lock.hosts
    changes = relock_changes(plan, plan_host(hardware, settings.policy)) if locked else ()
    return Served(hardware.host, rehearsed(plan, settings, rehearsal), locked=locked, relock_changes=changes)


def relock_changes(locked: HostPlan, today: HostPlan) -> tuple[str, ...]:
    """What serving today's plan instead of the locked one would change, one line each; () when nothing."""
    return tuple(line for line in plan_diff(locked, today) if not line.startswith("why: "))


def lock_note(served: Served, fleet: str | None = None) -> str | None:
    """Says that the deploy serves the lock's plan where today's planner (a newer r1fleet, a changed policy, a model
    pinned since) would choose otherwise, and how to take today's; None when the lock and today agree."""
    if not served.relock_changes:
        return None
    return (f"served from the fleet lock, not today's plan, which would change {'; '.join(served.relock_changes)} "
            f"(to serve today's plan: `{relock_command(served.host, fleet)}`)")


def served_in_pool(settings: HostConfig, hardware: Hardware, pool: PoolPlan, locked: bool,
                   rehearsal: bool = False) -> Served:
    """A member of a pooled pool: the head runs the model over every member's devices, a worker its rpc-server."""
    role: Role = "head" if hardware.host == pool.head else "worker"
    plan = member_plan(pool, hardware.host, hardware)
    if role == "head":
        plan = rehearsed(plan, settings, rehearsal)
    return Served(hardware.host, plan, role, pool, locked)


def served_plans(hosts: Mapping[str, HostConfig], pools: Mapping[str, PoolSettings], lock: Lock | None,
                 hardware: Mapping[str, Hardware], fleet: str | None = None, rehearsal: bool = False,
                 ) -> dict[str, Served | R1FleetError]:
    """Each host with hardware: what it serves, or the error that stops it alone. A pool whose members are not all
    probed leaves its members to be served alone (the deploy refuses such a member; verify checks its own plan)."""
    out: dict[str, Served | R1FleetError] = {}
    for name, pool in pools.items():
        if not all(member in hardware and member in hosts for member in pool.hosts):
            continue
        try:
            planned, locked = pool_served(name, pool, hosts, hardware, lock, fleet)
        except R1FleetError as err:  # a member's hardware changed since the pool was locked
            out.update({member: R1FleetError(f"pool {name}: {err}") for member in pool.hosts})
            continue
        if planned.pooled:
            for member in pool.hosts:
                try:
                    out[member] = served_in_pool(hosts[member], hardware[member], planned, locked, rehearsal)
                except R1FleetError as err:
                    out[member] = err
    for host, hw in hardware.items():
        if host in out or host not in hosts:
            continue
        try:
            out[host] = served_alone(hosts[host], hw, lock, fleet, rehearsal)
        except R1FleetError as err:
            out[host] = err
    return out
