"""A pool's deploy decisions, made without a host: each member's share of the pool, the address, port and devices
of a worker's rpc-server, who may reach it, and where rpc-server (and the head's RPC backend) come from.

Security model. ggml's RPC protocol has no authentication and no encryption (llama.cpp tools/rpc/README.md: "Never
run the RPC server on an open network"; tools/rpc/rpc-server.cpp warns whenever it binds anything but 127.0.0.1).
Whoever reaches a worker's port can allocate, read and write tensors on its GPUs, the head's KV cache (its
conversations) included. So a worker's rpc-server binds one address, the worker's own on the pool's network (never
a wildcard, never loopback: the head must reach it), and its firewall admits one peer to the port, the head's single
address. Any setting that would open it wider is refused here (R1FleetError naming pool, host, field and fix).

Two filters hold the port, each on its own: nftables (`table inet r1fleet-rpc`) and systemd's IP filter on the
service's own sockets (IPAddressDeny=any, IPAddressAllow= the head alone, cgroup BPF: systemd.resource-control(5)).
A `flush ruleset` (Debian's nftables.service, a user's own rules) or a deleted table leaves the second in place, so
the port still admits the head alone, this host's users included, until the next deploy restores the table. The
unit also requires the firewall unit, so it never starts when the rules cannot be loaded.

A member's pool address is its fleet `address` (the one the controller reaches it by) unless the caller names
another; it must be an IP address: a DNS name can change, or resolve to several addresses.
"""

from __future__ import annotations

import ipaddress
import shlex
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from r1fleet.fleet.config import DEFAULT_PORTS, HostConfig
from r1fleet.records import CONFIG_DIR, Hardware, HostPlan, PoolPlan, is_debian_version
from r1fleet.plan.pool_settings import DEFAULT_RPC_PORT
from r1fleet.plan.pools import member_plan, pool_refusal
from r1fleet.artifacts.pins import Pins, Platform, load_pins
from r1fleet.artifacts.llama_cpp_install import LlamaInstall, llama_cpp_install, llama_cpp_packages, pool_source_problem
from r1fleet.roles.llama_cpp.decide import llama_environment

RPC_UNIT = "r1fleet-rpc-server.service"
RPC_FIREWALL_UNIT = "r1fleet-rpc-firewall.service"
RPC_TABLE = "r1fleet-rpc"  # its own nftables table: the serving API's `inet r1fleet` (exposure.py) stays as it is
RPC_RULES_FILE = f"{CONFIG_DIR}/rpc-nftables.conf"
USER = "ggml-rpc"
HOME = "/var/lib/ggml-rpc"
# Debian's multiarch triplets, as in /usr/libexec/<triplet>/llama/bin (docs/research/lab-notes.md, forky's llama.cpp-tools-extra)
MULTIARCH = {"amd64": "x86_64-linux-gnu", "arm64": "aarch64-linux-gnu"}
# ggml's device names: ggml/include/ggml-cuda.h GGML_CUDA_NAME ("CUDA", "ROCm" under HIP), ggml/include/ggml-vulkan.h
# GGML_VK_NAME; the backend numbers the devices it sees from 0.
DEVICE_PREFIX = {"nvidia": "CUDA", "amd": "ROCm", "intel": "Vulkan"}

# ---------------------------------------------------------------------------------------------
# Addresses


def pool_address(pool: str, config: HostConfig, role: str, override: str | None = None) -> str:
    """The member's one unicast address on the pool's network: `override`, else its fleet `address`."""
    value = override if override is not None else config.address
    field = "address" if override is None else f"pools.{pool}"
    where = f"the {role} {config.name}'s pool address {value!r}"
    try:
        network = ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise pool_refusal(pool, config.name, field, f"{where} is not an IP address; the worker's firewall admits one "
                           "address, and a name can change or resolve to several",
                           f"give {config.name} its IP address on the pool's network (e.g. address: 192.168.1.32)") from None
    ip = network.network_address
    why = None
    if network.num_addresses != 1:
        why = f"is a network of {network.num_addresses} addresses, not one host"
    elif ip.is_unspecified:
        why = "is a wildcard: it means every address"
    elif ip.is_loopback:
        why = "is loopback: the other members cannot reach it"
    elif ip.is_multicast:
        why = "is a multicast address"
    elif ip.version == 6 and ip.is_link_local:
        why = "is IPv6 link-local: it needs a scope id, which the firewall and systemd units cannot carry"
    if why:
        raise pool_refusal(pool, config.name, field, f"{where} {why}",
                           f"use {config.name}'s own unicast address on the pool's network")
    return str(ip)


def host_address_problem(worker: RpcWorker, addresses: Iterable[str]) -> str | None:
    """Why the worker cannot bind its pool address on the host (None when the host has it)."""
    found = {str(ipaddress.ip_address(a.split("%", 1)[0])) for a in addresses if _is_ip(a.split("%", 1)[0])}
    if worker.bind in found:
        return None
    return (f"pool {worker.pool}: host {worker.host}: field address: {worker.bind} is not an address of this host "
            f"(it has {', '.join(sorted(found)) or 'none'}); rpc-server binds the worker's own pool address only "
            f"(fix: set {worker.host}'s address to its IP on the pool's network)")


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------------
# A member's share of the pool


# ---------------------------------------------------------------------------------------------
# The worker


@dataclass(frozen=True)
class RpcWorker:
    """A validated pool worker: rpc-server on `bind`:`port`, reachable by `head` alone."""

    pool: str
    host: str
    bind: str  # the worker's own pool address
    head: str  # the head's address: the one peer the firewall admits
    port: int
    plan: HostPlan  # the worker's share (its GPUs)
    devices: tuple[str, ...]  # rpc-server -d (ggml device names); empty on a lab host (its CPU stands in)

    @property
    def family(self) -> str:
        """nftables' address family keyword for the pool's addresses."""
        return "ip6" if ":" in self.bind else "ip"


def rpc_worker(pool: PoolPlan, worker: HostConfig, head: HostConfig, hardware: Hardware, *,
               bind_address: str | None = None, head_address: str | None = None) -> RpcWorker:
    """Validate the worker's pool settings, refusing (DeployError: pool, host, field, fix) any that would open the
    RPC port wider than the head's one address or collide with the host's other ports."""
    name = worker.name
    if not pool.pooled:
        raise pool_refusal(pool.pool, name, "pools", "the pool is kept separate, so its members serve alone",
                           "deploy the members' own plans (see the pool's reasons in r1fleet plan)")
    if name not in pool.workers or head.name != pool.head:
        raise pool_refusal(pool.pool, name, "pools", f"{name} is not a worker of this pool with head {head.name} "
                           f"(workers: {', '.join(pool.workers)}; head: {pool.head})", "deploy the plan of this fleet")
    bind = pool_address(pool.pool, worker, "worker", bind_address)
    peer = pool_address(pool.pool, head, "head", head_address)
    if ipaddress.ip_address(bind).version != ipaddress.ip_address(peer).version or bind == peer:
        raise pool_refusal(pool.pool, name, "address", f"the worker's pool address {bind} and the head's {peer} must be "
                           "two addresses of one IP version on one network", "give both hosts their addresses there")
    _check_port(pool, worker)
    plan = member_plan(pool, name, hardware)
    return RpcWorker(pool.pool, name, bind, peer, pool.rpc_port, plan, _devices(pool, worker, hardware, plan))


def _check_port(pool: PoolPlan, worker: HostConfig) -> None:
    """rpc_port is the worker's alone: the serving API's port is opened to its allow-list by the exposure role
    (which would admit that list to the RPC port too), and the SSH port would be dropped for all but the head."""
    taken = {f"the {backend} serving port (port)": worker.port_for(backend) for backend in DEFAULT_PORTS}
    taken["the SSH port (ssh_port)"] = worker.ssh_port
    clash = [what for what, port in taken.items() if port == pool.rpc_port]
    if clash:
        raise pool_refusal(pool.pool, worker.name, f"pools.{pool.pool}.rpc_port",
                           f"rpc_port {pool.rpc_port} is also {' and '.join(clash)} on {worker.name}",
                           f"choose another rpc_port for the pool (default {DEFAULT_RPC_PORT})")


def _devices(pool: PoolPlan, worker: HostConfig, hardware: Hardware, plan: HostPlan) -> tuple[str, ...]:
    """rpc-server's -d: the planned GPUs by ggml name. Without -d rpc-server serves every non-CPU device it finds
    (tools/rpc/rpc-server.cpp, get_devices), a second backend's view of the same GPU included, which would not
    match the plan's split. NVIDIA GPUs are narrowed to the planned ones by CUDA_VISIBLE_DEVICES (rpc_environment),
    so they are CUDA0..n-1; other vendors' GPUs have no such selector here, so the worker must lend all of them."""
    if worker.profile is not None:  # a lab host: simulated GPUs, served by the CPU backend (one device)
        return ()
    vendor = plan.vendor or ""
    count = len(plan.gpu_indices)
    if vendor != "nvidia" and count != sum(1 for g in hardware.gpus if g.vendor == vendor):
        raise pool_refusal(pool.pool, worker.name, "pools", f"the plan lends {count} of {worker.name}'s {vendor} GPUs; "
                           "r1fleet selects a subset of GPUs by CUDA_VISIBLE_DEVICES, on NVIDIA only",
                           f"take {worker.name} out of the pool, or plan it to lend all its GPUs")
    return tuple(f"{DEVICE_PREFIX[vendor]}{i}" for i in range(count))


def rpc_server_args(worker: RpcWorker) -> list[str]:
    """ggml-rpc-server's arguments (tools/rpc/rpc-server.cpp: -H host, -p port, -d devices; no -c: its cache would
    keep the worker's weights on disk, which the plan does not budget for)."""
    args = ["-H", worker.bind, "-p", str(worker.port)]
    if worker.devices:
        args += ["-d", ",".join(worker.devices)]
    return args


def rpc_environment(worker: RpcWorker, install: LlamaInstall) -> dict[str, str]:
    """The unit's environment: the llama.cpp role's (the GPU selection, by UUID or else in PCI bus order), with the
    worker's own home."""
    return {**llama_environment(worker.plan, install), "HOME": HOME}


def firewall_context(worker: RpcWorker) -> dict[str, Any]:
    """Variables of templates/rpc_worker/nftables.conf.j2."""
    return {"table": RPC_TABLE, "pool": worker.pool, "head": worker.head, "bind": worker.bind, "port": worker.port,
            "family": worker.family}


# ---------------------------------------------------------------------------------------------
# Where rpc-server and the RPC backend come from


def pool_packages(pins: Pins | None = None) -> tuple[str, ...]:
    """Every package the sourcing decisions ask apt about."""
    return llama_cpp_packages(pins)


def _pool_source(base: LlamaInstall, platform: Platform, plan: HostPlan, settings: HostConfig, available: set[str],
                 pool: str, role: str, pins: Pins | None = None) -> None:
    """Refuse a member whose llama.cpp cannot take part in a pool: the decision `r1fleet plan` takes too
    (pool_source_problem), here with what the host's apt offers; and a source the llama.cpp role would not take
    from Debian after all (`base`)."""
    vendor = plan.vendor if plan.uses_gpu else None
    problem = pool_source_problem(plan.host, pool, role, platform, vendor, settings, available, pins=pins)
    if problem is None and base.method != "package":
        problem = (f"llama.cpp would come from {base.method} here, which has no rpc-server or RPC backend",
                   f"take {plan.host} out of pool {pool}")
    if problem:
        raise pool_refusal(pool, plan.host, "llama_cpp_install", *problem)


def rpc_worker_install(base: LlamaInstall, platform: Platform, plan: HostPlan, settings: HostConfig,
                       available: set[str], pool: str, pins: Pins | None = None) -> LlamaInstall:
    """rpc-server for a worker, from the source the llama.cpp role chose (`base`): Debian's packages only."""
    debian = (pins or load_pins()).llama_cpp.debian
    needs = (debian.rpc_server_package, debian.rpc_backend_package)
    _pool_source(base, platform, plan, settings, available, pool, "worker", pins)
    if platform.arch not in MULTIARCH:
        raise pool_refusal(pool, plan.host, "uname", f"no Debian multiarch path known for {platform.arch}",
                           "use an amd64 or arm64 worker")
    gpu_backend = tuple(p for p in base.packages if p != debian.server_package)  # a worker runs no llama-server
    return LlamaInstall(method="package", packages=(*gpu_backend, *needs),
                        binary=debian.rpc_server_binary.format(multiarch=MULTIARCH[platform.arch]))


def pool_head_install(base: LlamaInstall, platform: Platform, plan: HostPlan, settings: HostConfig, available: set[str],
                      pool: str, pins: Pins | None = None) -> LlamaInstall:
    """The head's llama-server with the RPC backend (what makes `--rpc` exist), from Debian's packages only."""
    debian = (pins or load_pins()).llama_cpp.debian
    needs = (debian.rpc_backend_package,)
    _pool_source(base, platform, plan, settings, available, pool, "head", pins)
    return LlamaInstall(method="package", packages=(*base.packages, *needs), binary=base.binary)


def pool_install(plan: HostPlan, settings: HostConfig, platform: Platform, available: set[str], pool: str,
                 role: str, pins: Pins | None = None) -> LlamaInstall:
    """A pool member's llama.cpp, from what its apt offers (`available`): rpc-server on a worker (`role` "worker"),
    llama-server with the RPC backend on the head; DeployError when the member cannot take part."""
    base = llama_cpp_install(platform, plan, settings, available, pins)
    if role == "worker":
        return rpc_worker_install(base, platform, plan, settings, available, pool, pins)
    return pool_head_install(base, platform, plan, settings, available, pool, pins)


# ---------------------------------------------------------------------------------------------
# One llama.cpp version across the pool

# A member's apt offer: {package: (installed version, candidate version)}, None where there is none (AptVersions).
Offer = Mapping[str, tuple[str | None, str | None]]


def version_packages(role: str, pins: Pins | None = None) -> dict[str, str]:
    """{source: the package whose version stands for that source on a member of this role}: Debian builds ggml (its
    RPC backend, the protocol) and llama.cpp (llama-server, rpc-server) from two sources (docs/research/lab-notes.md)."""
    debian = (pins or load_pins()).llama_cpp.debian
    return {"ggml": debian.rpc_backend_package,
            "llama.cpp": debian.server_package if role == "head" else debian.rpc_server_package}


def pool_versions(pool: PoolPlan, offers: Mapping[str, Offer], pins: Pins | None = None) -> dict[str, str]:
    """The one ggml and one llama.cpp version every member runs, as `{source: version}`.

    ggml's RPC protocol has a major version that changes with it (ggml/include/ggml-rpc.h:9, 7 at 0c1e570), and a
    head refuses a worker of another major (ggml/src/ggml-rpc/ggml-rpc.cpp:356-360),
    so members installed at different times must not each take what their apt offers. The version is the lock's
    (PoolPlan.llama_cpp_versions) when it has one, else the one every member has installed, else the one apt offers
    every member. DeployError naming each member's versions when there is none, or when a member cannot get the
    locked one."""
    members = [pool.head, *pool.workers]
    chosen: dict[str, str] = {}
    for source in ("ggml", "llama.cpp"):
        have = {m: _debian_only((offers.get(m) or {}).get(
            version_packages("head" if m == pool.head else "worker", pins)[source], (None, None))) for m in members}
        shown = "; ".join(f"{m} {_offer_text(*have[m])}" for m in members)
        locked = pool.llama_cpp_versions.get(source)
        if locked:
            short = [m for m in members if locked not in have[m]]
            if short:
                raise pool_refusal(pool.pool, ", ".join(short), "llama_cpp_versions",
                                   f"the lock runs the pool on {source} {locked}, which {', '.join(short)} cannot "
                                   f"install ({shown})",
                                   "relock the pool after updating every member's apt lists (`r1fleet lock`), so "
                                   "that it records the version they all have")
            chosen[source] = locked
            continue
        installed = {v for v, _ in have.values()}
        candidates = {c for _, c in have.values()}
        if len(installed) == 1 and None not in installed:
            chosen[source] = installed.pop()
        elif len(candidates) == 1 and None not in candidates:
            chosen[source] = candidates.pop()
        else:
            raise pool_refusal(pool.pool, ", ".join(members), "llama_cpp_install",
                               f"the members would run different {source} versions ({shown}); a head refuses or "
                               "drops a worker of another RPC protocol version",
                               "give every member the same Debian release and apt sources, run `apt-get update` on "
                               "each, and deploy the pool again")
    return chosen


def _debian_only(offer: tuple[str | None, str | None]) -> tuple[str | None, str | None]:
    """A host's (installed, candidate), each kept only when it is a Debian version (it goes into commands)."""
    return tuple(v if v is not None and is_debian_version(v) else None for v in offer)  # type: ignore[return-value]


def _offer_text(installed: str | None, candidate: str | None) -> str:
    if installed is None and candidate is None:
        return "has none and apt offers none"
    if installed == candidate or candidate is None:
        return f"has {installed}"
    return f"has {installed or 'none'}, apt offers {candidate}"


def pinned(packages: Iterable[str], versions: Mapping[str, str], pins: Pins | None = None) -> tuple[str, ...]:
    """apt's `name=version` for the packages whose versions the pool agrees on (version_packages); the others (a GPU
    backend: NVIDIA's comes from its own source package, ggml-cuda, docs/research/cuda-llama-server.md section 4.1)
    are left to apt's dependencies."""
    sources = {package: source for role in ("head", "worker") for source, package in version_packages(role, pins).items()}
    return tuple(f"{p}={versions[sources[p]]}" if p in sources and versions.get(sources[p]) else p for p in packages)


def version_check(pool: str, host: str, role: str, versions: Mapping[str, str], pins: Pins | None = None) -> str:
    """A shell step for ExecStartPre: the member's installed llama.cpp packages are still the pool's versions (an
    upgrade since the deploy, unattended-upgrades' say, would put it on another RPC protocol); else the start fails,
    naming the host, the package, its version and the pool's."""
    steps = []
    for source, package in version_packages(role, pins).items():
        want = versions.get(source)
        if not want:
            continue
        q = shlex.quote
        said = (q(f"r1fleet: pool {pool}: {host} has {package} ") + '"${have:-none}"'
                + q(f", the pool runs {source} {want} on every member (upgraded since the deploy?); deploy the pool "
                    "again, or relock it on the new version"))
        steps.append(f"have=$(dpkg-query -W -f='${{Version}}' {q(package)} 2>/dev/null); "
                     f"[ \"$have\" = {q(want)} ] || {{ echo {said} >&2; exit 1; }}")
    return "; ".join(steps)

