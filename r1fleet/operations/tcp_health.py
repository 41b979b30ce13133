"""Health of services that speak no HTTP: a port that accepts a TCP connection.

ggml's rpc-server speaks its own binary protocol (ggml/src/ggml-rpc/ggml-rpc.cpp), so curl cannot ask it
anything; a TCP connection that is accepted is the most the deploy can check without a client. The probe is
bash's /dev/tcp redirection under coreutils' `timeout`: both are in every Debian and Ubuntu base system
(bash and coreutils are Essential), where `nc` is not installed by default.

Example:
    >>> tcp_probe("10.0.0.2", 50052)
    "timeout 2 bash -c '</dev/tcp/10.0.0.2/50052' 2>/dev/null"
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from pyinfra import host
from pyinfra.api import FactBase, operation

from r1fleet.net import host_port

PROBE_TIMEOUT_S = 2  # one connection attempt; a dropped SYN would otherwise wait for the kernel's retries


@dataclass(frozen=True)
class TcpHealth:
    """A service is healthy once address:port accepts a TCP connection from the host itself."""

    address: str
    port: int


@dataclass(frozen=True)
class ListenHealth:
    """A service is healthy once it listens on address:port: for one whose own filter drops the host's own
    connections (rpc-server's unit admits the pool's head alone, r1fleet/roles/rpc_worker/decide.py)."""

    address: str
    port: int


@dataclass(frozen=True)
class TcpEndpoint:
    """Something another host must reach: its name (for messages), address and port."""

    name: str
    address: str
    port: int

    @property
    def endpoint(self) -> str:
        return host_port(self.address, self.port)


def tcp_probe(address: str, port: int) -> str:
    """A shell command that succeeds when address:port accepts a TCP connection within PROBE_TIMEOUT_S."""
    # bash reads /dev/tcp/HOST/PORT as a connection (bash(1), REDIRECTION); the host part may be an IPv6 address.
    return f"timeout {PROBE_TIMEOUT_S} bash -c {shlex.quote(f'</dev/tcp/{address}/{port}')} 2>/dev/null"


def listen_probe(address: str, port: int) -> str:
    """A shell command that succeeds when a socket on this host listens on address:port (iproute2's ss, as
    status.sh uses it); it connects to nothing.

    >>> listen_probe("10.0.0.2", 50052)
    "ss -Hltn '( src 10.0.0.2 and sport = :50052 )' 2>/dev/null | grep -q ."
    """
    local = f"[{address}]" if ":" in address else address
    return f"ss -Hltn {shlex.quote(f'( src {local} and sport = :{port} )')} 2>/dev/null | grep -q ."


def reached_or_probe(address: str, port: int) -> str:
    """A shell command that succeeds when this host already holds a connection to address:port (a pool head's
    llama-server to its worker) or when a new one is accepted. ggml's rpc-server serves one client at a time
    and listens with a backlog of 1 (ggml-rpc.cpp, create_server_socket), so while the head is connected a probe
    is never accepted: it waits in the queue, and two such probes fill it. The live connection is the proof."""
    peer = f"[{address}]" if ":" in address else address
    held = f"ss -Htn state established {shlex.quote(f'( dst {peer} and dport = :{port} )')} 2>/dev/null | grep -q ."
    return f"{{ {held} || {tcp_probe(address, port)}; }}"


@operation()
def wait_tcp(address: str, port: int, timeout_s: int = 60, what: str = "service", listening: bool = False):
    """Poll until address:port accepts a TCP connection (`listening`: until a socket listens there); fail the
    host with a clear message otherwise."""
    did = "listen" if listening else "accept a TCP connection"
    message = f"{what} did not {did} at {host_port(address, port)} within {timeout_s}s; see journalctl -u {what}"
    probe = listen_probe(address, port) if listening else tcp_probe(address, port)
    yield (f"i=0; while [ $i -lt {timeout_s} ]; do if {probe}; then exit 0; fi; sleep 1; "
           f"i=$((i+1)); done; echo {shlex.quote(message)} >&2; exit 1")


class UnreachableEndpoints(FactBase):
    """The endpoints that do not accept a TCP connection from this host within `timeout_s` (each is retried
    until then: a peer started in the same run may still be coming up). Empty when all answer."""

    default = list

    def command(self, endpoints: tuple[tuple[str, str, int], ...], timeout_s: int) -> str:
        checks = []
        for name, address, port in endpoints:
            checks.append(f"until {reached_or_probe(address, port)}; do [ $(date +%s) -lt $end ] || "
                          f"{{ echo down {shlex.quote(name)}; break; }}; sleep 1; done")
        return f"end=$(($(date +%s)+{int(timeout_s)})); " + "; ".join(checks) + "; true"

    def process(self, output: list[str]) -> list[str]:
        return [line.split(" ", 1)[1] for line in output if line.startswith("down ") and " " in line]


@operation()
def check_reachable(endpoints: tuple[TcpEndpoint, ...], timeout_s: int, what: str, fix: str):
    """Fail this host, naming each endpoint that does not accept a connection from it; nothing when all do."""
    facts = tuple((e.name, e.address, e.port) for e in endpoints)
    down = host.get_fact(UnreachableEndpoints, endpoints=facts, timeout_s=timeout_s) or []
    if not down:
        host.noop(f"{what}: all accept connections")
        return
    named = ", ".join(f"{e.name} ({e.endpoint})" for e in endpoints if e.name in down)
    message = f"r1fleet: {what}: {named} did not accept a TCP connection within {timeout_s}s (fix: {fix})"
    yield f"echo {shlex.quote(message)} >&2; exit 1"
