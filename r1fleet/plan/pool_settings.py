"""The fleet file's `pools:` section: hosts that serve one model together through llama.cpp's RPC backend.

Pooling is opt-in: a pool names its hosts and its head (which runs llama-server and serves the API); the other
hosts are its workers (each runs ggml's rpc-server). A host belongs to one pool at most.

Example:
    pools:
      big: {hosts: [box-a, box-b], head: box-a, network_gbps: 1}
"""

from __future__ import annotations

from collections.abc import Iterable

from pydantic import BaseModel, ConfigDict, Field

# ggml's rpc-server listens here unless told otherwise (llama.cpp tools/rpc/rpc-server.cpp,
# rpc_server_params: `int port = 50052;`, the same in tools/rpc/README.md).
DEFAULT_RPC_PORT = 50052


class PoolSettings(BaseModel):
    """One pool: its hosts, its head, the link between them, and the workers' RPC port."""

    model_config = ConfigDict(extra="forbid")

    hosts: list[str] = Field(
        description="fleet hosts in the pool, head included; the workers' GPUs are used in this order (llama-server --rpc)"
    )
    head: str = Field(description="the host that runs llama-server and serves the API; the others run rpc-server")
    network_gbps: float = Field(1.0, gt=0, le=1000, description="link speed between the pool's hosts (Gbit/s), for the speed estimate")
    rpc_port: int = Field(DEFAULT_RPC_PORT, ge=1, le=65535, description="the workers' rpc-server port (admits the head only)")

    @property
    def workers(self) -> list[str]:
        """The hosts other than the head, in the file's order: llama-server's --rpc order."""
        return [h for h in self.hosts if h != self.head]


def pool_problems(pools: dict[str, PoolSettings], host_names: Iterable[str], source: str) -> list[str]:
    """Every way the pools disagree with the fleet's hosts, one line each (pool, field, fix)."""
    known = list(host_names)
    problems: list[str] = []
    owner: dict[str, str] = {}
    for name, pool in pools.items():
        where = f"{source}: pool {name}"
        problems += _host_problems(where, pool, known)
        if len(set(pool.hosts)) < 2:
            problems.append(f"{where}: field hosts: a pool needs at least 2 hosts (a head and a worker), it has "
                            f"{len(set(pool.hosts))} (fix: add a worker host, or remove the pool)")
        if pool.head not in pool.hosts:
            problems.append(f"{where}: field head: {pool.head!r} is not one of the pool's hosts ({', '.join(pool.hosts)}) "
                            f"(fix: name one of them as head, or add {pool.head} to hosts)")
        for host in dict.fromkeys(pool.hosts):
            if host in owner:
                problems.append(f"{where}: field hosts: {host} is already in pool {owner[host]}; a host serves one pool at most "
                                "(fix: remove it from one of the pools)")
            else:
                owner[host] = name
    return problems


def _host_problems(where: str, pool: PoolSettings, known: list[str]) -> list[str]:
    problems = []
    seen: set[str] = set()
    for host in pool.hosts:
        if host in seen:
            problems.append(f"{where}: field hosts: {host} is listed twice (fix: list each host once)")
            continue
        seen.add(host)
        if host not in known:
            problems.append(f"{where}: field hosts: {host!r} is not a host of this fleet (fix: add it under hosts:, or "
                            f"correct the name; the fleet has {', '.join(known)})")
    return problems
