"""Every role has one shape, and the deploy's stage order is written here once.

Every role is built the same way, `XRole.prepare(ctx)`, from one `HostContext` (the host's settings, its
hardware and what it serves): preparing decides and checks, and changes nothing. A role then offers what it
reads on the host and three stages of operations (apply):

  install    packages, releases, accounts, directories, downloads
  configure  the files the services read: units, rules, keys
  activate   start, reload or restart what changed, wait for health, load the model

The deploy runs every role's install, then every role's configure, then every role's activate, in the
roles' order (driver, exposure, backend): the firewall is loaded before the backend starts, the API key
exists before the unit that reads it, and a service restarts only when one of its own files changed.
After every host's activate stage comes one shared operation (a barrier across the run's hosts), then each
role's `after_peers`: a pool's head starts only once its workers' rpc-servers run.

Example:
    ctx = HostContext(settings, hardware, served)
    apply_roles([role.prepare(ctx) for role in (DriverRole, ExposureRole, OllamaRole)])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from pyinfra import host
from pyinfra.api import operation

from r1fleet.artifacts.pins import Platform, platform_from_hardware
from r1fleet.fleet.config import HostConfig
from r1fleet.lock.served import Served
from r1fleet.operations.fact_batch import FactRequest, prefetch
from r1fleet.records import Hardware, HostPlan

STAGES = ("install", "configure", "activate")


@dataclass(frozen=True)
class HostContext:
    """What every role is prepared from: the host's settings and hardware, and what it serves
    (r1fleet/lock/served.py); a pool member also has every member's settings and what each member's apt has of the
    pool's llama.cpp packages ({member: {package: (installed, candidate)}}, read on each member by the deploy)."""

    settings: HostConfig
    hardware: Hardware
    served: Served
    members: Mapping[str, HostConfig] = field(default_factory=dict)
    pool_offers: Mapping[str, Mapping[str, tuple[str | None, str | None]]] = field(default_factory=dict)

    @property
    def host(self) -> str:
        return self.settings.name

    @property
    def plan(self) -> HostPlan:
        return self.served.plan

    @property
    def system(self) -> str:
        return self.hardware.os.system

    def platform(self) -> Platform:
        return platform_from_hardware(self.hardware)


class Role:
    """The shape every role has; a stage with nothing to do is simply not overridden."""

    @classmethod
    def prepare(cls, ctx: HostContext) -> "Role":
        """The role for this host, every decision made (it may read facts, never change the host)."""
        raise NotImplementedError(f"{cls.__name__} is not prepared from a HostContext")

    def reads(self) -> list[FactRequest]:
        """Every fact the stages read on a host where nothing changes (fetched in one round trip)."""
        return []

    def install(self) -> None:
        """Packages, releases, accounts, directories and downloads."""

    def configure(self) -> None:
        """The files the services read."""

    def activate(self) -> None:
        """Start, reload or restart what changed; health; the model."""

    def after_peers(self) -> None:
        """What needs the other hosts activated first (a pool's head: its workers serving)."""


@operation()
def peers_activated():
    """Every host of the run has run its activate stage: one operation shared by all of them (called from this
    one place, it is one node of pyinfra's operation graph), so what follows it on any host runs after every
    host's activation. Changes nothing."""
    host.noop("every host of this run has activated its roles")
    yield from ()


def apply_roles(roles: list[Role]) -> None:
    """Read everything the roles read in one round trip, then run the stages in order over the roles, then
    what waits for the other hosts."""
    prefetch([request for role in roles for request in role.reads()])
    # host.loop: pyinfra orders a loop's operations by their position in it, not only by source line
    for stage in host.loop(STAGES):
        for role in host.loop(roles):
            getattr(role, stage)()
    peers_activated(name="Every host has started its services")
    for role in host.loop(roles):
        role.after_peers()
