"""Plug-ins: a fleet by name (`--fleet lab`) and what a simulated fleet adds to its hosts.

r1fleet never imports a plug-in; a package declares one as an entry point in the group `r1fleet.plugins`
(the lab does, in pyproject.toml) and r1fleet asks each one through this interface:

    name                          the fleet reference it answers (`lab`)
    fleet_file(require_up)        that fleet's file; require_up: refuse (R1FleetError) when it cannot be reached
    connection_defaults(raw, source)
                                  address, port, user and key for a fleet file with the plug-in's own section
                                  (the lab's `lab:`); None when the file has none
    lock_path(fleet_file)         where that fleet's lock lives, when not beside its file; None otherwise
    gpu_devices(plan, settings)   llama.cpp devices standing in for the planned GPUs (the lab's RPC devices)
    register(subparsers)          its own `r1fleet` subcommands
"""

from __future__ import annotations

from functools import lru_cache
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Protocol

ENTRY_POINT_GROUP = "r1fleet.plugins"


class Plugin(Protocol):
    name: str

    def fleet_file(self, require_up: bool) -> Path: ...

    def connection_defaults(self, raw: Any, source: str) -> dict[str, dict] | None: ...

    def lock_path(self, fleet_file: Path) -> Path | None: ...

    def gpu_devices(self, plan: Any, settings: Any) -> list[str]: ...

    def register(self, subparsers: Any) -> None: ...


@lru_cache(maxsize=1)
def plugins() -> tuple[Plugin, ...]:
    return tuple(point.load() for point in entry_points(group=ENTRY_POINT_GROUP))


def named(ref: str) -> Plugin | None:
    """The plug-in a fleet reference names (`lab`), if any."""
    return next((p for p in plugins() if p.name == ref), None)


def owning(fleet_file: str | Path) -> Plugin | None:
    """The plug-in whose fleet file this is (its lock and its name on a relock command follow it)."""
    path = Path(fleet_file).resolve()
    return next((p for p in plugins() if p.fleet_file(require_up=False).resolve() == path), None)


def connection_defaults(raw: Any, source: str) -> dict[str, dict] | None:
    for plugin in plugins():
        defaults = plugin.connection_defaults(raw, source)
        if defaults is not None:
            return defaults
    return None


def gpu_devices(plan: Any, settings: Any) -> list[str]:
    return [device for plugin in plugins() for device in plugin.gpu_devices(plan, settings)]
