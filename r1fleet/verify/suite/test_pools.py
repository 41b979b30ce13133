"""Checks of pool members (`pools:` in the fleet file): the head serves over every worker's devices, and a
worker's RPC port admits the head alone (ggml's RPC protocol has no authentication).

The host checks in test_hosts.py run on pool members too, as their `roles` marker says: a worker's service,
user and listening socket are its rpc-server's; the API checks run on the head.
"""

from __future__ import annotations

import re
import socket

import pytest

from r1fleet.net import source_address_towards
from r1fleet.operations.tcp_health import reached_or_probe
from r1fleet.verify.target import Target, fail

CONNECT_TIMEOUT_S = 3


def controller_reaches(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=CONNECT_TIMEOUT_S):
            return True
    except OSError:  # refused, reset, or dropped until the timeout: not reached
        return False


@pytest.mark.roles("worker")
def test_rpc_port_admits_only_the_head(target: Target, targets: dict[str, Target]) -> None:
    pool = target.pool
    head = targets.get(pool.head)
    address, port = target.bind, pool.rpc_port
    if head is None or head.error or head.host is None:
        pytest.skip(f"the head {pool.head} is not verified in this run")
    if head.entry.address == source_address_towards(address):
        pytest.skip("this controller is the pool's head")
    assert not controller_reaches(address, port), (
        f"{target.name}: this controller reached the RPC port {address}:{port}; only the head "
        f"{pool.head} may (fix: r1fleet-rpc-firewall.service and its table inet r1fleet-rpc on {target.name})")
    probe = head.run(reached_or_probe(address, port))
    assert probe.rc == 0, (f"{target.name}: the head {pool.head} cannot reach the RPC port {address}:{port} "
                           f"(fix: systemctl status r1fleet-rpc-server on {target.name})")


@pytest.mark.roles("head")
def test_head_uses_every_worker(target: Target, targets: dict[str, Target]) -> None:
    """llama-server's load log names each worker's RPC device (`RPC0 (10.0.0.12:50052)`), first and in the pool's
    order (llama.cpp lists RPC devices first, in --rpc order)."""
    missing = [w for w in target.pool.workers if w not in targets]
    if missing:
        pytest.skip(f"the workers {', '.join(missing)} are not verified in this run")
    invocation = target.output(f"systemctl show -p InvocationID --value {target.unit}").strip()
    if not invocation:
        fail(target, f"{target.unit} is not running, so there is no load log to read")
    log = target.output(f"journalctl -o cat --no-pager _SYSTEMD_INVOCATION_ID={invocation}")
    used = re.findall(r"using device RPC\d+ \(([^)]+)\)", log)
    workers = [f"{targets[w].entry.address}:{target.pool.rpc_port}" for w in target.pool.workers]
    assert used[:len(workers)] == workers, (
        f"{target.name}: llama-server uses the devices {used or 'none'}, not first the workers {workers} "
        f"(fix: check the workers' rpc-servers and the head's --rpc)")
