"""One download per artifact per fleet: the controller fetches each pinned artifact once into its cache
(r1fleet/cache/store.py) and serves it to the hosts over the LAN (r1fleet/cache/server.py) for this run.

All of it happens when pyinfra runs an operation that downloads, never while pyinfra prepares the run: a
dry run (`--dry`) and the prompt before a confirmed run fetch nothing and start no server. Such an
operation yields `routed(...).commands()` first (one Python callback, executed on the controller when the
operation runs, `WhenRun`), then builds its host script from the routed artifacts: each artifact with the URL that
host downloads from, the controller's cache server when the artifact is (or could just be) fetched into
the cache, else the upstream URL unchanged (the controller cannot reach it: the host tries as before). A
host given the controller's URL keeps the upstream one as its fallback. Hosts verify every file's sha256
themselves, whichever URL they use. The server is started once per controller address facing the hosts,
on CACHE_PORT when free (a fixed port a controller firewall can admit), admits only the fleet's hosts, and
lives as long as the pyinfra run.

Turned off with R1FLEET_CACHE=off (each host downloads on its own, as before).

Example, inside an @operation:
    routing = routed([(download, download.name)])
    yield from routing.commands()
    (download,) = routing.value      # the controller's URL when the operation runs
    yield f"curl -o /m/x {download.url}"
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
import threading
from dataclasses import replace
from typing import Any, Callable, Generic, Iterator, Sequence, TypeVar

from pyinfra.api.command import FunctionCommand

from r1fleet.cache.store import ArtifactCache, cache_root
from r1fleet.cache.server import CacheServer, serve_cache
from r1fleet.errors import R1FleetError
from r1fleet.net import source_address_towards
from r1fleet.progress import TerminalProgress

CACHE_PORT = 8089
T = TypeVar("T")
V = TypeVar("V")
_servers: dict[str, tuple[CacheServer, str]] = {}  # controller address -> (server, base URL)
_caches: dict[str, ArtifactCache] = {}
_fetching: dict[str, threading.Lock] = {}  # per sha256: hosts planned at once wait for one fetch (gevent-patched)


def enabled() -> bool:
    return os.environ.get("R1FLEET_CACHE", "on").lower() not in ("off", "0", "no", "false")


def fleet_addresses(inventory) -> dict[str, str]:
    """Every host of this run's inventory by its IP address (names resolved here, as ssh would) -> its name."""
    found = {}
    for each in inventory:
        name = each.data.get("ssh_hostname") or each.name
        try:
            found[str(ipaddress.ip_address(name))] = each.name
        except ValueError:
            try:
                found[socket.gethostbyname(name)] = each.name
            except OSError:
                continue  # unreachable by name: it cannot download from us either
    return found


def cache_for(fleet_cache_dir: str | None) -> ArtifactCache:
    """The controller's cache for this fleet (one object per directory for the run)."""
    root = str(cache_root(fleet_cache_dir))
    if root not in _caches:
        _caches[root] = ArtifactCache(cache_root(fleet_cache_dir))
    return _caches[root]


def _base_url(cache: ArtifactCache, address: str, inventory) -> str:
    if address not in _servers:
        hosts = fleet_addresses(inventory)
        server = serve_cache(cache, address, list(hosts), CACHE_PORT)
        try:
            base = server.__enter__()
        except (OSError, R1FleetError):  # the fixed port is taken: any free one
            server = serve_cache(cache, address, list(hosts), 0)
            base = server.__enter__()
        _servers[address] = (server, base)
    return _servers[address][1]


def via_controller(state, host, url: str, sha256: str, name: str, size: int | None = None) -> str:
    """The URL `host` downloads `name` from (see the module docstring); fetches it into the cache and starts
    the server, so only ever called while an operation runs. Whatever goes wrong here (the upstream's answer,
    this machine's disk or network) leaves the host to download it itself, with the reason printed: it is
    never an error of the run."""
    if not enabled():
        return url
    try:
        cache = cache_for(host.data.get("r1fleet_cache_dir"))
        with _fetching.setdefault(sha256.lower(), threading.Lock()):
            if cache.path_for(sha256) is None:
                cache.fetch(url, sha256, name, progress=TerminalProgress(stream=sys.stderr, host="controller"), size=size)
        address = source_address_towards(host.data.get("ssh_hostname") or host.name)
        if address is None:
            raise OSError("no route from this machine to the host")
        base = _base_url(cache, address, state.inventory)
    except Exception as error:  # noqa: BLE001 - one upstream's odd answer must not end the run for every host
        reason = str(error) if isinstance(error, (OSError, R1FleetError)) else f"unexpected {type(error).__name__}: {error}"
        print(f"[{host.name}] {name}: not from the controller's cache ({reason}); the host downloads it itself",
              file=sys.stderr)
        return url
    return f"{base}/sha256/{sha256.lower()}"


def from_controller(state, host, artifact: T, name: str) -> T:
    """The artifact (its `url`, `sha256` and `size`) from the controller's cache when it can serve it, with
    its upstream URL as the fallback for a host that cannot reach the controller (a firewall on this machine,
    say): the host then downloads it itself, as without the cache."""
    url = via_controller(state, host, artifact.url, artifact.sha256, name, size=artifact.size)
    if url == artifact.url:
        return artifact
    # An artifact pinned by sha256 alone (an Ollama release archive) has the size of the verified copy: the host's
    # download, the upstream fallback included, is bounded by it (operations/common.py verified_fetch_steps).
    size = artifact.size if artifact.size is not None else _cached_size(host, artifact.sha256)
    return replace(artifact, url=url, fallback_url=artifact.url, size=size)


def _cached_size(host, sha256: str) -> int | None:
    path = cache_for(host.data.get("r1fleet_cache_dir")).path_for(sha256, touch=False)
    return path.stat().st_size if path is not None else None


class WhenRun(Generic[V]):
    """A value an operation decides when it runs, never while pyinfra prepares it (a dry run decides nothing): the
    operation yields `commands()` first (one callback, run on the controller), then reads `value`. Until then, and
    when there is nothing to decide (`decide` None), `value` is the one given."""

    def __init__(self, value: V, decide: Callable[[Any, Any], V] | None):
        self.value, self._decide = value, decide

    def commands(self) -> Iterator[FunctionCommand]:
        if self._decide is not None:
            yield FunctionCommand(self._run, (), {})

    def _run(self, state, host) -> bool:  # pyinfra passes these two by name
        self.value = self._decide(state, host)
        return True


def routed(artifacts: Sequence[tuple[T, str]]) -> WhenRun[list[T]]:
    """Artifacts (each with its `url`, `sha256` and `size`, and the name the cache shows) routed through the
    controller's cache when the operation runs; until then, and with the cache off, their upstream URLs."""
    named = list(artifacts)

    def route(state, host) -> list[T]:
        return [from_controller(state, host, artifact, name) for artifact, name in named]
    return WhenRun([artifact for artifact, _ in named], route if enabled() and named else None)


def served_bytes() -> dict[str, int]:
    """Bytes each cache server sent in this run, per sha256 (for the run's summary)."""
    total: dict[str, int] = {}
    for server, _ in _servers.values():
        for digest, sent in getattr(server, "served", {}).items():
            total[digest] = total.get(digest, 0) + sent
    return total
