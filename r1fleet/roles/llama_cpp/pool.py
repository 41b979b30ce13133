"""A pool head's llama-server, decided without a host: the single-host arguments (llama_server_args) plus
`--rpc` to the workers and the split over every device, a unit that waits for its workers, and the time the
workers' weights take to cross the link at load.

llama.cpp orders devices RPC first, in `--rpc` order, then the head's own (src/llama.cpp,
llama_prepare_model_devices); the pool plan's devices and its --tensor-split are in that order
(r1fleet/plan/pools.py), so `--rpc` lists the workers as the plan does (PoolPlan.workers).

Example:
    >>> head = pool_head(pool_plan, head_config, served.plan, {"box-b": box_b_config})
    >>> pool_server_args(head, head_config, "/models/70b.gguf", None)[6:10]
    ['--rpc', '192.168.1.32:50052', '--tensor-split', '41,40']
"""

from __future__ import annotations

import math
import re
import shlex
from dataclasses import dataclass
from typing import Any, Mapping

from r1fleet.fleet.config import HostConfig
from r1fleet.plan.memory import MIB
from r1fleet.records import HostPlan, PoolPlan
from r1fleet.fleet import plugins
from r1fleet.roles.llama_cpp.decide import llama_server_args, planned_gpus
from r1fleet.plan.pools import pool_refusal
from r1fleet.roles.rpc_worker.decide import RPC_UNIT, pool_address, version_check
from r1fleet.render.systemd_unit import service_ip_allow
from r1fleet.operations.tcp_health import TcpEndpoint, tcp_probe

# How long the head's unit waits for its workers before each start. A worker rebooting with the head takes
# about as long as the head itself; after that the unit fails, and systemd retries it (Restart=on-failure).
WORKER_WAIT_S = 120
# How long one device check (llama-server --rpc ENDPOINT --list-devices) may take: backends load, one RPC handshake.
DEVICE_CHECK_S = 30
# TCP and RPC framing on top of the weights' bytes when the head sends them to the workers at load (assumed).
LOAD_MARGIN = 1.25


@dataclass(frozen=True)
class PoolHead:
    """A validated pool head: its share of the pool (plan) and its workers in --rpc order."""

    pool: str
    host: str
    plan: HostPlan  # the head's own GPUs, the model, and the split over every device of the pool
    workers: tuple[TcpEndpoint, ...]
    wait_s: int = WORKER_WAIT_S
    load_s: int = 0  # added to the health gate: the workers' weights crossing the link
    lent: tuple[int, ...] = ()  # the devices each worker lends (in workers' order), as planned
    stand_ins: tuple[str, ...] = ()  # a lab head: its own GPUs' stand-in rpc-servers (one device each), after the workers
    versions: tuple[tuple[str, str], ...] = ()  # (source, version): the llama.cpp every member runs (pool_versions)

    @property
    def rpc_servers(self) -> list[str]:
        return [w.endpoint for w in self.workers]

    def unit_options(self, settings: HostConfig, binary: str) -> dict[str, Any]:
        """unit_context's pool arguments: wait for the workers, then check that each lends its planned devices,
        before each start; and let the unit reach them (IPAddressDeny=any covers its outgoing connections too)."""
        checks = len(self.workers) + len(self.stand_ins) + 1
        return {
            "exec_start_pre": wait_for_workers(self, binary),
            "timeout_start_s": self.wait_s + DEVICE_CHECK_S * checks + 30,
            "ip_allow": [*service_ip_allow(settings), *dict.fromkeys(w.address for w in self.workers)],
        }


def pool_head(pool: PoolPlan, head: HostConfig, plan: HostPlan, workers: Mapping[str, HostConfig],
              addresses: Mapping[str, str] | None = None) -> PoolHead:
    """Validate the head's side of a pooled pool serving `plan` (the head's part, r1fleet/lock/served.py); `workers`
    holds each worker's config (its pool address is its
    `address` unless `addresses` names another, as on the worker's side: rpc_worker)."""
    if not pool.pooled or head.name != pool.head:
        raise pool_refusal(pool.pool, head.name, "pools", f"{head.name} is not the head of a pooled pool "
                           f"(head: {pool.head}; pooled: {pool.pooled})", "deploy the plan of this fleet")
    missing = [w for w in pool.workers if w not in workers]
    if missing:
        raise pool_refusal(pool.pool, head.name, "pools", f"no settings for worker {', '.join(missing)}",
                           "deploy the head with the fleet that lists its workers")
    pool_address(pool.pool, head, "head", (addresses or {}).get(head.name))  # the address the workers admit
    endpoints = tuple(
        TcpEndpoint(name, pool_address(pool.pool, workers[name], "worker", (addresses or {}).get(name)), pool.rpc_port)
        for name in pool.workers
    )
    # A lab worker's rpc-server lends its CPU backend, one device, for its simulated GPUs (rpc_worker/decide.py)
    lent = tuple(1 if workers[name].profile is not None else sum(1 for d in pool.devices if d.host == name)
                 for name in pool.workers)
    return PoolHead(pool.pool, head.name, plan, endpoints, load_s=load_seconds(pool), lent=lent,
                    stand_ins=tuple(plugins.gpu_devices(plan, head)))


def load_seconds(pool: PoolPlan) -> int:
    """The time the workers' weights take to cross the pool's link when llama-server loads the model."""
    remote_mib = sum(d.weights_mib for d in pool.devices if d.rpc)
    return math.ceil(remote_mib * MIB * 8 * LOAD_MARGIN / (pool.network_gbps * 1e9))


def pool_server_args(head: PoolHead, head_config: HostConfig, model_path: str, key_path: str | None) -> list[str]:
    """llama-server's arguments on the head: the single-host ones for the head's plan, with --rpc to the workers
    and --tensor-split over all the pool's devices (PoolPlan.tensor_split_flag)."""
    return llama_server_args(head.plan, head_config, model_path, key_path, rpc_servers=head.rpc_servers)


def wait_for_workers(head: PoolHead, binary: str) -> list[str]:
    """ExecStartPre: the head's llama.cpp is still the pool's version (version_check); until each worker's RPC port
    accepts a connection, for head.wait_s in all; then that each gives llama-server the devices planned on it
    (device_checks). Any failing fails the start, and the journal names the host."""
    steps = [check] if (check := version_check(head.pool, head.host, "head", dict(head.versions))) else []
    steps.append(f"end=$(($(date +%s)+{head.wait_s}))")
    for w in head.workers:
        message = (f"r1fleet: pool {head.pool}: worker {w.name} ({w.endpoint}) did not accept a connection within "
                   f"{head.wait_s}s; check {RPC_UNIT} and its firewall on {w.name}")
        steps.append(f"until {tcp_probe(w.address, w.port)}; do [ $(date +%s) -lt $end ] || "
                     f"{{ echo {shlex.quote(message)} >&2; exit 1; }}; sleep 1; done")
    return ["/bin/bash", "-c", "; ".join([*steps, *device_checks(head, binary)])]


def device_checks(head: PoolHead, binary: str) -> list[str]:
    """Shell steps: each RPC server, asked alone, gives llama-server the devices planned on it, and the head lists
    its own planned GPUs; else the start fails, naming the worker (or the head) and what llama-server said.

    Why (llama.cpp at 0c1e570): a worker whose rpc-server speaks another RPC protocol major fails the handshake
    (ggml/src/ggml-rpc/ggml-rpc.cpp:356-360). This build then aborts (rpc_dispatcher::start, :535-551); builds of
    b10353's time (4df29be, the Ollama archive's) count no device for that worker (ggml-rpc.cpp:378-384, 1994-1999),
    register none (:2021-2023; a null registry is ignored, ggml/src/ggml-backend-reg.cpp:186-189) and go on, applying
    the first split values to the devices left: the wrong layers on each card, and an out-of-memory start.
    llama-server handles its arguments in order (common/arg.cpp:815-860),
    so `--rpc ENDPOINT --list-devices` registers that server (:1166-1185, 2680-2687) before printing every
    non-CPU device (:2746-2751), an RPC one as `RPCn: ENDPOINT (...)` (:1141-1163; the description is the endpoint,
    ggml-rpc.cpp:2352-2354)."""
    servers = [(endpoint_pattern(w.endpoint), n, f"worker {w.name} ({w.endpoint})", f"{RPC_UNIT} on {w.name}")
               for w, n in zip(head.workers, head.lent)]
    servers += [(endpoint_pattern(ep), 1, f"the head {head.host}'s own GPU stand-in ({ep})", "the lab's stand-in")
                for ep in head.stand_ins]
    steps = [
        _count_check(f"{shlex.quote(binary)} --rpc {shlex.quote(endpoint)} --list-devices", pattern, wanted,
                     f"r1fleet: pool {head.pool}: {what} gives llama-server fewer than the {wanted} device(s) planned "
                     f"on it (another llama.cpp RPC protocol version, or another server on its port); check {where} "
                     "and that every member runs one llama.cpp version. llama-server said: ")
        for (pattern, wanted, what, where), endpoint in zip(servers, [*head.rpc_servers, *head.stand_ins])
    ]
    own = 0 if head.stand_ins else planned_gpus(head.plan)
    if own:
        steps.append(_count_check(
            f"{shlex.quote(binary)} --list-devices", "^ *[A-Za-z]+[0-9]+: ", own,
            f"r1fleet: pool {head.pool}: the head {head.host}'s llama-server lists fewer than its {own} planned GPU(s); "
            "check the driver (nvidia-smi) and the GPU backend package. llama-server said: "))
    return steps


def endpoint_pattern(endpoint: str) -> str:
    """grep -E: a --list-devices line of an RPC device served at `endpoint`."""
    return f"^ *RPC[0-9]+: {re.escape(endpoint)} "


def _count_check(command: str, pattern: str, wanted: int, message: str) -> str:
    """A shell step: `command` (bounded by DEVICE_CHECK_S) prints at least `wanted` lines matching `pattern`, else
    `message` and the end of its output go to the journal, and the step exits 1."""
    q = shlex.quote
    return (f"out=$(timeout {DEVICE_CHECK_S} {command} 2>&1); n=$(printf '%s\\n' \"$out\" | grep -Ec {q(pattern)}); "
            f"[ \"$n\" -ge {wanted} ] || {{ echo {q(message)}\"$(printf '%s' \"$out\" | tail -n 3 | tr '\\n' ' ')\" >&2; "
            "exit 1; }")
